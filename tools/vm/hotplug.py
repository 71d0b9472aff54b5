"""Hot-plug for the VM tier: the guest asks, the host plugs a second vhost-pci device through QMP.

A test inside the guest cannot reach QEMU's monitor, so the runner gives the
guest a virtio-serial port (``/dev/virtio-ports/vhostpci.ctl``) wired to a
socket here. The guest writes one command a line, and gets one answer a line:

    plug      start a second driver VM on the host and ``device_add`` its device
              (vfio-user-pci, on the hot-plug root port); answers ``ok PCI-SLOT-ID``
    stats     answers ``ok {json}``: the second driver VM's counters
    send N    the second driver VM's second frontend sends N frames to its first (through the
              switch, which never sends a frame back to its source port); answers ``ok``
    unplug    ``device_del`` it and wait for QEMU's DEVICE_DELETED, which comes only
              once the guest let go of the function; answers ``ok SECONDS``. QEMU 11.1.3
              aborts on it for any vfio-user-pci function (a QEMU bug, docs/host.md): the
              tier's tests remove the function from inside the guest instead

Errors answer ``error MESSAGE``. Everything waits on sockets with timeouts.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from vhostpci_host.harness import DriverVmProcess, HostServer

ROOT_PORT = "vphp0"  # the pcie-root-port the runner adds for hot-plug
PLUGGED_ID = "vhostpci1"
MAC2 = "52:54:00:00:00:bb"
MAC2B = "52:54:00:00:00:bc"  # its second frontend: the switch's other port
UUID2 = uuid.UUID("7e57ab1e-0000-4000-8000-00000000a002")


def qemu_options(qemu_dir: str) -> str:
    """The QEMU options this needs (paths as QEMU sees them): QMP, the control port, a root port."""
    return (
        f"-qmp unix:{qemu_dir}/qmp.sock,server=on,wait=off "
        f"-chardev socket,id=vpctl,path={qemu_dir}/ctl.sock,server=on,wait=off "
        "-device virtio-serial-pci,id=vpserial -device virtserialport,chardev=vpctl,name=vhostpci.ctl "
        # The firmware sizes a root port's windows at boot: reserve room for a hot-plugged device's
        # 64-bit BAR 2 (the remote window: twice the driver VM's 64 MiB), or the guest leaves it
        # unassigned ("the remote window BAR is not implemented", seen in the VM tier).
        f"-device pcie-root-port,id={ROOT_PORT},chassis=8,slot=8,pref64-reserve=512M"
    )


def _connect(path: Path, deadline: float) -> socket.socket:
    """Connect to a socket QEMU creates as it starts (bounded: QEMU may still be starting)."""
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"QEMU never opened {path}") from None
            time.sleep(0.2)


class Qmp:
    """A minimal QMP client: commands in order, events kept for whoever waits on them."""

    def __init__(self, path: Path, deadline: float) -> None:
        self.sock = _connect(path, deadline)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self._read(10)  # the greeting
        self.execute("qmp_capabilities")

    def _read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError("QMP did not answer")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, timeout: float = 30, **arguments: Any) -> Any:
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        while True:
            msg = self._read(timeout)
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise RuntimeError(f"{command}: {msg['error'].get('desc')}")
            elif "return" in msg:
                return msg["return"]

    def wait_event(self, name: str, timeout: float, **data: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev["event"] == name and all(ev.get("data", {}).get(k) == v for k, v in data.items()):
                    self.events.remove(ev)
                    return ev
            msg = self._read(max(0.0, deadline - time.monotonic()))
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self.sock.close()


class HotplugController:
    """Serves the guest's control port until the guest closes it (or the runner stops)."""

    def __init__(self, server: HostServer, run_dir: Path, guest_path: str) -> None:
        self.server = server
        self.run_dir = run_dir
        self.guest_path = guest_path  # how QEMU (chrooted) names the run directory
        self.vm2: DriverVmProcess | None = None
        self.qmp: Qmp | None = None
        self.log: list[str] = []

    def serve(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            ctl = _connect(self.run_dir / "ctl.sock", deadline)
            self.qmp = Qmp(self.run_dir / "qmp.sock", deadline)
        except (TimeoutError, OSError, RuntimeError) as e:
            self.log.append(f"no control channel: {e}")
            return
        buf = b""
        with ctl:
            while time.monotonic() < deadline:
                if not select.select([ctl], [], [], 1.0)[0]:
                    continue
                chunk = ctl.recv(4096)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    answer = self._command(line.decode().strip())
                    self.log.append(f"{line.decode().strip()} -> {answer}")
                    ctl.sendall(answer.encode() + b"\n")

    def _command(self, line: str) -> str:
        words = line.split()
        if not words:
            return "error empty command"
        assert self.qmp is not None
        try:
            if words[0] == "plug":
                if self.vm2 is None:
                    self.vm2 = DriverVmProcess(
                        self.server.socket, [MAC2, MAC2B], vm_uuid=UUID2, memory="128M"
                    )  # two frontends of 2 x 256 64 KiB buffers each
                host_sock = self.server.device_socket(UUID2)
                guest_sock = self.guest_path + "/" + os.path.relpath(host_sock, self.run_dir)
                self.qmp.execute(
                    "device_add",
                    driver="vfio-user-pci",
                    id=PLUGGED_ID,
                    bus=ROOT_PORT,
                    socket={"type": "unix", "path": guest_sock},
                )
                return f"ok {PLUGGED_ID}"
            if words[0] == "stats" and self.vm2 is not None:
                return "ok " + json.dumps(self.vm2.stats(timeout=10))
            if words[0] == "send" and self.vm2 is not None:
                self.vm2.send(f"send {MAC2} {int(words[1])} 256 1")
                return "ok"
            if words[0] == "unplug":
                t0 = time.monotonic()
                self.qmp.execute("device_del", id=PLUGGED_ID)
                self.qmp.wait_event("DEVICE_DELETED", 120, device=PLUGGED_ID)
                return f"ok {time.monotonic() - t0:.1f}"
            return f"error unknown or out-of-order command {line!r}"
        except Exception as e:  # the guest gets the reason; the runner keeps going
            return f"error {type(e).__name__}: {e}"

    def close(self) -> None:
        if self.vm2 is not None:
            self.vm2.stop()
        if self.qmp is not None:
            self.qmp.close()
