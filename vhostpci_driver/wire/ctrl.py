"""controlq and ackq messages (docs/protocol.md, section 4).

Every message is a 16-byte header followed by ``len`` payload bytes. The device
writes one message per controlq buffer; the driver writes one ACK per ackq
buffer, repeating the request id it acks. Bodies are immutable values;
:func:`encode_message` and :func:`decode_message` are exact inverses, and the
decoders raise only :class:`ProtocolError`, whose ``reason`` is the FAIL reason
the driver puts in its ack.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vhostpci_driver.addr import WindowOffset, Xgpa
from vhostpci_driver.errors import FailReason, ProtocolError
from vhostpci_driver.spec.virtio import MAX_QUEUE_SIZE, misaligned_ring_part, queue_size_ok
from vhostpci_driver.wire.layout import WireStruct, check_exact, check_reserved

VERSION = 1
HEADER = WireStruct("vhost_pci_msg_hdr", [("type", "H"), ("version", "H"), ("len", "I"), ("request_id", "Q")])
MEMORY_INFO = WireStruct("vhost_pci_memory_info", [("ops", "H"), ("reserved", "H"), ("nregions", "I")])
MEM_REGION = WireStruct("vhost_pci_mem_region", [("xgpa", "Q"), ("size", "Q"), ("window_offset", "Q")])
DEVICE_INFO = WireStruct(
    "vhost_pci_device_info",
    [
        ("ops", "H"),
        ("reserved", "H"),
        ("device_type", "I"),
        ("device_id", "Q"),
        ("nvirtq", "I"),
        ("reserved2", "I"),
    ],
)
VIRTQ = WireStruct(
    "vhost_pci_virtq",
    [
        ("index", "H"),
        ("size", "H"),
        ("notify_slot", "I"),
        ("desc_xgpa", "Q"),
        ("avail_xgpa", "Q"),
        ("used_xgpa", "Q"),
        ("last_avail_idx", "H"),
        ("last_used_idx", "H"),
        ("reserved", "I"),
    ],
)
FEATURE_BITS = WireStruct(
    "vhost_pci_feature_bits",
    [("device_type", "I"), ("reserved", "I"), ("device_id", "Q"), ("features", "Q")],
)
ACK = WireStruct("vhost_pci_ack", [("acked_type", "H"), ("result", "H"), ("reason", "I"), ("value", "Q")])
#: A stopped virtqueue's state, after the DEL_DONE ack of a DEVICE_INFO(DEL) (protocol.md 4.4):
#: where the frontend resumes (vhost-user GET_VRING_BASE needs it).
VIRTQ_STATE = WireStruct(
    "vhost_pci_virtq_state",
    [("index", "H"), ("last_avail_idx", "H"), ("last_used_idx", "H"), ("reserved", "H")],
)

U64_END = 1 << 64
NO_SLOT = 0xFFFFFFFF  # a virtqueue with no notification slot (the app polls it)
#: Most ring states one ACK carries: a frontend has at most 64 virtqueues (Limits.max_virtqs).
MAX_STATES = 64


class MsgType(enum.IntEnum):
    """``vhost_pci_msg_hdr.type``."""

    MEMORY_INFO = 1
    DEVICE_INFO = 2
    FEATURE_BITS = 3
    ACK = 0x80


CONTROL_TYPES = frozenset({MsgType.MEMORY_INFO, MsgType.DEVICE_INFO, MsgType.FEATURE_BITS})


class Op(enum.IntEnum):
    """``ops`` of MEMORY_INFO and DEVICE_INFO."""

    ADD = 0
    DEL = 1


class AckResult(enum.IntEnum):
    """``ACK.result``: FEATURE_BITS is acked with the ADD pair."""

    ADD_DONE = 0
    ADD_FAIL = 1
    DEL_DONE = 2
    DEL_FAIL = 3

    @property
    def failed(self) -> bool:
        return self in (AckResult.ADD_FAIL, AckResult.DEL_FAIL)


@dataclass(frozen=True)
class Limits:
    """Device limits a decoder enforces (from the device config; docs/protocol.md 2.3)."""

    max_regions: int = 64
    max_virtqs: int = 64
    max_msg_len: int = 4096


@dataclass(frozen=True)
class MsgHeader:
    """A decoded ``vhost_pci_msg_hdr``."""

    type: int
    version: int
    len: int
    request_id: int


@dataclass(frozen=True)
class FrontendKey:
    """A frontend device of the driver VM: ``(device_type, device_id)``, as DEVICE_INFO and
    FEATURE_BITS name it (protocol.md 4.2, 4.3)."""

    device_type: int
    device_id: int

    def __str__(self) -> str:
        return f"{self.device_type}:{self.device_id:#x}"


@dataclass(frozen=True)
class MemoryRegion:
    """One region of the driver VM's memory as it sits in the remote window."""

    xgpa: Xgpa
    size: int
    window_offset: WindowOffset


@dataclass(frozen=True)
class MemoryInfo:
    """MEMORY_INFO: regions added to or removed from the remote window."""

    op: Op
    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True)
class VirtqInfo:
    """One virtqueue of a frontend: where its split ring lives in the driver VM."""

    index: int
    size: int
    desc: Xgpa
    avail: Xgpa
    used: Xgpa
    last_avail_idx: int = 0
    last_used_idx: int = 0
    notify_slot: int = NO_SLOT


@dataclass(frozen=True)
class DeviceInfo:
    """DEVICE_INFO: a frontend device added (with its rings) or removed (rings empty)."""

    op: Op
    device_type: int
    device_id: int
    virtqs: tuple[VirtqInfo, ...] = ()


@dataclass(frozen=True)
class FeatureBits:
    """FEATURE_BITS: the feature bits one frontend's driver offers."""

    device_type: int
    device_id: int
    features: int


@dataclass(frozen=True)
class VirtqState:
    """Where a stopped virtqueue stands: the next avail entry to take, the next used entry to write."""

    index: int
    last_avail_idx: int
    last_used_idx: int


@dataclass(frozen=True)
class Ack:
    """ACK on the ackq: the result of one controlq request.

    ``states`` only on the DEL_DONE of a DEVICE_INFO(DEL): one per virtqueue of the
    removed frontend; ``value`` then counts them (protocol.md 4.4).
    """

    acked_type: int
    result: AckResult
    reason: int = FailReason.NONE
    value: int = 0
    states: tuple[VirtqState, ...] = ()

    def __post_init__(self) -> None:
        # protocol.md 4.4: on a DEVICE_INFO DEL_DONE ``value`` is the count of the states that
        # follow (an ack claiming more than it carries does not decode); on no other ack are there any.
        if states_allowed(self.acked_type, self.result):
            if self.value != len(self.states):
                raise ValueError("a DEVICE_INFO DEL_DONE counts its ring states in value")
        elif self.states:
            raise ValueError("only a DEVICE_INFO DEL_DONE carries ring states")


ControlBody = MemoryInfo | DeviceInfo | FeatureBits


def _type_of(body: ControlBody | Ack) -> MsgType:
    if isinstance(body, MemoryInfo):
        return MsgType.MEMORY_INFO
    if isinstance(body, DeviceInfo):
        return MsgType.DEVICE_INFO
    if isinstance(body, FeatureBits):
        return MsgType.FEATURE_BITS
    return MsgType.ACK


def encode_regions(regions: tuple[MemoryRegion, ...]) -> bytes:
    """The region array shared by MEMORY_INFO on the controlq."""
    return b"".join(MEM_REGION.pack(r.xgpa, r.size, r.window_offset) for r in regions)


def encode_virtqs(virtqs: tuple[VirtqInfo, ...]) -> bytes:
    """The virtqueue array shared by DEVICE_INFO on the controlq and the socket."""
    return b"".join(
        VIRTQ.pack(
            v.index, v.size, v.notify_slot, v.desc, v.avail, v.used, v.last_avail_idx, v.last_used_idx, 0
        )
        for v in virtqs
    )


def encode_body(body: ControlBody | Ack) -> bytes:
    """The payload of a message, without its header."""
    if isinstance(body, MemoryInfo):
        return MEMORY_INFO.pack(body.op, 0, len(body.regions)) + encode_regions(body.regions)
    if isinstance(body, DeviceInfo):
        head = DEVICE_INFO.pack(body.op, 0, body.device_type, body.device_id, len(body.virtqs), 0)
        return head + encode_virtqs(body.virtqs)
    if isinstance(body, FeatureBits):
        return FEATURE_BITS.pack(body.device_type, 0, body.device_id, body.features)
    return ACK.pack(body.acked_type, body.result, body.reason, body.value) + encode_states(body.states)


def encode_states(states: tuple[VirtqState, ...]) -> bytes:
    """The ``vhost_pci_virtq_state`` array after a DEL_DONE ack (controlq and socket)."""
    return b"".join(VIRTQ_STATE.pack(s.index, s.last_avail_idx, s.last_used_idx, 0) for s in states)


def decode_states(payload: memoryview, offset: int, count: int, what: str) -> tuple[VirtqState, ...]:
    """``count`` ring states at ``offset``; the caller checked that the payload holds exactly them."""
    out = []
    seen: set[int] = set()
    for i in range(count):
        field = f"{what}.states[{i}]"
        index, lai, lui, reserved = VIRTQ_STATE.unpack_from(payload, offset + i * VIRTQ_STATE.size, field)
        check_reserved(reserved, f"{field}.reserved")
        if index in seen:
            raise ProtocolError(f"{field}.index", f"index {index} appears twice")
        seen.add(index)
        out.append(VirtqState(index, lai, lui))
    return tuple(out)


def states_allowed(acked_type: int, result: int) -> bool:
    """Only a DEVICE_INFO(DEL) that succeeded hands ring states back."""
    return acked_type == MsgType.DEVICE_INFO and result == AckResult.DEL_DONE


def encode_message(request_id: int, body: ControlBody | Ack, *, version: int = VERSION) -> bytes:
    """Header plus payload, ready for a controlq or ackq buffer."""
    payload = encode_body(body)
    return HEADER.pack(_type_of(body), version, len(payload), request_id) + payload


def encode_ack(request_id: int, ack: Ack) -> bytes:
    """An ackq message: the header repeats the id being acked."""
    return encode_message(request_id, ack)


def unpack_header(buf: bytes | bytearray | memoryview) -> MsgHeader:
    """The header's fields, unchecked (a caller can still ack a bad message by id)."""
    mtype, version, length, request_id = HEADER.unpack_from(buf, 0, "header")
    return MsgHeader(mtype, version, length, request_id)


def check_header(hdr: MsgHeader, buf_len: int, limits: Limits | None = None) -> None:
    """Check a header against the ``buf_len`` bytes it heads.

    Raises :class:`ProtocolError` with reason BAD_VERSION or MALFORMED. The
    type is *not* checked here, so a caller can still ack an unknown type by id.
    """
    if hdr.version != VERSION:
        raise ProtocolError(
            "header.version", f"version {hdr.version} is not {VERSION}", FailReason.BAD_VERSION
        )
    if hdr.len > buf_len - HEADER.size:
        raise ProtocolError("header.len", f"len {hdr.len} exceeds the {buf_len - HEADER.size} bytes present")
    if limits is not None and HEADER.size + hdr.len > limits.max_msg_len:
        raise ProtocolError("header.len", f"message of {HEADER.size + hdr.len} bytes over max_msg_len")


def decode_header(buf: bytes | bytearray | memoryview, limits: Limits | None = None) -> MsgHeader:
    """Decode and check a header against the bytes that follow it (see :func:`check_header`)."""
    hdr = unpack_header(buf)
    check_header(hdr, len(buf), limits)
    return hdr


def _check_op(op: int, what: str) -> Op:
    if op not in (Op.ADD, Op.DEL):
        raise ProtocolError(what, f"unknown op {op}")
    return Op(op)


def decode_memory_info(payload: memoryview, limits: Limits, what: str = "MEMORY_INFO") -> MemoryInfo:
    """Decode a MEMORY_INFO payload; regions are checked for size and u64 overflow only.

    Overlap and window bounds depend on the region table: the engine checks them.
    """
    ops, reserved, nregions = MEMORY_INFO.unpack_from(payload, 0, what)
    op = _check_op(ops, f"{what}.ops")
    check_reserved(reserved, f"{what}.reserved")
    if nregions == 0:
        raise ProtocolError(f"{what}.nregions", "must be at least 1")
    if nregions > limits.max_regions:
        raise ProtocolError(
            f"{what}.nregions", f"{nregions} over max_regions {limits.max_regions}", FailReason.LIMIT
        )
    check_exact(len(payload), MEMORY_INFO.size + nregions * MEM_REGION.size, f"{what}.nregions")
    regions = []
    for i in range(nregions):
        field = f"{what}.regions[{i}]"
        xgpa, size, woff = MEM_REGION.unpack_from(payload, MEMORY_INFO.size + i * MEM_REGION.size, field)
        if size == 0:
            raise ProtocolError(f"{field}.size", "must not be 0")
        if xgpa + size > U64_END:
            raise ProtocolError(f"{field}.size", "xgpa + size wraps past 2**64")
        if woff + size > U64_END:
            raise ProtocolError(f"{field}.size", "window_offset + size wraps past 2**64")
        regions.append(MemoryRegion(Xgpa(xgpa), size, WindowOffset(woff)))
    return MemoryInfo(op, tuple(regions))


def decode_virtq(buf: memoryview, offset: int, field: str, *, slot_reserved: bool) -> VirtqInfo:
    """One ``vhost_pci_virtq`` entry: size a power of two, ring parts aligned (virtio 1.2, 2.7.2)."""
    index, size, slot, desc, avail, used, lai, lui, reserved = VIRTQ.unpack_from(buf, offset, field)
    check_reserved(reserved, f"{field}.reserved")
    if slot_reserved:
        check_reserved(slot, f"{field}.notify_slot")
        slot = NO_SLOT
    if not queue_size_ok(size):
        raise ProtocolError(
            f"{field}.size", f"{size} is not a power of two <= {MAX_QUEUE_SIZE}", FailReason.BAD_RING
        )
    bad = misaligned_ring_part(desc, avail, used)
    if bad is not None:
        part, addr, align = bad
        raise ProtocolError(
            f"{field}.{part}_xgpa", f"{addr:#x} is not {align}-byte aligned", FailReason.BAD_RING
        )
    return VirtqInfo(index, size, Xgpa(desc), Xgpa(avail), Xgpa(used), lai, lui, slot)


def decode_device_info(
    payload: memoryview, limits: Limits, what: str = "DEVICE_INFO", *, slot_reserved: bool = False
) -> DeviceInfo:
    """Decode DEVICE_INFO: ADD carries 1..max_virtqs rings with distinct indices, DEL carries none."""
    ops, reserved, dtype, did, nvirtq, reserved2 = DEVICE_INFO.unpack_from(payload, 0, what)
    op = _check_op(ops, f"{what}.ops")
    check_reserved(reserved, f"{what}.reserved")
    check_reserved(reserved2, f"{what}.reserved2")
    if dtype == 0:
        raise ProtocolError(f"{what}.device_type", "0 is not a virtio device type")
    if op == Op.DEL and nvirtq != 0:
        raise ProtocolError(f"{what}.nvirtq", "DEL names the frontend only: nvirtq must be 0")
    if op == Op.ADD and nvirtq == 0:
        raise ProtocolError(f"{what}.nvirtq", "ADD needs at least one virtqueue")
    if nvirtq > limits.max_virtqs:
        raise ProtocolError(
            f"{what}.nvirtq", f"{nvirtq} over the limit {limits.max_virtqs}", FailReason.LIMIT
        )
    check_exact(len(payload), DEVICE_INFO.size + nvirtq * VIRTQ.size, f"{what}.nvirtq")
    virtqs = [
        decode_virtq(
            payload, DEVICE_INFO.size + i * VIRTQ.size, f"{what}.virtq[{i}]", slot_reserved=slot_reserved
        )
        for i in range(nvirtq)
    ]
    seen: set[int] = set()
    for i, v in enumerate(virtqs):
        if v.index in seen:
            raise ProtocolError(
                f"{what}.virtq[{i}].index", f"index {v.index} appears twice", FailReason.BAD_RING
            )
        seen.add(v.index)
    return DeviceInfo(op, dtype, did, tuple(virtqs))


def decode_feature_bits(payload: memoryview, what: str = "FEATURE_BITS") -> FeatureBits:
    """Decode FEATURE_BITS: one frontend's offered features."""
    check_exact(len(payload), FEATURE_BITS.size, what)
    dtype, reserved, did, features = FEATURE_BITS.unpack_from(payload, 0, what)
    check_reserved(reserved, f"{what}.reserved")
    if dtype == 0:
        raise ProtocolError(f"{what}.device_type", "0 is not a virtio device type")
    return FeatureBits(dtype, did, features)


def decode_body(hdr: MsgHeader, view: memoryview, limits: Limits) -> ControlBody:
    """The body of a message whose header is ``hdr``, from ``view`` (the whole buffer, not copied)."""
    payload = view[HEADER.size : HEADER.size + hdr.len]
    if hdr.type == MsgType.MEMORY_INFO:
        return decode_memory_info(payload, limits)
    if hdr.type == MsgType.DEVICE_INFO:
        return decode_device_info(payload, limits)
    if hdr.type == MsgType.FEATURE_BITS:
        return decode_feature_bits(payload)
    raise ProtocolError("header.type", f"{hdr.type:#x} is not a controlq type", FailReason.UNKNOWN_TYPE)


def decode_message(
    buf: bytes | bytearray | memoryview, limits: Limits | None = None
) -> tuple[MsgHeader, ControlBody]:
    """Decode one controlq message (header and body)."""
    limits = limits or Limits()
    view = memoryview(buf)
    hdr = decode_header(view, limits)
    return hdr, decode_body(hdr, view, limits)


@dataclass(frozen=True)
class Received:
    """One controlq buffer decoded in one pass, for a caller that acks even a bad message.

    ``op`` is the ``ops`` field of a MEMORY_INFO or DEVICE_INFO (its first field,
    read where the buffer holds it, whatever else is broken: a refused DEL is
    acked DEL_FAIL); ``body`` is the decoded body, or the error saying why
    there is none.
    """

    header: MsgHeader
    op: int | None
    body: ControlBody | ProtocolError


_OPS_TYPES = frozenset({MsgType.MEMORY_INFO, MsgType.DEVICE_INFO})


def receive(buf: bytes | bytearray | memoryview, limits: Limits) -> Received:
    """Decode one controlq buffer of at least :data:`HEADER` size; never raises for its content."""
    view = memoryview(buf)
    hdr = unpack_header(view)
    op = None
    if hdr.type in _OPS_TYPES and len(view) >= HEADER.size + 2:
        op = view[HEADER.size] | view[HEADER.size + 1] << 8  # ops: a u16, first in both payloads
    try:
        check_header(hdr, len(view), limits)
        body = decode_body(hdr, view, limits)
    except ProtocolError as e:
        return Received(hdr, op, e)
    return Received(hdr, op, body)


def decode_ack(buf: bytes | bytearray | memoryview) -> tuple[int, Ack]:
    """Decode one ackq message: ``(request id being acked, ack)``."""
    view = memoryview(buf)
    hdr = decode_header(view)
    if hdr.type != MsgType.ACK:
        raise ProtocolError("header.type", f"{hdr.type:#x} is not ACK", FailReason.UNKNOWN_TYPE)
    payload = view[HEADER.size : HEADER.size + hdr.len]
    acked_type, result, reason, value = ACK.unpack_from(payload, 0, "ACK")
    if result not in AckResult._value2member_map_:
        raise ProtocolError("ACK.result", f"unknown result {result}")
    count = value if states_allowed(acked_type, result) else 0
    if count > MAX_STATES:
        raise ProtocolError("ACK.value", f"{count} ring states over the limit {MAX_STATES}", FailReason.LIMIT)
    check_exact(len(payload), ACK.size + count * VIRTQ_STATE.size, "ACK.value")
    states = decode_states(payload, ACK.size, count, "ACK")
    if hdr.request_id == 0:
        raise ProtocolError("header.request_id", "request ids start at 1")
    return hdr.request_id, Ack(acked_type, AckResult(result), reason, value, states)
