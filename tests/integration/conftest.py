"""Fixtures that start the host side as real processes and serve its devices in this process."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vhostpci_driver.apps.net import NetBackend, net_policy
from vhostpci_driver.device import VhostPciDevice
from vhostpci_driver.service import Service
from vhostpci_host.harness import DriverVmProcess, HostServer


@dataclass
class Rig:
    """A running server, driver VMs, and our driver serving their devices with the net switch."""

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

    def serve(self) -> None:
        """Open every driver VM's device (vfio-user) and start serving them in a thread."""
        for vm in self.vms:
            path = self.server.device_socket(vm.uuid)
            self.devices.append(VhostPciDevice(f"vfio-user:{path}", policies={1: net_policy}))
        self.service = Service(self.devices, self.backend)
        self.start_service()
        for vm in self.vms:
            self.ready[vm.uuid] = vm.read_event("ready", timeout=20)

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
            assert not self.thread.is_alive()
            self.thread = None

    def close(self) -> None:
        """Stop everything the rig started: our service and devices first, then the VMs, then the server."""
        self.stop_service()
        for dev in self.devices:
            dev.close()
        for vm in self.vms:
            vm.stop()
        self.server.stop()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: UNIX socket paths are limited to 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="vp-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def rig(short_dir: Path) -> Iterator[Rig]:
    server = HostServer(short_dir, ping_interval=0.2, ping_misses=3)
    r = Rig(server)
    try:
        yield r
    finally:
        r.close()


def wait_for(cond: object, timeout: float, what: str, step: float = 0.05) -> None:
    """Poll ``cond()`` (bounded) for state that has no fd to wait on."""
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


MAC_A, MAC_B, MAC_C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"
UUIDS = [uuid.UUID(int=0xA), uuid.UUID(int=0xB), uuid.UUID(int=0xC)]
