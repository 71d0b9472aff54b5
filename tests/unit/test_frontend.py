"""The simulated virtio-net frontend against the real device-side ring, in one process.

The frontend's rings live in its guest RAM (a real memfd); a device-side
queue over the same memory plays the backend: it moves TX frames into RX
buffers, as the net backend does across vhost-pci.
"""

from __future__ import annotations

import os

import pytest

from vhostpci_driver.errors import RingError
from vhostpci_driver.spec.virtio_net import VIRTIO_NET_F_MRG_RXBUF
from vhostpci_driver.virtqueue.device import DeviceQueue
from vhostpci_host import frontend as fe_mod
from vhostpci_host import netpacket
from vhostpci_host.frontend import MRG_BUF, NET_FEATURES, NetFrontend, mixed_size
from vhostpci_host.guestram import GuestRam

A = netpacket.mac_bytes("52:54:00:00:00:0a")


def backend(ram: GuestRam, fe: NetFrontend) -> tuple[DeviceQueue, DeviceQueue]:
    return tuple(  # type: ignore[return-value]
        DeviceQueue(
            ram, q.size, q.desc, q.avail, q.used, event_idx=bool(fe.accepted and fe.accepted >> 29 & 1)
        )
        for q in fe.queues
    )


def loop_back(rx: DeviceQueue, tx: DeviceQueue, mergeable: bool) -> int:
    """Copy every TX frame (header included) into RX buffers; returns frames moved."""
    moved = 0
    worst = -(-(netpacket.NET_HDR_SIZE + netpacket.MAX_FRAME) // MRG_BUF) if mergeable else 1
    while rx.pending() >= worst:  # like a real backend: take TX only when RX can hold it
        chain = tx.pop()
        if chain is None:
            break
        data = chain.read_all()
        pieces = [data[i : i + MRG_BUF] for i in range(0, len(data), MRG_BUF)] if mergeable else [data]
        rx_chains = rx.pop_batch(len(pieces))
        assert len(rx_chains) == len(pieces), "RX ring ran dry"
        used = []
        if mergeable:  # virtio 1.2, 5.1.6.4: num_buffers in the first buffer's header
            pieces[0] = pieces[0][:10] + len(pieces).to_bytes(2, "little") + pieces[0][12:]
        for piece, rc in zip(pieces, rx_chains, strict=True):
            rc.writable[0][: len(piece)] = piece
            used.append((rc.head, len(piece)))
        rx.push_batch(used)
        tx.push(chain.head, 0)
        moved += 1
    return moved


@pytest.mark.parametrize("mergeable", [False, True])
def test_frames_loop_back_intact(mergeable: bool) -> None:
    ram = GuestRam(64 << 20)
    fe = NetFrontend(ram, A, queue_size=64)
    features = NET_FEATURES if mergeable else NET_FEATURES & ~(1 << VIRTIO_NET_F_MRG_RXBUF)
    fe.negotiated(features)
    fe.start()
    rx, tx = backend(ram, fe)
    total = 0
    for _ in range(10_000):  # bounded: a stuck data path fails the test instead of hanging it
        total += fe.send(A, 300 - total, mixed_size)
        loop_back(rx, tx, mergeable)
        fe.receive()
        if fe.receiver.received == 300:
            break
    fe.reclaim_tx()
    assert fe.sent == 300
    r = fe.receiver
    assert (r.received, r.duplicates, r.corrupt) == (300, 0, 0)
    assert fe.tx.kicks > 0
    fe.close()
    ram.close()


@pytest.mark.parametrize("kind", ["desc-loop", "oob-addr", "huge-len", "avail-jump", "bad-index"])
def test_hostile_modes_break_the_backend_ring_with_the_named_rule(kind: str) -> None:
    ram = GuestRam(16 << 20)
    fe = NetFrontend(ram, A, queue_size=16)
    fe.negotiated(NET_FEATURES)
    _, tx = backend(ram, fe)
    fe.hostile(kind)
    assert os.eventfd_read(fe.tx.kick_fd) == 1
    with pytest.raises(RingError) as ei:
        tx.pop_batch()
    expected = {
        "desc-loop": "chain-length",
        "oob-addr": "desc-addr",
        "huge-len": "desc-addr",
        "avail-jump": "avail-idx",
        "bad-index": "desc-index",
    }
    assert ei.value.rule == expected[kind]
    fe.close()
    ram.close()


def test_guest_ram_regions_share_one_memfd() -> None:
    ram = GuestRam(8 << 20)
    regions = ram.socket_regions()
    assert len(regions) == 2 and {r.fd for r in regions} == {ram.fd}
    assert regions[1].guest_phys_addr == 4 << 30 and regions[1].mmap_offset == 4 << 20
    ram.view(4 << 30, 4)[:] = b"high"
    assert os.pread(ram.fd, 4, 4 << 20) == b"high"
    ram.close()


@pytest.mark.parametrize(
    "compiled",
    [False, pytest.param(True, marks=pytest.mark.skipif(fe_mod.PKTGEN is None, reason="_pktgen not built"))],
)
def test_interrupt_moderation_calls_once_per_half_ring_rx_and_three_quarters_tx(compiled: bool) -> None:
    """NetFrontend.arm: the device side (the reference DeviceQueue) signals exactly when it asked.

    RX while frames keep coming: once half the posted buffers are used, not per push;
    at the next frame once a turn found none. TX while sending: once 3/4 of what is in
    flight is back; none when there is nothing more to send.
    """
    size = 64
    ram = GuestRam(64 << 20)
    fe = NetFrontend(ram, A, queue_size=size, compiled=compiled)
    fe.negotiated(NET_FEATURES & ~(1 << VIRTIO_NET_F_MRG_RXBUF))
    fe.start()
    rx, tx = backend(ram, fe)
    try:

        def deliver(n: int) -> list[bool]:
            """Move n frames TX -> RX one at a time; the RX call decision after each push."""
            calls = []
            for _ in range(n):
                chain = tx.pop()
                assert chain is not None
                (buf,) = rx.pop_batch(1)
                data = chain.read_all()
                buf.writable[0][: len(data)] = data
                rx.push(buf.head, len(data))
                tx.push(chain.head, 0)
                calls.append(rx.need_notify())
            return calls

        assert fe.send_pktgen(A, size, 64) == size  # TX full
        assert deliver(1) == [True]  # idle: the first frame interrupts
        assert fe.receive() == 1
        assert not fe.arm(sending=True, receiving=True)
        half = size // 2
        # RX: one call for half the ring, whatever the pushes; TX: at 3/4 of the 64 in flight
        # (not harvested yet: the first frame's TX buffer too)
        assert deliver(half) == [False] * (half - 1) + [True]
        assert not tx.need_notify()  # 33 of 64 back: fewer than 48
        deliver(14)
        assert not tx.need_notify()
        deliver(1)
        assert tx.need_notify()  # the 48th
        assert fe.receive() == half + 15
        fe.reclaim_tx()
        assert not fe.arm(sending=False, receiving=False)  # a turn with no frame: the next one calls
        assert deliver(1) == [True]
        assert not tx.need_notify()  # nothing more to send: no TX interrupt
        assert fe.arm(sending=False, receiving=False)  # the frame is there already: serve it
    finally:
        fe.close()
        ram.close()
