"""Running the host side as real processes: the server and simulated driver VMs.

The demo, the benchmarks and the integration tests all start the reference
host side this way: separate processes speaking JSON lines on stdout, read
with timeouts (never a bare sleep), stopped with SIGTERM and killed if they
do not go.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any, cast


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
            if want is not None and ev.get("event") == self.instead_of.get(want):
                raise ProcessError(f"{self.name}: {ev['event']} instead of {want}: {ev}")
        deadline = time.monotonic() + timeout
        fd = self._stdout().fileno()
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                ev = cast(dict[str, Any], json.loads(line))
                if want is None or ev.get("event") == want:
                    return ev
                if want is not None and ev.get("event") == self.instead_of.get(want):
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
            self.read_event("listening")
        except BaseException:
            self.stop()
            raise

    def device_socket(self, vm_uuid: uuid.UUID, timeout: float = 10.0) -> str:
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
        super().__init__(host_command(*args), f"driver-vm-{str(self.uuid)[:8]}")
        self.instead_of["ready"] = "setup-failed"

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        self.send("stats")
        return self.read_event("stats", timeout)
