"""The net switch's own rate, in process: frames per second of :meth:`NetBackend.poll` on one core.

Two ports over one bytearray (a :class:`~vhostpci_driver.memory.RegionTable`, the
region table the device's window gives the rings), each a real
:class:`~vhostpci_driver.frontends.Frontend` with the rings of the data path that
runs (compiled or pure: virtqueue/native.py). Their driver sides are
:class:`~vhostpci_driver.virtqueue.driver.DriverQueue` rings: each port transmits
pre-built frames to the other and keeps its receive ring full. Only ``poll`` is on
the clock: the driver side's work (posting frames and buffers, harvesting) is
outside it, so the figure is the switch's, comparable with one-core results such as
ixy's, and the traffic source is never the bottleneck. Frames are neither checked
nor rebuilt here (the end-to-end tests check every byte).

``python -m vhostpci_driver.apps.switch_rate [SIZE...]`` measures both paths (the
pure one in a child run with ``VHOSTPCI_PURE=1``), each against its baseline in the
same run (the same switch with :func:`policy_only`, every frame through the policy),
and prints one JSON line per path, size and primitive (``SWITCH_RATE_REPS`` runs
each, 5 by default; the medians).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from vhostpci_driver.addr import WindowOffset, Xgpa
from vhostpci_driver.apps.net import NET_HDR, NetBackend, Place, net_policy
from vhostpci_driver.events import FeaturesNegotiated
from vhostpci_driver.frontends import Chain, Frontend
from vhostpci_driver.memory import BufferWindow, Region, RegionTable
from vhostpci_driver.spec.virtio import Feature
from vhostpci_driver.spec.virtio_net import VIRTIO_NET_F_MRG_RXBUF
from vhostpci_driver.virtqueue import native
from vhostpci_driver.virtqueue.driver import DriverQueue
from vhostpci_driver.wire.ctrl import FrontendKey, VirtqInfo

BASE = 0x4000_0000
QUEUE = 256
RX_BUF = 4096  # mergeable receive buffers, as a Linux guest posts (a larger frame takes several)
FEATURES = (1 << Feature.VERSION_1) | (1 << Feature.RING_EVENT_IDX) | (1 << VIRTIO_NET_F_MRG_RXBUF)
SIZES = (64, 1500, 65536)


def policy_only(chains: list[Chain], start: int, *_: object) -> tuple[int, int]:
    """A primitive that places nothing: the switch's policy takes every frame (the baseline)."""
    return start, 0


@dataclass
class Rate:
    path: str
    primitive: bool  # False: the baseline, every frame through the policy (policy_only)
    size: int  # frame bytes, without the virtio-net header
    frames: int
    seconds: float  # CPU seconds inside poll() only
    frames_per_s: float
    gbit_per_s: float


class _Side:
    """One port's driver side: its two rings and their buffers, in the shared memory."""

    def __init__(self, mem: RegionTable, at: int, mac: bytes, peer: bytes, size: int) -> None:
        self.mac = mac
        self.frame_len = NET_HDR + size
        self.tx_buf = -(-self.frame_len // 4096) * 4096
        self.rings: list[DriverQueue] = []
        infos = []
        for index in (0, 1):
            d, a, u, total = DriverQueue.layout(QUEUE)
            self.rings.append(DriverQueue(mem, QUEUE, at + d, at + a, at + u, event_idx=True))
            infos.append(VirtqInfo(index, QUEUE, Xgpa(at + d), Xgpa(at + a), Xgpa(at + u), 0, 0, index))
            at += -(-total // 4096) * 4096
        self.rx_base, at = at, at + QUEUE * RX_BUF
        self.tx_base, at = at, at + QUEUE * self.tx_buf
        self.end = at
        self.virtqs = tuple(infos)
        frame = bytes(NET_HDR) + peer + mac + b"\x08\x00" + bytes(max(0, size - 14))
        for slot in range(QUEUE):
            mem.view(self.tx_base + slot * self.tx_buf, self.frame_len)[:] = frame[: self.frame_len]
        self.tx_free = list(range(QUEUE))

    def post_rx(self, slots: list[int]) -> None:
        rx = self.rings[0]
        rx.add_many([(self.rx_base + s * RX_BUF, RX_BUF, s) for s in slots], True)
        rx.publish()

    def refill(self) -> None:
        """Harvest both rings and give everything back: RX buffers posted again, TX full of frames."""
        rx, tx = self.rings
        got = rx.harvest()
        if got:
            self.post_rx([s for s, _ in got])  # type: ignore[misc]
        self.tx_free += [s for s, _ in tx.harvest()]  # type: ignore[misc]
        if self.tx_free:
            tx.add_many([(self.tx_base + s * self.tx_buf, self.frame_len, s) for s in self.tx_free], False)
            tx.publish()
            self.tx_free = []


def _side_bytes(size: int) -> int:
    ring = -(-DriverQueue.layout(QUEUE)[3] // 4096) * 4096
    return 2 * ring + QUEUE * (RX_BUF + -(-(NET_HDR + size) // 4096) * 4096)


def measure(size: int, frames: int, place: Place | None = None) -> Rate:
    """Switch ``frames`` frames of ``size`` bytes between two ports; the time inside ``poll`` only.

    ``place`` is the switch's primitive (NetBackend's default when None).
    """
    sides: list[_Side] = []
    at = BASE
    macs = [bytes([0x52, 0x54, 0, 0, 0, 1]), bytes([0x52, 0x54, 0, 0, 0, 2])]
    window = bytearray(2 * _side_bytes(size))
    mem = RegionTable(BufferWindow(window))
    mem.add([Region(Xgpa(BASE), len(window), WindowOffset(0))])
    for i in (0, 1):
        s = _Side(mem, at, macs[i], macs[1 - i], size)
        sides.append(s)
        at = s.end
    backend = NetBackend("switch", place=place)
    for s in sides:
        key = FrontendKey(1, int.from_bytes(s.mac, "big"))
        fe = Frontend(key, s.virtqs, mem, lambda slot: None, {})
        accepted = net_policy(key, FEATURES)
        fe.start(accepted)
        s.post_rx(list(range(QUEUE)))
        backend.on_event(FeaturesNegotiated(key, FEATURES, accepted), {key: fe})
    ports = list(backend.ports.values())
    clock = time.thread_time  # this thread's CPU time: on a shared machine a preemption is not the switch's
    spent = 0.0
    moved = 0
    while moved < frames:
        for s in sides:
            s.refill()
        t0 = clock()
        backend.poll()
        spent += clock() - t0
        moved = sum(p.rx_frames for p in ports)
        if any(p.broken for p in ports):
            raise RuntimeError(f"a port broke: {backend.stats()}")
    return Rate(native.PATH, place is not policy_only, size, moved, spent, moved / spent,
                moved * size * 8 / spent / 1e9)  # fmt: skip


def median_of(size: int, frames: int, reps: int) -> list[Rate]:
    """The switch and its baseline (:func:`policy_only`), ``reps`` runs each, interleaved: the medians."""
    runs: list[list[Rate]] = [[], []]
    for _ in range(reps):
        for out, place in zip(runs, (None, policy_only), strict=True):
            out.append(measure(size, frames, place))
    return [sorted(r, key=lambda x: x.frames_per_s)[len(r) // 2] for r in runs]


def _lines(rates: list[Rate]) -> str:
    return "\n".join(json.dumps(asdict(r)) for r in rates)


def _frames_for(size: int) -> int:
    return 200_000 if size <= 1500 else 20_000


def main() -> None:
    """Both paths, each size: this process runs its own path, a child run the pure one, turn by turn."""
    reps = int(os.environ.get("SWITCH_RATE_REPS", "5"))
    sizes = [int(a) for a in sys.argv[1:]] or list(SIZES)
    if os.environ.get("SWITCH_RATE_CHILD") == "1":
        for size in sizes:
            print(_lines(median_of(size, _frames_for(size), reps)), flush=True)
        return
    env = dict(os.environ, VHOSTPCI_PURE="1", SWITCH_RATE_CHILD="1")
    for size in sizes:
        if native.LIB is not None:
            print(_lines(median_of(size, _frames_for(size), reps)), flush=True)
        out = subprocess.run(
            [sys.executable, "-m", "vhostpci_driver.apps.switch_rate", str(size)],
            env=env, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        print(out.strip(), flush=True)


if __name__ == "__main__":
    main()
