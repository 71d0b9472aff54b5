"""The vhost-pci server socket: driver VM (client) <-> host server (docs/protocol.md, section 5).

A UNIX stream socket. Every message is a 32-byte header and ``msg_len``
payload bytes; file descriptors ride as ``SCM_RIGHTS`` with the header's
``sendmsg``: one memory fd per region of MEMORY_INFO(ADD), a kick and a call
eventfd per virtqueue of DEVICE_INFO(ADD), none otherwise.

fd ownership: :func:`decode_body` takes the received fds; on success they
belong to the returned value, on error the *caller* still owns them and must
close them (the decoder never closes what it did not open).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field

from vhostpci_driver.addr import Xgpa
from vhostpci_driver.errors import FailReason, ProtocolError
from vhostpci_driver.wire.ctrl import (
    DEVICE_INFO,
    MEMORY_INFO,
    VIRTQ,
    VIRTQ_STATE,
    AckResult,
    DeviceInfo,
    FeatureBits,
    Limits,
    Op,
    VirtqInfo,
    VirtqState,
    decode_device_info,
    decode_feature_bits,
    decode_states,
    encode_body,
    encode_states,
)
from vhostpci_driver.wire.layout import WireStruct, check_exact, check_reserved

VERSION = 1
HEADER = WireStruct(
    "vhost_pci_socket_hdr",
    [("msg_type", "H"), ("msg_version", "H"), ("msg_len", "I"), ("vm_uuid", "16s"), ("request_id", "Q")],
)
REGION = WireStruct(
    "vhost_pci_socket_region", [("guest_phys_addr", "Q"), ("memory_size", "Q"), ("mmap_offset", "Q")]
)
ACK = WireStruct("vhost_pci_socket_ack", [("result", "H"), ("reserved", "H"), ("reason", "I")])

#: SCM_MAX_FD in Linux (include/net/scm.h): no message can carry more fds.
SCM_MAX_FD = 253
U64_END = 1 << 64


class SockMsgType(enum.IntEnum):
    """``vhost_pci_socket_hdr.msg_type``."""

    MEMORY_INFO = 0
    MEMORY_INFO_ACK = 1
    DEVICE_INFO = 2
    DEVICE_INFO_ACK = 3
    FEATURE_BITS = 4
    FEATURE_BITS_ACK = 5
    PING = 6
    PONG = 7


ACK_TYPES = frozenset(
    {SockMsgType.MEMORY_INFO_ACK, SockMsgType.DEVICE_INFO_ACK, SockMsgType.FEATURE_BITS_ACK}
)


@dataclass(frozen=True)
class SockLimits:
    """What a peer may send in one message (docs/security.md: peer limits)."""

    max_payload: int = 64 * 1024
    max_regions: int = 64
    max_virtqs: int = 64

    def __post_init__(self) -> None:
        # One fd per region and two per virtqueue must fit one SCM_RIGHTS message.
        if self.max_regions > SCM_MAX_FD or 2 * self.max_virtqs > SCM_MAX_FD:
            raise ValueError("limits exceed SCM_MAX_FD fds per message")


@dataclass(frozen=True)
class SockHeader:
    """A decoded socket header."""

    msg_type: SockMsgType
    msg_len: int
    vm_uuid: uuid.UUID
    request_id: int


@dataclass(frozen=True)
class SocketRegion:
    """One region of the driver VM's memory: ``memory_size`` bytes of ``fd`` at ``mmap_offset``."""

    guest_phys_addr: Xgpa
    memory_size: int
    mmap_offset: int
    fd: int = field(default=-1, compare=False)


@dataclass(frozen=True)
class SockMemoryInfo:
    """MEMORY_INFO on the socket: ADD carries one fd per region, DEL none."""

    op: Op
    regions: tuple[SocketRegion, ...]


@dataclass(frozen=True)
class SockDeviceInfo:
    """DEVICE_INFO on the socket: ADD carries (kick, call) eventfds per virtqueue, in virtqueue order."""

    info: DeviceInfo
    kick_fds: tuple[int, ...] = field(default=(), compare=False)
    call_fds: tuple[int, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class SockAck:
    """``*_ACK``: the result of one request, repeating its id in the header.

    ``states``: only in the DEL_DONE of a DEVICE_INFO(DEL), the removed frontend's
    ring states (protocol.md 7.1), so a vhost-user front door can answer GET_VRING_BASE.
    """

    result: AckResult
    reason: int = FailReason.NONE
    states: tuple[VirtqState, ...] = ()


@dataclass(frozen=True)
class Empty:
    """PING and PONG carry no payload."""


SockBody = SockMemoryInfo | SockDeviceInfo | FeatureBits | SockAck | Empty


@dataclass(frozen=True)
class SockMessage:
    """One whole socket message."""

    msg_type: SockMsgType
    vm_uuid: uuid.UUID
    request_id: int
    body: SockBody

    def fds(self) -> list[int]:
        """The fds this message carries, in wire order."""
        b = self.body
        if isinstance(b, SockMemoryInfo):
            return [r.fd for r in b.regions] if b.op == Op.ADD else []
        if isinstance(b, SockDeviceInfo):
            return [fd for pair in zip(b.kick_fds, b.call_fds, strict=True) for fd in pair]
        return []


def encode(msg: SockMessage) -> tuple[bytes, list[int]]:
    """``(bytes, fds)`` for one ``sendmsg``."""
    b = msg.body
    if isinstance(b, SockMemoryInfo):
        payload = MEMORY_INFO.pack(b.op, 0, len(b.regions)) + b"".join(
            REGION.pack(r.guest_phys_addr, r.memory_size, r.mmap_offset) for r in b.regions
        )
    elif isinstance(b, SockDeviceInfo):
        # On the socket the notification slot is not known yet: the field is reserved.
        info = b.info
        payload = DEVICE_INFO.pack(
            info.op, 0, info.device_type, info.device_id, len(info.virtqs), 0
        ) + b"".join(
            VIRTQ.pack(v.index, v.size, 0, v.desc, v.avail, v.used, v.last_avail_idx, v.last_used_idx, 0)
            for v in info.virtqs
        )
    elif isinstance(b, FeatureBits):
        payload = encode_body(b)
    elif isinstance(b, SockAck):
        payload = ACK.pack(b.result, 0, b.reason) + encode_states(b.states)
    else:
        payload = b""
    head = HEADER.pack(msg.msg_type, VERSION, len(payload), msg.vm_uuid.bytes, msg.request_id)
    return head + payload, msg.fds()


def decode_header(buf: bytes | bytearray | memoryview, limits: SockLimits) -> SockHeader:
    """Decode and check a 32-byte header; its payload is read next, ``msg_len`` bytes."""
    mtype, version, length, raw_uuid, request_id = HEADER.unpack_from(buf, 0, "socket header")
    if version != VERSION:
        raise ProtocolError(
            "socket header.msg_version", f"version {version} is not {VERSION}", FailReason.BAD_VERSION
        )
    if mtype not in SockMsgType._value2member_map_:
        raise ProtocolError("socket header.msg_type", f"unknown type {mtype}", FailReason.UNKNOWN_TYPE)
    if length > limits.max_payload:
        raise ProtocolError(
            "socket header.msg_len", f"{length} over the limit {limits.max_payload}", FailReason.LIMIT
        )
    vm_uuid = uuid.UUID(bytes=bytes(raw_uuid))
    if vm_uuid.int == 0:
        raise ProtocolError("socket header.vm_uuid", "the nil UUID names no driver VM")
    return SockHeader(SockMsgType(mtype), length, vm_uuid, request_id)


def _expect_fds(fds: list[int], n: int, what: str) -> None:
    if len(fds) != n:
        raise ProtocolError(f"{what}.fds", f"carries {len(fds)} fds, needs {n}")


def _decode_memory(payload: memoryview, fds: list[int], limits: SockLimits) -> SockMemoryInfo:
    what = "MEMORY_INFO"
    ops, reserved, nregions = MEMORY_INFO.unpack_from(payload, 0, what)
    if ops not in (Op.ADD, Op.DEL):
        raise ProtocolError(f"{what}.ops", f"unknown op {ops}")
    check_reserved(reserved, f"{what}.reserved")
    if not 1 <= nregions <= limits.max_regions:
        raise ProtocolError(
            f"{what}.nregions", f"{nregions} not in 1..{limits.max_regions}", FailReason.LIMIT
        )
    check_exact(len(payload), MEMORY_INFO.size + nregions * REGION.size, f"{what}.nregions")
    op = Op(ops)
    _expect_fds(fds, nregions if op == Op.ADD else 0, what)
    regions = []
    for i in range(nregions):
        f = f"{what}.regions[{i}]"
        gpa, size, moff = REGION.unpack_from(payload, MEMORY_INFO.size + i * REGION.size, f)
        if size == 0:
            raise ProtocolError(f"{f}.memory_size", "must not be 0")
        if gpa + size > U64_END or moff + size > U64_END:
            raise ProtocolError(f"{f}.memory_size", "range wraps past 2**64")
        regions.append(SocketRegion(Xgpa(gpa), size, moff, fds[i] if op == Op.ADD else -1))
    return SockMemoryInfo(op, tuple(regions))


def _decode_device(payload: memoryview, fds: list[int], limits: SockLimits) -> SockDeviceInfo:
    info = decode_device_info(payload, Limits(max_virtqs=limits.max_virtqs), slot_reserved=True)
    n = len(info.virtqs)
    _expect_fds(fds, 2 * n, "DEVICE_INFO")
    return SockDeviceInfo(info, tuple(fds[0::2]), tuple(fds[1::2]))


def decode_body(
    hdr: SockHeader, payload: bytes | bytearray | memoryview, fds: list[int], limits: SockLimits
) -> SockMessage:
    """Decode the payload of a message whose header was decoded; see the module doc for fd ownership."""
    view = memoryview(payload)
    check_exact(len(view), hdr.msg_len, "socket header.msg_len")
    t = hdr.msg_type
    body: SockBody
    if t == SockMsgType.MEMORY_INFO:
        body = _decode_memory(view, fds, limits)
    elif t == SockMsgType.DEVICE_INFO:
        body = _decode_device(view, fds, limits)
    else:
        _expect_fds(fds, 0, t.name)
        if t == SockMsgType.FEATURE_BITS:
            body = decode_feature_bits(view)
        elif t in ACK_TYPES:
            result, reserved, reason = ACK.unpack_from(view, 0, t.name)
            check_reserved(reserved, f"{t.name}.reserved")
            if result not in AckResult._value2member_map_:
                raise ProtocolError(f"{t.name}.result", f"unknown result {result}")
            count = 0
            if t == SockMsgType.DEVICE_INFO_ACK and result == AckResult.DEL_DONE:
                # The states fill the rest of the payload: their count is implied by msg_len.
                count = max(0, len(view) - ACK.size) // VIRTQ_STATE.size
                if count > limits.max_virtqs:
                    raise ProtocolError(
                        f"{t.name}.states", f"{count} over the limit {limits.max_virtqs}", FailReason.LIMIT
                    )
            check_exact(len(view), ACK.size + count * VIRTQ_STATE.size, f"{t.name}.states")
            body = SockAck(AckResult(result), reason, decode_states(view, ACK.size, count, t.name))
        else:
            check_exact(len(view), 0, t.name)
            body = Empty()
    return SockMessage(t, hdr.vm_uuid, hdr.request_id, body)


def decode(
    buf: bytes | bytearray | memoryview, fds: list[int], limits: SockLimits | None = None
) -> SockMessage:
    """Decode a whole message (header and payload in ``buf``) with its fds."""
    limits = limits or SockLimits()
    view = memoryview(buf)
    hdr = decode_header(view, limits)
    return decode_body(hdr, view[HEADER.size :], fds, limits)


__all__ = [
    "HEADER",
    "REGION",
    "SCM_MAX_FD",
    "VERSION",
    "Empty",
    "SockAck",
    "SockBody",
    "SockDeviceInfo",
    "SockHeader",
    "SockLimits",
    "SockMemoryInfo",
    "SockMessage",
    "SockMsgType",
    "SocketRegion",
    "VirtqInfo",
    "VirtqState",
    "decode",
    "decode_body",
    "decode_header",
    "encode",
]
