"""``vhostpci bench``: figures, each beside a baseline measured in the same run.

Benchmarks are not tests: nothing here fails a build. Each row reports the
median (and p99 where latency matters) of several repetitions, interleaved
with its baseline, the ratio, the target and whether it is met. A figure that
sits at the simulated driver VM's own ceiling is marked ``limited_by``.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vhostpci_driver.addr import WindowOffset, Xgpa
from vhostpci_driver.memory import BufferWindow, Region, RegionTable
from vhostpci_driver.virtqueue.device import DeviceQueue
from vhostpci_driver.virtqueue.driver import DriverQueue
from vhostpci_driver.wire.ctrl import FeatureBits


@dataclass
class Row:
    name: str
    figure: float
    unit: str
    baseline_name: str | None
    baseline: float | None
    ratio: float | None
    target: str
    met: bool | None
    limited_by: str | None = None
    spread: float | None = None


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


# -- ring batch (in process) ------------------------------------------------------------------


def ring_batch(reps: int) -> Row:
    base, size = 0x1000_0000, 256
    table = RegionTable(BufferWindow(bytearray(1 << 20)))
    table.add([Region(Xgpa(base), 1 << 20, WindowOffset(0))])
    d, a, u, _ = DriverQueue.layout(size)
    drv = DriverQueue(table, size, base + d, base + a, base + u)
    dev = DeviceQueue(table, size, base + d, base + a, base + u)
    times = []
    for _ in range(reps):
        for i in range(32):
            drv.add((), ((base + 0x10000 + 2048 * i, 2048),), i)
        drv.publish()
        t0 = time.perf_counter()
        chains = dev.pop_batch(32)
        dev.push_batch([(c.head, 64) for c in chains])
        times.append((time.perf_counter() - t0) * 1e6)
        drv.harvest()
    med = statistics.median(times)
    return Row(
        "ring-batch",
        round(med, 2),
        "us/batch of 32",
        None,
        None,
        None,
        "<= 15 us",
        med <= 15,
        spread=round(_pct(times, 90) - _pct(times, 10), 2),
    )


# -- baselines between two processes ----------------------------------------------------------------


def eventfd_pingpong(n: int) -> list[float]:
    """Round trips of one eventfd write/read pair between two processes, in microseconds."""
    a, b = os.eventfd(0), os.eventfd(0)
    pid = os.fork()
    if pid == 0:  # the child answers every ping
        try:
            for _ in range(n):
                os.eventfd_read(a)
                os.eventfd_write(b, 1)
        finally:
            os._exit(0)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        os.eventfd_write(a, 1)
        os.eventfd_read(b)
        times.append((time.perf_counter() - t0) * 1e6)
    os.waitpid(pid, 0)
    os.close(a)
    os.close(b)
    return times


def socketpair_rate(size: int, count: int) -> float:
    """Frames/s of ``size`` bytes from one process to another over an AF_UNIX socketpair."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    payload = os.urandom(min(size, 65536))
    pid = os.fork()
    if pid == 0:
        try:
            left.close()
            for _ in range(count):
                right.recv(65536)
        finally:
            os._exit(0)
    right.close()
    t0 = time.perf_counter()
    for _ in range(count):
        left.send(payload)
    os.waitpid(pid, 0)
    el = time.perf_counter() - t0
    left.close()
    return count / el


def memcpy_rate(size: int, count: int) -> float:
    src, dst = bytearray(os.urandom(size)), bytearray(size)
    view = memoryview(dst)
    t0 = time.perf_counter()
    for _ in range(count):
        view[:] = src
    return count / (time.perf_counter() - t0)


# -- control plane: a device model in this process, the driver as `vhostpci run` ------------------------


class _ControlRig:
    def __init__(self, workdir: Path) -> None:
        from vhostpci_host.device_model import VhostPciDeviceModel  # noqa: PLC0415
        from vhostpci_host.vfio_user_server import VfioUserServer  # noqa: PLC0415

        self.model = VhostPciDeviceModel(window_size=1 << 24)
        self.ram = os.memfd_create("bench")
        os.ftruncate(self.ram, 1 << 16)
        self.model.map_region(0, 1 << 16, self.ram, 0)
        self.server = VfioUserServer(str(workdir / "dev.sock"), self.model)
        self.acked: set[int] = set()
        self.model.on_ack = lambda rid, ack: self.acked.add(rid)
        env = {**os.environ, "VHOSTPCI_RUN_DIR": str(workdir / "run")}
        argv = [
            sys.executable,
            "-m",
            "vhostpci_driver",
            "run",
            f"vfio-user:{workdir}/dev.sock",
            "--app",
            "none",
        ]
        self.proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while self.model.rings[1] is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the driver did not come up")
            self.server.run_once(0.05)

    def round_trip(self) -> float:
        t0 = time.perf_counter()
        rid = self.model.send_control(FeatureBits(1, 7, 1 << 32))
        while rid not in self.acked:
            self.server.run_once(1.0)
        return (time.perf_counter() - t0) * 1e6

    def storm(self, count: int) -> float:
        t0 = time.perf_counter()
        ids = [self.model.send_control(FeatureBits(1, 7, 1 << 32)) for _ in range(count)]
        last = ids[-1]
        while last not in self.acked:
            self.server.run_once(1.0)
        return count / (time.perf_counter() - t0)

    def close(self) -> None:
        self.proc.terminate()
        while self.proc.poll() is None:
            self.server.run_once(0.05)
        self.server.close()
        os.close(self.ram)


# -- the suite -----------------------------------------------------------------------------------


def run_bench(
    quick: bool, only: str | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    from vhostpci_driver.demo import run_demo  # noqa: PLC0415

    say = progress or (lambda _m: None)
    rows: list[Row] = []

    def want(name: str) -> bool:
        return only is None or name == only

    reps = 3 if quick else 7
    if want("ring-batch"):
        say("ring-batch")
        rows.append(ring_batch(2000 if quick else 20000))
    workdir = Path(tempfile.mkdtemp(prefix="vhostpci-bench-", dir="/tmp"))
    try:
        if want("ack-round-trip") or want("controlq-storm"):
            say("control plane")
            rig = _ControlRig(workdir)
            try:
                n = 300 if quick else 3000
                ours, base = [], []
                for _ in range(reps):  # interleaved with the baseline
                    ours += [rig.round_trip() for _ in range(n // reps)]
                    base += eventfd_pingpong(n // reps)
                p50, p99, b50, b99 = _pct(ours, 50), _pct(ours, 99), _pct(base, 50), _pct(base, 99)
                if want("ack-round-trip"):
                    base_name = "eventfd ping-pong"
                    rows.append(
                        Row(
                            "ack-round-trip p50",
                            round(p50, 1),
                            "us",
                            f"{base_name} p50",
                            round(b50, 1),
                            round(p50 / b50, 1),
                            "<= 3x",
                            p50 <= 3 * b50,
                        )
                    )
                    rows.append(
                        Row(
                            "ack-round-trip p99",
                            round(p99, 1),
                            "us",
                            f"{base_name} p99",
                            round(b99, 1),
                            round(p99 / b99, 1),
                            "<= 10x",
                            p99 <= 10 * b99,
                        )
                    )
                if want("controlq-storm"):
                    rates = [rig.storm(2000 if quick else 10000) for _ in range(reps)]
                    med = statistics.median(rates)
                    rows.append(
                        Row(
                            "controlq-storm",
                            round(med),
                            "msgs/s",
                            None,
                            None,
                            None,
                            ">= 50000",
                            med >= 50000,
                            spread=round(max(rates) - min(rates)),
                        )
                    )
            finally:
                rig.close()
        for size, name in ((64, "net-switch-64"), (1500, "net-switch-1500"), (65536, "net-switch-64k")):
            if not want(name):
                continue
            say(name)
            count = (4000 if quick else 40000) if size < 65536 else (1000 if quick else 10000)
            results = [run_demo(2, count, str(size)) for _ in range(2 if quick else reps)]
            pps = statistics.median(r.received / r.elapsed for r in results)
            copy = memcpy_rate(size, 20000 if size < 65536 else 2000)
            sock = socketpair_rate(size, 20000 if size < 65536 else 4000)
            ceiling = _simulator_ceiling(size)
            limited = "simulator" if pps >= 0.8 * ceiling else None
            if size == 64:
                rows.append(
                    Row(
                        name,
                        round(pps),
                        "frames/s",
                        "AF_UNIX socketpair",
                        round(sock),
                        round(pps / sock, 3),
                        ">= 1000000 frames/s",
                        pps >= 1e6,
                        limited,
                    )
                )
            else:
                gbps, sgbps, mgbps = (x * size * 8 / 1e9 for x in (pps, sock, copy))
                if size == 1500:
                    rows.append(
                        Row(
                            name,
                            round(gbps, 3),
                            "Gbit/s",
                            "AF_UNIX socketpair",
                            round(sgbps, 3),
                            round(gbps / sgbps, 3),
                            ">= 3x socketpair",
                            gbps >= 3 * sgbps,
                            limited,
                        )
                    )
                else:
                    rows.append(
                        Row(
                            name,
                            round(gbps, 3),
                            "Gbit/s",
                            "memcpy",
                            round(mgbps, 3),
                            round(gbps / mgbps, 4),
                            ">= 50% of memcpy",
                            gbps >= 0.5 * mgbps,
                            limited,
                        )
                    )
        if want("bring-up"):
            say("bring-up")
            rows.append(_bring_up(workdir, reps))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"machine": _machine(), "benchmarks": [asdict(r) for r in rows]}


def _simulator_ceiling(size: int) -> float:
    """Frames/s the simulated driver VM can build and check by itself (its side alone, no backend)."""
    from vhostpci_host import netpacket  # noqa: PLC0415

    src, dst = netpacket.mac_bytes("52:54:00:00:00:01"), netpacket.mac_bytes("52:54:00:00:00:02")
    n = 3000 if size < 65536 else 300
    t0 = time.perf_counter()
    for seq in range(n):
        netpacket.check(netpacket.build(dst, src, seq, size))
    return n / (time.perf_counter() - t0)


def _bring_up(workdir: Path, reps: int) -> Row:
    from vhostpci_driver.device import VhostPciDevice  # noqa: PLC0415
    from vhostpci_driver.events import FeaturesNegotiated  # noqa: PLC0415
    from vhostpci_host.harness import DriverVmProcess, HostServer  # noqa: PLC0415

    server = HostServer(workdir / "bring-up")
    vm = DriverVmProcess(server.socket, ["52:54:00:00:00:01"], vm_uuid=uuid.uuid4(), memory="64M")
    try:
        path = server.device_socket(vm.uuid)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            with VhostPciDevice(f"vfio-user:{path}") as dev:
                for ev in dev.events(timeout=5):
                    if isinstance(ev, FeaturesNegotiated):
                        break
                times.append((time.perf_counter() - t0) * 1e3)
        med = statistics.median(times)
        return Row(
            "bring-up",
            round(med, 1),
            "ms (open -> DRIVER_OK -> acks)",
            None,
            None,
            None,
            "<= 100 ms",
            med <= 100,
            spread=round(max(times) - min(times), 1),
        )
    finally:
        vm.stop()
        server.stop()


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "little_endian": struct.pack("=H", 1)[0] == 1,
    }
