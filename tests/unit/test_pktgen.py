"""The compiled traffic source (vhostpci_host._pktgen) against the pure frontend, lockstep.

Two simulated guest RAMs with the same layout, one frontend each (compiled and pure),
driven by the same hypothesis-drawn steps: pktgen and ordinary sends, a device side
that delivers frames to RX (whole, split over mergeable buffers, cut short, corrupted,
duplicated, reordered, with a lying num_buffers) and returns TX, a sender that restarts
(a new sequence base), and hostile used rings. After
every step the two guest RAMs are the same bytes, the two rings' states (free stack,
tokens, chains, lengths, indexes) are the same, and so are the receivers' counts and
any error (type, rule, message).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostpci_driver.errors import RingError
from vhostpci_driver.virtqueue.device import DeviceQueue
from vhostpci_host import frontend as fe_mod
from vhostpci_host import netpacket
from vhostpci_host.frontend import HDR, MRG_BUF, NET_FEATURES, NetFrontend, mixed_size
from vhostpci_host.guestram import GuestRam
from vhostpci_host.netpacket import NET_HDR_SIZE

pytestmark = pytest.mark.skipif(fe_mod.PKTGEN is None, reason="vhostpci_host._pktgen is not built")

MAC = bytes.fromhex("525400000001")
PEER = bytes.fromhex("525400000002")
QSIZE = 16
MRG = 1 << 15  # VIRTIO_NET_F_MRG_RXBUF


class Side:
    """One guest RAM, one frontend, and the device side of its two rings (pure DeviceQueues)."""

    def __init__(self, compiled: bool, mergeable: bool, event_idx: bool) -> None:
        self.ram = GuestRam(4 << 20)
        self.fe = NetFrontend(self.ram, MAC, QSIZE, compiled=compiled)
        self.fe.seq = 12288 * 7
        features = NET_FEATURES if mergeable else NET_FEATURES & ~MRG
        if not event_idx:
            features &= ~(1 << 29)
        self.fe.negotiated(features)
        self.fe.start()
        self.dev = [
            DeviceQueue(self.ram, q.size, q.desc, q.avail, q.used, event_idx=event_idx)
            for q in self.fe.queues
        ]

    def state(self) -> Any:
        fe = self.fe
        rings = [
            (
                q.ring._free,
                q.ring._tokens,
                q.ring._chains,
                q.ring._wlen,
                q.ring.avail_idx,
                q.ring.last_used_idx,
            )
            for q in fe.queues
        ]
        r = fe.receiver
        return (
            bytes(self.ram._mm),
            rings,
            fe.tx.free,
            fe.rx.free,
            fe._stamped,
            fe.seq,
            fe.sent,
            fe.sent_bytes,
            (r.received, r.octets, r.duplicates, r.corrupt),
            # how each SeqSet holds its numbers, not only which: both saw the same frames in order
            {src: (q.lo, q.hi, q.rest) for src, q in r.seen.items()},
        )

    def deliver(self, k: int, how: str, at: int) -> None:
        """The device side: pop up to ``k`` TX frames, place each in RX buffers, push both rings."""
        rx, tx = self.dev
        frames = tx.pop_batch(k)
        used_rx: list[tuple[int, int]] = []
        # "reverse": out of order, so the receivers' SeqSets hold numbers beside their runs
        for c in reversed(frames) if how == "reverse" else frames:
            data = bytearray(c.read_all())
            if how == "corrupt" and len(data) > HDR:
                data[HDR + at % (len(data) - HDR)] ^= 0x40
            copies = 2 if how == "duplicate" else 1
            for _ in range(copies):
                bufs = rx.pop_batch(1 if not self.fe.mergeable else QSIZE)
                if not bufs:
                    break
                if self.fe.mergeable:
                    need = max(1, -(-len(data) // MRG_BUF))
                    rx.discard(bufs[need:])
                    bufs = bufs[:need]
                    nb = len(bufs) + (3 if how == "lie" else 0)
                    struct.pack_into("<H", data, 10, nb)
                    off = 0
                    for b in bufs:
                        piece = data[off : off + len(b.writable[0])]
                        b.writable[0][: len(piece)] = piece
                        used_rx.append((b.head, len(piece)))
                        off += len(piece)
                else:
                    b = bufs[0]
                    n = min(len(data), b.writable_len)
                    if how == "short":
                        n = at % (n + 1)
                    b.writable[0][:n] = data[:n]
                    used_rx.append((b.head, n))
        rx.push_batch(used_rx)
        tx.push_batch([(c.head, 0) for c in frames])

    def hostile(self, which: int, kind: str, value: int) -> None:
        """Write a used element or index the rules forbid, as a broken device would."""
        q = self.fe.queues[which]
        used = self.ram.view(q.used, 4 + 8 * q.size)
        (idx,) = struct.unpack_from("<H", used, 2)
        if kind == "idx":
            struct.pack_into("<H", used, 2, (idx + value) & 0xFFFF)
            return
        head, length = (value % (2 * q.size), 0) if kind == "id" else (0, value)
        if kind == "len":  # a head that is in flight, with a length past its buffer
            head = next((h for h, t in enumerate(q.ring._tokens) if t is not fe_mod._driver._FREE), 0)
            length = q.ring._wlen[head] + 1 + value
        struct.pack_into("<II", used, 4 + 8 * (idx % q.size), head, length)
        struct.pack_into("<H", used, 2, (idx + 1) & 0xFFFF)


def _run(side: Side, step: tuple[Any, ...]) -> Any:
    fe = side.fe
    try:
        match step:
            case ("pktgen", n, size):
                return fe.send_pktgen(PEER, n, size)
            case ("send", n):
                return fe.send(PEER, n, lambda seq: mixed_size(seq) % 3000 + 64)
            case ("rebase", k):  # the sender restarted: a new incarnation numbers from a new base
                fe.seq += 12288 * k
                return None
            case ("deliver", k, how, at, reclaim):
                side.deliver(k, how, at)
                # not reclaimed: the next pktgen send takes the used TX chains back itself (kept
                # and stamped again where they hold its frame, released where they do not)
                return (fe.receive(), fe.reclaim_tx() if reclaim else None)
            case ("hostile", which, kind, value):
                side.hostile(which, kind, value)
                if which == 0:
                    return fe.receive()
                return fe.send_pktgen(PEER, value % 5, 64) if value % 2 else fe.reclaim_tx()
            case ("irq", which, after):  # interrupt moderation: where later harvests put used_event
                ring = fe.queues[which].ring
                if after == 0:
                    ring.disable_interrupts()
                    return None
                return ring.enable_interrupts(after)
    except (RingError, IndexError, ValueError) as e:
        return (type(e).__name__, getattr(e, "rule", None), str(e))
    raise AssertionError(step)


steps = st.one_of(
    st.tuples(st.just("pktgen"), st.integers(0, QSIZE + 2), st.sampled_from([64, 65, 200, 1500, 5000, 9000])),
    st.tuples(st.just("send"), st.integers(0, 4)),
    st.tuples(
        st.just("deliver"),
        st.integers(0, QSIZE),
        st.sampled_from(["whole", "whole", "corrupt", "short", "duplicate", "lie", "reverse"]),
        st.integers(0, 1 << 16),
        st.booleans(),
    ),
    st.tuples(
        st.just("hostile"), st.integers(0, 1), st.sampled_from(["id", "len", "idx"]), st.integers(0, 40)
    ),
    st.tuples(st.just("irq"), st.integers(0, 1), st.integers(0, QSIZE)),
    st.tuples(st.just("rebase"), st.integers(-2, 2)),
)


@settings(max_examples=200, deadline=None)
@given(st.booleans(), st.booleans(), st.lists(steps, min_size=1, max_size=14))
def test_compiled_source_matches_the_pure_one(mergeable: bool, event_idx: bool, plan: list[Any]) -> None:
    sides = [Side(True, mergeable, event_idx), Side(False, mergeable, event_idx)]
    try:
        for step in plan:
            got = [_run(s, step) for s in sides]
            assert got[0] == got[1], step
            assert sides[0].state() == sides[1].state(), step
    finally:
        for s in sides:
            s.fe.close()
            s.ram.close()


@pytest.mark.parametrize("compiled", [True, False])
def test_the_source_checks_every_pktgen_byte(compiled: bool) -> None:
    """A frame whose payload, length or check is wrong is counted corrupt, a byte in any buffer."""
    side = Side(compiled, False, True)
    try:
        for how, at in (("whole", 0), ("corrupt", 40), ("corrupt", 20), ("corrupt", 1400), ("short", 700)):
            side.fe.send_pktgen(PEER, 1, 1500)
            side.deliver(1, how, at)
            side.fe.receive()
            side.fe.reclaim_tx()
        r = side.fe.receiver
        assert (r.received, r.corrupt, r.duplicates) == (1, 4, 0)
        assert r.octets == 1500 and r.from_sender(MAC) == 1
        assert len(netpacket.PATTERN) >= 2 * netpacket.MAX_FRAME and NET_HDR_SIZE == HDR
    finally:
        side.fe.close()
        side.ram.close()
    # A 9000-byte frame over three mergeable buffers, checked where they lie: one byte flipped
    # in each buffer's part, the last byte of each part and the frame's last byte.
    side = Side(compiled, True, True)
    try:
        ats = [0, 100, MRG_BUF - HDR - 1, MRG_BUF - HDR, MRG_BUF + 7, 2 * MRG_BUF - HDR, 9000 - HDR - 1]
        for at in ats:
            side.fe.send_pktgen(PEER, 1, 9000)
            side.deliver(1, "corrupt", at)
            side.fe.receive()
            side.fe.reclaim_tx()
        side.fe.send_pktgen(PEER, 1, 9000)
        side.deliver(1, "whole", 0)
        side.fe.receive()
        r = side.fe.receiver
        assert (r.received, r.corrupt, r.duplicates, r.octets) == (1, len(ats), 0, 9000)
    finally:
        side.fe.close()
        side.ram.close()


@given(
    st.integers(0, (1 << 64) - 64), st.lists(st.integers(-8, 40) | st.integers(1 << 40, 1 << 41), max_size=80)
)
def test_a_seqset_holds_what_a_set_holds(base: int, offsets: list[int]) -> None:
    """netpacket.SeqSet (a run and the rest) counts as a set of ints would, in any order."""
    seqs, ref = netpacket.SeqSet(), set()
    for off in offsets:
        seq = max(0, base + off)
        assert seqs.add(seq) == (seq not in ref)
        ref.add(seq)
        assert len(seqs) == len(ref) and set(seqs) == ref and seq in seqs
        assert not seqs.rest & set(range(seqs.lo, seqs.hi)) and {seqs.lo - 1, seqs.hi}.isdisjoint(seqs.rest)


def test_a_slot_not_the_frontends_stops_the_compiled_fill_before_it_takes_any() -> None:
    """fill checks every slot of the batch before it pops one: a bad one raises, and the free
    slots, the ring and the guest's TX buffers are as they were (no C call with an error set)."""
    side = Side(True, False, True)
    try:
        fe = side.fe
        fe.tx.free.insert(len(fe.tx.free) - 2, 10**6)  # the third slot fill would take
        before = (list(fe.tx.free), bytes(side.ram._mm), fe.tx.ring.avail_idx, fe.seq, fe.sent)
        with pytest.raises(IndexError, match="slot 1000000 out of range"):
            fe.send_pktgen(PEER, 5, 64)
        assert (list(fe.tx.free), bytes(side.ram._mm), fe.tx.ring.avail_idx, fe.seq, fe.sent) == before
    finally:
        side.fe.close()
        side.ram.close()


def test_used_tx_chains_are_stamped_again_in_place_or_released() -> None:
    """A pktgen send takes the used TX chains back itself: those holding its frame, up to the
    count, posted again in place (the same heads, in the order used); the rest released to the
    free stacks; then free slots. Both paths, the same bytes and state at every step."""
    sides = [Side(True, False, True), Side(False, False, True)]
    try:
        for side in sides:
            fe, tx = side.fe, side.fe.tx
            assert fe.send_pktgen(PEER, 8, 64) == 8
            used_heads = [c.head for c in side.dev[1].pop_batch(8)]
            side.dev[1].push_batch([(h, 0) for h in used_heads])
            assert fe.send_pktgen(PEER, 3, 64) == 3  # 3 kept, 5 released, no free slot needed
            avail = tx.ring._avail
            assert [avail[2 + (8 + k) % QSIZE] for k in range(3)] == used_heads[:3]
            assert len(tx.ring._free) == QSIZE - 3 and len(tx.free) == QSIZE - 3
            side.deliver(3, "whole", 0)  # TX not reclaimed
            # another size: no used chain holds it, all three released, five from free slots
            assert fe.send_pktgen(PEER, 5, 1500) == 5
            assert len(tx.ring._free) == QSIZE - 5 and len(tx.free) == QSIZE - 5
            assert fe.receive() == 3
        assert sides[0].state() == sides[1].state()
        assert sides[0].fe.seq == 12288 * 7 + 16
    finally:
        for s in sides:
            s.fe.close()
            s.ram.close()


@pytest.mark.parametrize("compiled", [True, False])
def test_a_receive_that_keeps_finding_frames_kicks_once_a_ring(compiled: bool) -> None:
    """A device that keeps pushing keeps a receive in its loop; each kick covers the entries
    published since the last one, compared as 16-bit indexes (virtio 1.2, 2.7.13), so the loop
    kicks each time a ring's worth went back, not only after it ends. The device here runs
    inside the receive (from Receiver.take, which both paths call for a non-pktgen frame), as
    one on another CPU would: a frame each time, asking for a kick each time."""
    side = Side(compiled, False, True)
    try:
        fe, dev = side.fe, side.dev[0]
        data = netpacket.NO_CSUM_HDR + netpacket.build(MAC, PEER, 0, 64)
        pushed = 0

        def device_pushes_one() -> None:
            nonlocal pushed
            (b,) = dev.pop_batch(1)
            b.writable[0][: len(data)] = data
            dev.push_batch([(b.head, len(data))])
            dev.enable_notifications()
            pushed += 1

        take = fe.receiver.take

        def take_while_the_device_runs(frame: bytes) -> bool:
            if pushed < 3 * QSIZE:
                device_pushes_one()
            return take(frame)

        fe.receiver.take = take_while_the_device_runs  # type: ignore[method-assign]
        device_pushes_one()
        kicks = fe.rx.kicks
        assert fe.receive() == 3 * QSIZE
        assert fe.rx.kicks - kicks >= 3  # at 16, 32 and 48 entries (the old loop: one, at the end)
    finally:
        side.fe.close()
        side.ram.close()
