"""Differential tests: the compiled ring walker against the pure reference, over the same bytes.

The strategies are test_virtqueue.py's (random rings, random traffic); each
example builds two copies of the same memory, runs DeviceQueue on one and
NativeDeviceQueue on the other, and asserts the same chains (heads, lengths,
every view's place in memory), the same used entries and indexes, the same
errors (rule, index, message), the same in-flight table and the same bytes
everywhere. Mutated rings are the ``ring-diff`` fuzz target's, which
test_fuzz_corpus.py drives with hypothesis.
"""

from __future__ import annotations

import ctypes
import struct
from array import array
from collections.abc import Callable
from operator import methodcaller
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_virtqueue import BUFS, MEM, RING, Mem, buf
from vhostpci_driver.addr import GuestMemory
from vhostpci_driver.errors import RingError
from vhostpci_driver.virtqueue import native
from vhostpci_driver.virtqueue.device import Chain, DeviceQueue
from vhostpci_driver.virtqueue.driver import DriverQueue
from vhostpci_driver.virtqueue.layout import layout
from vhostpci_driver.virtqueue.native import LIB, REASON, NativeDeviceQueue

pytestmark = pytest.mark.skipif(LIB is None, reason=REASON)


class Plain:
    """A GuestMemory that is not the region table: the compiled walker calls its view() back."""

    def __init__(self, m: Mem) -> None:
        self.m = m

    def view(self, addr: int, length: int) -> memoryview:
        return self.m.view(addr, length)


def where(m: Mem, v: memoryview) -> tuple[int, int]:
    if not len(v):
        return (-1, 0)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m.raw))
    return (ctypes.addressof(ctypes.c_char.from_buffer(v)) - base, len(v))


def summary(m: Mem, r: object) -> Any:
    if isinstance(r, list):
        return [
            (c.head, c.readable_len, c.writable_len, [where(m, v) for v in c.readable],
             [where(m, v) for v in c.writable])
            for c in r
            if isinstance(c, Chain)
        ]  # fmt: skip
    return r


class Twin:
    def __init__(self, size: int = 8, *, plain: bool = False, **kw: Any) -> None:
        self.mems = (Mem(), Mem())
        self.size = size
        self.kw = kw
        self.plain = plain

    def memory(self, m: Mem) -> GuestMemory:
        return Plain(m) if self.plain else m.table

    def start(self) -> None:
        d, a, u, _ = layout(self.size)
        self.queues = [
            cls(self.memory(m), self.size, RING + d, RING + a, RING + u, **self.kw)
            for cls, m in zip((DeviceQueue, NativeDeviceQueue), self.mems, strict=True)
        ]

    def write(self, addr: int, data: bytes) -> None:
        for m in self.mems:
            m.view(addr, len(data))[:] = data

    def do(self, what: Callable[[DeviceQueue], object]) -> object:
        got: list[tuple[Any, ...]] = []
        results: list[object] = []
        for m, q in zip(self.mems, self.queues, strict=True):
            try:
                r = what(q)
            except RingError as e:
                got.append(("RingError", e.rule, e.index, str(e), q.broken is e))
                results.append(None)
            except (TypeError, ValueError) as e:
                got.append((type(e).__name__, str(e)))
                results.append(None)
            else:
                got.append(("ok", summary(m, r)))
                results.append(r)
        assert got[0] == got[1]
        p, n = self.queues
        assert (p.last_avail_idx, p.last_used_idx, list(p._inflight)) == (
            n.last_avail_idx, n.last_used_idx, list(n._inflight),
        )  # fmt: skip
        assert self.mems[0].raw == self.mems[1].raw
        return results[0]  # the pure queue's


def test_the_dispatch_says_which_path_runs() -> None:
    assert native.describe()["built"] is True
    assert native.RingQueue is (NativeDeviceQueue if native.PATH == "native" else DeviceQueue)
    assert native.describe()["path"] == native.PATH


@settings(max_examples=400, deadline=None)
@given(
    st.binary(min_size=16 * 8, max_size=16 * 8),
    st.lists(st.integers(0, 12), min_size=8, max_size=8),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 9),
    st.booleans(),
    st.binary(min_size=64, max_size=64),
)
def test_random_rings_same_chains_used_entries_and_errors(
    table_bytes: bytes, heads: list[int], avail_idx: int, last_avail: int, max_chain: int, plain: bool,
    indirect: bytes,
) -> None:  # fmt: skip
    t = Twin(8, plain=plain, last_avail_idx=last_avail, max_chain_len=max_chain or None)
    d, a, _, _ = layout(8)
    # As test_virtqueue: steer half the addresses into memory so walks go deep; some point at a
    # random indirect table at BUFS, some past the end of memory.
    raw = bytearray(table_bytes)
    for i in range(8):
        if raw[16 * i] & 1:
            struct.pack_into("<Q", raw, 16 * i, BUFS + (raw[16 * i + 1] << 8))
            struct.pack_into("<I", raw, 16 * i + 8, raw[16 * i + 9] << 4)
        elif raw[16 * i] & 2:
            struct.pack_into("<Q", raw, 16 * i, RING + MEM - (raw[16 * i + 1] << 4))
    t.write(RING + d, bytes(raw))
    t.write(BUFS, indirect)
    t.write(RING + a + 2, struct.pack("<H", avail_idx) + struct.pack("<8H", *heads))
    t.start()
    chains = t.do(lambda q: q.pop_batch(64))
    if isinstance(chains, list):
        used = [(c.head, c.writable_len) for c in chains]
        t.do(lambda q: q.push_batch(used))
        t.do(lambda q: q.need_notify())


def direct(q: DeviceQueue, n: int) -> tuple[int, list[int]]:
    """pop_direct into a fresh array: the count and the words (regions and offsets are the same
    numbers in both copies of memory, whose region tables are alike)."""
    out = array("Q", bytes(24 * max(n, 0)))
    got = q.pop_direct(out, n)
    return got, list(out[: 3 * got])


@settings(max_examples=400, deadline=None)
@given(
    st.binary(min_size=16 * 8, max_size=16 * 8),
    st.lists(st.integers(0, 12), min_size=8, max_size=8),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(-1, 9),
    st.booleans(),
    st.integers(0, 3),
)
def test_random_rings_same_direct_batch(
    table_bytes: bytes, heads: list[int], avail_idx: int, last_avail: int, n: int, plain: bool, lie: int
) -> None:
    """pop_direct / push_direct alike on random rings: the words, the stop at a chain, every error."""
    t = Twin(8, plain=plain, last_avail_idx=last_avail)
    d, a, _, _ = layout(8)
    raw = bytearray(table_bytes)
    for i in range(8):
        if raw[16 * i] & 1:
            struct.pack_into("<Q", raw, 16 * i, BUFS + (raw[16 * i + 1] << 8))
            struct.pack_into("<I", raw, 16 * i + 8, raw[16 * i + 9] << 4)
        elif raw[16 * i] & 2:
            struct.pack_into("<Q", raw, 16 * i, RING + MEM - (raw[16 * i + 1] << 4))
    t.write(RING + d, bytes(raw))
    t.write(RING + a + 2, struct.pack("<H", avail_idx) + struct.pack("<8H", *heads))
    t.start()
    got = t.do(lambda q: direct(q, n))
    if isinstance(got, tuple) and got[0]:
        words = got[1]
        used = array("I")
        for k in range(got[0]):  # what each chain can take, and sometimes more or a wrong head
            head, length = words[3 * k] & 0xFFFF, words[3 * k] >> 32 if words[3 * k] >> 16 & 1 else 0
            used += array("I", [head ^ (lie == 3 and k == 1), length + (lie == 2 and k == 0)])
        t.do(lambda q: q.push_direct(used, got[0] - (lie == 1)))
        t.do(lambda q: q.need_notify())
    t.do(lambda q: q.pop_batch(8))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 40)), min_size=1, max_size=40),
    st.booleans(),
    st.sampled_from([4, 8, 16]),
    st.integers(0, 0xFFFF),
)
def test_random_traffic_same_used_entries(
    ops: list[tuple[int, int, int]], event_idx: bool, size: int, start: int
) -> None:
    t = Twin(size, event_idx=event_idx)
    d, a, u, _ = layout(size)
    drivers = [DriverQueue(m, size, RING + d, RING + a, RING + u, event_idx=event_idx) for m in t.mems]
    t.start()
    seq = 0
    for nout, nin_, burst in ops:
        nin = nin_ or (0 if nout else 1)
        for drv in drivers:
            k = burst
            s = seq
            while drv.free_count() >= nout + nin and k:
                drv.add([(buf(j), 16) for j in range(nout)], [(buf(j + 4), 32) for j in range(nin)], s)
                s += 1
                k -= 1
            drv.publish()
        seq = s
        chains = t.do(methodcaller("pop_batch", burst + 1))
        assert isinstance(chains, list)
        # written lengths vary with the step; every third step returns one chain too long
        used = [(c.head, (c.writable_len + start + i) % (c.writable_len + 1 + (i % 3 == 2))) for i, c in
                enumerate(chains)]  # fmt: skip
        t.do(methodcaller("push_batch", used))
        t.do(lambda q: q.need_notify())
        t.do(lambda q: q.enable_notifications())
        if t.queues[0].broken:
            return
        harvested = [dq.harvest() for dq in drivers]
        assert harvested[0] == harvested[1]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.integers(-3, 10), st.integers(-(2**70), 2**70)),
            st.one_of(st.integers(-3, 300), st.integers(-(2**70), 2**70)),
        ),
        max_size=12,
    ),
)
def test_used_entries_from_the_backend_checked_alike(used: list[tuple[int, int]]) -> None:
    t = Twin(8)
    d, a, _, _ = layout(8)
    for i in range(8):
        t.write(RING + d + 16 * i, struct.pack("<QIHH", buf(i), 64 * i, 2 if i % 2 else 0, 0))
    t.write(RING + a + 2, struct.pack("<H8H", 6, 0, 1, 2, 3, 4, 5, 6, 7))
    t.start()
    t.do(lambda q: q.pop_batch(32))
    t.do(lambda q: q.push_batch(used))


def test_a_ring_error_marks_both_broken_for_good() -> None:
    t = Twin(8)
    _, a, _, _ = layout(8)
    t.write(RING + a + 2, struct.pack("<HH", 1, 9))  # head 9 in a ring of 8
    t.start()
    t.do(lambda q: q.pop_batch(8))
    for q in t.queues:
        assert q.broken is not None and q.broken.rule == "desc-index" and q.broken.index == 9
    t.do(lambda q: q.push_batch([(0, 0)]))
    t.do(lambda q: q.pop_batch(8))
