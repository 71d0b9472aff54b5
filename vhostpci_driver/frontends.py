"""What an application holds for one frontend device: its rings and its notifications.

A :class:`Frontend` gives the frontend's virtqueues as device-side rings over
the remote window, the eventfd that fires when the driver VM kicks a queue,
and :meth:`Frontend.notify` to interrupt the driver VM (protocol.md, section 6).
When the frontend is removed (DEVICE_INFO DEL, or the driver VM vanished)
every later ring call raises :class:`FrontendGoneError`: the app's next call
fails clearly instead of touching memory the driver VM no longer lends us.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from vhostpci_driver.addr import GuestMemory
from vhostpci_driver.errors import FrontendGoneError
from vhostpci_driver.spec.virtio import Feature
from vhostpci_driver.virtqueue.device import Chain, DeviceQueue
from vhostpci_driver.virtqueue.native import RingQueue
from vhostpci_driver.wire.ctrl import NO_SLOT, FrontendKey, VirtqInfo, VirtqState

#: The app-facing surface: a popped :class:`Chain` comes with its :class:`Queue`.
log = logging.getLogger(__name__)

__all__ = ["Chain", "Frontend", "Queue"]


class Queue:
    """A frontend virtqueue: the device-side ring, guarded against the frontend's removal.

    Everything an app needs from a ring, and nothing of its internals: every
    call raises :class:`FrontendGoneError` once the frontend is removed, and
    :class:`~vhostpci_driver.errors.RingError` (naming the broken rule) once
    the ring is broken.
    """

    def __init__(self, frontend: Frontend, info: VirtqInfo, ring: DeviceQueue) -> None:
        self.frontend = frontend
        self.info = info
        self.index = info.index
        self._ring = ring

    def _live(self) -> DeviceQueue:
        if self.frontend.removed:
            raise FrontendGoneError(f"frontend {self.frontend.key} was removed ({self.frontend.removed})")
        return self._ring

    def pop_batch(self, max_chains: int = 32) -> list[Chain]:
        """Pop up to ``max_chains`` available chains (virtio 1.2, 2.7.13.3), every ring rule checked."""
        return self._live().pop_batch(max_chains)

    def push_batch(self, used: Sequence[tuple[int, int]]) -> None:
        """Return ``(head, bytes written)`` pairs to the driver VM, one index store (virtio 1.2, 2.7.8)."""
        self._live().push_batch(used)

    def discard(self, chains: Sequence[Chain]) -> None:
        """Give back the last ``chains`` popped, unused: they become available again, in order."""
        self._live().discard(chains)

    def pending(self) -> int:
        """Available chains not yet popped."""
        return self._live().pending()

    def avail_idx(self) -> int:
        """The driver's avail index as it is now: compare two readings to see it move (re-arm races)."""
        return self._live().avail_idx()

    def enable_notifications(self) -> None:
        """Ask the driver VM to kick for new buffers (virtio 1.2, 2.7.10); then look at the ring again."""
        self._live().enable_notifications()

    def disable_notifications(self) -> None:
        """Ask the driver VM not to kick while the app is polling anyway (a hint it may ignore)."""
        self._live().disable_notifications()

    def notify(self) -> None:
        """Interrupt the driver VM for this queue when the ring says it wants one (event idx)."""
        if self._live().need_notify():
            self.frontend.doorbell(self.info.notify_slot)

    @property
    def kick_fd(self) -> int | None:
        """The eventfd that fires when the driver VM kicks this queue (None: poll)."""
        return self.frontend.kick_fds.get(self.info.notify_slot)


class Frontend:
    """One frontend device of the driver VM, as an app sees it."""

    def __init__(
        self,
        key: FrontendKey,
        virtqs: tuple[VirtqInfo, ...],
        memory: GuestMemory,
        doorbell: Callable[[int], None],
        kick_fds: dict[int, int],
    ) -> None:
        self.key = key
        self.virtqs = virtqs
        self.memory = memory
        self.kick_fds = kick_fds
        self._doorbell = doorbell
        self.features: int | None = None
        self.removed: str | None = None
        self.queues: dict[int, Queue] = {}

    @property
    def device_type(self) -> int:
        return self.key.device_type

    @property
    def device_id(self) -> int:
        return self.key.device_id

    def start(self, features: int) -> None:
        """Build the rings once the features are known (EVENT_IDX changes the ring protocol)."""
        self.features = features
        event_idx = bool(features >> Feature.RING_EVENT_IDX & 1)
        queues = {}
        resumed: list[int] = []
        for v in self.virtqs:
            ring = RingQueue(  # compiled or pure: virtqueue/native.py says which
                self.memory,
                v.size,
                v.desc,
                v.avail,
                v.used,
                event_idx=event_idx,
                last_avail_idx=v.last_avail_idx,
                last_used_idx=v.last_used_idx,
            )
            if not (v.last_avail_idx or v.last_used_idx):
                # protocol.md 4.2: no position given, so the ring's own says where we stopped
                # (a driver that restarted while the driver VM ran on); a fresh ring's is 0.
                again = ring.resume()
                if ring.last_used_idx:
                    log.info("frontend %s queue %d resumed at used idx %d (%d chains were in flight)",
                             self.key, v.index, ring.last_used_idx, again)  # fmt: skip
                    resumed.append(v.notify_slot)
            queues[v.index] = Queue(self, v, ring)
        self.queues = queues
        # The instance before us may have died between publishing used entries and
        # signalling them: the driver VM would wait for a call that never comes while
        # its ring stays full. One call per resumed queue tells it to look; a spurious
        # one costs a look at the used index (virtio 1.2, 2.7.10: the driver handles spurious notifications).
        for slot in resumed:
            self.doorbell(slot)

    def queue(self, index: int) -> Queue:
        if self.removed:
            raise FrontendGoneError(f"frontend {self.key} was removed ({self.removed})")
        try:
            return self.queues[index]
        except KeyError:
            raise FrontendGoneError(f"frontend {self.key} has no started queue {index}") from None

    def doorbell(self, slot: int) -> None:
        if slot != NO_SLOT and not self.removed:
            self._doorbell(slot)

    def ring_states(self) -> tuple[VirtqState, ...]:
        """Where each ring stands, for the DEL_DONE ack (protocol.md 4.4).

        Chains the app popped and never completed are handed back (the avail
        index rewinds over them), so the frontend sees them again when it
        resumes instead of losing those descriptors. That is exact for a backend
        that completes in order, as the net switch does.
        """
        out = []
        for v in self.virtqs:
            q = self.queues.get(v.index)
            if q is None or q._ring.broken is not None:
                out.append(VirtqState(v.index, v.last_avail_idx, v.last_used_idx))
                continue
            ring = q._ring
            out.append(
                VirtqState(v.index, (ring.last_avail_idx - ring.in_flight()) & 0xFFFF, ring.last_used_idx)
            )
        return tuple(out)

    def remove(self, why: str) -> None:
        """Mark the frontend gone; its rings are dropped (their views into the window with them)."""
        self.removed = why
        for q in self.queues.values():
            q._ring.release(f"frontend {self.key} was removed")
        self.queues = {}
