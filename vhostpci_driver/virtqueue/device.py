"""The device side of a split virtqueue: the frontend's rings, in the driver VM's memory.

Every byte here is written by a driver VM we do not trust, concurrently with
our reads. So each descriptor is read once into locals and the copy is
validated (no double fetch), indices are checked against the ring size,
chains are bounded (which is how loops are caught), indirect tables are
checked as Linux ``vhost_get_vq_desc``/``get_indirect`` and QEMU
``virtqueue_split_pop`` do, and every buffer address goes through the memory's
translation. The first broken rule raises :class:`RingError` naming it and
marks the queue broken: every later call raises the same error, so a
malicious frontend is stopped and nothing else is disturbed.
"""

from __future__ import annotations

from array import array
from collections.abc import MutableSequence, Sequence

from vhostpci_driver.addr import GuestMemory
from vhostpci_driver.errors import RemoteMemoryError, RingError
from vhostpci_driver.spec.virtio import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from vhostpci_driver.virtqueue.layout import (
    DESC,
    check_alignment,
    check_size,
    full_barrier,
    need_event,
    ring_part_sizes,
)

MAX_CHAIN_BYTES = 1 << 32
_CHAINED = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT


class Chain(tuple[int, list[memoryview], list[memoryview], int, int]):
    """One popped descriptor chain: zero-copy views of its buffers, in order.

    A tuple underneath: the data path makes one per frame, and building a
    tuple costs a third of running a Python ``__init__`` (docs/performance.md).
    """

    __slots__ = ()

    def __new__(
        cls, head: int, readable: list[memoryview], writable: list[memoryview], rlen: int, wlen: int
    ) -> Chain:
        return tuple.__new__(cls, (head, readable, writable, rlen, wlen))

    @property
    def head(self) -> int:
        """The head descriptor's index: what :meth:`DeviceQueue.push_batch` takes back."""
        return self[0]

    @property
    def readable(self) -> list[memoryview]:
        """Device-readable buffers (the driver's data for us), in chain order."""
        return self[1]

    @property
    def writable(self) -> list[memoryview]:
        """Device-writable buffers (room for our data), in chain order."""
        return self[2]

    @property
    def readable_len(self) -> int:
        return self[3]

    @property
    def writable_len(self) -> int:
        return self[4]

    def read_all(self) -> bytes:
        """The device-readable bytes joined (one copy; for control messages, not the data path)."""
        return b"".join(self[1])

    def __repr__(self) -> str:
        return f"Chain(head={self[0]}, r={self[3]}, w={self[4]})"


_new_chain = tuple.__new__


class DeviceQueue:
    """A split virtqueue seen from the device."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc: int,
        avail: int,
        used: int,
        *,
        event_idx: bool = False,
        last_avail_idx: int = 0,
        last_used_idx: int = 0,
        max_chain_len: int | None = None,
    ) -> None:
        check_size(size)
        check_alignment(desc, avail, used)
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.last_used_idx = last_used_idx & 0xFFFF
        self.max_chain_len = min(size, max_chain_len or size)
        self.broken: RingError | None = None
        dsize, asize, usize = ring_part_sizes(size)
        try:
            self._desc = mem.view(desc, dsize)
            avail_v = mem.view(avail, asize)
            used_v = mem.view(used, usize)
        except RemoteMemoryError as e:
            raise RingError("ring-addr", f"ring not in mapped memory: {e}") from None
        self._avail = avail_v.cast("H")  # flags, idx, ring[size], used_event
        self._used = used_v
        self._used16 = used_v.cast("H")  # flags, idx, ..., avail_event at [2 + 4 * size]
        # the used ring as 32-bit words: [0] flags|idx, then (id, len) per element, from word 1
        self._used32 = used_v[: 4 + 8 * size].cast("I")
        # head -> writable bytes of the chain, -1 when free
        self._inflight: MutableSequence[int] = [-1] * size
        self._signalled = self.last_used_idx
        self._pushed_since_signal = False

    def resume(self) -> int:
        """Go on where the ring says the device side stopped: its used index, for both indices.

        For a ring that an earlier instance of the device side served (our driver
        restarted while the driver VM kept running): what it popped but never
        returned is available again and popped anew, as vhost does after a
        reconnect (QEMU ``vhost_virtqueue_stop``: "sync internal last avail idx
        to the device used idx", ``virtio_queue_restore_last_avail_idx``). A
        fresh ring's used index is 0, so this changes nothing there. The index
        is the driver VM's to write: a bad one breaks this ring on the first
        :meth:`pending`, as any other. Returns how many chains it makes
        available again (the ones the earlier instance had in flight).
        """
        used = int(self._used16[1])
        self.last_avail_idx = self.last_used_idx = self._signalled = used
        return (int(self._avail[1]) - used) & 0xFFFF

    def _break(self, rule: str, message: str, index: int | None = None) -> RingError:
        self.broken = RingError(rule, message, index)
        return self.broken

    def pending(self) -> int:
        """Available chains not yet popped (virtio 1.2, 2.7.6)."""
        if self.broken:
            raise self.broken
        n = (self._avail[1] - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            raise self._break("avail-idx", f"avail idx moved {n} entries past ours, ring holds {self.size}")
        return n

    def pop(self) -> Chain | None:
        chains = self.pop_batch(1)
        return chains[0] if chains else None

    def pop_batch(self, max_chains: int = 32) -> list[Chain]:
        """Pop up to ``max_chains`` chains, reading the avail index once.

        The common chain is one direct descriptor (a network frame): it is read,
        checked and translated here, inline; anything else (NEXT, INDIRECT) goes
        through :meth:`_walk`, which gets the copy already read (no double fetch).
        """
        n = min(self.pending(), max_chains)
        out: list[Chain] = []
        if not n:
            return out
        size, inflight, table = self.size, self._inflight, self._desc
        unpack, view, append = DESC.unpack_from, self.mem.view, out.append
        ring = self._next_heads(n)
        popped = 0
        try:
            for head in ring:
                if head >= size:
                    raise self._break("desc-index", f"head {head} >= queue size {size}", head)
                if inflight[head] >= 0:
                    raise self._break("desc-in-flight", f"head {head} is already in flight", head)
                first = unpack(table, head << 4)  # read once; only the copy is used
                flags = first[2]
                if flags & _CHAINED:
                    chain = self._walk(head, first)
                else:
                    try:
                        buf = view(first[0], first[1])
                    except RemoteMemoryError as e:
                        raise self._break("desc-addr", str(e), head) from None
                    if flags & VIRTQ_DESC_F_WRITE:
                        chain = _new_chain(Chain, (head, [], [buf], 0, first[1]))
                    else:
                        chain = _new_chain(Chain, (head, [buf], [], first[1], 0))
                inflight[head] = chain[4]  # writable bytes
                append(chain)
                popped += 1
        finally:
            self.last_avail_idx = (self.last_avail_idx + popped) & 0xFFFF
        return out

    def _next_heads(self, n: int) -> list[int]:
        """The next ``n`` available heads from ``last_avail_idx`` on, in one read each (virtio 1.2, 2.7.6)."""
        size = self.size
        start = self.last_avail_idx & (size - 1)
        ring = self._avail[2 + start : 2 + min(size, start + n)].tolist()
        if len(ring) < n:  # the batch wraps around the end of the ring
            ring += self._avail[2 : 2 + n - len(ring)].tolist()
        return ring

    def pop_direct(self, out: array[int], max_chains: int = 32) -> int:
        """Pop up to ``max_chains`` chains of one direct descriptor, described in ``out``; returns how many.

        The batch form without an object per chain, for a consumer that works on
        offsets (the compiled walker fills the same array in one call): ``out`` is an
        ``array('Q')`` of at least ``3 * max_chains`` items, and chain ``k`` is
        ``out[3k] = head | writable << 16 | length << 32``, ``out[3k + 1]`` the index of
        the region holding its buffer and ``out[3k + 2]`` the buffer's offset in that
        region's view (``RegionTable.locate`` / ``region_view``; valid until the region
        table changes). It stops before the first chain that is not one direct
        descriptor (NEXT or INDIRECT), which stays available for :meth:`pop_batch`.
        Every rule, error and index is :meth:`pop_batch`'s. The memory must be the
        region table (:class:`~vhostpci_driver.memory.RegionTable`).
        """
        locate = getattr(self.mem, "locate", None)
        if locate is None:
            raise TypeError("pop_direct needs the region table as the queue's memory")
        if not (isinstance(out, array) and out.typecode == "Q"):
            raise TypeError("pop_direct: out must be an array('Q')")
        n = max(0, min(self.pending(), max_chains))
        if len(out) < 3 * n:
            raise ValueError(f"pop_direct: {len(out)} words cannot describe {n} chains")
        if not n:
            return 0
        size, inflight, table, unpack = self.size, self._inflight, self._desc, DESC.unpack_from
        ring = self._next_heads(n)
        popped = 0
        try:
            for head in ring:
                if head >= size:
                    raise self._break("desc-index", f"head {head} >= queue size {size}", head)
                if inflight[head] >= 0:
                    raise self._break("desc-in-flight", f"head {head} is already in flight", head)
                addr, length, flags, _next = unpack(table, head << 4)  # read once; only the copy is used
                if flags & _CHAINED:
                    break  # not popped: pop_batch walks it
                try:
                    region, off = locate(addr, length)
                except RemoteMemoryError as e:
                    raise self._break("desc-addr", str(e), head) from None
                writable = flags & VIRTQ_DESC_F_WRITE
                k = 3 * popped
                out[k] = head | (1 << 16 if writable else 0) | length << 32
                out[k + 1] = region
                out[k + 2] = off
                inflight[head] = length if writable else 0
                popped += 1
        finally:
            self.last_avail_idx = (self.last_avail_idx + popped) & 0xFFFF
        return popped

    def push_direct(self, used: array[int], n: int) -> None:
        """:meth:`push_batch` of ``n`` entries given as words: ``used[2k]`` the head, ``used[2k + 1]``
        the bytes written (an ``array('I')``, as :meth:`pop_direct` is the batch without objects)."""
        if not (isinstance(used, array) and used.typecode == "I"):
            raise TypeError("push_direct: the entries must be an array('I')")
        if not 0 <= n <= len(used) // 2:
            raise ValueError(f"push_direct: {len(used)} words cannot hold {n} used entries")
        self.push_batch(list(zip(used[0 : 2 * n : 2], used[1 : 2 * n : 2], strict=True)))

    def _walk(self, head: int, first: tuple[int, int, int, int]) -> Chain:
        """A chain of several descriptors, or an indirect one; ``first`` is the head, already read."""
        unpack, view = DESC.unpack_from, self.mem.view
        table, tsize, i = self._desc, self.size, head
        limit, count, indirect = self.max_chain_len, 0, False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        desc: tuple[int, int, int, int] | None = first
        while True:
            count += 1
            if count > limit:
                raise self._break("chain-length", f"chain from head {head} longer than {limit} (a loop?)", i)
            # read once; only the copy is used
            addr, length, flags, nxt = desc if desc is not None else unpack(table, 16 * i)
            desc = None
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise self._break("indirect-nested", "indirect descriptor inside an indirect table", i)
                if flags & VIRTQ_DESC_F_NEXT:
                    raise self._break(
                        "indirect-next", "INDIRECT together with NEXT (virtio 1.2, 2.7.5.3.1)", i
                    )
                if length == 0 or length % 16 or length // 16 > self.size:
                    raise self._break("indirect-len", f"indirect table of {length} bytes", i)
                try:
                    table = view(addr, length)
                except RemoteMemoryError as e:
                    raise self._break("desc-addr", f"indirect table: {e}", i) from None
                tsize, i, indirect, count = length // 16, 0, True, 0
                limit = tsize
                continue
            try:
                buf = view(addr, length)
            except RemoteMemoryError as e:
                raise self._break("desc-addr", str(e), i) from None
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(buf)
                wlen += length
            else:
                if writable:
                    raise self._break("desc-order", "device-readable descriptor after a writable one", i)
                readable.append(buf)
                rlen += length
            if rlen + wlen > MAX_CHAIN_BYTES:
                raise self._break("chain-bytes", f"chain from head {head} exceeds 4 GiB", i)
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable, rlen, wlen)
            if nxt >= tsize:
                raise self._break("desc-index", f"next {nxt} >= table size {tsize}", nxt)
            i = nxt

    def discard(self, chains: Sequence[Chain]) -> None:
        """Give back the last ``chains`` popped, unused (Linux ``vhost_discard_vq_desc``).

        For a backend that popped RX buffers and then found them too few: the
        chains become available again, in the same order.
        """
        if self.broken:
            raise self.broken
        for c in chains:
            self._inflight[c.head] = -1
        self.last_avail_idx = (self.last_avail_idx - len(chains)) & 0xFFFF

    def push(self, head: int, written: int) -> None:
        self.push_batch(((head, written),))

    def push_batch(self, used: Sequence[tuple[int, int]]) -> None:
        """Return chains to the driver; the used index is published once, after the entries."""
        if self.broken:
            raise self.broken
        if not used:
            return
        size, inflight = self.size, self._inflight
        words: list[int] = []  # (id, len) pairs of used elements, in ring order
        for head, written in used:
            if not 0 <= head < size or inflight[head] < 0:
                raise self._break("used-id", f"head {head} is not in flight", head)
            if not 0 <= written <= inflight[head]:
                raise self._break(
                    "used-len", f"{written} bytes written, chain has {inflight[head]} writable", head
                )
            inflight[head] = -1
            words += (head, written)
        # One store of all entries, in at most two runs (the ring may wrap): virtio 1.2, 2.7.8.
        ring32, start = self._used32, self.last_used_idx & (size - 1)
        first = min(len(used), size - start)
        ring32[1 + 2 * start : 1 + 2 * (start + first)] = array("I", words[: 2 * first])
        if first < len(used):
            ring32[1 : 1 + 2 * (len(used) - first)] = array("I", words[2 * first :])
        idx = (self.last_used_idx + len(used)) & 0xFFFF
        # x86 keeps stores in order (TSO): the entries are visible before the index.
        self._used16[1] = idx
        self._pushed(idx)

    def _pushed(self, idx: int) -> None:
        """The used index is ``idx`` now (stored): what :meth:`need_notify` has not signalled yet."""
        self.last_used_idx = idx
        self._pushed_since_signal = True

    def need_notify(self) -> bool:
        """Should the device signal the driver for what it pushed since the last call? (virtio 1.2, 2.7.10)"""
        if not self._pushed_since_signal:
            return False
        self._pushed_since_signal = False
        old, new = self._signalled, self.last_used_idx
        self._signalled = new
        return self._wants_signal(old, new)

    def _wants_signal(self, old: int, new: int) -> bool:
        """The event-index rule for the used index moved from ``old`` to ``new`` (virtio 1.2, 2.7.10)."""
        full_barrier()  # our used-idx store before the driver's flags / used_event load (virtio 1.2, 2.7.10)
        if self.event_idx:
            return need_event(self._avail[2 + self.size], new, old)
        return not self._avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def avail_idx(self) -> int:
        """The driver's avail index as it is now (for re-arm races; not validated)."""
        return int(self._avail[1])

    def disable_notifications(self) -> None:
        """Ask the driver not to kick (busy polling); a hint the driver may ignore."""
        if not self.event_idx:
            self._used16[0] = VIRTQ_USED_F_NO_NOTIFY

    def enable_notifications(self) -> None:
        """Ask for a kick when the driver makes more buffers available than we have seen.

        With EVENT_IDX the event is the avail index as we read it now, not our
        ``last_avail_idx``: a backend that left entries unpopped (waiting for
        room elsewhere) must still hear of new ones (Linux ``vhost_enable_notify``).
        """
        if self.event_idx:
            self._used16[2 + 4 * self.size] = self._avail[1]
        else:
            self._used16[0] = 0
        full_barrier()  # the re-arm is visible before the caller looks at the ring again

    def release(self, why: str = "the queue was released") -> None:
        """Let go of the ring's memory now (views released), so its mapping can be unmapped.

        Every later call raises; chains already popped keep their own views.
        """
        self.broken = RingError("released", why)
        for v in (self._avail, self._used16, self._used32, self._used, self._desc):
            v.release()

    def in_flight(self) -> int:
        return sum(1 for w in self._inflight if w >= 0)
