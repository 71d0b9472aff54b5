"""The controlq engine: message in, state change and ack out (pure).

It owns the driver's view of the remote side: the region table and the
frontends. :meth:`Engine.handle` takes the bytes of one controlq buffer and
returns the ack to post on the ackq plus the events to tell applications. It
never raises for anything the device sent: a message it cannot parse or apply
is acked FAIL with a reason and changes nothing (protocol.md, section 5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vhostpci_driver.errors import FailReason, FeaturesRefusedError, ProtocolError, RemoteMemoryError
from vhostpci_driver.events import (
    Event,
    FeaturesNegotiated,
    FrontendAdded,
    FrontendRemoved,
    MemoryAdded,
    MemoryRemoved,
)
from vhostpci_driver.memory import RegionTable
from vhostpci_driver.spec.virtio import Feature
from vhostpci_driver.virtqueue.layout import ring_part_sizes
from vhostpci_driver.wire import ctrl
from vhostpci_driver.wire.ctrl import (
    Ack,
    AckResult,
    DeviceInfo,
    FeatureBits,
    FrontendKey,
    Limits,
    MemoryInfo,
    MemoryRegion,
    MsgType,
    Op,
    VirtqInfo,
    VirtqState,
)

#: Transport feature bits the toolkit's device-side ring implements (virtio 1.2, 6):
#: what the default policy accepts for a frontend no app serves.
TRANSPORT_FEATURES = (
    (1 << Feature.RING_INDIRECT_DESC) | (1 << Feature.RING_EVENT_IDX) | (1 << Feature.VERSION_1)
)

#: ``(frontend, offered bits) -> accepted bits``; the engine keeps only bits that were offered.
FeaturePolicy = Callable[[FrontendKey, int], int]
#: ``frontend -> its rings' states`` at a DEVICE_INFO(DEL), read from the live rings by the device
#: layer (the engine never touches remote memory); None means "as they were added".
RingStates = Callable[[FrontendKey], "tuple[VirtqState, ...] | None"]


def added_states(virtqs: tuple[VirtqInfo, ...]) -> tuple[VirtqState, ...]:
    """The states a frontend was added with: what a frontend whose rings never ran hands back."""
    return tuple(VirtqState(v.index, v.last_avail_idx, v.last_used_idx) for v in virtqs)


def default_policy(key: FrontendKey, offered: int) -> int:
    """With no app for a device type: the transport bits we implement, nothing device-specific."""
    return offered & TRANSPORT_FEATURES


@dataclass
class FrontendState:
    """What the engine knows of one frontend: its rings and its negotiated features.

    The app-facing object, with the rings themselves, is
    :class:`vhostpci_driver.frontends.Frontend`; the device makes one per state.
    """

    key: FrontendKey
    virtqs: tuple[VirtqInfo, ...]
    offered: int | None = None
    accepted: int | None = None

    def ring_ranges(self) -> list[tuple[int, int]]:
        """``(xgpa, length)`` of every ring part of every virtqueue."""
        out: list[tuple[int, int]] = []
        for v in self.virtqs:
            desc, avail, used = ring_part_sizes(v.size)
            out += [(v.desc, desc), (v.avail, avail), (v.used, used)]
        return out


@dataclass
class EngineStats:
    """Counters for ``vhostpci status``."""

    received: int = 0
    acked_done: int = 0
    acked_fail: int = 0
    dropped_short: int = 0
    fail_reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What handling one controlq buffer produced."""

    request_id: int | None  # None: the buffer was dropped (too short to hold a header)
    ack: Ack | None
    events: tuple[Event, ...] = ()

    def ack_bytes(self) -> bytes | None:
        """The ackq message to post, if any."""
        if self.request_id is None or self.ack is None:
            return None
        return ctrl.encode_ack(self.request_id, self.ack)


class _RefusedError(Exception):
    """Internal: a message is refused with ``reason`` (turned into a FAIL ack)."""

    def __init__(self, reason: FailReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Engine:
    """The controlq state machine of one vhost-pci device."""

    def __init__(
        self,
        table: RegionTable,
        *,
        limits: Limits | None = None,
        max_frontends: int = 64,
        policies: dict[int, FeaturePolicy] | None = None,
        ring_states: RingStates | None = None,
    ) -> None:
        self.table = table
        self.ring_states = ring_states
        self.limits = limits or Limits()
        self.max_frontends = max_frontends
        self.policies = dict(policies or {})
        self.frontends: dict[FrontendKey, FrontendState] = {}
        self.stats = EngineStats()
        self.last_request_id = 0
        self.last_error: str | None = None

    # -- the one entry point -------------------------------------------------

    def handle(self, buf: bytes | bytearray | memoryview) -> Outcome:
        """Handle one controlq buffer (the bytes the device wrote)."""
        view = memoryview(buf)
        if len(view) < ctrl.HEADER.size:
            # protocol.md 5.2: no id to ack; drop and count.
            self.stats.dropped_short += 1
            self.last_error = f"controlq buffer of {len(view)} bytes holds no header"
            return Outcome(None, None)
        msg = ctrl.receive(view, self.limits)
        request_id = msg.header.request_id
        self.stats.received += 1
        try:
            if request_id == 0:
                raise _RefusedError(FailReason.MALFORMED, "request id 0 (ids start at 1)")
            if request_id <= self.last_request_id:
                # Ids grow strictly (rule 1): an old id is a replay, refuse it without touching state.
                raise _RefusedError(FailReason.DUPLICATE_ID, f"request id {request_id} already seen")
            self.last_request_id = request_id
            if isinstance(msg.body, ProtocolError):
                raise _RefusedError(msg.body.reason, str(msg.body))
            ack, events = self._apply(msg.body)
        except _RefusedError as r:
            self.stats.acked_fail += 1
            name = r.reason.name
            self.stats.fail_reasons[name] = self.stats.fail_reasons.get(name, 0) + 1
            self.last_error = f"request {request_id}: {r}"
            # DEL messages fail as DEL_FAIL, everything else (unknown types too) as ADD_FAIL.
            result = AckResult.DEL_FAIL if msg.op == Op.DEL else AckResult.ADD_FAIL
            return Outcome(request_id, Ack(msg.header.type, result, r.reason))
        self.stats.acked_done += 1
        return Outcome(request_id, ack, tuple(events))

    def _apply(self, body: ctrl.ControlBody) -> tuple[Ack, list[Event]]:
        if isinstance(body, MemoryInfo):
            return self._memory(body)
        if isinstance(body, DeviceInfo):
            return self._device(body)
        return self._features(body)

    # -- MEMORY_INFO -----------------------------------------------------------

    def _memory(self, msg: MemoryInfo) -> tuple[Ack, list[Event]]:
        t = MsgType.MEMORY_INFO
        if msg.op == Op.ADD:
            try:
                self.table.add(msg.regions)
            except RemoteMemoryError as e:
                raise _RefusedError(e.reason, str(e)) from None
            return Ack(t, AckResult.ADD_DONE), [MemoryAdded(msg.regions)]
        # Rule 4: memory a live frontend's rings use cannot go; the host removes the frontend first.
        for region in msg.regions:
            user = self._ring_user(region)
            if user is not None:
                raise _RefusedError(
                    FailReason.IN_USE, f"region at {region.xgpa:#x} holds rings of frontend {user}"
                )
        try:
            self.table.remove(msg.regions)
        except RemoteMemoryError as e:
            raise _RefusedError(e.reason, str(e)) from None
        return Ack(t, AckResult.DEL_DONE), [MemoryRemoved(msg.regions)]

    def _ring_user(self, region: MemoryRegion) -> FrontendKey | None:
        end = region.xgpa + region.size
        for fe in self.frontends.values():
            for addr, length in fe.ring_ranges():
                if addr < end and region.xgpa < addr + length:
                    return fe.key
        return None

    # -- DEVICE_INFO -----------------------------------------------------------

    def _device(self, msg: DeviceInfo) -> tuple[Ack, list[Event]]:
        t = MsgType.DEVICE_INFO
        key = FrontendKey(msg.device_type, msg.device_id)
        if msg.op == Op.DEL:
            gone = self.frontends.get(key)
            if gone is None:
                raise _RefusedError(FailReason.NOT_FOUND, f"no frontend {key}")
            # protocol.md 4.4: the DEL_DONE hands each ring's state back, so the driver VM's
            # frontend can resume where we stopped (vhost-user GET_VRING_BASE).
            live = self.ring_states(key) if self.ring_states is not None else None
            states = live if live is not None else added_states(gone.virtqs)
            del self.frontends[key]
            return Ack(t, AckResult.DEL_DONE, FailReason.NONE, len(states), states), [FrontendRemoved(key)]
        if key in self.frontends:
            raise _RefusedError(FailReason.EXISTS, f"frontend {key} exists")
        if len(self.frontends) >= self.max_frontends:
            raise _RefusedError(
                FailReason.LIMIT, f"already {len(self.frontends)} frontends (max {self.max_frontends})"
            )
        fe = FrontendState(key, msg.virtqs)
        for addr, length in fe.ring_ranges():
            if not self.table.covers(addr, length):
                raise _RefusedError(
                    FailReason.RING_OUTSIDE_MEMORY, f"ring part {addr:#x}+{length:#x} is not in mapped memory"
                )
        self.frontends[key] = fe
        return Ack(t, AckResult.ADD_DONE), [FrontendAdded(key, msg.virtqs)]

    # -- FEATURE_BITS ----------------------------------------------------------

    def _features(self, msg: FeatureBits) -> tuple[Ack, list[Event]]:
        key = FrontendKey(msg.device_type, msg.device_id)
        fe = self.frontends.get(key)
        if fe is None:
            # Features belong to a frontend whose rings we know: DEVICE_INFO(ADD) comes first.
            raise _RefusedError(FailReason.NOT_FOUND, f"FEATURE_BITS for unknown frontend {key}")
        policy = self.policies.get(msg.device_type, default_policy)
        try:
            accepted = policy(key, msg.features) & msg.features  # a subset, whatever the app answered
        except FeaturesRefusedError as e:
            raise _RefusedError(FailReason.REJECTED, str(e)) from None
        fe.offered, fe.accepted = msg.features, accepted
        return (
            Ack(MsgType.FEATURE_BITS, AckResult.ADD_DONE, FailReason.NONE, accepted),
            [FeaturesNegotiated(key, msg.features, accepted)],
        )

    # -- teardown and status ---------------------------------------------------

    def remote_gone(self) -> list[Event]:
        """The driver VM vanished: drop every frontend, then every region (rule 7's order)."""
        events: list[Event] = [FrontendRemoved(k) for k in self.frontends]
        self.frontends.clear()
        regions = tuple(self.table.regions())
        self.table.clear()
        if regions:
            events.append(MemoryRemoved(regions))
        return events

    def dump(self) -> dict[str, object]:
        """The engine's state as plain data (for ``vhostpci status --json``)."""
        return {
            "regions": [
                {"xgpa": r.xgpa, "size": r.size, "window_offset": r.window_offset}
                for r in self.table.regions()
            ],
            "frontends": [
                {
                    "device_type": fe.key.device_type,
                    "device_id": fe.key.device_id,
                    "offered": fe.offered,
                    "accepted": fe.accepted,
                    "virtqs": [
                        {"index": v.index, "size": v.size, "desc": v.desc, "avail": v.avail, "used": v.used}
                        for v in fe.virtqs
                    ],
                }
                for fe in self.frontends.values()
            ],
            "last_request_id": self.last_request_id,
            "stats": {
                "received": self.stats.received,
                "acked_done": self.stats.acked_done,
                "acked_fail": self.stats.acked_fail,
                "dropped_short": self.stats.dropped_short,
                "fail_reasons": dict(self.stats.fail_reasons),
            },
            "last_error": self.last_error,
        }
