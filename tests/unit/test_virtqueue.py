"""Split virtqueues: driver and device sides over one buffer, hostile rings, property tests."""

from __future__ import annotations

import struct
from array import array
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostpci_driver.addr import WindowOffset, Xgpa
from vhostpci_driver.errors import RingError
from vhostpci_driver.memory import BufferWindow, Region, RegionTable
from vhostpci_driver.spec.virtio import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vhostpci_driver.virtqueue.device import DeviceQueue
from vhostpci_driver.virtqueue.driver import DriverQueue
from vhostpci_driver.virtqueue.layout import (
    layout,
    need_event,
)
from vhostpci_driver.virtqueue.native import LIB, REASON, NativeDeviceQueue

BASE = 0x1_0000_0000  # guest-physical base of the test memory
MEM = 1 << 20
RING = BASE  # rings at the start, buffers from BASE + 64 KiB
BUFS = BASE + (64 << 10)

# Every device-side test runs against both implementations: the pure reference and the compiled one.
IMPLS = [
    pytest.param(DeviceQueue, id="pure"),
    pytest.param(NativeDeviceQueue, id="native", marks=pytest.mark.skipif(LIB is None, reason=REASON)),
]


class Mem:
    """Guest memory for tests: a bytearray behind the real region table, with a guard band around it."""

    def __init__(self) -> None:
        self.raw = bytearray(MEM + 2 * 4096)
        self.raw[:4096] = b"\xaa" * 4096
        self.raw[-4096:] = b"\xaa" * 4096
        self.table = RegionTable(BufferWindow(memoryview(self.raw)[4096:-4096]))
        self.table.add([Region(Xgpa(BASE), MEM, WindowOffset(0))])

    def view(self, addr: int, length: int) -> memoryview:
        return self.table.view(addr, length)

    def guards_intact(self) -> bool:
        return self.raw[:4096] == b"\xaa" * 4096 and self.raw[-4096:] == b"\xaa" * 4096


def pair(
    impl: type[DeviceQueue], size: int = 8, event_idx: bool = False
) -> tuple[Mem, DriverQueue, DeviceQueue]:
    m = Mem()
    d, a, u, _ = layout(size)
    drv = DriverQueue(m, size, RING + d, RING + a, RING + u, event_idx=event_idx)
    dev = impl(m.table, size, RING + d, RING + a, RING + u, event_idx=event_idx)
    return m, drv, dev


def buf(i: int, size: int = 256) -> int:
    return BUFS + i * size


# -- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_chains_round_trip_with_data(impl: type[DeviceQueue]) -> None:
    m, drv, dev = pair(impl)
    m.view(buf(0), 5)[:] = b"hello"
    drv.add([(buf(0), 5)], [(buf(1), 100), (buf(2), 50)], "t0")
    drv.add([], [(buf(3), 64)], "t1")
    drv.publish()
    assert drv.kick_needed()
    chains = dev.pop_batch()
    assert [c.head for c in chains] == [0, 3]  # heads are the first descriptor of each chain
    c = chains[0]
    assert c.read_all() == b"hello" and c.readable_len == 5 and c.writable_len == 150
    c.writable[0][:3] = b"abc"
    dev.push_batch([(c.head, 3), (chains[1].head, 0)])
    assert dev.need_notify()
    assert drv.harvest() == [("t0", 3), ("t1", 0)]
    assert bytes(m.view(buf(1), 3)) == b"abc"
    assert drv.free_count() == 8


@pytest.mark.parametrize("impl", IMPLS)
def test_indirect_chain(impl: type[DeviceQueue]) -> None:
    m, drv, dev = pair(impl)
    table = BUFS + 0x8000
    entries = [(buf(0), 10, VIRTQ_DESC_F_NEXT, 1), (buf(1), 20, VIRTQ_DESC_F_WRITE, 0)]
    for i, e in enumerate(entries):
        struct.pack_into("<QIHH", m.view(table, 32), 16 * i, *e)
    drv.add([(table, 32)], [], "ind")
    # turn the descriptor the driver wrote into an indirect one
    struct.pack_into("<H", m.view(RING, 16), 12, VIRTQ_DESC_F_INDIRECT)
    drv.publish()
    (c,) = dev.pop_batch()
    assert (c.readable_len, c.writable_len) == (10, 20)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 40)), min_size=1, max_size=60),
    st.booleans(),
    st.sampled_from([4, 8, 16]),
)
@pytest.mark.parametrize("impl", IMPLS)
def test_random_traffic_round_trips(
    impl: type[DeviceQueue], ops: list[tuple[int, int, int]], event_idx: bool, size: int
) -> None:
    m, drv, dev = pair(impl, size, event_idx)
    outstanding: dict[int, int] = {}
    seq = 0
    for nout, nin_, burst_ in ops:
        nin = nin_ or (0 if nout else 1)
        burst = burst_
        while drv.free_count() >= nout + nin and burst:
            drv.add([(buf(k), 16) for k in range(nout)], [(buf(k + 4), 32) for k in range(nin)], seq)
            outstanding[seq] = 32 * nin
            seq += 1
            burst -= 1
        drv.publish()
        kick = drv.kick_needed()
        pending = dev.pending()
        if pending and not event_idx:
            assert kick
        chains = dev.pop_batch(64)
        dev.push_batch([(c.head, c.writable_len) for c in chains])
        dev.enable_notifications()
        for token, written in drv.harvest():
            assert outstanding.pop(token) == written  # type: ignore[call-overload]
    assert not outstanding
    assert m.guards_intact()


def test_need_event_rule() -> None:
    assert need_event(0, 1, 0)
    assert not need_event(5, 3, 0)
    assert need_event(0xFFFF, 0, 0xFFFE)  # wraps
    assert not need_event(10, 10, 10)


@pytest.mark.parametrize("impl", IMPLS)
def test_event_idx_suppresses_kicks_and_interrupts(impl: type[DeviceQueue]) -> None:
    _, drv, dev = pair(impl, 8, event_idx=True)
    drv.add([], [(buf(0), 8)], 0)
    drv.publish()
    assert drv.kick_needed()  # avail_event 0 is in (0, 1]
    chains = dev.pop_batch()
    # the device does not re-arm: the next kick is suppressed
    drv.add([], [(buf(1), 8)], 1)
    drv.publish()
    assert not drv.kick_needed()
    chains += dev.pop_batch()  # a device re-checks the ring before re-arming (the race of 2.7.10)
    dev.enable_notifications()  # avail_event = 2
    drv.add([], [(buf(2), 8)], 2)
    drv.publish()
    assert drv.kick_needed()
    chains += dev.pop_batch()
    dev.push_batch([(chains[0].head, 8)])
    assert dev.need_notify()  # used_event 0 is in (0, 1]
    dev.push_batch([(c.head, 0) for c in chains[1:]])
    assert not dev.need_notify()  # the driver has not moved used_event past 0
    assert len(drv.harvest()) == 3
    dev.push_batch([])
    assert not dev.need_notify()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("after", [1, 3, 8, 16])
def test_interrupt_moderation_gets_exactly_the_calls_used_event_asks_for(
    impl: type[DeviceQueue], after: int
) -> None:
    """used_event set ``after`` - 1 past last_used_idx: one call per ``after`` entries, batches or not.

    virtio 1.2, 2.7.10: the device signals iff the used index passed used_event since
    its last signal; the driver's harvests keep used_event that far ahead, across the
    16-bit wrap (the ring runs 70,000 entries).
    """
    size = 16
    _, drv, dev = pair(impl, size, event_idx=True)
    assert not drv.enable_interrupts(after)
    for i in range(size):
        drv.add([], [(buf(i), 8)], i)
    drv.publish()
    pushed = calls = since = 0
    batch = [1, 2, 5, 3, 7, 1, 4]
    k = 0
    while pushed < 70_000:
        n = batch[k % len(batch)]
        k += 1
        chains = dev.pop_batch(n)
        dev.push_batch([(c.head, 8) for c in chains])
        pushed += len(chains)
        since += len(chains)
        call = dev.need_notify()
        # the rule: a call iff this push reached the after-th entry past the last harvest
        assert call == (since >= after), (pushed, since)
        if call:
            calls += 1
            got = drv.harvest()  # the driver takes its interrupt: harvests, re-posts
            assert len(got) == since
            since = 0
            for token, _ in got:
                drv.add([], [(buf(cast(int, token)), 8)], token)
            drv.publish()
    assert calls >= 70_000 // (after + 6)


@pytest.mark.parametrize("impl", IMPLS)
def test_disabled_interrupts_get_no_call_and_enable_reports_what_is_there(impl: type[DeviceQueue]) -> None:
    size = 8
    _, drv, dev = pair(impl, size, event_idx=True)
    drv.disable_interrupts()
    for round_ in range(3):  # used_event stays behind last_used_idx across harvests
        for i in range(size):
            drv.add([], [(buf(i), 8)], i)
        drv.publish()
        for c in dev.pop_batch(size):
            dev.push_batch([(c.head, 8)])
            assert not dev.need_notify(), round_
        assert len(drv.harvest()) == size
    for i in range(4):
        drv.add([], [(buf(i), 8)], i)
    drv.publish()
    dev.push_batch([(c.head, 8) for c in dev.pop_batch(2)])
    assert not dev.need_notify()
    # re-enabled with entries already used: True, and harvesting them is the caller's job
    assert drv.enable_interrupts(2) and not drv.enable_interrupts(3)
    dev.push_batch([(c.head, 8) for c in dev.pop_batch(1)])
    assert dev.need_notify()  # the third entry past last_used_idx
    with pytest.raises(ValueError):
        drv.enable_interrupts(size + 1)


def test_interrupt_moderation_without_event_idx_is_the_flag() -> None:
    _, drv, dev = pair(DeviceQueue, 8, event_idx=False)
    drv.disable_interrupts()
    drv.add([], [(buf(0), 8)], 0)
    drv.add([], [(buf(1), 8)], 1)
    drv.publish()
    chains = dev.pop_batch()
    dev.push_batch([(chains[0].head, 8)])
    assert not dev.need_notify()  # NO_INTERRUPT
    assert drv.enable_interrupts(4)  # "after" cannot be said: the next entry; one is there
    dev.push_batch([(chains[1].head, 8)])
    assert dev.need_notify()


# -- hostile rings: each rule has its test ---------------------------------------


def hostile(impl: type[DeviceQueue], size: int = 8) -> tuple[Mem, DeviceQueue, memoryview, memoryview]:
    m = Mem()
    d, a, u, _ = layout(size)
    dev = impl(m.table, size, RING + d, RING + a, RING + u)
    return m, dev, m.view(RING + d, 16 * size), m.view(RING + a, 6 + 2 * size)


def publish(avail: memoryview, heads: list[int], idx: int | None = None) -> None:
    for i, h in enumerate(heads):
        struct.pack_into("<H", avail, 4 + 2 * i, h)
    struct.pack_into("<H", avail, 2, len(heads) if idx is None else idx)


def desc(table: memoryview, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
    struct.pack_into("<QIHH", table, 16 * i, addr, length, flags, nxt)


def broken_with(dev: DeviceQueue, rule: str) -> RingError:
    with pytest.raises(RingError) as ei:
        dev.pop_batch()
    assert ei.value.rule == rule, str(ei.value)
    assert dev.broken is ei.value
    with pytest.raises(RingError) as again:  # broken for good
        dev.pop_batch()
    assert again.value is ei.value
    return ei.value


@pytest.mark.parametrize("impl", IMPLS)
def test_head_index_out_of_range(impl: type[DeviceQueue]) -> None:
    _, dev, _, avail = hostile(impl)
    publish(avail, [8])
    assert broken_with(dev, "desc-index").index == 8


@pytest.mark.parametrize("impl", IMPLS)
def test_next_index_out_of_range(impl: type[DeviceQueue]) -> None:
    _, dev, table, avail = hostile(impl)
    desc(table, 0, buf(0), 8, VIRTQ_DESC_F_NEXT, 9)
    publish(avail, [0])
    broken_with(dev, "desc-index")


@pytest.mark.parametrize("impl", IMPLS)
def test_descriptor_loop(impl: type[DeviceQueue]) -> None:
    _, dev, table, avail = hostile(impl)
    desc(table, 0, buf(0), 8, VIRTQ_DESC_F_NEXT, 1)
    desc(table, 1, buf(1), 8, VIRTQ_DESC_F_NEXT, 0)
    publish(avail, [0])
    broken_with(dev, "chain-length")


@pytest.mark.parametrize("impl", IMPLS)
def test_chain_longer_than_the_ring(impl: type[DeviceQueue]) -> None:
    _, dev, table, avail = hostile(impl, 4)
    for i in range(4):
        desc(table, i, buf(i), 8, VIRTQ_DESC_F_NEXT, (i + 1) % 4)
    publish(avail, [0])
    broken_with(dev, "chain-length")


@pytest.mark.parametrize("impl", IMPLS)
def test_indirect_inside_indirect(impl: type[DeviceQueue]) -> None:
    m, dev, table, avail = hostile(impl)
    ind = BUFS + 0x8000
    desc(m.view(ind, 16), 0, ind, 16, VIRTQ_DESC_F_INDIRECT)
    desc(table, 0, ind, 16, VIRTQ_DESC_F_INDIRECT)
    publish(avail, [0])
    broken_with(dev, "indirect-nested")


@pytest.mark.parametrize("length", [0, 24, 16 * 9])
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_indirect_table_length(impl: type[DeviceQueue], length: int) -> None:
    _, dev, table, avail = hostile(impl)
    desc(table, 0, BUFS, length, VIRTQ_DESC_F_INDIRECT)
    publish(avail, [0])
    broken_with(dev, "indirect-len")


@pytest.mark.parametrize("impl", IMPLS)
def test_indirect_with_next(impl: type[DeviceQueue]) -> None:
    _, dev, table, avail = hostile(impl)
    desc(table, 0, BUFS, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    publish(avail, [0])
    broken_with(dev, "indirect-next")


@pytest.mark.parametrize("impl", IMPLS)
def test_loop_inside_an_indirect_table(impl: type[DeviceQueue]) -> None:
    m, dev, table, avail = hostile(impl)
    ind = BUFS + 0x8000
    t = m.view(ind, 32)
    desc(t, 0, buf(0), 8, VIRTQ_DESC_F_NEXT, 1)
    desc(t, 1, buf(1), 8, VIRTQ_DESC_F_NEXT, 0)
    desc(table, 0, ind, 32, VIRTQ_DESC_F_INDIRECT)
    publish(avail, [0])
    broken_with(dev, "chain-length")


@pytest.mark.parametrize(
    ("addr", "length"), [(0xDEAD_0000_0000, 8), (BASE + MEM - 4, 8), (BUFS, 0xFFFF_FFFF), (BASE - 8, 8)]
)
@pytest.mark.parametrize("impl", IMPLS)
def test_buffer_outside_memory(impl: type[DeviceQueue], addr: int, length: int) -> None:
    _, dev, table, avail = hostile(impl)
    desc(table, 0, addr, length)
    publish(avail, [0])
    broken_with(dev, "desc-addr")


@pytest.mark.parametrize("impl", IMPLS)
def test_indirect_table_outside_memory(impl: type[DeviceQueue]) -> None:
    _, dev, table, avail = hostile(impl)
    desc(table, 0, BASE + MEM - 16, 32, VIRTQ_DESC_F_INDIRECT)
    publish(avail, [0])
    broken_with(dev, "desc-addr")


@pytest.mark.parametrize("impl", IMPLS)
def test_avail_index_jump(impl: type[DeviceQueue]) -> None:
    _, dev, _, avail = hostile(impl)
    publish(avail, [0], idx=9)
    broken_with(dev, "avail-idx")


@pytest.mark.parametrize("impl", IMPLS)
def test_readable_after_writable(impl: type[DeviceQueue]) -> None:
    _, dev, table, avail = hostile(impl)
    desc(table, 0, buf(0), 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    desc(table, 1, buf(1), 8, 0)
    publish(avail, [0])
    broken_with(dev, "desc-order")


@pytest.mark.parametrize("impl", IMPLS)
def test_head_already_in_flight(impl: type[DeviceQueue]) -> None:
    _, dev, table, avail = hostile(impl)
    desc(table, 0, buf(0), 8)
    publish(avail, [0, 0])
    broken_with(dev, "desc-in-flight")


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_used_entries_from_the_backend(impl: type[DeviceQueue]) -> None:
    _, dev, table, avail = hostile(impl)
    desc(table, 0, buf(0), 8, VIRTQ_DESC_F_WRITE)
    publish(avail, [0])
    dev.pop_batch()
    with pytest.raises(RingError) as ei:
        dev.push(0, 9)
    assert ei.value.rule == "used-len"
    _, dev2, _, _ = hostile(impl)
    with pytest.raises(RingError) as ei:
        dev2.push(3, 0)
    assert ei.value.rule == "used-id"


@pytest.mark.parametrize("impl", IMPLS)
def test_rings_outside_memory_and_misaligned(impl: type[DeviceQueue]) -> None:
    m = Mem()
    with pytest.raises(RingError) as ei:
        impl(m.table, 8, BASE + MEM - 64, RING + 0x1000, RING + 0x2000)
    assert ei.value.rule == "ring-addr"
    with pytest.raises(RingError) as ei:
        impl(m.table, 8, RING + 8, RING + 0x1000, RING + 0x2000)
    assert ei.value.rule == "ring-align"
    with pytest.raises(RingError) as ei:
        impl(m.table, 6, RING, RING + 0x1000, RING + 0x2000)
    assert ei.value.rule == "queue-size"


def test_a_device_returning_garbage_to_the_driver() -> None:
    m, drv, _ = pair(DeviceQueue)
    drv.add([], [(buf(0), 8)], "x")
    drv.publish()
    used = m.view(RING + layout(8)[2], 6 + 64)
    struct.pack_into("<HII", used, 2, 1, 5, 0)  # idx 1, id 5 (not in flight)
    with pytest.raises(RingError) as ei:
        drv.harvest()
    assert ei.value.rule == "used-id"
    struct.pack_into("<HII", used, 2, 1, 0, 99)  # id 0, too long
    with pytest.raises(RingError) as ei:
        drv.harvest()
    assert ei.value.rule == "used-len"
    struct.pack_into("<H", used, 2, 7)  # more used than made available
    with pytest.raises(RingError) as ei:
        drv.harvest()
    assert ei.value.rule == "used-idx"


def test_taken_chains_go_back_as_they_were_or_to_the_free_stack() -> None:
    """take_used keeps the chains out of the free stack for repost (the same heads, descriptors
    and tokens) or release; its rules are harvest's, all or nothing."""
    m, drv, dev = pair(DeviceQueue)
    heads = drv.add_many([(buf(i), 64, f"b{i}") for i in range(4)], True)
    drv.publish()
    desc = bytes(m.view(RING, 16 * 8))
    chains = dev.pop_batch(4)
    dev.push_batch([(c.head, 10 + i) for i, c in enumerate(chains)])
    taken, used = drv.take_used()
    assert taken == [c.head for c in chains] and used == [(f"b{i}", 10 + i) for i in range(4)]
    assert len(drv._free) == 4 and drv.in_flight() == 0
    drv.repost(taken[:3])
    drv.release(taken[3:])
    drv.publish()
    assert bytes(m.view(RING, 16 * 8)) == desc  # descriptors untouched
    assert sorted(drv._free) == sorted(set(range(8)) - set(taken[:3])) and sorted(taken) == sorted(heads)
    again = dev.pop_batch(8)
    assert [c.head for c in again] == taken[:3] and all(c.writable_len == 64 for c in again)
    # a head returned twice in one batch is not in flight the second time; nothing is taken
    used_ring = m.view(RING + layout(8)[2], 4 + 8 * 8)
    before = (drv.last_used_idx, list(drv._tokens), list(drv._free))
    (idx,) = struct.unpack_from("<H", used_ring, 2)
    for k, head in enumerate((taken[0], taken[0])):
        struct.pack_into("<II", used_ring, 4 + 8 * ((idx + k) % 8), head, 1)
    struct.pack_into("<H", used_ring, 2, (idx + 2) & 0xFFFF)
    with pytest.raises(RingError) as ei:
        drv.take_used()
    assert (ei.value.rule, ei.value.index) == ("used-id", taken[0])
    assert (drv.last_used_idx, list(drv._tokens), list(drv._free)) == before


# -- property: random ring states never escape, loop, or raise anything else -------


@settings(max_examples=300, deadline=None)
@given(
    st.binary(min_size=16 * 8, max_size=16 * 8),
    st.lists(st.integers(0, 12), min_size=8, max_size=8),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
)
@pytest.mark.parametrize("impl", IMPLS)
def test_random_rings_yield_valid_chains_or_ring_error(
    impl: type[DeviceQueue], table_bytes: bytes, heads: list[int], avail_idx: int, last_avail: int
) -> None:
    m = Mem()
    d, a, u, _ = layout(8)
    # Steer random addresses into a plausible range half of the time, so walks go deep.
    raw = bytearray(table_bytes)
    for i in range(8):
        if raw[16 * i] & 1:
            struct.pack_into("<Q", raw, 16 * i, BUFS + (raw[16 * i + 1] << 8))
            struct.pack_into("<I", raw, 16 * i + 8, raw[16 * i + 9] << 4)
    m.view(RING + d, 128)[:] = raw
    avail = m.view(RING + a, 22)
    for i, h in enumerate(heads):
        struct.pack_into("<H", avail, 4 + 2 * i, h)
    struct.pack_into("<H", avail, 2, avail_idx)
    before = bytes(m.raw)
    dev = impl(m.table, 8, RING + d, RING + a, RING + u, last_avail_idx=last_avail)
    try:
        chains = dev.pop_batch(64)
    except RingError:
        assert dev.broken is not None
    else:
        for c in chains:
            assert len(c.readable) + len(c.writable) <= 8 * 9
            for v in (*c.readable, *c.writable):
                assert len(v) <= MEM
        try:
            dev.push_batch([(c.head, c.writable_len) for c in chains])
        except RingError:
            pass
    # only the used ring may have changed
    used_lo, used_hi = 4096 + (RING - BASE) + u, 4096 + (RING - BASE) + u + 6 + 64
    after = bytes(m.raw)
    assert after[:used_lo] == before[:used_lo] and after[used_hi:] == before[used_hi:]
    assert m.guards_intact()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("entries", "ok"), [(8, True), (9, False)])
def test_an_indirect_table_of_the_ring_size_is_taken_and_one_more_entry_is_not(
    impl: type[DeviceQueue], entries: int, ok: bool
) -> None:
    """The bound of rule indirect-len (as Linux get_indirect): at most as many entries as the ring."""
    m, dev, table, avail = hostile(impl, 8)
    ind = BUFS + 0x8000
    t = m.view(ind, 16 * entries)
    for i in range(entries):  # one chain through the whole table
        last = i == entries - 1
        desc(t, i, buf(i), 8, 0 if last else VIRTQ_DESC_F_NEXT, 0 if last else i + 1)
    desc(table, 0, ind, 16 * entries, VIRTQ_DESC_F_INDIRECT)
    publish(avail, [0])
    if ok:
        (c,) = dev.pop_batch()
        assert (len(c.readable), c.readable_len) == (entries, 8 * entries)
    else:
        broken_with(dev, "indirect-len")


# -- the batch described in arrays (pop_direct / push_direct) ---------------------------------------


def _direct(dev: DeviceQueue, table: RegionTable, n: int) -> list[tuple[int, bool, memoryview]]:
    out = array("Q", bytes(24 * n))
    got = dev.pop_direct(out, n)
    res = []
    for k in range(got):
        w, region, off = out[3 * k : 3 * k + 3]
        length = w >> 32
        res.append((w & 0xFFFF, bool(w >> 16 & 1), table.region_view(region)[off : off + length]))
    return res


@pytest.mark.parametrize("impl", IMPLS)
def test_pop_direct_describes_what_pop_batch_pops_and_stops_at_a_chain(impl: type[DeviceQueue]) -> None:
    m, drv, dev = pair(impl, 16)
    for i in range(5):
        drv.add((), ((buf(i), 100 + i),), i)  # writable, direct
    drv.add(((buf(8), 16),), ((buf(9), 16),), "chained")  # NEXT: not a direct chain
    drv.add(((buf(10), 30),), (), 6)
    drv.publish()
    for i in range(5):
        m.view(buf(i), 4)[:] = bytes([i]) * 4
    got = _direct(dev, m.table, 16)
    heads = [h for h, _, _ in got]  # the driver's descriptors, in avail order
    want = [(True, 100 + i, bytes([i]) * 4) for i in range(5)]
    assert [(w, len(v), bytes(v[:4])) for _, w, v in got] == want
    v0 = dev.mem.view(buf(0), 100)  # the same bytes pop_batch would have viewed
    v0[:1] = b"\x7f"
    assert got[0][2][0] == 0x7F
    assert dev.in_flight() == 5 and dev.pending() == 2  # the chained one waits for pop_batch
    (chained,) = dev.pop_batch(1)
    assert chained.readable_len == 16 and chained.writable_len == 16
    rest = _direct(dev, m.table, 16)
    assert [(w, bytes(v)) for _, w, v in rest] == [(False, bytes(30))]
    used = array("I", [x for h, _, v in got for x in (h, len(v))])
    dev.push_direct(used, len(got))
    assert drv.harvest() == [(i, 100 + i) for i in range(5)] and len(set(heads)) == 5
    with pytest.raises(RingError) as e:
        dev.push_direct(array("I", [got[0][0], 1]), 1)  # pushed already: not in flight
    assert e.value.rule == "used-id"


@pytest.mark.parametrize("impl", IMPLS)
def test_pop_direct_keeps_every_rule(impl: type[DeviceQueue]) -> None:
    _, drv, dev = pair(impl, 8)
    drv.add((), ((RING + MEM - 8, 64),), 0)  # past the end of memory
    drv.publish()
    with pytest.raises(RingError) as e:
        dev.pop_direct(array("Q", bytes(24 * 8)), 8)
    assert e.value.rule == "desc-addr" and dev.broken is e.value
    with pytest.raises(TypeError):
        pair(impl, 8)[2].pop_direct([0] * 24, 8)  # type: ignore[arg-type]
    _, _, short = pair(impl, 8)
    with pytest.raises(ValueError):
        short.push_direct(array("I", [0]), 1)
