"""Server-socket codec: round trips with fd lists, hostile bytes, fd-count rules."""

from __future__ import annotations

import contextlib
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostpci_driver.addr import Xgpa
from vhostpci_driver.errors import FailReason, ProtocolError
from vhostpci_driver.wire import sock
from vhostpci_driver.wire.ctrl import AckResult, DeviceInfo, FeatureBits, Op, VirtqInfo
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

U64 = st.integers(0, 2**64 - 1)
UUIDS = st.uuids().filter(lambda u: u.int != 0)
FD = st.integers(3, 1000)


@st.composite
def memory_infos(draw: st.DrawFn) -> SockMemoryInfo:
    op = draw(st.sampled_from(Op))
    regs = []
    for _ in range(draw(st.integers(1, 16))):
        size = draw(st.integers(1, 2**40))
        regs.append(
            SocketRegion(
                Xgpa(draw(st.integers(0, 2**64 - size))),
                size,
                draw(st.integers(0, 2**64 - size)),
                draw(FD) if op == Op.ADD else -1,
            )
        )
    return SockMemoryInfo(op, tuple(regs))


@st.composite
def device_infos(draw: st.DrawFn) -> SockDeviceInfo:
    op = draw(st.sampled_from(Op))
    n = 0 if op == Op.DEL else draw(st.integers(1, 4))
    vqs = tuple(
        VirtqInfo(
            i,
            1 << draw(st.integers(0, 15)),
            Xgpa(draw(U64) & ~15),
            Xgpa(draw(U64) & ~1),
            Xgpa(draw(U64) & ~3),
            draw(st.integers(0, 65535)),
            draw(st.integers(0, 65535)),
        )
        for i in range(n)
    )
    kicks = tuple(draw(FD) for _ in range(n))
    calls = tuple(draw(FD) for _ in range(n))
    return SockDeviceInfo(DeviceInfo(op, draw(st.integers(1, 2**32 - 1)), draw(U64), vqs), kicks, calls)


@st.composite
def messages(draw: st.DrawFn) -> SockMessage:
    t = draw(st.sampled_from(SockMsgType))
    body: sock.SockBody
    if t == SockMsgType.MEMORY_INFO:
        body = draw(memory_infos())
    elif t == SockMsgType.DEVICE_INFO:
        body = draw(device_infos())
    elif t == SockMsgType.FEATURE_BITS:
        body = FeatureBits(draw(st.integers(1, 2**32 - 1)), draw(U64), draw(U64))
    elif t in sock.ACK_TYPES:
        body = SockAck(draw(st.sampled_from(AckResult)), draw(st.integers(0, 2**32 - 1)))
    else:
        body = Empty()
    return SockMessage(t, draw(UUIDS), draw(U64), body)


@given(messages())
def test_round_trip_with_fds(msg: SockMessage) -> None:
    raw, fds = sock.encode(msg)
    back = sock.decode(raw, fds)
    assert back == msg
    assert back.fds() == fds
    if isinstance(msg.body, SockDeviceInfo):
        assert back.body.kick_fds == msg.body.kick_fds  # type: ignore[union-attr]
        assert back.body.call_fds == msg.body.call_fds  # type: ignore[union-attr]


@settings(max_examples=500, deadline=None)  # no timing on a loaded machine
@given(st.binary(max_size=400), st.lists(FD, max_size=6))
def test_random_bytes_only_raise_protocol_error(raw: bytes, fds: list[int]) -> None:
    with contextlib.suppress(ProtocolError):
        sock.decode(raw, fds)


@settings(max_examples=500, deadline=None)
@given(messages(), st.data())
def test_mutations_only_raise_protocol_error(msg: SockMessage, data: st.DataObject) -> None:
    raw, fds = sock.encode(msg)
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        if buf and data.draw(st.booleans()):
            buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
        else:
            del buf[data.draw(st.integers(0, len(buf))) :]
    if data.draw(st.booleans()):
        fds = [*fds, 99] if data.draw(st.booleans()) else fds[:-1]
    try:
        sock.decode(bytes(buf), fds)
    except ProtocolError as e:
        assert e.field


U = uuid.UUID("12345678-1234-5678-1234-567812345678")


def _mem_msg(n: int) -> tuple[bytes, list[int]]:
    regs = tuple(SocketRegion(Xgpa(i << 30), 1 << 20, 0, 10 + i) for i in range(n))
    return sock.encode(SockMessage(SockMsgType.MEMORY_INFO, U, 1, SockMemoryInfo(Op.ADD, regs)))


def test_memory_add_needs_one_fd_per_region() -> None:
    raw, fds = _mem_msg(3)
    with pytest.raises(ProtocolError, match=r"MEMORY_INFO.fds: carries 2 fds, needs 3"):
        sock.decode(raw, fds[:2])
    with pytest.raises(ProtocolError, match=r"carries 4 fds"):
        sock.decode(raw, [*fds, 50])


def test_device_add_needs_kick_and_call_per_queue() -> None:
    vq = VirtqInfo(0, 256, Xgpa(0x1000), Xgpa(0x2000), Xgpa(0x3000))
    msg = SockMessage(
        SockMsgType.DEVICE_INFO, U, 2, SockDeviceInfo(DeviceInfo(Op.ADD, 1, 5, (vq,)), (7,), (8,))
    )
    raw, fds = sock.encode(msg)
    assert fds == [7, 8]
    with pytest.raises(ProtocolError, match="DEVICE_INFO.fds"):
        sock.decode(raw, [7])


def test_notify_slot_is_reserved_on_the_socket() -> None:
    vq = VirtqInfo(0, 256, Xgpa(0x1000), Xgpa(0x2000), Xgpa(0x3000))
    raw, fds = sock.encode(
        SockMessage(
            SockMsgType.DEVICE_INFO, U, 2, SockDeviceInfo(DeviceInfo(Op.ADD, 1, 5, (vq,)), (7,), (8,))
        )
    )
    bad = bytearray(raw)
    bad[sock.HEADER.size + 24 + 4] = 1
    with pytest.raises(ProtocolError, match=r"virtq\[0\].notify_slot"):
        sock.decode(bytes(bad), fds)


def test_messages_without_fds_refuse_fds() -> None:
    raw, _ = sock.encode(SockMessage(SockMsgType.PING, U, 3, Empty()))
    with pytest.raises(ProtocolError, match="PING.fds"):
        sock.decode(raw, [5])


def test_header_rules() -> None:
    raw, _ = sock.encode(SockMessage(SockMsgType.PONG, U, 3, Empty()))
    bad = bytearray(raw)
    bad[0] = 8
    with pytest.raises(ProtocolError) as ei:
        sock.decode(bytes(bad), [])
    assert ei.value.reason == FailReason.UNKNOWN_TYPE
    bad = bytearray(raw)
    bad[2] = 0
    with pytest.raises(ProtocolError) as ei:
        sock.decode(bytes(bad), [])
    assert ei.value.reason == FailReason.BAD_VERSION
    bad = bytearray(raw)
    bad[8:24] = bytes(16)
    with pytest.raises(ProtocolError, match="nil UUID"):
        sock.decode(bytes(bad), [])
    with pytest.raises(ProtocolError, match="msg_len"):
        sock.decode_header(sock.HEADER.pack(0, 1, 1 << 20, U.bytes, 1), SockLimits())


def test_region_limit_and_scm_max_fd() -> None:
    raw, fds = _mem_msg(5)
    with pytest.raises(ProtocolError) as ei:
        sock.decode(raw, fds, SockLimits(max_regions=4))
    assert ei.value.reason == FailReason.LIMIT
    with pytest.raises(ValueError):
        SockLimits(max_regions=300)
