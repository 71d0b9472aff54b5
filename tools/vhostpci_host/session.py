"""One driver VM as the vhost-pci server sees it: the relay between its socket and its device.

The session turns the driver VM's socket messages into controlq messages on
its vhost-pci device and the device driver's acks back into socket acks
(protocol.md, section 7). It owns what the driver VM gave: the memory fds (until
the device driver acks their removal) and the kick/call eventfds (handed to
notification slots). It is driven by the server's event loop and does no I/O
of its own: it returns the socket messages to send.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from vhostpci_driver.addr import WindowOffset
from vhostpci_driver.errors import FailReason
from vhostpci_driver.wire import ctrl
from vhostpci_driver.wire.ctrl import (
    Ack,
    AckResult,
    DeviceInfo,
    FeatureBits,
    FrontendKey,
    MemoryInfo,
    MemoryRegion,
    Op,
    VirtqState,
)
from vhostpci_driver.wire.sock import (
    Empty,
    SockAck,
    SockDeviceInfo,
    SocketRegion,
    SockMemoryInfo,
    SockMessage,
    SockMsgType,
)
from vhostpci_host.device_model import MAX_MSG_LEN
from vhostpci_host.peer_fds import PeerFdError, take_eventfd, take_memory_fd
from vhostpci_host.vfio_device import VfioDeviceError

log = logging.getLogger(__name__)


class DevicePort(Protocol):
    """What a session needs of its vhost-pci device model."""

    window_size: int
    max_regions: int

    def send_control(self, body: MemoryInfo | DeviceInfo | FeatureBits) -> int: ...

    def set_remote(self, vm_uuid: bytes, up: bool) -> None: ...

    def assign_slot(self, kick_fd: int, call_fd: int) -> int: ...

    def release_slot(self, slot: int) -> None: ...

    def map_region(self, window_offset: int, size: int, fd: int, fd_offset: int) -> None: ...

    def free_slots(self) -> int: ...

    def unmap_region(self, window_offset: int) -> None: ...


@dataclass(frozen=True)
class PeerLimits:
    """What one driver VM may hold at once (docs/security.md, "Peer limits").

    Per-message counts and sizes are :class:`~vhostpci_driver.wire.sock.SockLimits`,
    checked by the decoder; these bound what a well-formed peer can accumulate.
    A request past one of them gets a FAIL ack with reason ``LIMIT`` and changes
    nothing; the connection stays up, and other driver VMs never notice.
    """

    #: bytes of the driver VM's memory mapped into its device's window, all regions together
    max_mapped_bytes: int = 64 << 30
    #: frontends (DEVICE_INFO ADDs) live on one device
    max_frontends: int = 64
    #: requests relayed to the device driver and not acked yet
    max_pending: int = 256
    #: connections one uid may hold on the server socket at once (checked by the server)
    max_connections_per_uid: int = 8
    #: bytes queued for a peer that does not read its socket before it is dropped (the server)
    max_outbuf: int = 1 << 20
    #: bytes of one device's remote window (twice the driver VM's memory, a power of two)
    max_window_bytes: int = 1 << 40
    #: devices one uid holds at once, live or gone and not yet freed (the server)
    max_devices_per_uid: int = 16

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"peer limit {name} must be positive, not {value}")


@dataclass
class _Pending:
    """A controlq request waiting for the device driver's ack."""

    kind: SockMsgType  # the socket request it answers
    client_id: int | None  # the client's request id (None: the server's own, e.g. teardown)
    regions: tuple[MemoryRegion, ...] = ()
    key: FrontendKey | None = None
    offered: int = 0
    op: Op = Op.ADD
    #: the server's own removal of a gone driver VM's state: its ack releases it, whatever the result
    teardown: bool = False
    #: a client MEMORY_INFO split into several controlq messages: answered when all are acked
    group: _Group | None = None
    #: what this request's ack may release: the very entries it named, never a later ADD that
    #: reuses the xgpa or the key (a stale ack would close fds a newer mapping or slot uses)
    entries: tuple[tuple[MemoryRegion, int], ...] = ()
    frontend: _Frontend | None = None


@dataclass
class _Group:
    """The parts of one client request that went out as several controlq messages."""

    parts: int
    result: AckResult | None = None
    reason: int = 0


@dataclass
class _Frontend:
    slots: list[int]
    fds: list[int]
    info: DeviceInfo  # as sent on the controlq (with slots), for replays
    offered: int | None = None


@dataclass
class Session:
    """The relay for one driver VM (one UUID, one device)."""

    vm_uuid: uuid.UUID
    device: DevicePort
    send: Callable[[SockMessage], None]
    ping_interval: float = 1.0
    ping_misses: int = 3
    limits: PeerLimits = field(default_factory=PeerLimits)
    _pending: dict[int, _Pending] = field(default_factory=dict)
    _regions: dict[int, tuple[MemoryRegion, int]] = field(default_factory=dict)  # xgpa -> (region, fd)
    _frontends: dict[FrontendKey, _Frontend] = field(default_factory=dict)
    _ping_id: int = 0
    _pings_out: int = 0
    _next_ping: float = 0.0
    #: the driver memory fd kinds we cannot seal are accepted (``--trust-driver-memory``)
    trust_memory: bool = False
    gone: bool = False
    #: when the driver VM went (monotonic seconds), for the server's grace period
    gone_since: float = 0.0
    _lost: list[_Pending] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=lambda: {"requests": 0, "acks": 0, "fail_acks": 0})

    # -- from the driver VM ----------------------------------------------------

    def on_message(self, msg: SockMessage) -> None:
        """Handle one message from the driver VM's socket."""
        b = msg.body
        if isinstance(b, SockMemoryInfo | SockDeviceInfo | FeatureBits) and (
            len(self._pending) >= self.limits.max_pending
        ):
            # A peer that floods requests faster than the device driver acks them must not
            # grow our tables: refuse at the door (docs/security.md, peer limits).
            self._refuse(msg, f"{len(self._pending)} requests already wait for an ack")
            return
        if msg.msg_type == SockMsgType.PONG:
            if msg.request_id == self._ping_id:
                self._pings_out = 0
        elif msg.msg_type == SockMsgType.PING:
            self.send(SockMessage(SockMsgType.PONG, self.vm_uuid, msg.request_id, Empty()))
        elif isinstance(b, SockMemoryInfo):
            self._memory(msg.request_id, b)
        elif isinstance(b, SockDeviceInfo):
            self._device(msg.request_id, b)
        elif isinstance(b, FeatureBits):
            fe = self._frontends.get(FrontendKey(b.device_type, b.device_id))
            if fe is not None:
                fe.offered = b.features
            self._pending_control(
                SockMsgType.FEATURE_BITS,
                msg.request_id,
                b,
                offered=b.features,
                key=FrontendKey(b.device_type, b.device_id),
            )
        elif msg.msg_type == SockMsgType.FEATURE_BITS_ACK:
            # The driver VM confirms (or refuses) a renegotiated subset (protocol.md 7.3): nothing to relay.
            log.info("%s: feature renegotiation of request %d: %s", self.vm_uuid, msg.request_id, b)
        else:
            self._reply(msg.msg_type, msg.request_id, AckResult.ADD_FAIL, FailReason.UNKNOWN_TYPE)

    def _refuse(self, msg: SockMessage, why: str, reason: FailReason = FailReason.LIMIT) -> None:
        """FAIL ``msg`` with ``reason`` (LIMIT unless told), closing every fd it brought."""
        log.warning("%s: request %d refused: %s", self.vm_uuid, msg.request_id, why)
        for fd in msg.fds():
            os.close(fd)
        b = msg.body
        op = b.op if isinstance(b, SockMemoryInfo) else b.info.op if isinstance(b, SockDeviceInfo) else Op.ADD
        result = AckResult.DEL_FAIL if op == Op.DEL else AckResult.ADD_FAIL
        self.stats["refused"] = self.stats.get("refused", 0) + 1
        self._reply(msg.msg_type, msg.request_id, result, reason)

    def _reply(
        self,
        kind: SockMsgType,
        client_id: int,
        result: AckResult,
        reason: int = 0,
        states: tuple[VirtqState, ...] = (),
    ) -> None:
        ack_type = {
            SockMsgType.MEMORY_INFO: SockMsgType.MEMORY_INFO_ACK,
            SockMsgType.DEVICE_INFO: SockMsgType.DEVICE_INFO_ACK,
            SockMsgType.FEATURE_BITS: SockMsgType.FEATURE_BITS_ACK,
        }.get(kind, SockMsgType.FEATURE_BITS_ACK)
        self.send(SockMessage(ack_type, self.vm_uuid, client_id, SockAck(result, reason, states)))

    def _pending_control(
        self,
        kind: SockMsgType,
        client_id: int | None,
        body: MemoryInfo | DeviceInfo | FeatureBits,
        **extra: object,
    ) -> None:
        rid = self.device.send_control(body)
        self.stats["requests"] += 1
        self._pending[rid] = _Pending(kind, client_id, **extra)  # type: ignore[arg-type]

    def _memory_control(
        self, client_id: int | None, op: Op, regions: tuple[MemoryRegion, ...], *, teardown: bool = False
    ) -> None:
        """MEMORY_INFO on the controlq, split so every part fits one buffer the driver posts.

        The driver posts buffers of ``max_msg_len`` bytes and takes at most
        ``max_regions`` regions per message (protocol.md 2.4, 2.5): a teardown
        of everything a driver VM added over many requests can be more than that.
        """
        per = max(1, min(self.device.max_regions, (MAX_MSG_LEN - ctrl.HEADER.size - 8) // 24))
        parts = [regions[i : i + per] for i in range(0, len(regions), per)]
        group = _Group(len(parts)) if len(parts) > 1 and client_id is not None else None
        for part in parts:
            self._pending_control(
                SockMsgType.MEMORY_INFO,
                client_id,
                MemoryInfo(op, part),
                regions=part,
                entries=tuple(e for r in part if (e := self._regions.get(r.xgpa)) is not None),
                op=op,
                teardown=teardown,
                group=group,
            )

    def _memory(self, client_id: int, m: SockMemoryInfo) -> None:
        if m.op == Op.DEL:
            regions = []
            for r in m.regions:
                known = self._regions.get(r.guest_phys_addr)
                if known is None or known[0].size != r.memory_size:
                    self._reply(SockMsgType.MEMORY_INFO, client_id, AckResult.DEL_FAIL, FailReason.NOT_FOUND)
                    return
                regions.append(known[0])
            self._memory_control(client_id, Op.DEL, tuple(regions))
            return
        msg = SockMessage(SockMsgType.MEMORY_INFO, self.vm_uuid, client_id, m)
        mapped = sum(r.size for r, _ in self._regions.values())
        adding = sum(r.memory_size for r in m.regions)
        if mapped + adding > self.limits.max_mapped_bytes:
            self._refuse(
                msg, f"{mapped} + {adding} bytes would pass max_mapped_bytes {self.limits.max_mapped_bytes}"
            )
            return
        placed = self._place(m.regions)
        if placed is None:
            self._refuse(msg, "a region does not fit the window", FailReason.OUT_OF_WINDOW)
            return
        try:
            for i, sr in enumerate(m.regions):
                where = f"MEMORY_INFO.regions[{i}].fd"
                take_memory_fd(sr.fd, sr.mmap_offset, sr.memory_size, where, trusted=self.trust_memory)
        except PeerFdError as e:
            self._refuse(msg, str(e), FailReason.BAD_FD)
            return
        done: list[MemoryRegion] = []
        try:
            for region, sr in zip(placed, m.regions, strict=True):
                self.device.map_region(region.window_offset, region.size, sr.fd, sr.mmap_offset)
                done.append(region)
        except (OSError, ValueError, OverflowError, VfioDeviceError) as e:
            # Checked above, so this is the kernel refusing (no memory for the mapping, say):
            # undo this message's mappings, keep the connection (docs/security.md).
            for region in done:
                self.device.unmap_region(region.window_offset)
            self._refuse(msg, f"mapping failed: {e}", FailReason.OUT_OF_WINDOW)
            return
        for region, sr in zip(placed, m.regions, strict=True):
            self._regions[region.xgpa] = (region, sr.fd)
        self._memory_control(client_id, Op.ADD, placed)

    def _place(self, regions: tuple[SocketRegion, ...]) -> tuple[MemoryRegion, ...] | None:
        """Window offsets: a region sits at its own file offset (protocol.md 9), if that is free."""
        taken: list[tuple[int, int]] = [
            (r.window_offset, r.window_offset + r.size) for r, _ in self._regions.values()
        ]
        out: list[MemoryRegion] = []
        for r in regions:
            start, end = r.mmap_offset, r.mmap_offset + r.memory_size
            if end > self.device.window_size or any(s < end and start < e for s, e in taken):
                log.warning("%s: region %#x+%#x does not fit the window", self.vm_uuid, start, r.memory_size)
                return None
            if r.guest_phys_addr in self._regions or any(o.xgpa == r.guest_phys_addr for o in out):
                return None  # regions are kept by xgpa: a second one there would orphan the first's fd
            taken.append((start, end))
            out.append(MemoryRegion(r.guest_phys_addr, r.memory_size, WindowOffset(start)))
        return tuple(out)

    def _device(self, client_id: int, d: SockDeviceInfo) -> None:
        info = d.info
        key = FrontendKey(info.device_type, info.device_id)
        if info.op == Op.DEL:
            fe = self._frontends.get(key)
            self._pending_control(SockMsgType.DEVICE_INFO, client_id, info, key=key, op=Op.DEL, frontend=fe)
            return
        msg = SockMessage(SockMsgType.DEVICE_INFO, self.vm_uuid, client_id, d)
        if len(self._frontends) >= self.limits.max_frontends or len(info.virtqs) > self.device.free_slots():
            self._refuse(
                msg,
                f"{len(self._frontends)} frontends (max {self.limits.max_frontends}), "
                f"{len(info.virtqs)} virtqueues for {self.device.free_slots()} free notification slots",
            )
            return
        if key in self._frontends:
            self._refuse(msg, f"frontend {key} exists", FailReason.EXISTS)
            return
        try:
            for i, (k, c) in enumerate(zip(d.kick_fds, d.call_fds, strict=True)):
                take_eventfd(k, f"DEVICE_INFO.virtq[{i}].kick_fd")
                take_eventfd(c, f"DEVICE_INFO.virtq[{i}].call_fd")
        except PeerFdError as e:
            self._refuse(msg, str(e), FailReason.BAD_FD)
            return
        slots = [self.device.assign_slot(k, c) for k, c in zip(d.kick_fds, d.call_fds, strict=True)]
        virtqs = tuple(
            type(v)(v.index, v.size, v.desc, v.avail, v.used, v.last_avail_idx, v.last_used_idx, slot)
            for v, slot in zip(info.virtqs, slots, strict=True)
        )
        body = DeviceInfo(Op.ADD, info.device_type, info.device_id, virtqs)
        fe = self._frontends[key] = _Frontend(slots, [*d.kick_fds, *d.call_fds], body)
        self._pending_control(SockMsgType.DEVICE_INFO, client_id, body, key=key, frontend=fe)

    # -- from the device driver (acks) -----------------------------------------

    def on_ack(self, request_id: int, ack: Ack) -> None:
        """The device driver acked ``request_id``: apply it and answer the driver VM."""
        p = self._pending.pop(request_id, None)
        if p is None:
            return
        self.stats["acks"] += 1
        if ack.result.failed:
            self.stats["fail_acks"] += 1
        # DEL done, or ADD refused: either way it leaves the device. A teardown DEL releases
        # whatever the result: once REMOTE_UP drops the driver holds nothing of this driver VM
        # (protocol.md 7.5), so a DEL_FAIL(NOT_FOUND) means it is gone there already.
        release = p.teardown or ack.result in (AckResult.DEL_DONE, AckResult.ADD_FAIL)
        if p.kind == SockMsgType.MEMORY_INFO and release:
            for entry in p.entries:
                if self._regions.get(entry[0].xgpa) is entry:
                    self._drop_region(entry[0])
        elif (
            p.kind == SockMsgType.DEVICE_INFO
            and release
            and p.key is not None
            and p.frontend is not None
            and self._frontends.get(p.key) is p.frontend
        ):
            self._drop_frontend(p.key)
        if p.client_id is None:
            return
        if p.kind == SockMsgType.FEATURE_BITS and not ack.result.failed and ack.value != p.offered:
            # A strict subset: the driver VM renegotiates and confirms (protocol.md 7.3).
            assert p.key is not None
            subset = FeatureBits(p.key.device_type, p.key.device_id, ack.value)
            self.send(SockMessage(SockMsgType.FEATURE_BITS, self.vm_uuid, p.client_id, subset))
            return
        result, reason = ack.result, ack.reason
        if p.group is not None:
            g = p.group
            g.parts -= 1
            if ack.result.failed and g.result is None:
                g.result, g.reason = ack.result, ack.reason
            if g.parts:
                return
            if g.result is not None:
                result, reason = g.result, g.reason
        # A DEVICE_INFO(DEL) hands the rings' states back to the driver VM (protocol.md 7.1).
        self._reply(p.kind, p.client_id, result, reason, ack.states)

    def _drop_region(self, r: MemoryRegion) -> None:
        entry = self._regions.pop(r.xgpa, None)
        if entry is not None:
            self.device.unmap_region(r.window_offset)
            os.close(entry[1])

    def _drop_frontend(self, key: FrontendKey) -> None:
        fe = self._frontends.pop(key, None)
        if fe is not None:
            for slot in fe.slots:
                self.device.release_slot(slot)
            for fd in fe.fds:
                os.close(fd)

    # -- the device driver restarted ------------------------------------------

    def on_reset(self, lost: list[int]) -> None:
        """The device was reset: requests delivered or queued but not acked are gone.

        Also called at DRIVER_OK for what was queued since the reset (device_model): the
        lost requests add up until the replay takes them.
        """
        self._lost += [p for rid in lost if (p := self._pending.pop(rid, None)) is not None]
        if self.gone:
            # A gone driver VM's device restarted: the new driver holds nothing, and nothing is
            # replayed to it, so what the teardown was removing is released now.
            self._lost = []
            self.close()

    def on_driver_ok(self) -> None:
        """A (re)started driver knows nothing: replay memory, frontends and features, then lost DELs."""
        lost, self._lost = self._lost, []
        if self.gone:
            return  # REMOTE_UP is down: there is nothing to replay (protocol.md 7.5)

        def client(kind: SockMsgType, key: FrontendKey | None = None, op: Op = Op.ADD) -> int | None:
            for p in lost:
                if p.kind == kind and p.key == key and p.client_id is not None and p.op == op:
                    lost.remove(p)
                    return p.client_id
            return None

        regions = tuple(r for r, _ in self._regions.values())
        if regions:
            self._memory_control(client(SockMsgType.MEMORY_INFO), Op.ADD, regions)
        for key, fe in self._frontends.items():
            self._pending_control(
                SockMsgType.DEVICE_INFO, client(SockMsgType.DEVICE_INFO, key), fe.info, key=key, frontend=fe
            )
            if fe.offered is not None:
                self._pending_control(
                    SockMsgType.FEATURE_BITS,
                    client(SockMsgType.FEATURE_BITS, key),
                    FeatureBits(key.device_type, key.device_id, fe.offered),
                    key=key,
                    offered=fe.offered,
                )
        for p in lost:  # DELs that were lost: ask again
            if p.op == Op.DEL and p.kind == SockMsgType.DEVICE_INFO and p.key is not None:
                self._pending_control(
                    p.kind,
                    p.client_id,
                    DeviceInfo(Op.DEL, p.key.device_type, p.key.device_id),
                    key=p.key,
                    op=Op.DEL,
                    frontend=self._frontends.get(p.key),
                )
            elif p.op == Op.DEL and p.kind == SockMsgType.MEMORY_INFO:
                self._memory_control(p.client_id, Op.DEL, p.regions)
            elif p.client_id is not None:
                self._reply(p.kind, p.client_id, AckResult.ADD_DONE)  # its state is in the replay above

    # -- liveness --------------------------------------------------------------

    def tick(self, now: float | None = None) -> bool:
        """Send a PING when due; False when the driver VM missed too many (it is gone)."""
        now = time.monotonic() if now is None else now
        if now < self._next_ping:
            return True
        if self._pings_out >= self.ping_misses:
            return False
        self._ping_id += 1
        self._pings_out += 1
        self._next_ping = now + self.ping_interval
        self.send(SockMessage(SockMsgType.PING, self.vm_uuid, self._ping_id, Empty()))
        return True

    def teardown(self, now: float | None = None) -> None:
        """The driver VM is gone: UP -> GONE (protocol.md 7.5).

        Its frontends are removed, then its memory, then ``REMOTE_UP`` drops
        (rule 7). Requests of the old connection still waiting for an ack are
        answered to nobody. Each teardown DEL's ack releases what it names,
        whatever the result.
        """
        if self.gone:
            return
        self.gone = True
        self.gone_since = time.monotonic() if now is None else now
        for p in self._pending.values():
            p.client_id = None  # that connection is closed: its answers have nowhere to go
        for key in list(self._frontends):
            self._pending_control(
                SockMsgType.DEVICE_INFO,
                None,
                DeviceInfo(Op.DEL, key.device_type, key.device_id),
                key=key,
                op=Op.DEL,
                teardown=True,
                frontend=self._frontends[key],
            )
        regions = tuple(r for r, _ in self._regions.values())
        if regions:
            self._memory_control(None, Op.DEL, regions, teardown=True)
        self.device.set_remote(self.vm_uuid.bytes, False)

    def reconnect(self) -> None:
        """GONE -> UP for a new connection of the same UUID (protocol.md 7.5).

        What the old connection held is released at once, without waiting for
        the teardown DELs' acks: they are ahead of the new connection's requests
        on the controlq, so the driver removes the old state before it sees the
        new; their late acks find nothing pending and are ignored. The heartbeat
        starts afresh.
        """
        self.close()
        self._pending.clear()
        self._lost = []
        self._pings_out = 0
        self._next_ping = 0.0
        self.gone = False

    def outstanding(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Release every fd the session still holds (server shutdown or device removed)."""
        for key in list(self._frontends):
            self._drop_frontend(key)
        for r, _ in list(self._regions.values()):
            self._drop_region(r)
