"""One vhost-user front-end (a stock QEMU driver VM) as the front door sees it: the state machine.

It takes QEMU's requests one at a time (:meth:`VhostUserSession.handle`) and the
vhost-pci server's messages (:meth:`VhostUserSession.on_server`), and puts what
to send in two outboxes: replies for QEMU and socket messages for the server
(docs/protocol.md section 10 says how one maps onto the other). It does no
socket I/O of its own; it owns the fds QEMU gave (memory, kick, call, err) and
the call relays it hands the server, and closes every one of them.

What it enforces (a driver VM is untrusted, docs/security.md): the order of
requests (nothing but feature queries before SET_OWNER), every field of every
request, memory regions that neither overlap nor pass the limits, ring
addresses inside one region each. A violation raises
:class:`~vhostpci_driver.errors.ProtocolError`; the shell logs it and closes
that connection only.

A frontend is live on the device VM only while every ring is ready: size,
addresses, kick (the ring is started), call, enable and the memory table all
present (DPDK's ``vq_is_ready``; vhost-user.rst, "Ring states"). Whenever what
QEMU has set up differs from what the device VM serves, the frontend is removed
(DEVICE_INFO DEL, which hands the rings' states back) and added again.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from vhostpci_driver.addr import Xgpa
from vhostpci_driver.errors import FailReason, ProtocolError
from vhostpci_driver.virtqueue.layout import ring_part_sizes
from vhostpci_driver.wire.ctrl import AckResult, DeviceInfo, FeatureBits, Op, VirtqInfo, VirtqState
from vhostpci_driver.wire.layout import is_pow2
from vhostpci_driver.wire.sock import (
    Empty,
    SockAck,
    SockDeviceInfo,
    SocketRegion,
    SockMemoryInfo,
    SockMessage,
    SockMsgType,
)
from vhostpci_host import vhost_user_wire as vu
from vhostpci_host.vhost_user_wire import ProtocolFeature, Request

log = logging.getLogger(__name__)

#: virtio 1.2 6: bits a split-ring back end behind our device must never offer.
VIRTIO_F_ACCESS_PLATFORM = 33  # ring addresses would be IOVAs, not guest-physical
VIRTIO_F_RING_PACKED = 34  # only split rings are served
VIRTIO_F_VERSION_1 = 32
NEVER_OFFERED = (1 << VIRTIO_F_ACCESS_PLATFORM) | (1 << VIRTIO_F_RING_PACKED) | (1 << vu.F_PROTOCOL_FEATURES)
#: REPLY_ACK: every request that asks gets a status; MQ: GET_QUEUE_NUM says how many we serve.
#: Not CONFIG (QEMU strips it for net), not LOG_SHMFD (no migration log), not
#: CONFIGURE_MEM_SLOTS or STATUS (the table comes whole, the device status is QEMU's).
PROTOCOL_FEATURES = (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK)
#: What QEMU may send before SET_OWNER (vhost_user_backend_init, hw/virtio/vhost-user.c).
BEFORE_OWNER = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.SET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
    }
)
MAX_VRING_SIZE = 32768  # virtio 1.2, 2.7: Queue Size is at most 32768


@dataclass(frozen=True)
class FrontendConfig:
    """The device this front door serves: all device-specific knowledge is here (the net preset, say).

    ``features`` is what GET_FEATURES offers. It must be a set the device VM's app
    for ``device_type`` accepts entirely (docs/protocol.md 10.2): a stock guest
    negotiates once, before any ring exists, and cannot take back a bit later.
    """

    device_type: int
    device_id: int
    features: int
    num_rings: int
    queue_num: int = 1  # GET_QUEUE_NUM: queue pairs for net, virtqueues for the others
    max_mapped_bytes: int = 64 << 30
    reply_timeout: float = 5.0  # how long QEMU may wait for the device VM's ring states

    def __post_init__(self) -> None:
        if self.device_type <= 0:
            raise ValueError("device_type must be a virtio device id")
        if not 1 <= self.num_rings <= 64:
            raise ValueError("num_rings must be 1..64")
        if self.queue_num < 1:
            raise ValueError("queue_num must be at least 1")

    @property
    def offered(self) -> int:
        return (self.features & ~NEVER_OFFERED) | (1 << vu.F_PROTOCOL_FEATURES) | (1 << VIRTIO_F_VERSION_1)


@dataclass
class _Ring:
    num: int | None = None
    base: int = 0  # last avail index (SET_VRING_BASE, or the device VM's state at the last stop)
    addr: vu.VringAddr | None = None
    kick: int | None = None
    call: int | None = None  # QEMU's call fd; None: no fd (QEMU polls) or not given yet
    call_set: bool = False
    err: int | None = None
    enabled: bool = False


class Live(Enum):
    """The frontend as the device VM serves it."""

    DOWN = "down"
    ADDING = "adding"  # DEVICE_INFO(ADD) sent, no ack yet
    UP = "up"
    REMOVING = "removing"  # DEVICE_INFO(DEL) sent, no ack yet


@dataclass(frozen=True)
class _Wanted:
    """What the device VM should serve: the rings (as guest-physical) and the kick fds they carry."""

    virtqs: tuple[VirtqInfo, ...]
    kicks: tuple[int, ...]
    features: int


@dataclass
class VhostUserSession:
    """The state machine of one front-end connection."""

    config: FrontendConfig
    vm_uuid: uuid.UUID
    #: bytes for QEMU, in order
    replies: list[bytes] = field(default_factory=list)
    #: messages for the vhost-pci server, in order
    requests: list[SockMessage] = field(default_factory=list)
    #: notable things for the status log: ("frontend-up", {...}) and so on
    events: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    owner: bool = False
    protocol_features: int = 0
    features: int | None = None
    regions: tuple[vu.Region, ...] = ()
    live: Live = Live.DOWN
    refused: str | None = None
    _rings: list[_Ring] = field(default_factory=list)
    _region_ids: tuple[tuple[int, ...], ...] = ()
    _next_id: int = 0
    _pending: dict[int, str] = field(default_factory=dict)
    _live_wanted: _Wanted | None = None
    _relays: list[int] = field(default_factory=list)  # our call eventfds the device VM signals
    #: relays no longer in use, for the shell to unregister and close
    retired: list[int] = field(default_factory=list)
    #: a GET_VRING_BASE waiting for the device VM's ring states: (ring index, deadline)
    waiting: tuple[int, float] | None = None

    def __post_init__(self) -> None:
        self._rings = [_Ring() for _ in range(self.config.num_rings)]

    # -- QEMU's requests -------------------------------------------------------------------

    def handle(self, msg: vu.Message, now: float | None = None) -> None:
        """Apply one request; raises ProtocolError for anything a well-behaved front-end never sends.

        On error the message's fds that the session did not keep are closed; the
        caller then drops the connection and :meth:`close` releases the rest.
        """
        try:
            self._handle(msg, now)
        except ProtocolError:
            held = self.held_fds()
            _close_all(fd for fd in msg.fds() if fd not in held)
            raise

    def held_fds(self) -> set[int]:
        """Every fd the session owns now."""
        fds = {r.fd for r in self.regions} | set(self._relays) | set(self.retired)
        for ring in self._rings:
            fds |= {fd for fd in (ring.kick, ring.call, ring.err) if fd is not None}
        return fds

    def _handle(self, msg: vu.Message, now: float | None) -> None:
        req = msg.request
        if self.waiting is not None:
            raise ProtocolError(req.name, "sent while GET_VRING_BASE waits for its reply")
        if not self.owner and req not in BEFORE_OWNER and req != Request.SET_OWNER:
            raise ProtocolError(req.name, "sent before SET_OWNER")
        b = msg.body
        if req == Request.GET_FEATURES:
            self.replies.append(vu.reply_u64(req, self.config.offered))
        elif req == Request.GET_PROTOCOL_FEATURES:
            self.replies.append(vu.reply_u64(req, PROTOCOL_FEATURES))
        elif req == Request.SET_PROTOCOL_FEATURES:
            assert isinstance(b, vu.U64Value)
            if b.value & ~PROTOCOL_FEATURES:
                raise ProtocolError("SET_PROTOCOL_FEATURES.u64", f"{b.value:#x} has bits we never offered")
            self.protocol_features = b.value
        elif req == Request.GET_QUEUE_NUM:
            self.replies.append(vu.reply_u64(req, self.config.queue_num))
        elif req == Request.SET_OWNER:
            if self.owner:
                raise ProtocolError("SET_OWNER", "the session already has an owner")
            self.owner = True
        elif req == Request.RESET_OWNER:
            self._reset()
        elif req == Request.SET_FEATURES:
            assert isinstance(b, vu.U64Value)
            self._set_features(b.value)
        elif req == Request.SET_MEM_TABLE:
            assert isinstance(b, vu.MemTable)
            self._set_mem_table(b)
        elif req == Request.GET_VRING_BASE:
            assert isinstance(b, vu.VringState)
            self._stop_ring(self._ring_index(b.index, req), now)
        else:
            self._ring_request(req, b)
        self.reconcile()
        if msg.header.need_reply and req not in vu.ANSWERED:
            self.replies.append(vu.reply_ack(req, True))  # REPLY_ACK: a failure closes the connection

    def _ring_index(self, index: int, req: Request) -> int:
        if not 0 <= index < self.config.num_rings:
            raise ProtocolError(
                f"{req.name}.index", f"ring {index} is not one of 0..{self.config.num_rings - 1}"
            )
        return index

    def _ring_request(self, req: Request, b: vu.Body) -> None:
        if isinstance(b, vu.VringFile):
            ring = self._rings[self._ring_index(b.index, req)]
            if req == Request.SET_VRING_KICK:
                if b.fd is None:
                    # A kick-less ring would have to be polled by the device VM: not offered.
                    raise ProtocolError("SET_VRING_KICK.u64", "no-fd (polled) kicks are not supported")
                _close(ring.kick)
                ring.kick = b.fd  # vhost-user.rst: the ring is started when its kick fd arrives
            elif req == Request.SET_VRING_CALL:
                _close(ring.call)
                ring.call, ring.call_set = b.fd, True
            else:
                _close(ring.err)
                ring.err = b.fd
            return
        if isinstance(b, vu.VringState):
            ring = self._rings[self._ring_index(b.index, req)]
            if req == Request.SET_VRING_NUM:
                if not is_pow2(b.num) or b.num > MAX_VRING_SIZE:
                    raise ProtocolError(
                        "SET_VRING_NUM.num", f"{b.num} is not a power of two <= {MAX_VRING_SIZE}"
                    )
                ring.num = b.num
            elif req == Request.SET_VRING_BASE:
                if b.num > 0xFFFF:
                    raise ProtocolError(
                        "SET_VRING_BASE.num", f"{b.num:#x} is not a split ring's 16-bit index"
                    )
                ring.base = b.num
            else:  # SET_VRING_ENABLE
                if b.num not in (0, 1):
                    raise ProtocolError("SET_VRING_ENABLE.num", f"{b.num} is neither 0 nor 1")
                ring.enabled = bool(b.num)
            return
        assert isinstance(b, vu.VringAddr)
        ring = self._rings[self._ring_index(b.index, Request.SET_VRING_ADDR)]
        if b.flags:  # VHOST_VRING_F_LOG is the only flag, and logging was never offered
            raise ProtocolError("SET_VRING_ADDR.flags", f"{b.flags:#x}: no logging was offered")
        # virtio 1.2, 2.7: Descriptor Table 16-byte, Available Ring 2-byte, Used Ring 4-byte aligned.
        for name, addr, align in (("desc", b.desc, 16), ("avail", b.avail, 2), ("used", b.used, 4)):
            if addr % align:
                raise ProtocolError(
                    f"SET_VRING_ADDR.{name}_user_addr", f"{addr:#x} is not {align}-byte aligned"
                )
        ring.addr = b
        if ring.num is not None and self.regions:
            self._translate(b.index, ring.num, b)  # fail now, at the message that is wrong

    def _set_features(self, value: int) -> None:
        if value & ~self.config.offered:
            raise ProtocolError(
                "SET_FEATURES.u64", f"{value:#x} has bits not offered ({self.config.offered:#x})"
            )
        if not value >> VIRTIO_F_VERSION_1 & 1:
            # Legacy layout (10-byte net header, guest-endian rings): the device VM's apps speak virtio 1.x.
            raise ProtocolError(
                "SET_FEATURES.u64", "VIRTIO_F_VERSION_1 was not acked (use disable-legacy=on)"
            )
        self.features = value
        self.refused = None

    def _set_mem_table(self, table: vu.MemTable) -> None:
        regions = table.regions
        ids = tuple(_identity(r) for r in regions)
        self._check_regions(regions)
        if ids == self._region_ids:
            # QEMU resends the table on every start: the same memory needs no round trip.
            _close_all(r.fd for r in regions)
            return
        if self.live in (Live.UP, Live.ADDING):
            self._send_del()  # rule 4: the rings go before the memory they lie in
        if self.regions:
            old = tuple(
                SocketRegion(Xgpa(r.guest_phys_addr), r.memory_size, r.mmap_offset) for r in self.regions
            )
            self._request(SockMsgType.MEMORY_INFO, SockMemoryInfo(Op.DEL, old), "memory-del")
            _close_all(r.fd for r in self.regions)
        self.regions, self._region_ids = regions, ids
        new = tuple(
            SocketRegion(Xgpa(r.guest_phys_addr), r.memory_size, r.mmap_offset, r.fd) for r in regions
        )
        self._request(SockMsgType.MEMORY_INFO, SockMemoryInfo(Op.ADD, new), "memory-add")

    def _check_regions(self, regions: tuple[vu.Region, ...]) -> None:
        total = sum(r.memory_size for r in regions)
        if total > self.config.max_mapped_bytes:
            raise ProtocolError(
                "SET_MEM_TABLE.regions",
                f"{total} bytes over the limit {self.config.max_mapped_bytes}",
                FailReason.LIMIT,
            )
        for space in ("guest_phys_addr", "userspace_addr"):
            spans = sorted(
                (getattr(r, space), getattr(r, space) + r.memory_size, i) for i, r in enumerate(regions)
            )
            for (_, end, i), (start, _, j) in itertools.pairwise(spans):
                if start < end:
                    raise ProtocolError(
                        f"SET_MEM_TABLE.regions[{j}].{space}", f"overlaps region {i}", FailReason.OVERLAP
                    )

    def _translate(self, index: int, num: int, a: vu.VringAddr) -> VirtqInfo:
        """QEMU's user virtual addresses to guest-physical: gpa = uva - userspace_addr + guest_phys_addr."""
        desc_len, avail_len, used_len = ring_part_sizes(num)
        out = []
        for name, uva, length in (
            ("desc", a.desc, desc_len),
            ("avail", a.avail, avail_len),
            ("used", a.used, used_len),
        ):
            for r in self.regions:
                if r.userspace_addr <= uva and uva + length <= r.userspace_addr + r.memory_size:
                    out.append(uva - r.userspace_addr + r.guest_phys_addr)
                    break
            else:
                raise ProtocolError(
                    f"SET_VRING_ADDR.{name}_user_addr",
                    f"ring {index}: {uva:#x}+{length:#x} lies in no region of the memory table",
                    FailReason.RING_OUTSIDE_MEMORY,
                )
        ring = self._rings[index]
        return VirtqInfo(index, num, Xgpa(out[0]), Xgpa(out[1]), Xgpa(out[2]), ring.base, ring.base)

    def _stop_ring(self, index: int, now: float | None) -> None:
        """GET_VRING_BASE: the ring stops; QEMU waits for its last avail index."""
        ring = self._rings[index]
        _close(ring.kick)
        ring.kick = None  # stopped until the next SET_VRING_KICK (vhost-user.rst, "Ring states")
        if self.live == Live.DOWN:
            self.replies.append(vu.reply_vring_state(Request.GET_VRING_BASE, index, ring.base))
            return
        now = time.monotonic() if now is None else now
        self.waiting = (index, now + self.config.reply_timeout)

    def _reset(self) -> None:
        """RESET_OWNER: back to a fresh connection's state (the frontend and memory leave the device VM)."""
        if self.live in (Live.UP, Live.ADDING):
            self._send_del()
        if self.regions:
            old = tuple(
                SocketRegion(Xgpa(r.guest_phys_addr), r.memory_size, r.mmap_offset) for r in self.regions
            )
            self._request(SockMsgType.MEMORY_INFO, SockMemoryInfo(Op.DEL, old), "memory-del")
        self._close_qemu_fds()
        self._rings = [_Ring() for _ in range(self.config.num_rings)]
        self.owner, self.features, self.protocol_features = False, None, 0
        self.regions, self._region_ids = (), ()

    # -- what the device VM should serve --------------------------------------------------

    def _wanted(self) -> _Wanted | None:
        if not self.owner or self.features is None or not self.regions or self.refused:
            return None
        need_enable = bool(self.features >> vu.F_PROTOCOL_FEATURES & 1)
        virtqs, kicks = [], []
        for i, ring in enumerate(self._rings):
            if ring.num is None or ring.addr is None or ring.kick is None or not ring.call_set:
                return None
            if need_enable and not ring.enabled:
                return None
            virtqs.append(self._translate(i, ring.num, ring.addr))
            kicks.append(ring.kick)
        return _Wanted(tuple(virtqs), tuple(kicks), self.features & ~(1 << vu.F_PROTOCOL_FEATURES))

    def reconcile(self) -> None:
        """Bring the device VM's view in line with QEMU's: add, or remove (to add again later)."""
        wanted = self._wanted()
        if self.live in (Live.UP, Live.ADDING) and wanted != self._live_wanted:
            self._send_del()
        elif self.live == Live.DOWN and wanted is not None:
            self._send_add(wanted)

    def _send_add(self, w: _Wanted) -> None:
        self._relays = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in w.virtqs]
        info = DeviceInfo(Op.ADD, self.config.device_type, self.config.device_id, w.virtqs)
        self._request(
            SockMsgType.DEVICE_INFO, SockDeviceInfo(info, w.kicks, tuple(self._relays)), "device-add"
        )
        self._request(
            SockMsgType.FEATURE_BITS,
            FeatureBits(self.config.device_type, self.config.device_id, w.features),
            "features",
        )
        self.live, self._live_wanted = Live.ADDING, w

    def _send_del(self) -> None:
        info = DeviceInfo(Op.DEL, self.config.device_type, self.config.device_id)
        self._request(SockMsgType.DEVICE_INFO, SockDeviceInfo(info), "device-del")
        self.live, self._live_wanted = Live.REMOVING, None

    def _request(
        self, kind: SockMsgType, body: SockMemoryInfo | SockDeviceInfo | FeatureBits, what: str
    ) -> None:
        self._next_id += 1
        self._pending[self._next_id] = what
        self.requests.append(SockMessage(kind, self.vm_uuid, self._next_id, body))

    # -- the server's messages ---------------------------------------------------------------

    def on_server(self, msg: SockMessage) -> None:
        """An ack, a renegotiation or a PING from the vhost-pci server."""
        if msg.msg_type == SockMsgType.PING:
            self.requests.append(SockMessage(SockMsgType.PONG, self.vm_uuid, msg.request_id, Empty()))
            return
        what = self._pending.pop(msg.request_id, None)
        if what is None:
            raise ProtocolError("socket header.request_id", f"{msg.msg_type.name} answers no request of ours")
        b = msg.body
        if msg.msg_type == SockMsgType.FEATURE_BITS and isinstance(b, FeatureBits):
            # A strict subset (protocol.md 7.3): a stock guest negotiated once and cannot take bits
            # back, so the frontend is refused until the next start (10.2).
            self._refuse(
                f"the device VM accepts {b.features:#x} of the {self._live_features():#x} negotiated"
            )
            self.requests.append(
                SockMessage(
                    SockMsgType.FEATURE_BITS_ACK, self.vm_uuid, msg.request_id, SockAck(AckResult.ADD_FAIL)
                )
            )
            self.reconcile()
            return
        if not isinstance(b, SockAck):
            raise ProtocolError("socket header.msg_type", f"{msg.msg_type.name} is not an answer")
        if what == "device-add":
            if b.result.failed:
                self._refuse(f"DEVICE_INFO(ADD) failed: {_reason(b.reason)}")
                self.live = Live.DOWN if self.live == Live.ADDING else self.live
                self._drop_relays()
            elif self.live == Live.ADDING:
                self.live = Live.UP
                self.events.append(("frontend-up", {"rings": len(self._rings)}))
        elif what == "device-del":
            states = {s.index: s for s in b.states}
            for i, ring in enumerate(self._rings):
                s = states.get(i)
                if s is not None:
                    ring.base = s.last_avail_idx
            self.live = Live.DOWN
            self._drop_relays()
            self.events.append(("frontend-down", {"states": [_state_dict(s) for s in b.states]}))
            self._answer_waiting(from_device=bool(b.states))
        elif what == "features" and b.result.failed:
            self._refuse(f"FEATURE_BITS failed: {_reason(b.reason)}")
        elif what == "memory-add" and b.result.failed:
            log.warning("%s: the memory table was refused: %s", self.vm_uuid, _reason(b.reason))
            self.events.append(("memory-refused", {"reason": _reason(b.reason)}))
        self.reconcile()

    def _live_features(self) -> int:
        return (self.features or 0) & ~(1 << vu.F_PROTOCOL_FEATURES)

    def _refuse(self, why: str) -> None:
        if self.refused is None:
            log.error("%s: frontend refused until the next start: %s", self.vm_uuid, why)
            self.events.append(("frontend-refused", {"why": why}))
        self.refused = why

    def _answer_waiting(self, from_device: bool) -> None:
        if self.waiting is None or self.live != Live.DOWN:
            return
        index, _ = self.waiting
        self.waiting = None
        if not from_device:
            log.warning(
                "%s: ring %d's state did not come from the device VM: answering %d",
                self.vm_uuid,
                index,
                self._rings[index].base,
            )
        self.replies.append(vu.reply_vring_state(Request.GET_VRING_BASE, index, self._rings[index].base))

    def tick(self, now: float | None = None) -> None:
        """A GET_VRING_BASE whose device VM does not answer in time gets the last known index."""
        now = time.monotonic() if now is None else now
        if self.waiting is not None and now >= self.waiting[1]:
            index = self.waiting[0]
            self.waiting = None
            log.warning(
                "%s: no ring states from the device VM in %.1fs: ring %d answers %d",
                self.vm_uuid,
                self.config.reply_timeout,
                index,
                self._rings[index].base,
            )
            self.replies.append(vu.reply_vring_state(Request.GET_VRING_BASE, index, self._rings[index].base))

    # -- notifications and teardown ---------------------------------------------------------

    def relays(self) -> list[tuple[int, int]]:
        """``(our relay eventfd, ring index)`` for every ring the device VM can call."""
        return [(fd, i) for i, fd in enumerate(self._relays)]

    def call_fd(self, index: int) -> int | None:
        """QEMU's current call fd of ring ``index`` (it changes when the guest masks the vector)."""
        return self._rings[index].call

    def _drop_relays(self) -> None:
        # Not closed here: the shell unregisters them from its selector first (an eventfd the
        # server still holds stays in an epoll set after our close, under a reusable number).
        self.retired += self._relays
        self._relays = []

    def _close_qemu_fds(self) -> None:
        for ring in self._rings:
            _close_all((ring.kick, ring.call, ring.err))
            ring.kick = ring.call = ring.err = None
        _close_all(r.fd for r in self.regions)

    def close(self) -> None:
        """Release every fd the session holds (the connection is gone)."""
        self._close_qemu_fds()
        self.regions = ()
        _close_all([*self._relays, *self.retired])
        self._relays, self.retired = [], []


def _identity(r: vu.Region) -> tuple[int, ...]:
    """What makes two regions the same memory: the addresses and the file behind the fd."""
    st = os.fstat(r.fd)
    return (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, st.st_dev, st.st_ino)


def _reason(reason: int) -> str:
    try:
        return FailReason(reason).name
    except ValueError:
        return str(reason)


def _state_dict(s: VirtqState) -> dict[str, int]:
    return {"index": s.index, "last_avail_idx": s.last_avail_idx, "last_used_idx": s.last_used_idx}


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _close_all(fds: Iterable[int | None]) -> None:
    for fd in fds:
        _close(fd)
