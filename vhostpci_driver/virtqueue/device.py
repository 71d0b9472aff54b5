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

from collections.abc import Sequence

from vhostpci_driver.addr import GuestMemory
from vhostpci_driver.errors import RemoteMemoryError, RingError
from vhostpci_driver.virtqueue.layout import (
    DESC,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    check_alignment,
    check_size,
    full_barrier,
    need_event,
    ring_part_sizes,
)

MAX_CHAIN_BYTES = 1 << 32


class Chain:
    """One popped descriptor chain: zero-copy views of its buffers, in order."""

    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self, head: int, readable: list[memoryview], writable: list[memoryview], rlen: int, wlen: int
    ):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = rlen
        self.writable_len = wlen

    def read_all(self) -> bytes:
        """The device-readable bytes joined (one copy; for control messages, not the data path)."""
        return b"".join(self.readable)

    def __repr__(self) -> str:
        return f"Chain(head={self.head}, r={self.readable_len}, w={self.writable_len})"


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
        self._inflight: list[int] = [-1] * size  # head -> writable bytes of the chain, -1 when free
        self._signalled = self.last_used_idx
        self._pushed_since_signal = False

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
        """Pop up to ``max_chains`` chains, reading the avail index once."""
        n = min(self.pending(), max_chains)
        out: list[Chain] = []
        if not n:
            return out
        avail, mask, size, inflight = self._avail, self.size - 1, self.size, self._inflight
        idx = self.last_avail_idx
        for _ in range(n):
            head = avail[2 + (idx & mask)]
            if head >= size:
                raise self._break("desc-index", f"head {head} >= queue size {size}", head)
            if inflight[head] >= 0:
                raise self._break("desc-in-flight", f"head {head} is already in flight", head)
            chain = self._walk(head)
            inflight[head] = chain.writable_len
            out.append(chain)
            idx = (idx + 1) & 0xFFFF
            self.last_avail_idx = idx
        return out

    def _walk(self, head: int) -> Chain:
        unpack, view = DESC.unpack_from, self.mem.view
        table, tsize, i = self._desc, self.size, head
        limit, count, indirect = self.max_chain_len, 0, False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        while True:
            count += 1
            if count > limit:
                raise self._break("chain-length", f"chain from head {head} longer than {limit} (a loop?)", i)
            addr, length, flags, nxt = unpack(table, 16 * i)  # read once; only the copy is used
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
        pack, ring, inflight, mask = USED_ELEM.pack_into, self._used, self._inflight, self.size - 1
        idx = self.last_used_idx
        for head, written in used:
            if not 0 <= head < self.size or inflight[head] < 0:
                raise self._break("used-id", f"head {head} is not in flight", head)
            if not 0 <= written <= inflight[head]:
                raise self._break(
                    "used-len", f"{written} bytes written, chain has {inflight[head]} writable", head
                )
            inflight[head] = -1
            pack(ring, 4 + 8 * (idx & mask), head, written)
            idx = (idx + 1) & 0xFFFF
        # x86 keeps stores in order (TSO): the entries are visible before the index.
        self._used16[1] = idx
        self.last_used_idx = idx
        self._pushed_since_signal = True

    def need_notify(self) -> bool:
        """Should the device signal the driver for what it pushed since the last call? (virtio 1.2, 2.7.10)"""
        if not self._pushed_since_signal:
            return False
        self._pushed_since_signal = False
        old, new = self._signalled, self.last_used_idx
        self._signalled = new
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
        for v in (self._avail, self._used16, self._used, self._desc):
            v.release()

    def in_flight(self) -> int:
        return sum(1 for w in self._inflight if w >= 0)
