"""``vhostpci demo``: the whole system on any machine, no device, no VM.

Starts the reference host side (the vhost-pci server and N simulated driver
VMs, each with a virtio-net frontend) as real processes, opens every driver
VM's vhost-pci device through the vfio-user backend, switches frames between
the frontends with the net backend, and reports what happened: requests and
acks, frames sent, received, lost and corrupted (checked end to end by the
simulators), throughput.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from vhostpci_driver.apps.net import NetBackend, net_policy
from vhostpci_driver.device import VhostPciDevice
from vhostpci_driver.service import Service


@dataclass
class DemoResult:
    frontends: int
    requests: int
    acks_done: int
    acks_fail: int
    sent: int
    received: int
    corrupt: int
    duplicates: int
    octets: int
    elapsed: float

    def as_dict(self) -> dict[str, Any]:
        lost = self.sent - self.received
        return {
            "frontends": self.frontends,
            "requests": self.requests,
            "acks": {"done": self.acks_done, "fail": self.acks_fail},
            "packets": {"sent": self.sent, "received": self.received, "lost": lost, "corrupt": self.corrupt,
                        "duplicates": self.duplicates},
            "throughput": {"pps": round(self.received / self.elapsed, 1) if self.elapsed else 0.0,
                           "gbps": round(self.octets * 8 / self.elapsed / 1e9, 3) if self.elapsed else 0.0},
            "elapsed_s": round(self.elapsed, 3),
        }  # fmt: skip


def mac(i: int) -> str:
    return f"52:54:00:00:01:{i:02x}"


def run_demo(
    frontends: int,
    packets: int,
    size: str = "mixed",
    *,
    timeout: float = 300.0,
    progress: Callable[[int, int], None] | None = None,
) -> DemoResult:
    """Run the demo; ``progress(received, total)`` is called as frames arrive."""
    from vhostpci_host.harness import DriverVmProcess, HostServer  # noqa: PLC0415  (host side, on demand)

    if frontends < 1:
        raise ValueError("the demo needs at least one frontend")
    # Every frame asked for is sent: the first (packets % frontends) frontends send one more.
    shares = [packets // frontends + (i < packets % frontends) for i in range(frontends)]
    total = sum(shares)
    # $TMPDIR if set (the logs of the host side go there too), else /tmp: socket paths are bounded
    workdir = Path(tempfile.mkdtemp(prefix="vhostpci-demo-", dir=os.environ.get("TMPDIR") or "/tmp"))
    server: HostServer | None = None
    vms: list[DriverVmProcess] = []
    devices: list[VhostPciDevice] = []
    service: Service | None = None
    thread: threading.Thread | None = None
    try:
        # One uid connects every driver VM: the server's per-uid limit must admit them all.
        server = HostServer(workdir, extra=("--limit", f"max_connections_per_uid={max(8, frontends)}"))
        for i in range(frontends):  # one by one: a signal in between still stops those started
            vms.append(DriverVmProcess(server.socket, [mac(i)], memory="64M"))
        for vm in vms:
            devices.append(
                VhostPciDevice(f"vfio-user:{server.device_socket(vm.uuid)}", policies={1: net_policy})
            )
        service = Service(devices, NetBackend("switch" if frontends > 1 else "loopback"))
        thread = threading.Thread(target=service.run, args=(0.05,), daemon=True)
        thread.start()
        for vm in vms:
            vm.read_event("ready", timeout=30)
        start = time.monotonic()
        for i, vm in enumerate(vms):
            vm.send(f"send {mac((i + 1) % frontends)} {shares[i]} {size}")
        received = 0
        deadline = start + timeout
        while received < total and time.monotonic() < deadline:
            stats = [vm.stats()["frontends"][0] for vm in vms]
            received = sum(s["received"] + s["corrupt"] + s["duplicates"] for s in stats)
            if progress is not None:
                progress(received, total)
            if received < total:
                time.sleep(0.05)
        elapsed = time.monotonic() - start
        stats = [vm.stats()["frontends"][0] for vm in vms]
        dumps = [cast(dict[str, int], d.dump()["stats"]) for d in devices]
        return DemoResult(
            frontends=frontends,
            requests=sum(d["received"] for d in dumps),
            acks_done=sum(d["acked_done"] for d in dumps),
            acks_fail=sum(d["acked_fail"] for d in dumps),
            sent=sum(s["sent"] for s in stats),
            received=sum(s["received"] for s in stats),
            corrupt=sum(s["corrupt"] for s in stats),
            duplicates=sum(s["duplicates"] for s in stats),
            octets=sum(s["received_bytes"] for s in stats),
            elapsed=elapsed,
        )
    finally:
        if service is not None and thread is not None:
            service.stop.set()
            thread.join(10)
        for dev in devices:
            dev.close()
        for vm in vms:
            vm.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
