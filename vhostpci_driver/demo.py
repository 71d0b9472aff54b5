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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from vhostpci_driver.apps.net import NetBackend


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
    simulator_cpu: float = 0.0  # CPU seconds the simulated driver VMs used, all of them, during the run
    switch_cpu: float = 0.0  # CPU seconds of the serving thread (the net backend and the devices)

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


#: a frontend's counters before it sent anything (the baseline of a run with no warm-up)
_ZERO: dict[str, Any] = {"sent": 0, "received": 0, "corrupt": 0, "duplicates": 0, "received_bytes": 0}


def mac(i: int) -> str:
    return f"52:54:00:00:01:{i:02x}"


def run_demo(
    frontends: int,
    packets: int,
    size: str = "mixed",
    *,
    timeout: float = 300.0,
    progress: Callable[[int, int], None] | None = None,
    pktgen: bool = False,
    queue_size: int = 256,
    memory: str = "64M",
    warmup: int = 0,
) -> DemoResult:
    """Run the demo; ``progress(received, total)`` is called as frames arrive.

    ``queue_size`` and ``memory`` are each simulated driver VM's: its rings' size and
    its RAM (which holds a full-frame buffer per ring entry, both rings).

    ``warmup``: frames each frontend sends (and each peer receives) before the clock
    and the CPU counters start, none of them in the result. A benchmark's steady state:
    the first lap round a ring is each TX buffer's whole frame written and its pages
    faulted in (a 1024-entry ring of 64 KiB frames is 64 MiB per driver VM, about 50 ms
    of its CPU, a seventh of a 40,000-frame run's), and the first touch of each page
    by the switch; a running VM's RAM is populated and its pktgen frames are built.
    """
    from vhostpci_host.harness import HostServer, Rig  # noqa: PLC0415  (host side, on demand)

    if frontends < 1:
        raise ValueError("the demo needs at least one frontend")
    # Every frame asked for is sent: the first (packets % frontends) frontends send one more.
    shares = [packets // frontends + (i < packets % frontends) for i in range(frontends)]
    total = sum(shares)
    # $TMPDIR if set (the logs of the host side go there too), else /tmp: socket paths are bounded
    workdir = Path(tempfile.mkdtemp(prefix="vhostpci-demo-", dir=os.environ.get("TMPDIR") or "/tmp"))
    server: HostServer | None = None
    rig: Rig | None = None
    try:
        # One uid connects every driver VM: the server's per-uid limit must admit them all.
        server = HostServer(workdir, extra=("--limit", f"max_connections_per_uid={max(8, frontends)}"))
        rig = Rig(server, backend=NetBackend("switch" if frontends > 1 else "loopback"))
        for i in range(frontends):  # one by one: a signal in between still stops those started
            rig.add_vm(mac(i), memory=memory, queue_size=queue_size)
        rig.serve(ready_timeout=30)
        vms, devices = rig.vms, rig.devices
        serving = rig.thread.native_id if rig.thread is not None else None
        verb = "pktgen" if pktgen else "send"  # pktgen: recycled pre-built frames (simulator.py)

        def counted(stats: list[dict[str, Any]]) -> int:  # every frame that arrived, good or not
            return sum(s["received"] + s["corrupt"] + s["duplicates"] for s in stats)

        before = [_ZERO] * frontends  # each frontend's counters when the clock starts
        if warmup > 0:
            for i, vm in enumerate(vms):
                vm.send(f"{verb} {mac((i + 1) % frontends)} {warmup} {size}")
            deadline = time.monotonic() + timeout
            while True:
                before = [vm.stats()["frontends"][0] for vm in vms]
                if counted(before) >= warmup * frontends:
                    break
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"demo: the warm-up's {warmup * frontends} frames did not all arrive")
                time.sleep(0.01)
        cpu0 = sum(vm.stats()["cpu_s"] for vm in vms), _thread_cpu(serving)
        start = time.monotonic()
        for i, vm in enumerate(vms):
            vm.send(f"{verb} {mac((i + 1) % frontends)} {shares[i]} {size}")
        received = 0
        deadline = start + timeout
        while received < total and time.monotonic() < deadline:
            stats = [vm.stats()["frontends"][0] for vm in vms]
            received = counted(stats) - counted(before)
            if progress is not None:
                progress(received, total)
            if received < total:
                time.sleep(0.05)
        elapsed = time.monotonic() - start
        switch_cpu = _thread_cpu(serving) - cpu0[1]
        full = [vm.stats() for vm in vms]
        if received >= total:
            # To the last frame, not to the poll that saw it (up to 50 ms later): each simulator
            # says when it last received (CLOCK_MONOTONIC, the same clock in every process here).
            last = [f["last_rx_s"] for f in full if f.get("last_rx_s") is not None]
            if last and start < max(last) <= start + elapsed:
                elapsed = max(last) - start
        stats = [f["frontends"][0] for f in full]
        dumps = [cast(dict[str, int], d.dump()["stats"]) for d in devices]

        def run_total(key: str) -> int:  # the timed run's, the warm-up's taken off
            return sum(s[key] - b[key] for s, b in zip(stats, before, strict=True))

        return DemoResult(
            frontends=frontends,
            requests=sum(d["received"] for d in dumps),
            acks_done=sum(d["acked_done"] for d in dumps),
            acks_fail=sum(d["acked_fail"] for d in dumps),
            sent=run_total("sent"),
            received=run_total("received"),
            corrupt=run_total("corrupt"),
            duplicates=run_total("duplicates"),
            octets=run_total("received_bytes"),
            elapsed=elapsed,
            simulator_cpu=sum(f["cpu_s"] for f in full) - cpu0[0],
            switch_cpu=switch_cpu,
        )
    finally:
        if rig is not None:
            rig.close()
        elif server is not None:  # a signal between the two: the server is stopped all the same
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _thread_cpu(tid: int | None) -> float:
    """CPU seconds (user + system) of one thread of this process, from /proc (0 when unknown)."""
    if tid is None:
        return 0.0
    try:
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (proc(5))
