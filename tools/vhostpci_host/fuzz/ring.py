"""Fuzz target ``ring``: the device-side ring walk over memory the driver VM wrote.

The input is the driver VM's memory (descriptors, avail ring, buffers) plus a
script of device operations and concurrent driver writes. Memory is a
``bytearray`` with guard bands, seen through the real region table: two
regions with an unmapped hole between them in the window, so a walk that
ignores region bounds shows up. The contract (virtqueue/device.py): any ring
is either walked or refused with :class:`RingError`, after which the queue
stays broken. Invariants: every returned view lies inside one mapped region
and has the length its descriptor says; heads are in range; the guard bands
and the hole are never written; the in-flight count matches what was popped
and not pushed; a push publishes its used index.
"""

from __future__ import annotations

import ctypes
import struct

from vhostpci_driver.addr import WindowOffset, Xgpa
from vhostpci_driver.errors import RingError
from vhostpci_driver.memory import BufferWindow, Region, RegionTable
from vhostpci_driver.spec.virtio import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_WRITE
from vhostpci_driver.virtqueue.device import Chain, DeviceQueue
from vhostpci_driver.virtqueue.driver import DriverQueue
from vhostpci_driver.virtqueue.layout import DESC, layout
from vhostpci_host.fuzz.contract import FuzzInput, InvariantError, Target, check

GUARD = 4096
WINDOW = 0x6000
RING = 0x1000  # xgpa of region 0, where the rings start (window offset 0)
REGIONS = (Region(Xgpa(RING), 0x4000, WindowOffset(0)), Region(Xgpa(0x10000), 0x1000, WindowOffset(0x5000)))
HOLE = (0x4000, 0x5000)  # window bytes no region maps
MAX_OPS = 64
FILL = 0xAA

OP_POP, OP_PUSH, OP_POKE, OP_NOTIFY, OP_DISCARD = range(5)


class _Memory:
    """The driver VM's memory: a guarded bytearray behind the real region table."""

    def __init__(self, image: bytes) -> None:
        guard = bytes([FILL]) * GUARD
        self.raw = bytearray(guard + bytes(WINDOW) + guard)
        self.window = memoryview(self.raw)[GUARD : GUARD + WINDOW]
        self.window[: len(image)] = image
        self.hole = bytes(self.window[HOLE[0] : HOLE[1]])
        self.table = RegionTable(BufferWindow(self.window))
        self.table.add(REGIONS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.window))
        self.mapped = [(base + r.window_offset, base + r.window_offset + r.size) for r in REGIONS]

    def view(self, addr: int, length: int) -> memoryview:
        return self.table.view(addr, length)

    def inside(self, view: memoryview) -> bool:
        """Does ``view`` lie inside one mapped region of the window?"""
        if len(view) == 0:
            return True
        start = ctypes.addressof(ctypes.c_char.from_buffer(view))
        return any(lo <= start and start + len(view) <= hi for lo, hi in self.mapped)

    def untouched(self) -> bool:
        """The guards and the hole hold what they held: nothing wrote outside mapped memory."""
        guard = bytes([FILL]) * GUARD
        return (
            self.raw[:GUARD] == guard
            and self.raw[GUARD + WINDOW :] == guard
            and self.window[HOLE[0] : HOLE[1]] == self.hole
        )


def fuzz_ring(data: bytes) -> None:
    """Header: cfg (bits 0-2 log2 size, 3 event_idx, 4 ring parts placed by the input),
    last_avail_idx, last_used_idx, max_chain_len, [3 ring offsets], image length, image;
    then operations until the input ends."""
    inp = FuzzInput(data)
    cfg = inp.u8()
    size = 1 << (cfg & 7)
    last_avail, last_used, max_chain = inp.u16(), inp.u16(), inp.u8()
    if cfg & 0x10:
        desc, avail, used = (RING + inp.u16() for _ in range(3))
    else:
        d, a, u, _ = layout(size)
        desc, avail, used = RING + d, RING + a, RING + u
    mem = _Memory(inp.take(inp.u16() % (WINDOW + 1)))
    try:
        q = DeviceQueue(
            mem, size, desc, avail, used, event_idx=bool(cfg & 8), last_avail_idx=last_avail,
            last_used_idx=last_used, max_chain_len=max_chain or None,
        )  # fmt: skip
    except RingError:
        return
    try:
        _run(q, mem, inp, used)
    except RingError as e:
        check(q.broken is e, f"RingError {e} raised without marking the queue broken")
        try:
            q.pending()
        except RingError as again:
            check(again is e, "a broken queue raised a different error later")
        else:
            raise InvariantError("a broken queue answered pending()") from e
    check(mem.untouched(), "memory outside the mapped regions was written")


def _run(q: DeviceQueue, mem: _Memory, inp: FuzzInput, used_at: int) -> None:
    flight: list[Chain] = []  # popped, not pushed
    last_batch: list[Chain] = []  # the last pop, while none of it was pushed (what discard may return)
    for _ in range(MAX_OPS):
        if not inp.remaining():
            return
        op = inp.u8() % 5
        if op == OP_POP:
            before = q.pending()
            chains = q.pop_batch(inp.u8())
            check(len(chains) <= before, f"popped {len(chains)} chains, {before} were pending")
            for c in chains:
                _check_chain(q, mem, c)
            flight += chains
            last_batch = chains
        elif op == OP_PUSH:
            used = _pick_used(inp, flight)
            q.push_batch(used)
            pushed = {head for head, _ in used}
            flight = [c for c in flight if c.head not in pushed]
            last_batch = [] if pushed & {c.head for c in last_batch} else last_batch
            if used:
                published = struct.unpack("<H", mem.view(used_at + 2, 2))[0]
                check(published == q.last_used_idx, "push_batch did not publish its used index")
        elif op == OP_POKE:
            # The driver VM writes its memory whenever it likes (an avail idx, a descriptor).
            off = inp.u16() % (WINDOW - 1)
            if not HOLE[0] - 2 < off < HOLE[1]:
                mem.window[off : off + 2] = inp.take(2).ljust(2, b"\0")
        elif op == OP_NOTIFY:
            which = inp.u8() % 5
            if which == 0:
                q.need_notify()
            elif which == 1:
                q.enable_notifications()
            elif which == 2:
                q.disable_notifications()
            elif which == 3:
                q.avail_idx()
            else:
                q.pending()
        else:
            k = inp.u8() % (len(last_batch) + 1)
            if k:
                gone = last_batch[-k:]
                q.discard(gone)
                flight = [c for c in flight if c not in gone]
                last_batch = last_batch[:-k]
        check(q.in_flight() == len(flight), f"{q.in_flight()} chains in flight, {len(flight)} popped")


def _pick_used(inp: FuzzInput, flight: list[Chain]) -> list[tuple[int, int]]:
    """Up to 8 used entries: mostly chains in flight with a length within what they can take,
    sometimes a wrong head or length (push_batch must refuse those, not corrupt the ring)."""
    used = []
    for _ in range(inp.u8() % 9):
        sel = inp.u8()
        if sel & 0x80 or not flight:
            used.append((inp.u16(), inp.u32()))
            continue
        c = flight[sel % len(flight)]
        written = inp.u32()
        used.append((c.head, written % (c.writable_len + 1) if sel & 0x40 else written))
    return used


def _check_chain(q: DeviceQueue, mem: _Memory, c: Chain) -> None:
    check(0 <= c.head < q.size, f"chain head {c.head} outside a queue of {q.size}")
    check(c.readable_len == sum(len(v) for v in c.readable), "readable_len is not the sum of its buffers")
    check(c.writable_len == sum(len(v) for v in c.writable), "writable_len is not the sum of its buffers")
    # A chain is at most the ring's descriptors, or a few of them and one indirect table (<= size).
    check(len(c.readable) + len(c.writable) <= 2 * q.size, f"chain of {len(c.readable) + len(c.writable)}")
    for v in (*c.readable, *c.writable):
        check(mem.inside(v), f"chain {c.head} has a view outside mapped memory")


def ring_seeds() -> dict[str, bytes]:
    """Rings written by our own driver side (DriverQueue), plus an indirect chain written by hand."""
    seeds = {}
    for name, size, event_idx in (("size8", 8, False), ("size16-event-idx", 16, True)):
        mem = _Memory(b"")
        d, a, u, total = layout(size)
        drv = DriverQueue(mem, size, RING + d, RING + a, RING + u, event_idx=event_idx)
        drv.add([(0x2000, 64)], [(0x2100, 128), (0x10000, 256)], "request")
        drv.add([], [(0x2400, 512)], "rx")
        drv.add([(0x10800, 16), (0x10900, 32)], [], "tx")
        drv.publish()
        image = bytes(mem.window[:total])
        cfg = (size.bit_length() - 1) | (8 if event_idx else 0)
        script = bytes([OP_POP, 8, OP_PUSH, 2, 0x40, 0, 0, 0, 0, 0x41, 64, 0, 0, 0, OP_NOTIFY, 0,
                        OP_POKE]) + struct.pack("<HHBHH", a + 10, 3, OP_POKE, a + 2, 4)  # fmt: skip
        script += bytes([OP_POP, 1, OP_DISCARD, 1])  # ring[3] = head 3 again, avail idx 4
        seeds[name] = bytes([cfg]) + struct.pack("<HHBH", 0, 0, 0, len(image)) + image + script
    # One indirect chain: head 0 points at a 3-entry table just after the rings.
    mem = _Memory(b"")
    d, a, _, _ = layout(4)
    at = RING + 0x80
    DESC.pack_into(mem.view(RING + d, 16), 0, at, 48, VIRTQ_DESC_F_INDIRECT, 0)
    table = mem.view(at, 48)
    DESC.pack_into(table, 0, 0x2000, 32, 1, 1)
    DESC.pack_into(table, 16, 0x2100, 64, 1 | VIRTQ_DESC_F_WRITE, 2)
    DESC.pack_into(table, 32, 0x10100, 16, VIRTQ_DESC_F_WRITE, 0)
    struct.pack_into("<HHH", mem.view(RING + a, 6), 0, 0, 1, 0)
    image = bytes(mem.window[: 0x80 + 48])
    seeds["indirect"] = bytes([2]) + struct.pack("<HHBH", 0, 0, 0, len(image)) + image + bytes([OP_POP, 1])
    return seeds


TARGET = Target(
    "ring",
    "device-side split-ring walk over a bytearray (vhostpci_driver/virtqueue/device.py)",
    fuzz_ring,
    ring_seeds,
    max_len=4096,
)
