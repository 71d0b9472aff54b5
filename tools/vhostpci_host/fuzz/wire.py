"""Fuzz targets for the wire codecs: controlq/ackq (``ctrl``) and the server socket (``sock``).

Both codecs promise to raise only :class:`ProtocolError` (with a FAIL reason)
on bad bytes, and both are exact inverses of their encoders. So for any input:
a refusal is a ProtocolError; an acceptance re-encodes to exactly the bytes
that were decoded, and those decode to the same value again.
"""

from __future__ import annotations

import os
import uuid

from vhostpci_driver.addr import WindowOffset, Xgpa
from vhostpci_driver.errors import FailReason, ProtocolError
from vhostpci_driver.wire import ctrl, sock
from vhostpci_driver.wire.ctrl import (
    Ack,
    AckResult,
    DeviceInfo,
    FeatureBits,
    Limits,
    MemoryInfo,
    MemoryRegion,
    Op,
    VirtqInfo,
)
from vhostpci_driver.wire.sock import (
    Empty,
    SockAck,
    SockDeviceInfo,
    SocketRegion,
    SockLimits,
    SockMemoryInfo,
    SockMessage,
    SockMsgType,
)
from vhostpci_host.fuzz.contract import InvariantError, Target, check, fd_is_open

# The device's default limits, and tight ones so inputs reach the LIMIT refusals cheaply.
CTRL_LIMITS = (Limits(), Limits(max_regions=2, max_virtqs=2, max_msg_len=128))
SOCK_LIMITS = (SockLimits(), SockLimits(max_payload=256, max_regions=2, max_virtqs=2))
MAX_SOCK_FDS = 15  # more than the tight limits allow, so fd-count refusals are reachable


def _refusal(e: ProtocolError) -> None:
    check(bool(e.field), f"ProtocolError without a field: {e}")
    check(isinstance(e.reason, FailReason), f"ProtocolError reason {e.reason!r} is not a FailReason")


# -- ctrl -------------------------------------------------------------------------------


def fuzz_ctrl(data: bytes) -> None:
    """``data[0]``: bit 0 ackq (else controlq), bit 1 tight limits; the rest is one buffer."""
    if not data:
        return
    mode, buf = data[0], data[1:]
    limits = CTRL_LIMITS[mode >> 1 & 1]
    if mode & 1:
        try:
            rid, ack = ctrl.decode_ack(buf)
        except ProtocolError as e:
            _refusal(e)
            return
        raw = ctrl.encode_ack(rid, ack)
        check(raw == buf[: len(raw)], "an ACK does not re-encode to the bytes it was decoded from")
        check(ctrl.decode_ack(raw) == (rid, ack), "a re-encoded ACK decodes differently")
        return
    try:
        hdr, body = ctrl.decode_message(buf, limits)
    except ProtocolError as e:
        _refusal(e)
        return
    end = ctrl.HEADER.size + hdr.len
    check(end <= len(buf) and end <= limits.max_msg_len, f"accepted a {end}-byte message beyond the limits")
    raw = ctrl.encode_message(hdr.request_id, body)
    check(raw == buf[:end], f"{type(body).__name__} does not re-encode to the bytes it was decoded from")
    check(ctrl.decode_message(raw, limits) == (hdr, body), "a re-encoded message decodes differently")


def ctrl_seeds() -> dict[str, bytes]:
    vq = [
        VirtqInfo(i, 256, Xgpa(0x10000 + 0x4000 * i), Xgpa(0x11000 + 0x4000 * i), Xgpa(0x12000 + 0x4000 * i))
        for i in range(2)
    ]
    region = MemoryRegion(Xgpa(0x1_0000_0000), 1 << 20, WindowOffset(0))
    bodies: dict[str, ctrl.ControlBody] = {
        "memory-add": MemoryInfo(Op.ADD, (region, MemoryRegion(Xgpa(0), 4096, WindowOffset(1 << 20)))),
        "memory-del": MemoryInfo(Op.DEL, (region,)),
        "device-add": DeviceInfo(Op.ADD, 1, 7, tuple(vq)),
        "device-del": DeviceInfo(Op.DEL, 1, 7),
        "feature-bits": FeatureBits(1, 7, 1 << 32 | 1 << 5),
    }
    seeds = {name: bytes([0]) + ctrl.encode_message(i + 1, b) for i, (name, b) in enumerate(bodies.items())}
    seeds["ack"] = bytes([1]) + ctrl.encode_ack(3, Ack(ctrl.MsgType.DEVICE_INFO, AckResult.ADD_FAIL, 6))
    return seeds


CTRL = Target(
    "ctrl", "controlq/ackq decoders (vhostpci_driver/wire/ctrl.py)", fuzz_ctrl, ctrl_seeds, max_len=8192
)


# -- sock -------------------------------------------------------------------------------


def fuzz_sock(data: bytes) -> None:
    """``data[0]``: bits 0-3 how many real fds ride along, bit 4 tight limits, bit 5 read as the
    server does (header, then ``msg_len`` bytes) instead of one whole buffer; the rest is the bytes.

    The module's fd convention: on success the fds belong to the message, on a
    refusal they stay the caller's; the decoder never closes one. So every fd
    must still be open afterwards, and a message must hold exactly the fds it was
    given, in wire order. The target closes them all either way.
    """
    if not data:
        return
    mode, buf = data[0], data[1:]
    fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(min(mode & 0xF, MAX_SOCK_FDS))]
    try:
        _sock_one(buf, fds, SOCK_LIMITS[mode >> 4 & 1], as_server_reads=bool(mode & 0x20))
        closed = [fd for fd in fds if not fd_is_open(fd)]
        check(not closed, f"the decoder closed fds {closed} it did not open")
    finally:
        for fd in fds:
            if fd_is_open(fd):
                os.close(fd)


def _sock_one(buf: bytes, fds: list[int], limits: SockLimits, *, as_server_reads: bool) -> None:
    try:
        if as_server_reads:
            hdr = sock.decode_header(buf, limits)
            start = sock.HEADER.size
            msg = sock.decode_body(hdr, buf[start : start + hdr.msg_len], fds, limits)
        else:
            msg = sock.decode(buf, fds, limits)
    except ProtocolError as e:
        _refusal(e)
        return
    check(msg.fds() == fds, f"{msg.msg_type.name} holds fds {msg.fds()}, was given {fds}")
    raw, out_fds = sock.encode(msg)
    if raw != buf[: len(raw)] or (not as_server_reads and len(raw) != len(buf)):
        raise InvariantError(f"{msg.msg_type.name} does not re-encode to the bytes it was decoded from")
    check(out_fds == fds, "encode() sends other fds than the message holds")
    check(sock.decode(raw, out_fds, limits) == msg, "a re-encoded message decodes differently")


def sock_seeds() -> dict[str, bytes]:
    vm = uuid.UUID("6b1f3a52-8f7e-4c2b-9d64-0a1b2c3d4e5f")
    vq = VirtqInfo(0, 256, Xgpa(0x10000), Xgpa(0x11000), Xgpa(0x12000), 3, 3)
    msgs: dict[str, tuple[int, SockMessage]] = {
        "memory-add": (0, SockMessage(SockMsgType.MEMORY_INFO, vm, 1, SockMemoryInfo(Op.ADD, (
            SocketRegion(Xgpa(0), 1 << 20, 0, fd=10), SocketRegion(Xgpa(1 << 32), 4096, 1 << 20, fd=11),
        )))),
        "memory-del": (0, SockMessage(SockMsgType.MEMORY_INFO, vm, 2, SockMemoryInfo(Op.DEL, (
            SocketRegion(Xgpa(0), 1 << 20, 0),
        )))),
        "device-add": (0, SockMessage(SockMsgType.DEVICE_INFO, vm, 3, SockDeviceInfo(
            DeviceInfo(Op.ADD, 1, 9, (vq,)), (12,), (13,),
        ))),
        "device-del": (0, SockMessage(SockMsgType.DEVICE_INFO, vm, 4, SockDeviceInfo(DeviceInfo(
            Op.DEL, 1, 9,
        )))),
        "feature-bits": (0, SockMessage(SockMsgType.FEATURE_BITS, vm, 5, FeatureBits(1, 9, 1 << 32))),
        "ack": (0x20, SockMessage(SockMsgType.DEVICE_INFO_ACK, vm, 3, SockAck(AckResult.ADD_DONE))),
        "ping": (0x20, SockMessage(SockMsgType.PING, vm, 6, Empty())),
    }  # fmt: skip
    seeds = {}
    for name, (mode, msg) in msgs.items():
        raw, fds = sock.encode(msg)
        seeds[name] = bytes([mode | len(fds)]) + raw
    return seeds


SOCK = Target(
    "sock",
    "server-socket decoders with real fds (vhostpci_driver/wire/sock.py)",
    fuzz_sock,
    sock_seeds,
    max_len=8192,
)
