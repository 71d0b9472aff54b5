"""The reference vhost-pci device (protocol.md, sections 2, 3 and 6), behind a vfio-user server.

The virtio-pci function it is (config space, common config, status, queues,
ISR, MSI-X, INTx) is :class:`vhostpci_host.virtio_pci.VirtioPciFunction`, as
strict as a device can be; this module is what makes it vhost-pci: the device
config, the controlq and ackq (a message never truncated into a short buffer),
the remote window (BAR 2), the notification slots and doorbells, and the
ioeventfds that carry notifies and doorbells. The host side talks to it through :meth:`send_control`,
``on_ack``, :meth:`set_remote`, the window mapping and the notification slots.
Nothing the guest writes can raise out of it except :class:`VfioDeviceError`.
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vhostpci_driver.errors import ProtocolError, RingError
from vhostpci_driver.spec.virtio_pci import ISR_QUEUE, NO_VECTOR
from vhostpci_driver.wire import ctrl
from vhostpci_driver.wire import device as d
from vhostpci_host.pci_config import NUM_QUEUES
from vhostpci_host.peer_fds import drain_eventfd, signal_eventfd
from vhostpci_host.vfio_device import IoEventFdSpec, MmapArea, RegionFlag, RegionSpec, VfioDeviceError
from vhostpci_host.virtio_pci import VirtioPciFunction

log = logging.getLogger(__name__)

MAX_MSG_LEN = 4096


@dataclass
class _WindowRegion:
    window_offset: int
    size: int
    fd: int
    fd_offset: int
    ident: tuple[int, int]
    mm: mmap.mmap


@dataclass
class _Slot:
    kick_fd: int
    call_fd: int
    vector: int = NO_VECTOR


class VhostPciDeviceModel(VirtioPciFunction):
    """The device; implements ``VfioUserDevice``."""

    device_config_size = d.VHOST_PCI_CONFIG.size

    def __init__(
        self,
        *,
        window_size: int,
        virtio_id: int = d.DEFAULT_VIRTIO_ID,
        num_slots: int = d.DEFAULT_SLOTS,
        max_regions: int = 64,
        max_frontends: int = 64,
        direct_doorbells: bool = False,
    ) -> None:
        if window_size & (window_size - 1) or window_size < 4096:
            raise ValueError("the window size must be a power of two of at least 4 KiB")
        if not 0 < num_slots <= d.MAX_SLOTS:
            raise ValueError(f"num_slots must be 1..{d.MAX_SLOTS}")
        self.window_size = window_size
        self.num_slots = num_slots
        self.max_regions = max_regions
        self.max_frontends = max_frontends
        #: GET_REGION_IO_FDS hands an assigned slot's doorbell as the frontend's call eventfd itself:
        #: the device VM's doorbell write reaches the driver VM with no host-side Python between.
        self.direct_doorbells = direct_doorbells
        nvectors = d.Vector.FIRST_SLOT + num_slots
        super().__init__(virtio_id=virtio_id, window_size=window_size, nvectors=nvectors)
        self.remote_uuid = bytes(16)
        self.remote_status = 0
        self.window: list[_WindowRegion] = []
        self.slots: dict[int, _Slot] = {}
        self.pending_slots = 0
        self.next_request_id = 1
        self.backlog: deque[tuple[int, bytes]] = deque()
        self.outstanding: dict[int, bytes] = {}
        self.acked: set[int] = set()
        self.on_ack: Callable[[int, ctrl.Ack], None] = lambda rid, ack: None
        self.on_ack_error: Callable[[str, int | None], None] = lambda reason, rid: None
        self.on_reset: Callable[[list[int]], None] = lambda lost: None
        self.on_driver_ok: Callable[[], None] = lambda: None
        # GET_REGION_IO_FDS: BAR 0's trigger registers as eventfds, each with its handler (per client).
        self._ioeventfds: list[tuple[IoEventFdSpec, Callable[[], None]]] = []
        self.counters.update(messages_sent=0, acks=0, ack_errors=0, kicks=0, doorbells=0, stray_doorbells=0,
                             notifies=0, calls_refused=0)  # fmt: skip
        self._power_on()

    def _power_on(self) -> None:
        super()._power_on()
        for slot in self.slots.values():
            slot.vector = NO_VECTOR

    # -- VfioUserDevice: regions and irqs ------------------------------------------------

    def regions(self) -> list[RegionSpec]:
        specs = super().regions()
        specs[d.BAR_WINDOW] = self._window_spec()
        return specs

    def _window_spec(self) -> RegionSpec:
        """BAR 2: one fd; the areas are the regions of that file at a consistent offset (protocol.md 9)."""
        rw = RegionFlag.READ | RegionFlag.WRITE
        if not self.window:
            return RegionSpec(d.BAR_WINDOW, self.window_size, rw)
        first = min(self.window, key=lambda r: r.window_offset)
        delta = first.fd_offset - first.window_offset
        areas = tuple(
            MmapArea(r.window_offset, r.size)
            for r in sorted(self.window, key=lambda r: r.window_offset)
            if r.ident == first.ident and r.fd_offset - r.window_offset == delta
        )
        if delta < 0:
            return RegionSpec(d.BAR_WINDOW, self.window_size, rw)  # cannot express: accesses by message
        return RegionSpec(d.BAR_WINDOW, self.window_size, rw | RegionFlag.MMAP, first.fd, delta, areas)

    # -- ioeventfds (vfio-user GET_REGION_IO_FDS) --------------------------------------

    def io_fds(self, index: int) -> list[IoEventFdSpec]:
        """BAR 0's trigger registers as eventfds: the two queue notify registers, then the doorbells.

        Only with a loop to watch them (:meth:`attach_loop`). Made on the first
        request of a connection, closed when the client goes. Notify first: a
        client that takes few fds gets those, and the doorbells of the lowest
        slots (the first frontends).

        With :attr:`direct_doorbells`, the doorbell of a slot that has a frontend
        *now* is that frontend's call eventfd itself (what KVM's ioeventfd and
        irqfd do for vhost: no hop through this process); a free slot keeps our
        relay eventfd. The answer is only right until the slots change, so the
        client asks again when a frontend comes or goes (protocol.md 6).
        """
        if index != d.BAR_VIRTIO or self._add_reader is None:
            return []
        if not self._ioeventfds:
            # virtio 1.2, 4.1.5.2: a notification is the 16-bit queue index written at
            # cap.offset + queue_notify_off * notify_off_multiplier; match that value.
            for q in range(NUM_QUEUES):
                at = d.NOTIFY_OFFSET + q * d.NOTIFY_OFF_MULTIPLIER
                self._add_ioeventfd(at, 2, q, self._notify_fired, q)
            # protocol.md 6: a doorbell is a write of any value to doorbell_offset + 4 * slot.
            for slot in range(self.num_slots):
                self._add_ioeventfd(d.DOORBELL_OFFSET + 4 * slot, 4, None, self._doorbell_fired, slot)
        specs = [spec for spec, _ in self._ioeventfds]
        if self.direct_doorbells:
            for i, spec in enumerate(specs):
                sl = self.slots.get((spec.offset - d.DOORBELL_OFFSET) // 4) if spec.size == 4 else None
                if sl is not None:
                    specs[i] = IoEventFdSpec(spec.offset, spec.size, sl.call_fd, None)  # not ours to close
        return specs

    def _add_ioeventfd(
        self, offset: int, size: int, datamatch: int | None, fired: Callable[[int, int], None], arg: int
    ) -> None:
        assert self._add_reader is not None
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        handler = functools.partial(fired, fd, arg)
        self._ioeventfds.append((IoEventFdSpec(offset, size, fd, datamatch), handler))
        self._add_reader(fd, handler)

    def _notify_fired(self, fd: int, queue: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        # Notifications that piled up in the counter need one look at the ring: it takes
        # everything available, not one buffer per notification.
        self._queue_notify(queue)

    def _doorbell_fired(self, fd: int, slot: int) -> None:
        try:
            rings = os.eventfd_read(fd)
        except BlockingIOError:
            return
        self._doorbell(slot, rings)

    def _close_ioeventfds(self) -> None:
        """The client is gone: act on what it wrote before it went, then close every ioeventfd."""
        for spec, handler in self._ioeventfds:
            handler()
            if self._remove_reader is not None:
                self._remove_reader(spec.fd)
            os.close(spec.fd)
        self._ioeventfds.clear()

    def reset(self) -> None:
        """Power-on state. Messages not yet acked are dropped and reported: the host replays its
        state to the next driver at DRIVER_OK (a fresh driver knows nothing)."""
        super().reset()
        lost = sorted(self.outstanding)
        self.backlog.clear()
        self.outstanding.clear()
        if lost:
            self.on_reset(lost)

    def disconnected(self) -> None:
        self._close_ioeventfds()
        super().disconnected()

    # -- region access: BAR 2 -----------------------------------------------------------

    def _region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == d.BAR_WINDOW:
            return self._window_rw(offset, count, None)
        return super()._region_read(index, offset, count)

    def _region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == d.BAR_WINDOW:
            self._window_rw(offset, len(data), data)
        else:
            super()._region_write(index, offset, data)

    # -- BAR 0 beyond the virtio structures: notification slots --------------------------

    def _bar0_device_read(self, offset: int, count: int) -> bytes:
        if d.VECTOR_OFFSET <= offset < d.VECTOR_OFFSET + 2 * self.num_slots and count == 2:
            slot = self.slots.get((offset - d.VECTOR_OFFSET) // 2)
            return struct.pack("<H", slot.vector if slot else NO_VECTOR)
        if d.PENDING_OFFSET <= offset < d.PENDING_OFFSET + 4 * ((self.num_slots + 31) // 32) and count == 4:
            word = (offset - d.PENDING_OFFSET) // 4
            return struct.pack("<I", (self.pending_slots >> (32 * word)) & 0xFFFFFFFF)
        return bytes(count)

    def _bar0_device_write(self, offset: int, count: int, value: int) -> None:
        if d.DOORBELL_OFFSET <= offset < d.DOORBELL_OFFSET + 4 * self.num_slots:
            self._doorbell((offset - d.DOORBELL_OFFSET) // 4)
        elif d.VECTOR_OFFSET <= offset < d.VECTOR_OFFSET + 2 * self.num_slots and count == 2:
            slot = self.slots.get((offset - d.VECTOR_OFFSET) // 2)
            if slot is not None:
                slot.vector = value if value < self.nvectors else NO_VECTOR
        elif d.PENDING_OFFSET <= offset < d.PENDING_OFFSET + 4 * ((self.num_slots + 31) // 32) and count == 4:
            word = (offset - d.PENDING_OFFSET) // 4
            self.pending_slots &= ~(value << (32 * word))  # write 1 to clear

    def _device_config(self) -> bytes:
        return d.VHOST_PCI_CONFIG.pack(
            self.remote_uuid, self.window_size, self.max_regions, self.max_frontends, MAX_MSG_LEN,
            self.remote_status, self.num_slots, d.BAR_VIRTIO, 0, d.DOORBELL_OFFSET, d.VECTOR_OFFSET,
            d.PENDING_OFFSET,
        )  # fmt: skip

    def _queues_started(self) -> None:
        # Requests queued since the reset were never delivered: they are lost like those
        # before it (protocol.md 7.5), and the host's replay at DRIVER_OK carries their state,
        # memory before the frontends whose rings it holds. Delivered after the replay they
        # would arrive twice (and fail EXISTS); before it, a frontend would come before its
        # memory (RING_OUTSIDE_MEMORY).
        queued = [rid for rid, _ in self.backlog if rid]
        if queued:
            self.backlog = deque(m for m in self.backlog if not m[0])
            for rid in queued:
                self.outstanding.pop(rid, None)
            self.on_reset(queued)
        self.on_driver_ok()
        self._deliver_control()

    # -- controlq and ackq (protocol.md 2.5, 3-5) -------------------------------------

    def send_control(self, body: ctrl.MemoryInfo | ctrl.DeviceInfo | ctrl.FeatureBits) -> int:
        """Queue a message with the next request id (from 1, never reused); returns the id."""
        rid = self.next_request_id
        self.next_request_id += 1
        raw = ctrl.encode_message(rid, body)
        self.outstanding[rid] = raw
        self.backlog.append((rid, raw))
        self._deliver_control()
        return rid

    def send_raw(self, raw: bytes) -> None:
        """Put arbitrary bytes on the controlq (hostile-input tests of the driver)."""
        self.backlog.append((0, raw))
        self._deliver_control()

    def _deliver_control(self) -> None:
        ring = self.rings[d.Queue.CONTROLQ]
        if ring is None or not self.backlog:
            return
        try:
            chains = ring.pop_batch(len(self.backlog))
            if len(chains) < len(self.backlog):
                # Out of buffers: the driver's next repost must kick us (and we look again for a race).
                ring.enable_notifications()
                chains += ring.pop_batch(len(self.backlog) - len(chains))
            used = []
            for chain in chains:
                raw = self.backlog[0][1]
                if chain.writable_len < len(raw):
                    self._driver_error(
                        f"controlq buffer of {chain.writable_len} bytes < message of {len(raw)}"
                    )
                    return
                pos = 0
                for view in chain.writable:
                    n = min(len(view), len(raw) - pos)
                    view[:n] = raw[pos : pos + n]
                    pos += n
                    if pos == len(raw):
                        break
                self.backlog.popleft()
                used.append((chain.head, len(raw)))
                self.counters["messages_sent"] += 1
            ring.push_batch(used)
            if used and ring.need_notify():
                self._raise(self.queues[d.Queue.CONTROLQ].vector, ISR_QUEUE)
        except RingError as e:
            self._driver_error(f"controlq: {e}")

    def _queue_notify(self, index: int) -> None:
        self.counters["notifies"] += 1
        if index == d.Queue.CONTROLQ:
            self._deliver_control()
        elif index == d.Queue.ACKQ:
            self._consume_acks()

    def _consume_acks(self) -> None:
        ring = self.rings[d.Queue.ACKQ]
        if ring is None:
            return
        acks: list[bytes] = []
        try:
            while True:
                got = ring.pop_batch(ring.size)
                if got:
                    # Each ack copied out *before* its buffer goes back: once used, the driver
                    # may post a new ack in it at once (virtio 1.2, 2.7.8: the buffer is the
                    # driver's again). Read after the push, a fast driver's next ack replaced
                    # the one it held, which was lost (and the next counted twice).
                    acks += [c.read_all() for c in got]
                    ring.push_batch([(c.head, 0) for c in got])
                    continue
                # virtio 1.2, 2.7.10: ask for the next kick, then look once more for what raced it.
                ring.enable_notifications()
                if not ring.pending():
                    break
            if acks and ring.need_notify():
                self._raise(self.queues[d.Queue.ACKQ].vector, ISR_QUEUE)
        except RingError as e:
            self._driver_error(f"ackq: {e}")
            return
        for raw in acks:
            try:
                rid, ack = ctrl.decode_ack(raw)
            except ProtocolError as e:
                self.counters["ack_errors"] += 1
                self.on_ack_error(f"undecodable ack: {e}", None)
                continue
            if rid in self.outstanding:
                self.outstanding.pop(rid, None)
                self.acked.add(rid)
                self.counters["acks"] += 1
                self.on_ack(rid, ack)
            else:
                self.counters["ack_errors"] += 1
                self.on_ack_error("duplicate ack" if rid in self.acked else "ack of an unknown id", rid)

    def missing_acks(self) -> list[int]:
        """Ids delivered or queued and not yet acked."""
        return sorted(self.outstanding)

    def set_remote(self, vm_uuid: bytes, up: bool) -> None:
        self.remote_uuid = vm_uuid
        new = d.STATUS_REMOTE_UP if up else 0
        if new != self.remote_status:
            self.remote_status = new
            self._config_changed()

    # -- the remote window ---------------------------------------------------------

    def map_region(self, window_offset: int, size: int, fd: int, fd_offset: int) -> None:
        if window_offset < 0 or window_offset + size > self.window_size:
            raise VfioDeviceError(errno.EINVAL, "region outside the window")
        st = os.fstat(fd)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=fd_offset)
        self.window.append(_WindowRegion(window_offset, size, fd, fd_offset, (st.st_dev, st.st_ino), mm))

    def unmap_region(self, window_offset: int) -> None:
        for r in self.window:
            if r.window_offset == window_offset:
                self.window.remove(r)
                try:
                    r.mm.close()
                except BufferError:
                    pass
                return

    def _window_rw(self, offset: int, count: int, data: bytes | None) -> bytes:
        for r in self.window:
            if r.window_offset <= offset and offset + count <= r.window_offset + r.size:
                rel = offset - r.window_offset
                if data is None:
                    return bytes(r.mm[rel : rel + count])
                r.mm[rel : rel + count] = data
                return b""
        return b"\xff" * count if data is None else b""  # holes read as ones, writes are dropped

    # -- notification slots (protocol.md 6) ---------------------------------------------

    def assign_slot(self, kick_fd: int, call_fd: int) -> int:
        for s in range(self.num_slots):
            if s not in self.slots:
                self.slots[s] = _Slot(kick_fd, call_fd)
                if self._add_reader is not None:
                    self._add_reader(kick_fd, functools.partial(self._kick, s))
                return s
        raise VfioDeviceError(errno.ENOSPC, f"all {self.num_slots} notification slots are taken")

    def free_slots(self) -> int:
        return self.num_slots - len(self.slots)

    def release_slot(self, slot: int) -> None:
        sl = self.slots.pop(slot, None)
        if sl is not None and self._remove_reader is not None:
            self._remove_reader(sl.kick_fd)
        self.pending_slots &= ~(1 << slot)

    def _kick(self, slot: int) -> None:
        sl = self.slots.get(slot)
        if sl is None or not drain_eventfd(sl.kick_fd):
            return  # the peer's kick fd is checked and non-blocking (peer_fds): nothing, or it raced us
        self.counters["kicks"] += 1
        self.pending_slots |= 1 << slot
        if sl.vector != NO_VECTOR:
            self._raise(sl.vector, ISR_QUEUE)

    def _doorbell(self, slot: int, rings: int = 1) -> None:
        sl = self.slots.get(slot)
        if sl is None:
            self.counters["stray_doorbells"] += rings
            return
        self.counters["doorbells"] += rings
        if not signal_eventfd(sl.call_fd):
            # The driver VM's call counter is full (it never reads it, or filled it): it has a
            # notification pending already; never wait on it (docs/security.md).
            self.counters["calls_refused"] += 1

    def stats(self) -> dict[str, object]:
        return {**self.counters, "outstanding": len(self.outstanding), "backlog": len(self.backlog),
                "status": self.status, "slots": len(self.slots)}  # fmt: skip
