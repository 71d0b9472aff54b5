"""Running the host side as real processes: the server and simulated driver VMs.

The demo, the benchmarks and the integration tests all start the reference
host side this way: separate processes speaking JSON lines on stdout, read
with timeouts (never a bare sleep), stopped with SIGTERM and killed if they
do not go. :class:`Rig` adds our driver serving their devices, and takes the
whole of it down; :func:`stop_served_driver` stops a ``vhostpci run`` whose
device this process serves.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

from vhostpci_driver.apps.net import NetBackend, net_policy
from vhostpci_driver.device import VhostPciDevice
from vhostpci_driver.service import Service


class ProcessError(Exception):
    """A host-side process failed or did not answer in time; carries its stderr tail."""


class JsonProcess:
    """A child process that reports JSON lines on stdout and takes commands on stdin."""

    def __init__(self, argv: list[str], name: str) -> None:
        self.name = name
        self.stderr_path = (
            Path(os.environ.get("TMPDIR", "/tmp"))
            / f"vhostpci-{name}-{os.getpid()}-{time.monotonic_ns()}.log"
        )
        self._stderr = open(self.stderr_path, "w+b")  # noqa: SIM115  (closed in stop())
        # A process group of its own: the terminal's Ctrl-C reaches only whoever started it,
        # which then stops its children in order (its own devices first, the server last).
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            process_group=0,
        )
        self.pending: list[dict[str, Any]] = []
        #: events that mean the wanted one will never come ({"ready": "setup-failed"}): fail at once
        self.instead_of: dict[str, str] = {}
        self._buf = b""  # raw bytes read from stdout: select() must not be fooled by a Python buffer

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _stdout(self) -> IO[str]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def stderr_tail(self, n: int = 20) -> str:
        self._stderr.flush()
        lines = self.stderr_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def read_event(self, want: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """The next event (named ``want``, others are kept in :attr:`pending`)."""
        for i, ev in enumerate(self.pending):
            if want is None or ev.get("event") == want:
                return self.pending.pop(i)
            if want in self.instead_of and ev.get("event") == self.instead_of[want]:
                raise ProcessError(f"{self.name}: {ev['event']} instead of {want}: {ev}")
        deadline = time.monotonic() + timeout
        fd = self._stdout().fileno()
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                ev = cast(dict[str, Any], json.loads(line))
                if want is None or ev.get("event") == want:
                    return ev
                # (a line with no event, such as a --json error, matched a want with no "instead")
                if want in self.instead_of and ev.get("event") == self.instead_of[want]:
                    raise ProcessError(f"{self.name}: {ev['event']} instead of {want}: {ev}")
                self.pending.append(ev)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcessError(
                    f"{self.name}: no {want or 'event'} within {timeout}s\n{self.stderr_tail()}"
                )
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                code = self.proc.wait(5)
                raise ProcessError(
                    f"{self.name} exited ({code}) before {want or 'an event'}\n{self.stderr_tail()}"
                )
            self._buf += chunk

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal, wait, kill if it lingers; returns the exit status."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._stderr.close()
        try:
            self.stderr_path.unlink()
        except FileNotFoundError:
            pass
        return self.proc.returncode


#: How long a starting process may take to say it is up ("listening", "device", "ready"): a bound
#: for a hang, not a wait. 10 s was seen to pass on a machine at load 6 (the VM tier alongside),
#: where a Python process's start alone took seconds; a process that exits is seen at once anyway.
START_TIMEOUT = 60.0


def host_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vhostpci_host", *args]


class HostServer(JsonProcess):
    """``vhostpci-host serve`` in a directory of its own."""

    def __init__(
        self,
        directory: Path,
        *,
        ping_interval: float = 1.0,
        ping_misses: int = 3,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.socket = directory / "vhost-pci.sock"
        super().__init__(
            host_command(
                "serve",
                "--socket",
                str(self.socket),
                "--devices-dir",
                str(directory / "devices"),
                "--json",
                "--ping-interval",
                str(ping_interval),
                "--ping-misses",
                str(ping_misses),
                *extra,
            ),
            "server",
        )
        self.devices: dict[str, str] = {}
        try:
            self.read_event("listening", START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def device_socket(self, vm_uuid: uuid.UUID, timeout: float = START_TIMEOUT) -> str:
        """The vfio-user socket of ``vm_uuid``'s device, once the server made it."""
        while str(vm_uuid) not in self.devices:
            ev = self.read_event("device", timeout)
            self.devices[ev["uuid"]] = ev["socket"]
        return self.devices[str(vm_uuid)]


class DriverVmProcess(JsonProcess):
    """``vhostpci-host frontend``: a simulated driver VM with net frontends."""

    def __init__(
        self,
        server: Path,
        macs: list[str],
        *,
        vm_uuid: uuid.UUID | None = None,
        memory: str = "128M",
        queue_size: int = 256,
        features: int | None = None,
    ) -> None:
        self.uuid = vm_uuid or uuid.uuid4()
        self.macs = macs
        args = [
            "frontend",
            "--server",
            str(server),
            "--uuid",
            str(self.uuid),
            "--memory",
            memory,
            "--queue-size",
            str(queue_size),
        ]
        for m in macs:
            args += ["--net", m]
        if features is not None:
            args += ["--features", hex(features)]
        super().__init__(host_command(*args), f"driver-vm-{str(self.uuid)[:8]}")
        self.instead_of["ready"] = "setup-failed"

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        self.send("stats")
        return self.read_event("stats", timeout)


@dataclass
class Rig:
    """A running server, driver VMs, and our driver serving their devices with the net switch.

    The integration tests, the demo and the benchmarks build the whole system this way,
    and :meth:`close` takes it down in the one right order.
    """

    server: HostServer
    vms: list[DriverVmProcess] = field(default_factory=list)
    devices: list[VhostPciDevice] = field(default_factory=list)
    backend: NetBackend = field(default_factory=lambda: NetBackend("switch"))
    service: Service | None = None
    thread: threading.Thread | None = None
    #: each driver VM's "ready" line (what it negotiated), by UUID
    ready: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)

    def add_vm(self, *macs: str, **kw: object) -> DriverVmProcess:
        vm = DriverVmProcess(self.server.socket, list(macs), **kw)  # type: ignore[arg-type]
        self.vms.append(vm)
        return vm

    def serve(self, ready_timeout: float = START_TIMEOUT) -> None:
        """Open every driver VM's device (vfio-user) and start serving them in a thread."""
        for vm in self.vms:
            path = self.server.device_socket(vm.uuid, ready_timeout)
            self.devices.append(VhostPciDevice(f"vfio-user:{path}", policies={1: net_policy}))
        self.service = Service(self.devices, self.backend)
        self.start_service()
        for vm in self.vms:
            self.ready[vm.uuid] = vm.read_event("ready", timeout=ready_timeout)

    def start_service(self) -> None:
        """Run the service in a thread (again, after :meth:`stop_service`)."""
        assert self.service is not None and self.thread is None
        self.service.stop.clear()
        self.thread = threading.Thread(target=self.service.run, args=(0.05,), daemon=True)
        self.thread.start()

    def stop_service(self) -> None:
        if self.service is not None and self.thread is not None:
            self.service.stop.set()
            self.thread.join(10)
            if self.thread.is_alive():
                raise ProcessError("the service thread did not stop within 10 s")
            self.thread = None

    def close(self) -> None:
        """Stop everything the rig started: our service and devices first, then the VMs, then the server."""
        self.stop_service()
        for dev in self.devices:
            dev.close()
        for vm in self.vms:
            vm.stop()
        self.server.stop()


class _Loop(Protocol):
    def run_once(self, timeout: float | None = 0) -> None: ...
    def close(self) -> None: ...


def stop_served_driver(proc: subprocess.Popen[bytes], server: _Loop) -> None:
    """SIGTERM a driver whose device ``server`` serves here, serving it until it exits, then close.

    The driver resets the device on its way out: that needs the device answering,
    so the loop keeps running until the process is gone.
    """
    proc.terminate()
    while proc.poll() is None:
        server.run_once(0.05)
    server.close()
