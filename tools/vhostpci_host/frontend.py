"""Frontend devices of a simulated driver VM, driven as their guest drivers would drive them.

A :class:`NetFrontend` is a virtio-net device's driver side (virtio 1.2, 5.1):
an RX queue (0) it keeps filled with empty buffers and a TX queue (1) it puts
frames on, both split rings in the simulated guest RAM. The backend across
vhost-pci (our driver in the device VM) moves the frames. Everything is
batched: a burst of frames is one avail-index publish and at most one kick.

``hostile`` methods break the rules on purpose, writing raw ring bytes, to
prove the backend survives a malicious driver VM.

The per-frame ring work of ``pktgen`` traffic and of receiving (the used TX chains
taken back and stamped again in place, the used RX buffers checked and posted again as
they were, ``DriverQueue.take_used`` and ``repost``: no chain through a free stack) runs in
one compiled call per batch where ``vhostpci_host._pktgen`` is built (setup.py), so
the simulator is not the bottleneck of what it measures; ``VHOSTPCI_SIM_PURE=1``
keeps it in Python. The Python methods are the reference: the compiled ones work on
the same :class:`DriverQueue` state with the same rules (tests/unit/test_pktgen.py).
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Callable
from types import ModuleType
from typing import cast

from vhostpci_driver.addr import Xgpa
from vhostpci_driver.errors import RingError
from vhostpci_driver.spec.virtio import DeviceId, Feature
from vhostpci_driver.spec.virtio_net import VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF
from vhostpci_driver.virtqueue import driver as _driver
from vhostpci_driver.virtqueue import native
from vhostpci_driver.virtqueue.driver import DriverQueue
from vhostpci_driver.wire.ctrl import DeviceInfo, Op, VirtqInfo
from vhostpci_host import netpacket
from vhostpci_host.guestram import GuestRam

NET_FEATURES = (
    (1 << Feature.VERSION_1)
    | (1 << Feature.RING_EVENT_IDX)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_NET_F_MAC)
)
RX, TX = 0, 1
HDR = netpacket.NET_HDR_SIZE
FULL_BUF = HDR + netpacket.MAX_FRAME
MRG_BUF = 4096
#: Frame sizes of "mixed" traffic: mostly small, some jumbo, some 64 KiB (mean about 8 KiB).
MIXED = (64, 64, 128, 256, 512, 1024, 1500, 1500, 4096, 9000, 16384, 65536)


#: the longest a driver VM that moderates its RX interrupts (NetFrontend.arm) sleeps while frames
#: keep coming: the time half of a NIC's interrupt coalescing (ethtool's rx-usecs)
COALESCE_S = 0.002

#: lcm(len(MIXED), 4096): the cycle of mixed sizes and of payload patterns (netpacket.build)
SEQ_PERIOD = 12288


def _load_pktgen() -> ModuleType | None:
    """The compiled per-frame work, or None: not built, or ``VHOSTPCI_SIM_PURE=1``.

    ``VHOSTPCI_PKTGEN_LIB=path`` loads it from a file instead (the AddressSanitizer and
    UBSan build that .ci/run tests it as), as ``VHOSTPCI_NATIVE_LIB`` does for the ring walker.
    """
    if os.environ.get("VHOSTPCI_SIM_PURE") == "1":
        return None
    path = os.environ.get("VHOSTPCI_PKTGEN_LIB")
    try:
        lib = native.load_extension("vhostpci_host._pktgen", path)
    except ImportError:
        if path:
            raise  # asked for by name: a build that does not load must say so
        return None
    lib.setup(_driver._FREE, RingError, netpacket.SeqSet)
    return lib


#: ``vhostpci_host._pktgen`` when it runs (the default of every :class:`NetFrontend`), else None
PKTGEN = _load_pktgen()


def mixed_size(seq: int) -> int:
    return MIXED[seq % len(MIXED)]


class Queue:
    """One virtqueue of a frontend: its ring, its buffers and its kick/call eventfds."""

    def __init__(self, ram: GuestRam, index: int, size: int, buf_size: int) -> None:
        self.index = index
        self.size = size
        desc_off, avail_off, used_off, total = DriverQueue.layout(size)
        base = ram.alloc(total, 4096)
        self.desc = Xgpa(base + desc_off)
        self.avail = Xgpa(base + avail_off)
        self.used = Xgpa(base + used_off)
        self.ring = DriverQueue(ram, size, self.desc, self.avail, self.used)
        self.buf_size = buf_size
        self.buf_base = ram.alloc(size * buf_size, 4096)
        self.area = ram.view(self.buf_base, size * buf_size)  # every buffer, slot by slot
        self.bufs = [self.area[i * buf_size : (i + 1) * buf_size] for i in range(size)]
        # The pages of each buffer's first 4 KiB (a header and a frame up to 1500 bytes, or a
        # mergeable RX buffer) populated now, as a running VM's RAM is: else the first lap of
        # traffic round the ring takes a page fault per buffer (2 to 3 us each, a ring of 1024
        # both ways about 5 ms per driver VM), no frame's cost. Zeros written over zeros.
        for i in range(size):
            for at in (i * buf_size, i * buf_size + min(buf_size, MRG_BUF) - 1):
                self.area[at] = 0
        self.free = list(range(size))
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kicks = 0
        self.name = "rx" if index == RX else "tx"

    def addr(self, slot: int) -> int:
        return self.buf_base + slot * self.buf_size

    def info(self) -> VirtqInfo:
        return VirtqInfo(self.index, self.size, self.desc, self.avail, self.used)

    def kick(self) -> None:
        if self.ring.kick_needed():
            self.kicks += 1
            os.eventfd_write(self.kick_fd, 1)

    def drain_call(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.call_fd)

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            os.close(fd)


class NetFrontend:
    """A virtio-net frontend: MAC, RX and TX queues, self-checking traffic."""

    device_type = DeviceId.NET

    def __init__(
        self, ram: GuestRam, mac: bytes, queue_size: int = 256, *, compiled: bool | None = None
    ) -> None:
        """``compiled``: the per-frame work in ``vhostpci_host._pktgen`` (None: when it is built)."""
        if compiled and PKTGEN is None:
            raise RuntimeError("vhostpci_host._pktgen is not built (or VHOSTPCI_SIM_PURE=1)")
        self._lib = PKTGEN if compiled is None or compiled else None
        self.ram = ram
        self.mac = mac
        self.device_id = int.from_bytes(mac, "big")
        self.queue_size = queue_size
        self.offered = NET_FEATURES
        self.accepted: int | None = None
        self.rx = Queue(ram, RX, queue_size, FULL_BUF)
        self.tx = Queue(ram, TX, queue_size, FULL_BUF)
        self.receiver = netpacket.Receiver()
        self.sent = 0
        self.sent_bytes = 0
        # A driver VM that restarts with its UUID and MAC must not resend the sequence numbers its
        # peers already counted (they would be duplicates): each incarnation starts at its own base,
        # a multiple of SEQ_PERIOD so sizes and payloads run through the same cycle.
        self.seq = int.from_bytes(os.urandom(4), "little") * SEQ_PERIOD
        self.mergeable = False
        self._stamped: list[tuple[bytes, int] | None] = [None] * queue_size  # TX slot -> pktgen frame in it
        self._tx_addrs = [self.tx.addr(slot) for slot in range(queue_size)]
        self._template: tuple[tuple[bytes, int], bytes] | None = None  # the compiled fill's whole frame

    @property
    def queues(self) -> tuple[Queue, Queue]:
        return (self.rx, self.tx)

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(Op.ADD, self.device_type, self.device_id, tuple(q.info() for q in self.queues))

    def negotiated(self, accepted: int) -> None:
        """Apply the accepted features (virtio 1.2, 5.1.6.3.1: mergeable buffers change RX)."""
        self.accepted = accepted
        self.mergeable = bool(accepted >> VIRTIO_NET_F_MRG_RXBUF & 1)
        event_idx = bool(accepted >> Feature.RING_EVENT_IDX & 1)
        for q in self.queues:
            q.ring.event_idx = event_idx

    def start(self) -> None:
        """Fill the RX queue with empty buffers (mergeable: 4 KiB pieces, else whole frames)."""
        size = MRG_BUF if self.mergeable else FULL_BUF
        q = self.rx
        while q.free:
            slot = q.free.pop()
            q.ring.add((), ((q.addr(slot), size),), slot)
        q.ring.publish()
        q.kick()

    # -- TX ------------------------------------------------------------------

    def send(self, dst: bytes, count: int, size_of: Callable[[int], int]) -> int:
        """Queue up to ``count`` frames to ``dst`` as one batch; returns how many went."""
        self.reclaim_tx()
        q = self.tx
        n = min(count, len(q.free))
        if n == 0:
            return 0
        add, bufs, free = q.ring.add, q.bufs, q.free
        seq = self.seq
        for _ in range(n):
            size = size_of(seq)
            frame = netpacket.build(dst, self.mac, seq, size)
            slot = free.pop()
            buf = bufs[slot]
            self._stamped[slot] = None  # no pktgen frame in it any more
            buf[:HDR] = netpacket.NO_CSUM_HDR
            buf[HDR : HDR + size] = frame
            add(((q.addr(slot), HDR + size),), (), slot)
            self.sent_bytes += size
            seq += 1
        self.seq = seq
        self.sent += n
        q.ring.publish()
        q.kick()
        return n

    def send_pktgen(self, dst: bytes, count: int, size: int) -> int:
        """Queue up to ``count`` pktgen frames of ``size`` bytes to ``dst``; returns how many went.

        A traffic source that is not the bottleneck (netpacket's pktgen frames):
        a TX buffer gets the whole frame once; when it comes back it is reused
        with only seq, length and check stamped (16 bytes), whatever the size.
        The chains the device is done with are taken back as they are
        (``DriverQueue.take_used``) and those whose buffer holds this very frame
        are stamped and posted again in place (``repost``: nothing through the free
        stacks); the others are released, and the free slots fill what is left.
        """
        want, frame = self._pktgen_template(dst, size)
        if self._lib is not None:
            return self._send_pktgen_compiled(want, frame, count)
        q = self.tx
        ring, bufs, stamped = q.ring, q.bufs, self._stamped
        stamp, at, check = netpacket.PKTGEN_STAMP.pack_into, HDR + 14, netpacket.pktgen_check
        macs = zlib.crc32(dst + self.mac)
        seq = self.seq
        heads, used = ring.take_used()
        keep: list[int] = []
        drop: list[int] = []
        for head, (token, _) in zip(heads, used, strict=True):
            slot = cast(int, token)
            if len(keep) < count and stamped[slot] is want:  # this frame already: the stamp only
                stamp(bufs[slot], at, seq, size, check(seq, size, macs))
                keep.append(head)
                seq += 1
            else:
                drop.append(head)
                q.free.append(slot)
        ring.release(drop)
        ring.repost(keep)
        n = min(count - len(keep), len(q.free))
        addrs, length = self._tx_addrs, HDR + size
        chains = []
        for _ in range(n):  # the rest from free slots: the whole frame where another one was
            slot = q.free.pop()
            buf = bufs[slot]
            if stamped[slot] is not want:
                buf[:length] = frame
                stamped[slot] = want
            stamp(buf, at, seq, size, check(seq, size, macs))
            chains.append((addrs[slot], length, slot))
            seq += 1
        ring.add_many(chains, False)
        return self._sent(seq, size)

    def _send_pktgen_compiled(self, want: tuple[bytes, int], frame: bytes, count: int) -> int:
        """:meth:`send_pktgen` in one compiled call for the batch (the reference is the Python above)."""
        assert self._lib is not None
        q = self.tx
        dst, size = want
        macs = zlib.crc32(dst + self.mac)
        n = int(self._lib.fill(q.ring, q.free, count, q.area, q.buf_base, q.buf_size, frame,
                               self._stamped, want, self.seq, macs))  # fmt: skip
        return self._sent(self.seq + n, size)

    def _pktgen_template(self, dst: bytes, size: int) -> tuple[tuple[bytes, int], bytes]:
        """``(dst, size)`` as one object for every buffer it is stamped into, and its whole frame.

        The buffers' ``_stamped`` entries are compared with it by identity (the compiled
        fill does the same): a new object only when the destination or the size changes.
        """
        if self._template is None or self._template[0] != (dst, size):
            frame = netpacket.NO_CSUM_HDR + netpacket.pktgen_frame(dst, self.mac, size)
            self._template = ((dst, size), frame)
        return self._template

    def _sent(self, seq: int, size: int) -> int:
        """Account a batch that ends before ``seq``, publish it, kick; returns its frames."""
        n = seq - self.seq
        self.seq = seq
        self.sent += n
        self.sent_bytes += n * size
        self.tx.ring.publish()
        self.tx.kick()
        return n

    def reclaim_tx(self) -> None:
        if self._lib is not None:
            self._lib.reclaim(self.tx.ring, self.tx.free)
            return
        self.tx.free.extend(cast(int, slot) for slot, _ in self.tx.ring.harvest())

    # -- RX ------------------------------------------------------------------

    def receive(self) -> int:
        """Check every frame the backend delivered, give the buffers back; returns frames taken.

        Take until the ring is quiet *after* used_event was moved: a frame
        pushed between our read of the used index and that write would
        otherwise raise no interrupt and sit there (virtio 1.2, 2.7.10). Each
        batch's buffers go back as they were (``DriverQueue.take_used`` and
        ``repost``: the same descriptors, nothing through the free stack) and are
        published at once, so a device that is still running sees them without a
        kick; a kick covers every publish since the last one (2.7.13: the event
        index is compared with all those entries), so one comes after the loop,
        and one each time a ring's worth went back in it: the comparison is of
        16-bit indexes, which must not pass 65536 entries between two kicks.
        """
        if self._lib is not None:
            return self._receive_compiled()
        frames = 0
        q = self.rx
        since_kick = 0
        while True:
            heads, used = q.ring.take_used()
            if not used:
                break
            frames += self._take(used)
            q.ring.repost(heads)
            q.ring.publish()
            since_kick += len(heads)
            if since_kick >= q.size:  # where each compiled call returns (_pktgen.c receive)
                q.kick()
                since_kick = 0
        q.kick()
        return frames

    def _receive_compiled(self) -> int:
        """:meth:`receive` with its whole loop one compiled call, or a few (the reference: above)."""
        assert self._lib is not None
        q, r = self.rx, self.receiver
        frames: int = 0
        while True:
            got, received, octets, duplicates, corrupt, quiet = self._lib.receive(
                q.ring, q.area, q.buf_base, q.buf_size, self.mergeable, netpacket.PATTERN, r.seen, r.take
            )
            r.received += received
            r.octets += octets
            r.duplicates += duplicates
            r.corrupt += corrupt
            frames += int(got)
            if quiet:
                break
            q.kick()  # a ring's worth taken in the call: kick before the next (see receive)
        q.kick()
        return frames

    def _take(self, used: list[tuple[object, int]]) -> int:
        """Check each delivered frame in the buffers it came in (they go back to the device unchanged)."""
        bufs, take = self.rx.bufs, self.receiver.take
        frames = 0
        i = 0
        while i < len(used):
            slot, written = cast(int, used[i][0]), used[i][1]
            buf = bufs[slot]
            nbufs = buf[10] | buf[11] << 8 if self.mergeable else 1  # virtio 1.2, 5.1.6.4: num_buffers
            if nbufs <= 1:  # the frame in place
                take(buf[HDR:written])
                i += 1
            else:
                parts = [buf[HDR:written]]
                for j in range(1, nbufs):
                    if i + j >= len(used):
                        break  # a backend that published half a frame: it shows up as corrupt
                    s2, w2 = cast(int, used[i + j][0]), used[i + j][1]
                    parts.append(bufs[s2][:w2])
                take(b"".join(parts))
                i += len(parts)
            frames += 1
        return frames

    # -- interrupt moderation ----------------------------------------------------

    def arm(self, sending: bool, receiving: bool) -> bool:
        """Before the driver VM sleeps: ask for the interrupts it needs, and no more; True if work is there.

        Each interrupt is a wake-up of this process and each kick one of the device's;
        a driver that takes one per batch the device pushes spends its CPU on them, not
        on frames. So, with EVENT_IDX (virtio 1.2, 2.7.10), as a NIC's interrupt
        coalescing does (frames or time, whichever first): RX, while frames keep coming
        (``receiving``: the turn just served found some), interrupts once half the posted
        buffers are used (the other half stays with the device, which never waits for
        us), the caller sleeping at most :data:`COALESCE_S` so that the last frames of a
        burst are not left waiting; at the next frame once a turn found none. TX
        interrupts once 3/4 of the chains in flight are back (Linux's
        ``virtqueue_enable_cb_delayed``) while there is more to send, not at all
        otherwise (the next send reclaims first). True: that many entries were used
        already, maybe before the device saw the new event index (so no interrupt may
        come): serve them before sleeping.
        """
        rx, tx = self.rx.ring, self.tx.ring
        work = rx.enable_interrupts(max(1, min(rx.in_flight(), rx.size) // 2) if receiving else 1)
        out = tx.in_flight()
        if sending and out:
            work |= tx.enable_interrupts(max(1, out * 3 // 4))
        else:
            tx.disable_interrupts()
        return work

    def stats(self) -> dict[str, object]:
        r = self.receiver
        return {
            "mac": netpacket.mac_str(self.mac),
            "features": self.accepted,
            "sent": self.sent,
            "sent_bytes": self.sent_bytes,
            "received": r.received,
            "received_bytes": r.octets,
            "duplicates": r.duplicates,
            "corrupt": r.corrupt,
            "from": {netpacket.mac_str(src): len(seqs) for src, seqs in r.seen.items()},
            "kicks": {"rx": self.rx.kicks, "tx": self.tx.kicks},
            "rings": {q.name: q.ring.state() for q in self.queues},
        }

    # -- a malicious driver VM -------------------------------------------------

    def hostile(self, kind: str) -> None:
        """Break the TX ring on purpose (raw bytes, bypassing the ring code), then kick.

        ``rx-short`` and ``rx-readable`` break the RX ring instead: every posted
        receive buffer becomes 8 bytes (shorter than the net header) or device-readable.
        """
        if kind in ("rx-short", "rx-readable"):
            rx = self.rx
            table = self.ram.view(rx.desc, 16 * rx.size)
            for i in range(rx.size):
                addr, length, flags, nxt = struct.unpack_from("<QIHH", table, 16 * i)
                if kind == "rx-short":
                    length = 8
                else:
                    flags &= ~2  # VIRTQ_DESC_F_WRITE
                struct.pack_into("<QIHH", table, 16 * i, addr, length, flags, nxt)
            return
        q = self.tx
        desc = self.ram.view(q.desc, 16 * q.size)
        avail = self.ram.view(q.avail, 4 + 2 * q.size)
        (idx,) = struct.unpack_from("<H", avail, 2)
        head = 0
        if kind == "desc-loop":
            struct.pack_into("<QIHH", desc, 0, q.addr(0), 64, 1, 0)  # NEXT -> itself
        elif kind == "oob-addr":
            struct.pack_into("<QIHH", desc, 0, 0xDEAD_0000_0000, 64, 0, 0)
        elif kind == "huge-len":
            struct.pack_into("<QIHH", desc, 0, q.addr(0), 0xFFFF_FFFF, 0, 0)
        elif kind == "bad-index":
            head = q.size + 5
        elif kind != "avail-jump":
            raise ValueError(f"unknown hostile kind {kind!r}")
        struct.pack_into("<H", avail, 4 + 2 * (idx % q.size), head)
        new_idx = idx + (q.size + 100 if kind == "avail-jump" else 1)
        struct.pack_into("<H", avail, 2, new_idx & 0xFFFF)
        os.eventfd_write(q.kick_fd, 1)

    def close(self) -> None:
        for q in self.queues:
            q.close()
