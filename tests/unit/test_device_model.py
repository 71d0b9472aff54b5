"""The reference device is strict, so the toolkit cannot pass against a lenient one."""

from __future__ import annotations

import os
import struct

import pytest

from vhostpci_driver.errors import RemoteMemoryError
from vhostpci_driver.spec.virtio import Feature, Status
from vhostpci_driver.virtqueue.driver import DriverQueue
from vhostpci_driver.wire import ctrl
from vhostpci_driver.wire import device as d
from vhostpci_host.device_model import VhostPciDeviceModel
from vhostpci_host.vfio_device import VfioDeviceError
from vhostpci_host.vfio_user_server import DmaTable

DRIVER_OK, FEATURES_OK, NEEDS_RESET = Status.DRIVER_OK, Status.FEATURES_OK, Status.DEVICE_NEEDS_RESET

IOVA = 0x4000_0000
COMMON = {"dfs": 0, "df": 4, "gfs": 8, "gf": 12, "cvec": 16, "status": 20, "qsel": 22, "qsize": 24,
          "qvec": 26, "qen": 28, "qdesc": 32, "qdrv": 40, "qdev": 48}  # fmt: skip


class Bench:
    """The model with real DMA memory (a memfd mapped by the server's DMA table) and real eventfds."""

    def __init__(self) -> None:
        self.m = VhostPciDeviceModel(window_size=1 << 24)
        self.dma = DmaTable()
        self.fd = os.memfd_create("dma")
        os.ftruncate(self.fd, 1 << 20)
        self.dma.map(IOVA, 1 << 20, self.fd, 0, 3)
        self.m.attach_dma(self.dma)
        self.irq = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
        self.m.set_irqs(2, 0x24, 0, 3, [os.dup(fd) for fd in self.irq])
        self.m.region_write(7, 0x42, struct.pack("<H", 0x8000 | (self.m.nvectors - 1)))  # MSI-X enable
        self.w("cvec", 0, 2)  # config changes on vector 0

    def w(self, field: str, value: int, width: int) -> None:
        self.m.region_write(0, COMMON[field], value.to_bytes(width, "little"))

    def r(self, field: str, width: int) -> int:
        return int.from_bytes(self.m.region_read(0, COMMON[field], width), "little")

    def fired(self, vector: int) -> bool:
        try:
            os.eventfd_read(self.irq[vector])
            return True
        except BlockingIOError:
            return False

    def negotiate(self, features: int) -> int:
        self.w("status", 1 | 2, 1)
        for page in (0, 1):
            self.w("gfs", page, 4)
            self.w("gf", (features >> (32 * page)) & 0xFFFFFFFF, 4)
        self.w("status", 1 | 2 | FEATURES_OK, 1)
        return self.r("status", 1)

    def setup_queue(self, q: int, base: int, size: int = 16) -> DriverQueue | None:
        doff, aoff, uoff, _ = DriverQueue.layout(size)
        self.w("qsel", q, 2)
        self.w("qsize", size, 2)
        self.w("qdesc", base + doff, 8)
        self.w("qdrv", base + aoff, 8)
        self.w("qdev", base + uoff, 8)
        self.w("qvec", 1 + q, 2)
        self.w("qen", 1, 2)
        if base + uoff >= IOVA + (1 << 20):
            return None  # deliberately outside DMA memory
        return DriverQueue(self.dma, size, base + doff, base + aoff, base + uoff)

    def close(self) -> None:
        self.m.disconnected()
        for fd in (*self.irq, self.fd):
            os.close(fd)


@pytest.fixture
def b() -> Bench:
    bench = Bench()
    yield bench  # type: ignore[misc]
    bench.close()


def test_features_ok_only_for_offered_bits_with_version_1(b: Bench) -> None:
    assert not b.negotiate(1 << 5) & FEATURES_OK  # a device-specific bit nobody offered
    b.w("status", 0, 1)
    assert not b.negotiate(1 << Feature.RING_EVENT_IDX) & FEATURES_OK  # no VERSION_1
    b.w("status", 0, 1)
    assert b.negotiate(1 << Feature.VERSION_1) & FEATURES_OK


def test_queue_setup_rules_and_reset(b: Bench) -> None:
    b.negotiate(1 << Feature.VERSION_1)
    b.w("qsel", 0, 2)
    b.w("qsize", 12, 2)  # not a power of two: a driver error
    assert b.r("status", 1) & NEEDS_RESET and b.fired(0)
    b.w("status", 0, 1)
    assert b.r("status", 1) == 0  # reset completes at once
    b.negotiate(1 << Feature.VERSION_1)
    b.setup_queue(0, IOVA)
    b.setup_queue(1, IOVA + 0x4000)
    b.w("status", 1 | 2 | FEATURES_OK | DRIVER_OK, 1)
    assert not b.r("status", 1) & NEEDS_RESET
    b.w("qsel", 0, 2)
    b.w("qsize", 8, 2)  # after DRIVER_OK: refused, and the driver is told
    assert b.r("status", 1) & NEEDS_RESET


def test_driver_ok_with_rings_outside_dma_memory(b: Bench) -> None:
    b.negotiate(1 << Feature.VERSION_1)
    b.setup_queue(0, IOVA + (1 << 21))  # beyond the 1 MiB mapped
    b.w("status", 1 | 2 | FEATURES_OK | DRIVER_OK, 1)
    assert b.r("status", 1) & NEEDS_RESET and b.fired(0)


def _running_control_queues(b: Bench, buffers: int) -> tuple[DriverQueue, DriverQueue]:
    """controlq and ackq set up, ``buffers`` controlq buffers of 4 KiB posted, DRIVER_OK."""
    b.negotiate(1 << Feature.VERSION_1)
    cq = b.setup_queue(0, IOVA)
    aq = b.setup_queue(1, IOVA + 0x4000)
    assert cq is not None and aq is not None
    for i in range(buffers):
        cq.add((), ((IOVA + 0x10000 + 4096 * i, 4096),), i)
    cq.publish()
    b.w("status", 1 | 2 | FEATURES_OK | DRIVER_OK, 1)
    return cq, aq


def test_controlq_ids_and_acks(b: Bench) -> None:
    acks: list[tuple[int, int]] = []
    errors: list[tuple[str, int | None]] = []
    b.m.on_ack = lambda rid, ack: acks.append((rid, ack.result))
    b.m.on_ack_error = lambda why, rid: errors.append((why, rid))
    cq, aq = _running_control_queues(b, 4)
    ids = [b.m.send_control(ctrl.FeatureBits(1, i, 1 << 32)) for i in range(3)]
    assert ids == [1, 2, 3] and b.fired(1)
    got = cq.harvest()
    assert len(got) == 3
    seen = []
    for token, n in got:
        raw = bytes(b.dma.view(IOVA + 0x10000 + 4096 * int(token), n))  # type: ignore[call-overload]
        seen.append(ctrl.decode_message(raw)[0].request_id)
    assert seen == [1, 2, 3]
    for k, rid in enumerate([2, 1, 2, 99]):  # out of order, a duplicate, an unknown id
        raw = ctrl.encode_ack(rid, ctrl.Ack(3, ctrl.AckResult.ADD_DONE))
        b.dma.view(IOVA + 0x20000 + 64 * k, len(raw))[:] = raw
        aq.add(((IOVA + 0x20000 + 64 * k, len(raw)),), (), k)
    aq.publish()
    b.m.region_write(0, d.NOTIFY_OFFSET + d.NOTIFY_OFF_MULTIPLIER, struct.pack("<H", 1))
    assert acks == [(2, ctrl.AckResult.ADD_DONE), (1, ctrl.AckResult.ADD_DONE)]
    assert [e[1] for e in errors] == [2, 99] and "duplicate" in errors[0][0]
    assert b.m.missing_acks() == [3]


def test_an_ack_is_read_before_its_buffer_goes_back(b: Bench) -> None:
    """A driver may post a new ack in a buffer the moment the device returns it (virtio 1.2,
    2.7.8): the model must have copied the old one out first. The driver here runs right
    after the model's push, as a fast one in another process can; it reuses the one buffer."""
    acks: list[int] = []
    errors: list[tuple[str, int | None]] = []
    b.m.on_ack = lambda rid, ack: acks.append(rid)
    b.m.on_ack_error = lambda why, rid: errors.append((why, rid))
    _, aq = _running_control_queues(b, 2)
    ids = [b.m.send_control(ctrl.FeatureBits(1, i, 1 << 32)) for i in range(2)]
    buf = IOVA + 0x20000
    later = [ctrl.encode_ack(ids[1], ctrl.Ack(3, ctrl.AckResult.ADD_DONE))]

    def post(raw: bytes) -> None:
        b.dma.view(buf, len(raw))[:] = raw
        aq.add(((buf, len(raw)),), (), 0)
        aq.publish()

    ring = b.m.rings[d.Queue.ACKQ]
    assert ring is not None
    push = ring.push_batch

    def push_then_the_driver_runs(used: list[tuple[int, int]]) -> None:
        push(used)
        if later and aq.harvest():  # the buffer is the driver's again: the next ack goes in it
            post(later.pop())

    ring.push_batch = push_then_the_driver_runs  # type: ignore[method-assign]
    post(ctrl.encode_ack(ids[0], ctrl.Ack(3, ctrl.AckResult.ADD_DONE)))
    b.m.region_write(0, d.NOTIFY_OFFSET + d.NOTIFY_OFF_MULTIPLIER, struct.pack("<H", 1))
    assert acks == ids and errors == [] and b.m.missing_acks() == []


def test_short_controlq_buffer_is_a_driver_error(b: Bench) -> None:
    b.negotiate(1 << Feature.VERSION_1)
    cq = b.setup_queue(0, IOVA)
    assert cq is not None
    cq.add((), ((IOVA + 0x10000, 16),), 0)
    cq.publish()
    b.w("status", 1 | 2 | FEATURES_OK | DRIVER_OK, 1)
    b.m.send_control(ctrl.FeatureBits(1, 1, 1))
    assert b.r("status", 1) & NEEDS_RESET


def test_masked_vectors_pend_and_deliver_on_unmask(b: Bench) -> None:
    b.m.region_write(1, 16 * 0 + 12, b"\x01\x00\x00\x00")  # mask vector 0
    b.m.set_remote(b"\x11" * 16, True)
    assert not b.fired(0)
    assert int.from_bytes(b.m.region_read(1, d.MSIX_PBA_OFFSET, 8), "little") & 1
    b.m.region_write(1, 16 * 0 + 12, b"\x00\x00\x00\x00")
    assert b.fired(0)
    cfg = b"".join(
        b.m.region_read(0, d.DEVICE_CFG_OFFSET + off, 4) for off in range(0, d.VHOST_PCI_CONFIG.size, 4)
    )
    fields = d.VHOST_PCI_CONFIG.unpack_from(cfg, 0, "config")
    assert fields[0] == b"\x11" * 16 and fields[5] == d.STATUS_REMOTE_UP


def test_slots_relay_kicks_and_doorbells(b: Bench) -> None:
    kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    readers: dict[int, object] = {}
    b.m.attach_loop(readers.__setitem__, readers.pop)
    slot = b.m.assign_slot(kick, call)
    b.m.region_write(0, d.VECTOR_OFFSET + 2 * slot, struct.pack("<H", 2))
    assert b.m.region_read(0, d.VECTOR_OFFSET + 2 * slot, 2) == struct.pack("<H", 2)
    os.eventfd_write(kick, 1)
    readers[kick]()  # type: ignore[operator]
    assert b.fired(2)
    assert struct.unpack("<I", b.m.region_read(0, d.PENDING_OFFSET, 4))[0] == 1 << slot
    b.m.region_write(0, d.PENDING_OFFSET, struct.pack("<I", 1 << slot))  # write 1 to clear
    assert struct.unpack("<I", b.m.region_read(0, d.PENDING_OFFSET, 4))[0] == 0
    b.m.region_write(0, d.DOORBELL_OFFSET + 4 * slot, struct.pack("<I", 1))
    assert os.eventfd_read(call) == 1
    b.m.region_write(0, d.DOORBELL_OFFSET + 4 * 9, struct.pack("<I", 1))  # no frontend: counted
    assert b.m.counters["stray_doorbells"] == 1
    b.m.release_slot(slot)
    assert kick not in readers
    os.close(kick)
    os.close(call)


def test_ioeventfds_do_what_the_messages_do_and_go_with_the_client(b: Bench) -> None:
    assert b.m.io_fds(d.BAR_VIRTIO) == []  # no loop to watch them: none offered
    readers: dict[int, object] = {}
    b.m.attach_loop(readers.__setitem__, readers.pop)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    slot = b.m.assign_slot(call, call)
    specs = b.m.io_fds(d.BAR_VIRTIO)
    assert b.m.io_fds(d.BAR_VIRTIO) == specs and b.m.io_fds(d.BAR_MSIX) == []  # made once, BAR 0 only
    by_offset = {s.offset: s for s in specs}
    assert len(specs) == 2 + b.m.num_slots and len(readers) == len(specs) + 1
    notify = by_offset[d.NOTIFY_OFFSET + d.NOTIFY_OFF_MULTIPLIER * d.Queue.ACKQ]
    assert (notify.size, notify.datamatch) == (2, d.Queue.ACKQ)  # virtio 1.2, 4.1.5.2: the queue index
    bell = by_offset[d.DOORBELL_OFFSET + 4 * slot]
    assert (bell.size, bell.datamatch) == (4, None)  # protocol.md 6: any value
    for _ in range(3):  # three doorbells before the loop looks: one wake-up, three counted
        os.eventfd_write(bell.fd, 1)
    readers[bell.fd]()  # type: ignore[operator]
    assert os.eventfd_read(call) == 1 and b.m.counters["doorbells"] == 3
    readers[bell.fd]()  # type: ignore[operator]  # a spurious wake-up: nothing happens
    assert b.m.counters["doorbells"] == 3
    os.eventfd_write(notify.fd, 1)
    readers[notify.fd]()  # type: ignore[operator]
    assert b.m.counters["notifies"] == 1
    os.eventfd_write(bell.fd, 1)  # written just before the client went: still rung
    b.m.disconnected()
    assert os.eventfd_read(call) == 1 and b.m.counters["doorbells"] == 4
    assert set(readers) == {call}
    for s in specs:
        with pytest.raises(OSError):
            os.fstat(s.fd)
    b.m.release_slot(slot)
    os.close(call)


def test_window_holes_read_as_ones_and_regions_map_by_fd(b: Bench) -> None:
    assert b.m.region_read(2, 0, 4) == b"\xff" * 4
    mem = os.memfd_create("vm")
    os.ftruncate(mem, 1 << 17)
    os.pwrite(mem, b"abcd", 0x100)
    b.m.map_region(0x10000, 1 << 16, mem, 0)  # window offset != file offset: served by message only
    spec = b.m.regions()[2]
    assert spec.fd is None and b.m.region_read(2, 0x10100, 4) == b"abcd"
    b.m.unmap_region(0x10000)
    b.m.map_region(0, 1 << 16, mem, 0)  # the server's placement: window offset == file offset
    b.m.map_region(1 << 16, 1 << 16, mem, 1 << 16)
    spec = b.m.regions()[2]
    assert spec.fd == mem and spec.fd_offset == 0
    assert [(a.offset, a.size) for a in spec.areas] == [(0, 1 << 16), (1 << 16, 1 << 16)]
    b.m.unmap_region(0)
    b.m.unmap_region(1 << 16)
    os.close(mem)


def test_bad_widths_are_refused(b: Bench) -> None:
    with pytest.raises(VfioDeviceError):
        b.m.region_read(0, 1, 2)  # misaligned
    with pytest.raises(VfioDeviceError):
        b.m.region_write(0, 0, b"abc")


def test_dma_ranges_across_page_sized_mappings() -> None:
    """A VM behind a virtual IOMMU maps DMA memory page by page; a ring may cross pages."""
    table = DmaTable()
    fd = os.memfd_create("guest")
    os.ftruncate(fd, 3 * 4096)
    try:
        table.map(0x10000, 4096, fd, 0, 3)
        table.map(0x11000, 4096, fd, 4096, 3)
        table.map(0x12000, 4096, fd, 0, 3)  # adjacent in IOVA, but not the next file page
        v = table.view(0x10FF0, 0x20)
        v[:] = b"x" * 0x20
        assert os.pread(fd, 0x20, 0xFF0) == b"x" * 0x20
        with pytest.raises(RemoteMemoryError):
            table.view(0x11FF0, 0x20)  # would need file pages 1 then 0: refused
        del v
        assert table.unmap(0x10000, 0x2000) == [(0x10000, 4096), (0x11000, 4096)]
        with pytest.raises(RemoteMemoryError):
            table.view(0x10FF0, 0x20)
    finally:
        table.unmap_all()
        os.close(fd)


def test_fd_less_dma_ranges_are_bounded_too() -> None:
    """QEMU maps ROMs without an fd; a client must not grow the table (or its O(n) check) forever."""
    from vhostpci_host.vfio_user_server import MAX_DMA_MAPS  # noqa: PLC0415

    table = DmaTable()
    for i in range(MAX_DMA_MAPS):
        table.map_opaque(i * 4096, 4096)
    with pytest.raises(VfioDeviceError) as e:
        table.map_opaque(MAX_DMA_MAPS * 4096, 4096)
    assert "too many" in str(e.value)
    table.unmap(0, 4096)
    table.map_opaque(MAX_DMA_MAPS * 4096, 4096)  # room again once one went


def test_intx_follows_the_isr_with_vfio_masking_and_the_status_bit() -> None:
    """INTx as QEMU's vfio-user client and uio_pci_generic use it: level from the ISR, automasked."""
    fds_before = len(os.listdir("/proc/self/fd"))
    m = VhostPciDeviceModel(window_size=1 << 24)
    line = os.eventfd(0, os.EFD_NONBLOCK)

    def fired() -> int:
        try:
            return os.eventfd_read(line)
        except BlockingIOError:
            return 0

    def status_bit() -> bool:
        return bool(struct.unpack("<H", m.region_read(7, 6, 2))[0] & 0x08)

    try:
        m.set_irqs(0, 0x24, 0, 1, [os.dup(line)])  # TRIGGER, DATA_EVENTFD
        m.set_remote(b"\x01" * 16, True)  # a config change: ISR bit 1, the line rises
        assert fired() == 1 and status_bit()
        m.set_remote(b"\x01" * 16, False)  # more while masked (AUTOMASKED): no second edge
        assert fired() == 0
        m.set_irqs(0, 0x11, 0, 1, [])  # UNMASK, DATA_NONE: still asserted, so it fires again
        assert fired() == 1
        assert m.region_read(0, d.ISR_OFFSET, 1) == b"\x02"  # reading the ISR clears it...
        assert not status_bit()  # ...and lowers the line
        m.set_irqs(0, 0x11, 0, 1, [])
        m.region_write(7, 4, struct.pack("<H", 0x400 | 0x6))  # command: Interrupt Disable
        m.set_remote(b"\x01" * 16, True)
        assert fired() == 0 and status_bit()  # pending, shown in status, not signalled
        m.region_write(7, 4, struct.pack("<H", 0x6))  # re-armed (what uio_pci_generic users do)
        assert fired() == 1
        unmask = os.eventfd(0, os.EFD_NONBLOCK)  # an unmask (resample) eventfd instead of messages
        m.set_irqs(0, 0x14, 0, 1, [os.dup(unmask)])
        assert m.intx_unmask_fd is not None
        m.set_irqs(0, 0x21, 0, 0, [])  # TRIGGER, DATA_NONE, count 0: the line is torn down
        assert m.intx_fd is None
        os.close(unmask)
    finally:
        m.disconnected()
        os.close(line)
    assert len(os.listdir("/proc/self/fd")) == fds_before  # every fd the model was given is closed


def test_direct_doorbells_hand_the_call_eventfd_of_the_slot_holder_now() -> None:
    """With direct_doorbells, an assigned slot's doorbell is its frontend's call eventfd (no relay through
    us); a free slot keeps the relay; the answer follows the slot when it changes hands."""
    m = VhostPciDeviceModel(window_size=1 << 24, direct_doorbells=True)
    readers: dict[int, object] = {}
    m.attach_loop(readers.__setitem__, readers.pop)
    kick1, call1, kick2, call2 = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4))
    slot = m.assign_slot(kick1, call1)

    def bell() -> int:
        (spec,) = [s for s in m.io_fds(d.BAR_VIRTIO) if s.offset == d.DOORBELL_OFFSET + 4 * slot]
        return spec.fd

    assert bell() == call1
    os.eventfd_write(bell(), 1)  # what the client's posted write does: it lands in the driver VM's fd
    assert os.eventfd_read(call1) == 1 and m.counters["doorbells"] == 0  # we never saw it
    m.release_slot(slot)
    relay = bell()
    assert relay not in (call1, call2) and relay in readers  # a free slot: our own eventfd, watched
    assert m.assign_slot(kick2, call2) == slot and bell() == call2  # the new holder's, not the old one's
    m.disconnected()
    for fd in (call1, call2):
        os.fstat(fd)  # the frontends' fds are not ours to close
    with pytest.raises(OSError):
        os.fstat(relay)
    m.release_slot(slot)
    for fd in (kick1, call1, kick2, call2):
        os.close(fd)


def test_what_was_queued_before_driver_ok_is_lost_and_the_replay_goes_first(b: Bench) -> None:
    # A DEVICE_INFO queued between a reset and DRIVER_OK would otherwise be delivered
    # before the host's replay of the memory its rings are in (RING_OUTSIDE_MEMORY).
    order: list[tuple[str, object]] = []
    b.m.on_reset = lambda lost: order.append(("lost", lost))
    b.m.on_driver_ok = lambda: order.append(("replayed", b.m.send_control(ctrl.FeatureBits(1, 9, 1 << 32))))
    b.negotiate(1 << Feature.VERSION_1)
    cq = b.setup_queue(0, IOVA)
    assert cq is not None and b.setup_queue(1, IOVA + 0x4000) is not None
    for i in range(4):
        cq.add((), ((IOVA + 0x10000 + 4096 * i, 4096),), i)
    cq.publish()
    queued = b.m.send_control(ctrl.FeatureBits(1, 1, 1 << 32))  # no live ring yet: it waits
    b.w("status", 1 | 2 | FEATURES_OK | DRIVER_OK, 1)
    assert order == [("lost", [queued]), ("replayed", queued + 1)]
    got = cq.harvest()
    ids = [ctrl.decode_message(bytes(b.dma.view(IOVA + 0x10000 + 4096 * int(t), n)))[0].request_id  # type: ignore[call-overload]
           for t, n in got]  # fmt: skip
    assert ids == [queued + 1] and b.m.missing_acks() == [queued + 1]
