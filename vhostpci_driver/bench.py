"""``vhostpci bench``: figures, each beside a baseline measured in the same run.

Benchmarks are not tests: nothing here fails a build. Each row reports the
median (and p99 where latency matters) of several repetitions, interleaved
with its baseline, the ratio, the target and whether it is met. A figure that
sits at the simulated driver VM's own ceiling is marked ``limited_by``.

The data path is chosen once per process (virtqueue/native.py), so the rows of
every path the machine has built come from one run: the ring-batch rows run both
queue classes in this process, the net rows run each path in a child process
(``VHOSTPCI_PURE=1`` for the pure one), interleaved with their baseline.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vhostpci_driver.addr import WindowOffset, Xgpa
from vhostpci_driver.memory import BufferWindow, Region, RegionTable
from vhostpci_driver.virtqueue import native
from vhostpci_driver.virtqueue.device import DeviceQueue
from vhostpci_driver.virtqueue.driver import DriverQueue
from vhostpci_driver.virtqueue.layout import DESC as DESC_STRUCT
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


def ring_batch(reps: int) -> list[Row]:
    """Pop 32 single-buffer chains and push them back, on each data path and each batch API, interleaved.

    Two APIs: ``pop_direct``/``push_direct`` (the batch described in arrays, no
    object per chain: the ``ring-batch PATH`` rows) and ``pop_batch``/``push_batch``
    (a :class:`~vhostpci_driver.virtqueue.device.Chain` per chain, what the switch
    uses: the ``ring-batch PATH chains`` rows). Only the two ring calls are timed;
    building the used entries between them is the app's work. A pure row's baseline
    is the unchecked CPython floor for the same 32 frames (:func:`cpython_floor`'s
    five operations), measured in the same run; a native row's is its pure twin.
    """
    base, size = 0x1000_0000, 256
    impls: list[tuple[str, type[DeviceQueue]]] = [("pure", DeviceQueue)]
    if native.LIB is not None:
        impls.insert(0, ("native", native.NativeDeviceQueue))
    rigs = []
    for path, cls in impls:
        for api in ("direct", "chains"):
            table = RegionTable(BufferWindow(bytearray(1 << 20)))
            table.add([Region(Xgpa(base), 1 << 20, WindowOffset(0))])
            d, a, u, _ = DriverQueue.layout(size)
            drv = DriverQueue(table, size, base + d, base + a, base + u)
            dev = cls(table, size, base + d, base + a, base + u)
            rigs.append((path if api == "direct" else f"{path} chains", drv, dev))
    out, used = array("Q", bytes(8 * 3 * 32)), array("I", bytes(4 * 2 * 32))
    times: dict[str, list[float]] = {name: [] for name, _, _ in rigs}
    floor: list[float] = []
    for rep in range(reps):
        for name, drv, dev in rigs:  # interleaved: every row sees the same machine
            for i in range(32):
                drv.add((), ((base + 0x10000 + 2048 * i, 2048),), i)
            drv.publish()
            if name.endswith("chains"):
                t0 = time.perf_counter()
                chains = dev.pop_batch(32)
                t1 = time.perf_counter()
                entries = [(c[0], 64) for c in chains]  # as the switch does (c.head is a property call)
                t2 = time.perf_counter()
                dev.push_batch(entries)
            else:
                t0 = time.perf_counter()
                n = dev.pop_direct(out, 32)
                t1 = time.perf_counter()
                for k in range(n):
                    used[2 * k], used[2 * k + 1] = out[3 * k] & 0xFFFF, 64
                t2 = time.perf_counter()
                dev.push_direct(used, n)
            times[name].append((time.perf_counter() - t2 + t1 - t0) * 1e6)
            drv.harvest()
        if rep % 10 == 0:
            floor.append(_floor_per_frame(32) * 32)
    med = {name: statistics.median(t) for name, t in times.items()}
    spread = {name: round(_pct(t, 90) - _pct(t, 10), 2) for name, t in times.items()}
    floor32 = statistics.median(floor)
    rows = []
    for name in times:
        what = "arrays, no object per chain" if not name.endswith("chains") else "a Chain per chain"
        fig = med[name]
        if name.startswith("pure"):
            rows.append(Row(f"ring-batch {name}", round(fig, 2), f"us/batch of 32 (pure Python, {what})",
                            "cpython-floor x 32", round(floor32, 2), round(fig / floor32, 2), "<= 15 us",
                            fig <= 15, spread=spread[name]))  # fmt: skip
        else:
            twin = name.replace("native", "pure")
            rows.append(Row(f"ring-batch {name}", round(fig, 2), f"us/batch of 32 (compiled, {what})",
                            f"ring-batch {twin}", round(med[twin], 2), round(fig / med[twin], 3), "<= 3 us",
                            fig <= 3, spread=spread[name]))  # fmt: skip
    return rows


def cpython_floor(reps: int) -> Row:
    """The least a Python switch does per frame, timed: the floor under every net-switch row.

    Per frame: read a descriptor (one ``unpack_from``), translate its address (one
    memoryview slice), make the chain (one tuple), copy 64 bytes (one slice
    assignment), record the used element (one list append). Nothing validated,
    nothing notified: a real switch does all this on both of its queues, and more.
    """
    med = statistics.median(_floor_per_frame(256) for _ in range(reps))
    return Row("cpython-floor", round(med, 3), "us/frame (5 CPython operations)", None, None, None,
               "reference: 1 Mpps leaves 1 us/frame for everything", None)  # fmt: skip


def _floor_per_frame(frames: int) -> float:
    """Microseconds per frame of cpython_floor's five operations, over ``frames`` frames."""
    table = bytearray(16 * frames)
    for i in range(frames):
        DESC_STRUCT.pack_into(table, 16 * i, 0x1000 + 2048 * i, 64, 0, 0)
    window = memoryview(bytearray(0x1000 + 2048 * frames))
    frame = bytes(64)
    used: list[int] = []
    t0 = time.perf_counter()
    for head in range(frames):
        addr, length, _flags, _next = DESC_STRUCT.unpack_from(table, head << 4)
        buf = window[addr : addr + length]
        chain: tuple[int, list[memoryview], list[memoryview], int, int] = (head, [buf], [], length, 0)
        buf[:] = frame
        used.append(chain[0])
    return (time.perf_counter() - t0) * 1e6 / frames


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
        # As server.py serves a device: queue notifies and doorbells by ioeventfd (GET_REGION_IO_FDS),
        # so the ackq kick is an eventfd write, not a REGION_WRITE message the model must decode.
        self.model.attach_loop(self.server.add_reader, self.server.remove_reader)
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
        from vhostpci_host.harness import stop_served_driver  # noqa: PLC0415

        stop_served_driver(self.proc, self.server)
        os.close(self.ram)


@contextlib.contextmanager
def _one_cpu() -> Iterator[None]:
    """Run a latency row and its baseline with every process on one CPU, then restore.

    A wake-up between two CPUs costs an IPI and, on an idle vCPU, a halt exit: tens
    of microseconds that land on whichever pair the scheduler happens to split. A
    forked ping-pong child usually shares its parent's CPU and a long-lived device
    process usually does not, so unpinned ratios compare placements, not code.
    Children (forked or spawned) inherit the mask, so both arms get the same one.
    """
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# -- the suite -----------------------------------------------------------------------------------


#: every row name 'bench --only' takes (a test keeps it in step with run_bench's want() calls)
BENCHMARKS = (
    "ring-batch",
    "cpython-floor",
    "ack-round-trip",
    "controlq-storm",
    "net-switch-64",
    "net-switch-1500",
    "net-switch-64k",
    "notify-interrupt",
    "bring-up",
    "memory",
)


def run_bench(
    quick: bool, only: Collection[str] | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Every benchmark (or those named in ``only``); returns the machine, the rows, and what failed.

    Each benchmark runs on its own: one that fails (a host-side process that did not
    start, a driver that never acked) is recorded under ``failed`` with its error and
    the others still run, so a long run never loses what it measured to one row.
    """
    say = progress or (lambda _m: None)
    rows: list[Row] = []
    failed: list[dict[str, str]] = []

    def want(name: str) -> bool:
        return only is None or name in only

    def attempt(name: str, measure: Callable[[], list[Row]]) -> None:
        say(name)
        try:
            rows.extend(measure())
        except Exception as e:  # any failure of one benchmark; the run goes on (docstring)
            failed.append({"name": name, "error": f"{type(e).__name__}: {e}".strip()})
            say(f"{name} FAILED: {type(e).__name__}: {e}")

    reps = 3 if quick else 7
    if want("ring-batch"):
        attempt("ring-batch", lambda: ring_batch(2000 if quick else 20000))
    if want("cpython-floor"):
        attempt("cpython-floor", lambda: [cpython_floor(200 if quick else 2000)])
    workdir = Path(tempfile.mkdtemp(prefix="vhostpci-bench-", dir="/tmp"))
    try:
        if want("ack-round-trip") or want("controlq-storm"):
            attempt("control plane", lambda: _control_plane(workdir, quick, reps, want))
        for size, name in ((64, "net-switch-64"), (1500, "net-switch-1500"), (65536, "net-switch-64k")):
            if want(name):
                attempt(name, functools.partial(_net_rows, name, size, quick, reps))
        if want("notify-interrupt"):

            def notify() -> list[Row]:
                with _one_cpu():
                    return [_notify_interrupt(workdir, 300 if quick else 3000, reps)]

            attempt("notify-interrupt", notify)
        if want("bring-up"):
            attempt("bring-up", lambda: [_bring_up(workdir, reps)])
        if want("memory"):
            attempt("memory", lambda: [_memory(workdir)])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"machine": _machine(), "benchmarks": [asdict(r) for r in rows], "failed": failed}


def _control_plane(workdir: Path, quick: bool, reps: int, want: Callable[[str], bool]) -> list[Row]:
    """The ack round trip (against an eventfd ping-pong, interleaved) and the controlq storm."""
    rows: list[Row] = []
    with _one_cpu():
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
                rows.append(Row("ack-round-trip p50", round(p50, 1), "us", f"{base_name} p50", round(b50, 1),
                                round(p50 / b50, 1), "<= 3x", p50 <= 3 * b50))  # fmt: skip
                rows.append(Row("ack-round-trip p99", round(p99, 1), "us", f"{base_name} p99", round(b99, 1),
                                round(p99 / b99, 1), "<= 10x", p99 <= 10 * b99))  # fmt: skip
            if want("controlq-storm"):
                rates = [rig.storm(2000 if quick else 10000) for _ in range(reps)]
                med = statistics.median(rates)
                rows.append(Row("controlq-storm", round(med), "msgs/s", None, None, None, ">= 50000",
                                med >= 50000, spread=round(max(rates) - min(rates))))  # fmt: skip
        finally:
            rig.close()
    return rows


#: The simulated driver VMs' rings in the net rows: QEMU's virtio-net allows 1024
#: (rx_queue_size, tx_queue_size). With interrupt moderation (frontend.NetFrontend.arm) a
#: simulator's wake-up, kick and call each cover up to half or 3/4 of a ring: at 256 their
#: fixed cost was most of the traffic source's CPU per frame.
NET_QUEUE_SIZE = 1024


def _net_sample(size: int, count: int) -> dict[str, Any]:
    """One run of two simulated driver VMs sending pktgen frames to each other through the switch.

    Their rings are :data:`NET_QUEUE_SIZE` entries, so each needs 256 MiB of RAM (a
    full-frame buffer per entry, both rings; memfd pages, only those written are used).

    Run in a child process per data path (:func:`_net_rows`): the path is chosen once
    per process (virtqueue/native.py), so the child says which one it ran.
    """
    from vhostpci_driver.demo import run_demo  # noqa: PLC0415

    # A ring's worth first, outside the clock: each TX buffer's frame built, every page touched
    r = run_demo(
        2, count, str(size), pktgen=True, queue_size=NET_QUEUE_SIZE, memory="256M", warmup=NET_QUEUE_SIZE
    )
    return {"path": native.PATH, "received": r.received, "elapsed": r.elapsed,
            "simulator_cpu": r.simulator_cpu, "switch_cpu": r.switch_cpu,
            "lost": r.sent - r.received, "corrupt": r.corrupt}  # fmt: skip


def _net_child(path: str, size: int, count: int) -> dict[str, Any]:
    """:func:`_net_sample` in a child process on ``path`` (``VHOSTPCI_PURE=1`` for the pure one)."""
    env = dict(os.environ)
    env.pop("VHOSTPCI_PURE", None)
    if path == "pure":
        env["VHOSTPCI_PURE"] = "1"
    argv = [sys.executable, "-m", "vhostpci_driver.bench", "net-sample", str(size), str(count)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"net benchmark on the {path} path failed: {out.stderr.strip()[-2000:]}")
    sample: dict[str, Any] = json.loads(out.stdout)
    if sample["path"] != path:
        raise RuntimeError(f"net benchmark: asked for the {path} path, the child ran {sample['path']}")
    return sample


def _net_rows(name: str, size: int, quick: bool, reps: int) -> list[Row]:
    """The net-switch rows of one frame size, for every data path this machine has, interleaved.

    Each repetition runs each path once (a child process each) and the row's
    baseline (an AF_UNIX socketpair, or a cold memcpy at 64 KiB) once, in the
    same minutes. Beside each path's figure, the simulated driver VMs' own
    ceiling (frames they build, send, receive and check per CPU second of theirs,
    in the same run): the row is marked ``limited_by: simulator`` unless that is
    at least 3x the switch's figure. The switch's own rate per CPU second of its
    thread is reported too: on a busy machine it is the figure that compares with
    one-core results such as ixy's.
    """
    # Long enough that a run's fixed costs (the first lap of 1024-entry rings, the commands,
    # the last partial batch) are a small part of it: 40,000 frames at 64 B took 0.1 s native,
    # 10,000 at 64 KiB 0.6 s.
    count = (4000 if quick else 200_000) if size < 65536 else (1000 if quick else 40_000)
    paths = ["native", "pure"] if native.LIB is not None else ["pure"]
    samples: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    base: list[float] = []  # the baseline, frames/s of the same size
    for _ in range(2 if quick else reps):
        for p in paths:
            samples[p].append(_net_child(p, size, count))
        base.append(cold_memcpy_rate(size) if size == 65536 else socketpair_rate(size, 20000))
    bps = statistics.median(base)
    rows = []
    sim_unit = "frames/s per CPU second of the simulated driver VMs"
    core_unit = "frames/s per CPU second of the switch thread"
    for p in paths:
        got = samples[p]
        pps = statistics.median(s["received"] / s["elapsed"] for s in got)
        ceiling = statistics.median(s["received"] / s["simulator_cpu"] for s in got if s["simulator_cpu"] > 0)
        per_core = statistics.median(s["received"] / s["switch_cpu"] for s in got if s["switch_cpu"] > 0)
        limited = "simulator" if ceiling < 3 * pps else None
        rows += [
            Row(f"{name} {p} simulator", round(ceiling), sim_unit,
                f"{name} {p}", round(pps), round(ceiling / pps, 2), ">= 3x the switch", ceiling >= 3 * pps),
            Row(f"{name} {p} per switch core", round(per_core), core_unit,
                None, None, None, ">= 160000 (ixy.py)" if size == 64 and p == "pure" else "report",
                per_core >= 160_000 if size == 64 and p == "pure" else None),
        ]  # fmt: skip
        rows.append(_net_row(f"{name} {p}", p, size, pps, bps, limited))
    return rows


def _net_row(name: str, path: str, size: int, pps: float, bps: float, limited: str | None) -> Row:
    """The switch's figure against its baseline (both frames/s of ``size`` bytes), with issue 16's target."""
    ratio = pps / bps
    if size == 64:
        want = 1e6 if path == "native" else 160_000  # ixy.py's best, for the pure path
        return Row(name, round(pps), "frames/s", "AF_UNIX socketpair", round(bps), round(ratio, 3),
                   f">= {want:.0f} frames/s", pps >= want, limited)  # fmt: skip
    gbps, bgbps = pps * size * 8 / 1e9, bps * size * 8 / 1e9
    if size == 1500:
        times = 3 if path == "native" else 1
        return Row(name, round(gbps, 3), "Gbit/s", "AF_UNIX socketpair", round(bgbps, 3), round(ratio, 3),
                   f">= {times}x socketpair", ratio >= times, limited)  # fmt: skip
    if path == "native":
        return Row(name, round(gbps, 3), "Gbit/s", "cold memcpy (buffers > LLC)", round(bgbps, 3),
                   round(ratio, 4), ">= 50% of cold memcpy", ratio >= 0.5, limited)  # fmt: skip
    return Row(name, round(gbps, 3), "Gbit/s", "cold memcpy (buffers > LLC)", round(bgbps, 3),
               round(ratio, 4), "report", None, limited)  # fmt: skip


def _llc_bytes() -> int:
    """The last-level cache's size (sysfs), 32 MiB when it does not say."""
    caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"))
    best = 0
    for c in caches:
        text = c.read_text().strip()
        with contextlib.suppress(ValueError):
            best = max(best, int(text[:-1]) << 10 if text.endswith("K") else int(text))
    return best or 32 << 20


def cold_memcpy_rate(size: int) -> float:
    """Copies/s of ``size`` bytes between buffers larger than the last-level cache, walked in order.

    Source and target are each twice the LLC (at most 1 GiB), so no chunk is in the
    cache when it is copied: what copying another VM's frame into a third's costs.
    The first pass is not timed: it faults the target's pages in (a fresh bytearray's
    pages are the kernel's zero page until written), which a frontend's RX buffers,
    written every frame, never pay; the timed pass then finds each chunk evicted by
    the other 2 x LLC bytes walked since it was last touched.
    """
    span = min(1 << 30, 2 * _llc_bytes())
    span -= span % size
    src, dst = bytearray(os.urandom(1 << 20) * (span >> 20)), bytearray(span)
    sv, dv = memoryview(src), memoryview(dst)
    for _pass in range(2):  # the second is the one kept
        t0 = time.perf_counter()
        n = 0
        for off in range(0, span, size):
            dv[off : off + size] = sv[off : off + size]
            n += 1
        el = time.perf_counter() - t0
    rate = n / el
    sv.release()
    dv.release()
    return rate


def _bring_up(workdir: Path, reps: int) -> Row:
    from vhostpci_driver.device import VhostPciDevice  # noqa: PLC0415
    from vhostpci_driver.events import FeaturesNegotiated  # noqa: PLC0415
    from vhostpci_host.harness import HostServer, Rig  # noqa: PLC0415

    (workdir / "bring-up").mkdir()  # serve --socket wants the socket's directory to exist
    rig = Rig(HostServer(workdir / "bring-up"))
    try:
        vm = rig.add_vm("52:54:00:00:00:01", vm_uuid=uuid.uuid4(), memory="64M")
        path = rig.server.device_socket(vm.uuid)
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
        rig.close()


def _notify_device(path: str) -> None:
    """The far end of the notify benchmark, in a child process: a device with one frontend slot.

    The slot's kick and call are one eventfd, so a doorbell the driver rings
    (by ioeventfd: with direct doorbells, as `serve --direct-doorbells`, that is the
    slot's call eventfd itself) comes straight back as the slot's kick and so
    as its MSI-X interrupt: the device's whole notify -> interrupt path, and
    nothing of a driver VM's.
    """
    from vhostpci_driver.wire import ctrl  # noqa: PLC0415
    from vhostpci_host.device_model import VhostPciDeviceModel  # noqa: PLC0415
    from vhostpci_host.vfio_user_server import VfioUserServer  # noqa: PLC0415

    model = VhostPciDeviceModel(window_size=1 << 24, direct_doorbells=True)  # as serve --direct-doorbells
    ram = os.memfd_create("bench-notify")
    os.ftruncate(ram, 1 << 20)
    model.map_region(0, 1 << 20, ram, 0)
    server = VfioUserServer(path, model)
    model.attach_loop(server.add_reader, server.remove_reader)
    loop = os.eventfd(0, os.EFD_NONBLOCK)
    slot = model.assign_slot(loop, loop)
    told = False
    while True:
        server.run_once(0.5)
        if not told and model.rings[1] is not None:
            told = True
            vq = ctrl.VirtqInfo(0, 256, Xgpa(0x1000), Xgpa(0x2000), Xgpa(0x3000), notify_slot=slot)
            region = ctrl.MemoryRegion(Xgpa(0), 1 << 20, WindowOffset(0))
            model.send_control(ctrl.MemoryInfo(ctrl.Op.ADD, (region,)))
            model.send_control(ctrl.DeviceInfo(ctrl.Op.ADD, 1, 1, (vq,)))
            model.send_control(FeatureBits(1, 1, 1 << 32))


def _notify_interrupt(workdir: Path, n: int, reps: int) -> Row:
    """Doorbell (notify register) -> device -> MSI-X eventfd, through the vfio-user backend."""
    from vhostpci_driver.device import VhostPciDevice  # noqa: PLC0415
    from vhostpci_driver.events import FeaturesNegotiated  # noqa: PLC0415
    from vhostpci_driver.wire.device import Vector  # noqa: PLC0415

    path = str(workdir / "notify.sock")
    pid = os.fork()
    if pid == 0:
        try:
            _notify_device(path)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError("notify benchmark: the device never listened")
            time.sleep(0.01)
        with VhostPciDevice(f"vfio-user:{path}") as dev:
            for ev in dev.events(timeout=10):
                if isinstance(ev, FeaturesNegotiated):
                    break
            (fe,) = dev.frontends.values()
            slot = fe.virtqs[0].notify_slot
            irq = dev.irq_fds[Vector.FIRST_SLOT + slot]

            def round_trip() -> float:
                t0 = time.perf_counter()
                fe.doorbell(slot)
                select.select([irq], [], [], 5.0)
                os.eventfd_read(irq)
                return (time.perf_counter() - t0) * 1e6

            ours, base = [], []
            for _ in range(reps):  # interleaved with the baseline
                ours += [round_trip() for _ in range(n // reps)]
                base += eventfd_pingpong(n // reps)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    p50, b50 = _pct(ours, 50), _pct(base, 50)
    spread = round(_pct(ours, 90) - _pct(ours, 10), 1)
    return Row("notify-interrupt p50", round(p50, 1), "us", "eventfd ping-pong p50", round(b50, 1),
               round(p50 / b50, 1), "<= 3x", p50 <= 3 * b50, spread=spread)  # fmt: skip


def _memory(workdir: Path) -> Row:
    """RSS of a ``vhostpci run`` serving a 4 GiB window: 512 regions, 64 net frontends, all acked.

    The device model runs here and is driven directly (not through the server, whose
    notification slots, 125 at most, cannot give 64 two-queue frontends a slot each):
    the frontends' queues have no slot and the net switch polls them.
    """
    from vhostpci_driver.wire import ctrl  # noqa: PLC0415
    from vhostpci_host.device_model import VhostPciDeviceModel  # noqa: PLC0415
    from vhostpci_host.harness import stop_served_driver  # noqa: PLC0415
    from vhostpci_host.vfio_user_server import VfioUserServer  # noqa: PLC0415

    nregions, nfrontends, region = 512, 64, 4 << 20
    model = VhostPciDeviceModel(window_size=4 << 30, max_regions=nregions, max_frontends=nfrontends)
    ram = os.memfd_create("bench-ram")  # 2 GiB, sparse: only the rings' pages are ever touched
    os.ftruncate(ram, nregions * region)
    regions = []
    for i in range(nregions):
        model.map_region(i * region, region, ram, i * region)
        regions.append(ctrl.MemoryRegion(Xgpa(i * region), region, WindowOffset(i * region)))
    server = VfioUserServer(str(workdir / "mem.sock"), model)
    results: dict[int, bool] = {}
    model.on_ack = lambda rid, ack: results.__setitem__(rid, not ack.result.failed)
    env = {**os.environ, "VHOSTPCI_RUN_DIR": str(workdir / "mem-run")}
    argv = [sys.executable, "-m", "vhostpci_driver", "run", f"vfio-user:{workdir}/mem.sock"]
    log = workdir / "mem-driver.log"  # the driver's own account, for the error if it fails
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, env=env, stderr=err)
    try:
        deadline = time.monotonic() + 60

        def pump(until: Callable[[], bool], what: str) -> None:
            while not until():
                code = proc.poll()
                if code is not None or time.monotonic() > deadline:
                    how = f"it exited with {code}" if code is not None else "60 s passed"
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(f"memory benchmark: the driver never {what} ({how}); its log: {tail}")
                server.run_once(0.05)

        pump(lambda: model.rings[1] is not None, "came up")
        adds = [ctrl.MemoryInfo(ctrl.Op.ADD, tuple(regions[i : i + 64])) for i in range(0, nregions, 64)]
        ids = [model.send_control(m) for m in adds]
        for f in range(nfrontends):
            base = f * region  # each frontend's rings in a region of their own
            vqs = tuple(
                ctrl.VirtqInfo(q, 256, Xgpa(base + q * 0x4000), Xgpa(base + q * 0x4000 + 0x1000),
                          Xgpa(base + q * 0x4000 + 0x2000), notify_slot=ctrl.NO_SLOT)
                for q in range(2)
            )  # fmt: skip
            ids.append(model.send_control(ctrl.DeviceInfo(ctrl.Op.ADD, 1, f, vqs)))
            ids.append(model.send_control(FeatureBits(1, f, 1 << 32)))
        pump(lambda: all(i in results for i in ids), "acked every request")
        if not all(results[i] for i in ids):
            raise RuntimeError("memory benchmark: the driver refused part of the set-up")
        time.sleep(0.5)  # let the switch settle into its polling loop before reading RSS
        with open(f"/proc/{proc.pid}/status") as st:
            rss = next(int(ln.split()[1]) for ln in st if ln.startswith("VmRSS:")) / 1024
    finally:
        stop_served_driver(proc, server)
        os.close(ram)
    return Row("memory", round(rss, 1), "MiB RSS (4 GiB window, 512 regions, 64 frontends)",
               None, None, None, "<= 80 MiB", rss <= 80)  # fmt: skip


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "datapath": native.describe(),  # this process's; the ring-batch and net rows run every path built
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "latency_rows": "both arms pinned to one CPU",
        "cpu": cpu,
        "little_endian": struct.pack("=H", 1)[0] == 1,
    }


def main(argv: list[str]) -> int:
    """``python -m vhostpci_driver.bench net-sample SIZE COUNT``: one :func:`_net_sample`, as JSON.

    The child :func:`_net_rows` runs per data path; not a user command (``vhostpci bench`` is).
    """
    if len(argv) != 3 or argv[0] != "net-sample":
        sys.stderr.write("usage: python -m vhostpci_driver.bench net-sample SIZE COUNT\n")
        return 2
    sys.stdout.write(json.dumps(_net_sample(int(argv[1]), int(argv[2]))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
