"""controlq/ackq codec: round trips, hostile bytes, and each validation rule."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostpci_driver.addr import WindowOffset, Xgpa
from vhostpci_driver.errors import FailReason, ProtocolError
from vhostpci_driver.wire import ctrl
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

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
U16 = st.integers(0, 2**16 - 1)
LIMITS = Limits(max_regions=64, max_virtqs=64, max_msg_len=1 << 20)


@st.composite
def regions(draw: st.DrawFn) -> MemoryRegion:
    size = draw(st.integers(1, 2**40))
    xgpa = draw(st.integers(0, 2**64 - size))
    woff = draw(st.integers(0, 2**64 - size))
    return MemoryRegion(Xgpa(xgpa), size, WindowOffset(woff))


@st.composite
def virtqs(draw: st.DrawFn, index: int) -> VirtqInfo:
    return VirtqInfo(
        index=index,
        size=1 << draw(st.integers(0, 15)),
        desc=Xgpa(draw(U64) & ~15),
        avail=Xgpa(draw(U64) & ~1),
        used=Xgpa(draw(U64) & ~3),
        last_avail_idx=draw(U16),
        last_used_idx=draw(U16),
        notify_slot=draw(U32),
    )


@st.composite
def device_infos(draw: st.DrawFn) -> DeviceInfo:
    op = draw(st.sampled_from(Op))
    n = 0 if op == Op.DEL else draw(st.integers(1, 8))
    indices = draw(st.lists(U16, min_size=n, max_size=n, unique=True))
    return DeviceInfo(op, draw(st.integers(1, 2**32 - 1)), draw(U64), tuple(draw(virtqs(i)) for i in indices))


bodies = st.one_of(
    st.builds(MemoryInfo, st.sampled_from(Op), st.lists(regions(), min_size=1, max_size=64).map(tuple)),
    device_infos(),
    st.builds(FeatureBits, st.integers(1, 2**32 - 1), U64, U64),
)


@given(st.integers(1, 2**64 - 1), bodies)
def test_control_messages_round_trip(request_id: int, body: ctrl.ControlBody) -> None:
    raw = ctrl.encode_message(request_id, body)
    hdr, decoded = ctrl.decode_message(raw, LIMITS)
    assert hdr.request_id == request_id
    assert hdr.len == len(raw) - ctrl.HEADER.size
    assert decoded == body


#: Every valid ACK: a DEVICE_INFO DEL_DONE counts the ring states it carries in ``value``.
acks = st.one_of(
    st.tuples(U16, st.sampled_from(AckResult), U32, U64)
    .filter(lambda t: not ctrl.states_allowed(t[0], t[1]))
    .map(lambda t: Ack(*t)),
    st.lists(
        st.builds(ctrl.VirtqState, U16, U16, U16), max_size=ctrl.MAX_STATES, unique_by=lambda v: v.index
    ).map(lambda s: Ack(ctrl.MsgType.DEVICE_INFO, AckResult.DEL_DONE, 0, len(s), tuple(s))),
)


@given(st.integers(1, 2**64 - 1), acks)
def test_acks_round_trip(request_id: int, ack: Ack) -> None:
    assert ctrl.decode_ack(ctrl.encode_ack(request_id, ack)) == (request_id, ack)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(raw: bytes) -> None:
    for decode in (lambda b: ctrl.decode_message(b, LIMITS), ctrl.decode_ack):
        with contextlib.suppress(ProtocolError):
            decode(raw)


@settings(max_examples=500)
@given(st.integers(1, 2**64 - 1), bodies, st.data())
def test_mutated_messages_only_raise_protocol_error(
    request_id: int, body: ctrl.ControlBody, data: st.DataObject
) -> None:
    raw = bytearray(ctrl.encode_message(request_id, body))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
        if kind == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del raw[data.draw(st.integers(0, len(raw))) :]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=40))
    try:
        ctrl.decode_message(bytes(raw), LIMITS)
    except ProtocolError as e:
        assert e.field  # always names a field
        assert isinstance(e.reason, FailReason)


def _mem(*regs: tuple[int, int, int], op: Op = Op.ADD) -> bytes:
    return ctrl.encode_message(
        1, MemoryInfo(op, tuple(MemoryRegion(Xgpa(a), b, WindowOffset(c)) for a, b, c in regs))
    )


def _raises(raw: bytes, field: str, reason: FailReason = FailReason.MALFORMED) -> None:
    with pytest.raises(ProtocolError) as ei:
        ctrl.decode_message(raw, LIMITS)
    assert ei.value.field == field, str(ei.value)
    assert ei.value.reason == reason


def test_short_header() -> None:
    _raises(b"\x01\x00\x01\x00", "header")


def test_bad_version_is_its_own_reason() -> None:
    raw = bytearray(_mem((0, 4096, 0)))
    raw[2] = 2
    _raises(bytes(raw), "header.version", FailReason.BAD_VERSION)


def test_unknown_type_is_its_own_reason() -> None:
    raw = bytearray(_mem((0, 4096, 0)))
    raw[0] = 9
    _raises(bytes(raw), "header.type", FailReason.UNKNOWN_TYPE)


def test_len_beyond_buffer() -> None:
    raw = _mem((0, 4096, 0))
    _raises(raw[:-1], "header.len")


def test_len_over_max_msg_len() -> None:
    raw = _mem(*[(i << 20, 4096, i << 20) for i in range(10)])
    with pytest.raises(ProtocolError, match="max_msg_len"):
        ctrl.decode_message(raw, Limits(max_msg_len=64))


def test_trailing_bytes_after_len_are_not_part_of_the_message() -> None:
    raw = _mem((0, 4096, 0))
    _hdr, body = ctrl.decode_message(raw + b"\xff" * 7, LIMITS)
    assert isinstance(body, MemoryInfo) and len(body.regions) == 1


def test_nregions_disagreeing_with_len() -> None:
    raw = bytearray(_mem((0, 4096, 0), (8192, 4096, 8192)))
    raw[16 + 4] = 3  # nregions = 3, payload holds 2
    _raises(bytes(raw), "MEMORY_INFO.nregions")


def test_nregions_zero_and_over_limit() -> None:
    raw = bytearray(_mem((0, 4096, 0)))
    raw[16 + 4] = 0
    _raises(bytes(raw), "MEMORY_INFO.nregions")
    with pytest.raises(ProtocolError) as ei:
        ctrl.decode_message(_mem((0, 4096, 0), (8192, 4096, 8192)), Limits(max_regions=1))
    assert ei.value.reason == FailReason.LIMIT


def test_region_zero_size_and_wrap() -> None:
    _raises(_mem((0, 0, 0)), "MEMORY_INFO.regions[0].size")
    _raises(_mem((2**64 - 4096, 8192, 0)), "MEMORY_INFO.regions[0].size")
    _raises(_mem((0, 8192, 2**64 - 4096)), "MEMORY_INFO.regions[0].size")


def test_unknown_op_and_reserved() -> None:
    raw = bytearray(_mem((0, 4096, 0)))
    raw[16] = 2
    _raises(bytes(raw), "MEMORY_INFO.ops")
    raw = bytearray(_mem((0, 4096, 0)))
    raw[18] = 1
    _raises(bytes(raw), "MEMORY_INFO.reserved")


def _dev(*vqs: VirtqInfo, op: Op = Op.ADD, dtype: int = 1) -> bytes:
    return ctrl.encode_message(5, DeviceInfo(op, dtype, 0x525400000001, vqs))


VQ = VirtqInfo(0, 256, Xgpa(0x1000), Xgpa(0x2000), Xgpa(0x3000))


def test_device_info_rules() -> None:
    _raises(_dev(VQ, dtype=0), "DEVICE_INFO.device_type")
    _raises(_dev(), "DEVICE_INFO.nvirtq")
    _raises(_dev(VQ, op=Op.DEL), "DEVICE_INFO.nvirtq")
    _raises(
        _dev(VirtqInfo(0, 255, Xgpa(0x1000), Xgpa(0x2000), Xgpa(0x3000))),
        "DEVICE_INFO.virtq[0].size",
        FailReason.BAD_RING,
    )
    _raises(
        _dev(VirtqInfo(0, 0, Xgpa(0x1000), Xgpa(0x2000), Xgpa(0x3000))),
        "DEVICE_INFO.virtq[0].size",
        FailReason.BAD_RING,
    )
    _raises(
        _dev(VirtqInfo(0, 256, Xgpa(0x1008), Xgpa(0x2000), Xgpa(0x3000))),
        "DEVICE_INFO.virtq[0].desc_xgpa",
        FailReason.BAD_RING,
    )
    _raises(
        _dev(VirtqInfo(0, 256, Xgpa(0x1000), Xgpa(0x2001), Xgpa(0x3000))),
        "DEVICE_INFO.virtq[0].avail_xgpa",
        FailReason.BAD_RING,
    )
    _raises(
        _dev(VirtqInfo(0, 256, Xgpa(0x1000), Xgpa(0x2000), Xgpa(0x3002))),
        "DEVICE_INFO.virtq[0].used_xgpa",
        FailReason.BAD_RING,
    )
    _raises(_dev(VQ, VQ), "DEVICE_INFO.virtq[1].index", FailReason.BAD_RING)
    with pytest.raises(ProtocolError) as ei:
        ctrl.decode_message(_dev(VQ, VirtqInfo(1, 256, Xgpa(0), Xgpa(0), Xgpa(0))), Limits(max_virtqs=1))
    assert ei.value.reason == FailReason.LIMIT


def test_virtq_reserved_field() -> None:
    raw = bytearray(_dev(VQ))
    raw[16 + ctrl.DEVICE_INFO.size + ctrl.VIRTQ.size - 1] = 1
    _raises(bytes(raw), "DEVICE_INFO.virtq[0].reserved")


def test_feature_bits_rules() -> None:
    raw = bytearray(ctrl.encode_message(3, FeatureBits(1, 7, 1 << 32)))
    raw[16 + 4] = 1
    _raises(bytes(raw), "FEATURE_BITS.reserved")
    _raises(ctrl.encode_message(3, FeatureBits(0, 7, 1)), "FEATURE_BITS.device_type")
    raw = ctrl.encode_message(3, FeatureBits(1, 7, 1))
    bad = bytearray(raw[:-1])
    bad[4] -= 1  # len consistent with the shorter buffer
    _raises(bytes(bad), "FEATURE_BITS")


def test_ack_rules() -> None:
    good = ctrl.encode_ack(9, Ack(1, AckResult.ADD_DONE))
    with pytest.raises(ProtocolError, match="ACK.result"):
        bad = bytearray(good)
        bad[16 + 2] = 4
        ctrl.decode_ack(bytes(bad))
    with pytest.raises(ProtocolError, match="is not ACK"):
        ctrl.decode_ack(_mem((0, 4096, 0)))
    with pytest.raises(ProtocolError, match="request ids start at 1"):
        ctrl.decode_ack(ctrl.encode_ack(0, Ack(1, AckResult.ADD_DONE)))
    with pytest.raises(ProtocolError, match="header.len"):
        ctrl.decode_ack(good[:-2])
    short = bytearray(good[:-2])
    short[4] -= 2
    with pytest.raises(ProtocolError, match="^ACK"):
        ctrl.decode_ack(bytes(short))


def test_header_can_be_read_for_the_id_of_an_undecodable_message() -> None:
    raw = bytearray(_mem((0, 4096, 0)))
    raw[0] = 0x42
    hdr = ctrl.decode_header(raw)
    assert hdr.request_id == 1 and hdr.type == 0x42
