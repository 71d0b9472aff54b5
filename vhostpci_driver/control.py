"""The control channel: the controlq and ackq of one vhost-pci function, driver side.

protocol.md 2.5 and 3-5: the device writes one message per controlq buffer we
post; we hand each to the engine, repost the buffer, and put the engine's ack in
an ackq buffer of our own, by request id. This module owns the two driver-side
rings, their DMA memory (sized here), the buffers, and the backlog of acks
waiting for a free ackq buffer. It knows nothing of interrupts or of the
frontends: :class:`~vhostpci_driver.device.VhostPciDevice` wakes it up and
applies the events the engine returns.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from vhostpci_driver.engine import Engine
from vhostpci_driver.events import Event
from vhostpci_driver.pci.dma import DmaBuffer, DmaPool
from vhostpci_driver.pci.function import PciFunction
from vhostpci_driver.virtqueue.driver import DriverQueue
from vhostpci_driver.wire.device import Queue

#: An ACK is 32 bytes; a DEL_DONE with ring states up to 16 + 16 + 64 * 8 (protocol.md 4.4).
#: A power of two that divides a page, so no ack buffer crosses one.
ACK_BUF = 1024
PAGE = 4096


class ControlChannel:
    """The controlq and ackq rings and buffers in DMA memory; ``close()`` unmaps them.

    Counters go to ``stats`` (``controlq_messages``, ``acks_posted``), the
    device's own dictionary, so ``vhostpci status`` shows them beside its others.
    """

    def __init__(
        self,
        function: PciFunction,
        engine: Engine,
        *,
        queue_size: int,
        max_msg_len: int,
        event_idx: bool,
        stats: dict[str, int],
    ) -> None:
        self.engine = engine
        self.stats = stats
        qs = queue_size
        ring_bytes = DriverQueue.layout(qs)[3]
        pool_size = 2 * (ring_bytes + PAGE) + qs * (max_msg_len + PAGE) + qs * ACK_BUF + 8 * PAGE
        self.pool = DmaPool(function, pool_size)
        try:
            self.ring_addrs: dict[int, tuple[int, int, int]] = {}  # queue -> (desc, avail, used) IOVAs
            self.ctrlq = self._queue(Queue.CONTROLQ, qs, event_idx)
            self.ackq = self._queue(Queue.ACKQ, qs, event_idx)
            # No buffer crosses a page: behind an IOMMU each page is its own mapping, and a device
            # (ours included) may see consecutive IOVA pages land anywhere in memory.
            align = PAGE if max_msg_len <= PAGE else 8
            self._ctrl_bufs = [self.pool.alloc(max_msg_len, align) for _ in range(qs)]
            # ACK_BUF divides a page: no ack buffer crosses one.
            self._ack_bufs = [self.pool.alloc(ACK_BUF, ACK_BUF) for _ in range(qs)]
        except BaseException:
            self.pool.close()
            raise
        self._ack_free = list(range(qs))
        self._ack_backlog: deque[bytes] = deque()
        self._kick_ctrl: Callable[[], None] = lambda: None
        self._kick_ack: Callable[[], None] = lambda: None

    def _queue(self, index: int, size: int, event_idx: bool) -> DriverQueue:
        d, a, u, total = DriverQueue.layout(size)
        ring = self.pool.alloc(total, PAGE)
        self.ring_addrs[index] = (ring.iova + d, ring.iova + a, ring.iova + u)
        return DriverQueue(self.pool, size, ring.iova + d, ring.iova + a, ring.iova + u, event_idx=event_idx)

    def start(self, kick_ctrl: Callable[[], None], kick_ack: Callable[[], None]) -> None:
        """The queues are set up: offer every controlq buffer (the kick waits for :meth:`kick`)."""
        self._kick_ctrl, self._kick_ack = kick_ctrl, kick_ack
        for i, b in enumerate(self._ctrl_bufs):
            self.ctrlq.add((), ((b.iova, b.size),), i)
        self.ctrlq.publish()

    def kick(self) -> None:
        """After DRIVER_OK: tell the device about the buffers, if it asked to be told."""
        if self.ctrlq.kick_needed():
            self._kick_ctrl()

    def serve(self, apply: Callable[[Event], None]) -> None:
        """Handle every message the device wrote, post their acks, take back used ack buffers.

        ``apply`` is called with each event the engine returns, in order.
        """
        # Harvest until quiet after used_event moved (virtio 1.2, 2.7.10), or a message
        # that lands between our read and that write would wait for the next interrupt.
        while True:
            used = self.ctrlq.harvest()
            if not used:
                break
            self._handle(used, apply)
        self._reap_acks()

    def _handle(self, used: list[tuple[object, int]], apply: Callable[[Event], None]) -> None:
        for token, written in used:
            i = int(token)  # type: ignore[call-overload]
            buf = self._ctrl_bufs[i]
            outcome = self.engine.handle(buf.view[: min(written, buf.size)])  # decoded in place
            self.stats["controlq_messages"] += 1
            for ev in outcome.events:
                apply(ev)
            ack = outcome.ack_bytes()
            if ack is not None:
                self._ack_backlog.append(ack)
            self.ctrlq.add((), ((buf.iova, buf.size),), i)
        self.ctrlq.publish()
        if self.ctrlq.kick_needed():
            self._kick_ctrl()
        self._post_acks()

    def _post_acks(self) -> None:
        posted = False
        while self._ack_backlog and self._ack_free:
            ack = self._ack_backlog.popleft()
            i = self._ack_free.pop()
            b: DmaBuffer = self._ack_bufs[i]
            b.view[: len(ack)] = ack
            self.ackq.add(((b.iova, len(ack)),), (), i)
            posted = True
            self.stats["acks_posted"] += 1
        if posted:
            self.ackq.publish()
            if self.ackq.kick_needed():
                self._kick_ack()

    def _reap_acks(self) -> None:
        while True:
            done = self.ackq.harvest()
            if not done:
                break
            self._ack_free.extend(int(token) for token, _ in done)  # type: ignore[call-overload]
        self._post_acks()

    def acks_outstanding(self) -> bool:
        """Take back the ack buffers the device used; True while acks wait to be posted or taken."""
        self._reap_acks()
        return bool(self._ack_backlog) or len(self._ack_free) < len(self._ack_bufs)

    def close(self) -> None:
        """Drop our views into DMA memory, then unmap it; idempotent. The device must be reset first.

        The buffers and rings hold views of the pool's mapping: while one lives the mapping
        (and the fd it keeps) cannot close, and would linger until a garbage collection.
        """
        self._ctrl_bufs, self._ack_bufs = [], []
        if hasattr(self, "ctrlq"):
            del self.ctrlq, self.ackq
        self.pool.close()
