"""The driver side of a split virtqueue: our own controlq and ackq, in our DMA memory.

We own these rings, but the device is input too: every used entry it returns
is checked (id in flight, length within what we posted, used index not past
what we made available), so a buggy or hostile device cannot make us reuse a
buffer twice or read past one.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

from vhostpci_driver.addr import GuestMemory
from vhostpci_driver.errors import RemoteMemoryError, RingError
from vhostpci_driver.spec.virtio import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from vhostpci_driver.virtqueue import layout as _layout
from vhostpci_driver.virtqueue.layout import (
    DESC,
    USED_ELEM,
    check_alignment,
    check_size,
    full_barrier,
    need_event,
    ring_part_sizes,
)

_FREE = object()


class DriverQueue:
    """A split virtqueue seen from the driver."""

    def __init__(
        self, mem: GuestMemory, size: int, desc: int, avail: int, used: int, *, event_idx: bool = False
    ):
        check_size(size)
        check_alignment(desc, avail, used)
        self.size = size
        self.event_idx = event_idx
        dsize, asize, usize = ring_part_sizes(size)
        try:
            self._desc = mem.view(desc, dsize)
            avail_v = mem.view(avail, asize)
            self._used = mem.view(used, usize)
        except RemoteMemoryError as e:
            raise RingError("ring-addr", f"ring not in memory: {e}") from None
        self._avail = avail_v.cast("H")
        self._used16 = self._used.cast("H")
        self._desc[:] = bytes(dsize)
        avail_v[:] = bytes(asize)
        self._used[:] = bytes(usize)
        self._free = list(range(size - 1, -1, -1))  # a stack of free descriptor indices
        self._tokens: list[object] = [_FREE] * size
        self._chains: list[tuple[int, ...]] = [()] * size
        self._wlen = [0] * size
        self.avail_idx = 0  # shadow of what we made available (published or not)
        self.last_used_idx = 0
        self._kicked_idx = 0
        #: interrupt when this many more used entries are pushed (0: no interrupt). With EVENT_IDX
        #: every harvest moves used_event to last_used_idx + this - 1 (virtio 1.2, 2.7.10)
        self._irq_after = 1

    @staticmethod
    def layout(size: int) -> tuple[int, int, int, int]:
        """``(desc_off, avail_off, used_off, total)`` for one contiguous allocation."""
        return _layout.layout(size)

    def free_count(self) -> int:
        return len(self._free)

    def add(self, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]], token: object) -> int:
        """Chain ``out`` (device-readable) then ``in_`` (device-writable) buffers; publish later."""
        n = len(out) + len(in_)
        if n == 0:
            raise RingError("empty-chain", "a chain needs at least one buffer")
        if n > len(self._free):
            raise RingError("ring-full", f"{n} descriptors wanted, {len(self._free)} free")
        pack, desc, free = DESC.pack_into, self._desc, self._free
        ids = [free.pop() for _ in range(n)]
        k = 0
        wlen = 0
        for bufs, flags in ((out, 0), (in_, VIRTQ_DESC_F_WRITE)):
            for addr, length in bufs:
                nxt = ids[k + 1] if k + 1 < n else 0
                pack(desc, 16 * ids[k], addr, length, flags | (VIRTQ_DESC_F_NEXT if k + 1 < n else 0), nxt)
                if flags:
                    wlen += length
                k += 1
        head = ids[0]
        self._tokens[head] = token
        self._chains[head] = tuple(ids)
        self._wlen[head] = wlen
        self._avail[2 + (self.avail_idx & (self.size - 1))] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def add_one(self, addr: int, length: int, writable: bool, token: object) -> int:
        """:meth:`add` for the common chain of one buffer (a frame, an RX buffer), without its loops."""
        return self.add_many(((addr, length, token),), writable)[0]

    def add_many(self, bufs: Sequence[tuple[int, int, object]], writable: bool) -> list[int]:
        """Add one single-buffer chain per ``(addr, length, token)``, all readable or all writable.

        The batch form of :meth:`add` for frames and RX buffers: the avail entries go
        in one store (two when the ring wraps); publish later. Returns the heads.
        """
        free = self._free
        n = len(bufs)
        if n > len(free):
            raise RingError("ring-full", f"{n} descriptors wanted, {len(free)} free")
        pack, desc, tokens, chains, wlens = DESC.pack_into, self._desc, self._tokens, self._chains, self._wlen
        flags = VIRTQ_DESC_F_WRITE if writable else 0
        heads = [free.pop() for _ in range(n)]
        for head, (addr, length, token) in zip(heads, bufs, strict=True):
            pack(desc, head << 4, addr, length, flags, 0)
            tokens[head] = token
            chains[head] = (head,)
            wlens[head] = length if writable else 0
        self._put_avail(heads)
        return heads

    def _put_avail(self, heads: Sequence[int]) -> None:
        """The avail entries of ``heads``, in one store (two when the ring wraps); publish later."""
        n = len(heads)
        size, start = self.size, self.avail_idx & (self.size - 1)
        first = min(n, size - start)
        self._avail[2 + start : 2 + start + first] = array("H", heads[:first])
        if first < n:
            self._avail[2 : 2 + n - first] = array("H", heads[first:])
        self.avail_idx = (self.avail_idx + n) & 0xFFFF

    def publish(self) -> None:
        """Make every added chain visible to the device (one index write, after the entries)."""
        self._avail[1] = self.avail_idx

    def kick_needed(self) -> bool:
        """After :meth:`publish`: must we notify the device? (virtio 1.2, 2.7.10 and 2.7.13)"""
        old, new = self._kicked_idx, self.avail_idx
        self._kicked_idx = new
        if old == new:
            return False
        full_barrier()  # our avail-idx store before the device's flags / avail_event load
        if self.event_idx:
            return need_event(self._used16[2 + 4 * self.size], new, old)
        return not self._used16[0] & VIRTQ_USED_F_NO_NOTIFY

    def pending_used(self) -> int:
        """Used entries waiting to be harvested (validated)."""
        n = (self._used16[1] - self.last_used_idx) & 0xFFFF
        outstanding = self.size - len(self._free)
        if n > self.size or n > (self.avail_idx - self.last_used_idx) & 0xFFFF:
            raise RingError("used-idx", f"device claims {n} used entries, {outstanding} descriptors out")
        return n

    def harvest(self, max_entries: int | None = None) -> list[tuple[object, int]]:
        """``(token, bytes written)`` of every used chain, freeing their descriptors.

        All or nothing (:meth:`take_used`'s rules): an entry that breaks one raises with
        the ring left as it was, so a bad entry never frees the good ones before it.
        """
        heads, out = self.take_used(max_entries)
        self.release(heads)
        return out

    def take_used(self, max_entries: int | None = None) -> tuple[list[int], list[tuple[object, int]]]:
        """Every used chain (at most ``max_entries``), kept to be posted again unchanged: its heads, and
        ``(token, written)``.

        For a driver that gives each buffer back as it was (a receive ring of fixed
        buffers): the chains do not go through the free stack, their descriptors and
        tokens stay, and :meth:`repost` makes them available again. Every entry is
        checked, all or nothing (an entry that breaks a rule raises with the ring left
        as it was): the used index not past what was made available (used-idx), the id
        in flight and not returned twice in the batch (used-id), the length within the
        chain's writable bytes (used-len; virtio 1.2, 2.7.8). Give every head to :meth:`repost` or
        :meth:`release` before the next harvest or take: until then the chains are the
        caller's.
        """
        n = self.pending_used()
        if max_entries is not None:
            n = min(n, max_entries)
        unpack, ring, mask = USED_ELEM.unpack_from, self._used, self.size - 1
        tokens, wlens = self._tokens, self._wlen
        idx = self.last_used_idx
        heads: list[int] = []
        out: list[tuple[object, int]] = []
        taken: set[int] = set()
        for _ in range(n):
            head, written = unpack(ring, 4 + 8 * (idx & mask))
            if head >= self.size or tokens[head] is _FREE or head in taken:
                raise RingError("used-id", f"device returned id {head}, which is not in flight", head)
            if written > wlens[head]:
                raise RingError("used-len", f"device wrote {written} bytes into {wlens[head]}", head)
            taken.add(head)
            heads.append(head)
            out.append((tokens[head], written))
            idx = (idx + 1) & 0xFFFF
        self.last_used_idx = idx
        if self.event_idx and n:
            self._avail[2 + self.size] = (idx + self._irq_after - 1) & 0xFFFF  # as harvest (2.7.10)
            full_barrier()
        return heads, out

    def repost(self, heads: Sequence[int]) -> None:
        """Make the chains :meth:`take_used` returned available again, as they were (publish later)."""
        self._put_avail(heads)

    def release(self, heads: Sequence[int]) -> None:
        """Free chains :meth:`take_used` returned that will not be posted again as they are."""
        tokens, chains, free = self._tokens, self._chains, self._free
        for head in heads:
            tokens[head] = _FREE
            free.extend(chains[head])

    def state(self) -> dict[str, int]:
        """Indices as both sides see them (for status and debugging)."""
        return {
            "avail_idx": self.avail_idx,
            "last_used_idx": self.last_used_idx,
            "used_idx": int(self._used16[1]),
            "used_event": int(self._avail[2 + self.size]),
            "avail_event": int(self._used16[2 + 4 * self.size]),
            "free": len(self._free),
        }

    def in_flight(self) -> int:
        """Chains made available and not harvested yet (what the device may still use)."""
        return (self.avail_idx - self.last_used_idx) & 0xFFFF

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt until :meth:`enable_interrupts` (virtio 1.2, 2.7.10).

        Without EVENT_IDX this is the avail ring's NO_INTERRUPT flag, a hint. With it,
        used_event is put on the entry before ``last_used_idx``, which the device reaches
        only after 65536 more entries; every harvest keeps it there, so no interrupt
        comes however many entries are used meanwhile.
        """
        self._irq_after = 0
        if self.event_idx:
            self._avail[2 + self.size] = (self.last_used_idx - 1) & 0xFFFF
        else:
            self._avail[0] = VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_interrupts(self, after: int = 1) -> bool:
        """Ask for an interrupt once ``after`` more entries are used; True if that many are there already.

        Interrupt moderation (virtio 1.2, 2.7.10): with EVENT_IDX used_event is set
        ``after - 1`` entries past ``last_used_idx``, so the device signals once for
        ``after`` completions instead of once per batch it pushes (Linux's
        ``virtqueue_enable_cb_delayed`` asks for 3/4 of what is in flight); every later
        harvest keeps it that far ahead. Without EVENT_IDX only "at the next entry" can
        be said. ``after`` must not exceed what is in flight, or only a harvest of the
        caller's own will find the entries. When True, the entries may have been used
        before the device saw the new used_event (no interrupt may come): harvest before
        sleeping.
        """
        if not 1 <= after <= self.size:
            raise ValueError(f"interrupt after {after} entries: must be 1..{self.size}")
        self._irq_after = after
        if self.event_idx:
            self._avail[2 + self.size] = (self.last_used_idx + after - 1) & 0xFFFF
        else:
            self._avail[0] = 0
            after = 1
        full_barrier()  # used_event (or the flag) visible before the used index is looked at again
        return self.pending_used() >= after
