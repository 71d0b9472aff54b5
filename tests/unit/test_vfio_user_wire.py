"""vfio-user codec: round trips, the capability chain, hostile bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostpci_driver.errors import ProtocolError
from vhostpci_driver.pci import vfio_user_wire as w


@given(st.integers(0, 0xFFFF), st.integers(1, 16), st.binary(max_size=64), st.booleans())
def test_header_round_trip(msg_id: int, cmd: int, body: bytes, reply: bool) -> None:
    raw = w.encode(msg_id, cmd, body, reply=reply)
    hdr = w.decode_header(raw)
    assert (hdr.msg_id, hdr.command, hdr.size, hdr.is_reply) == (msg_id, cmd, len(raw), reply)


def test_error_reply_is_the_header_alone() -> None:
    hdr = w.decode_header(w.encode(7, w.Command.DMA_MAP, reply=True, error=22))
    assert hdr.is_error and hdr.error == 22 and hdr.size == w.HEADER_SIZE


def test_header_size_and_type_checks() -> None:
    with pytest.raises(ProtocolError, match="size"):
        w.decode_header(w.HEADER.pack(1, 1, 8, 0, 0))
    with pytest.raises(ProtocolError, match="size"):
        w.decode_header(w.HEADER.pack(1, 1, 1 << 30, 0, 0))
    with pytest.raises(ProtocolError, match="type"):
        w.decode_header(w.HEADER.pack(1, 1, 16, 5, 0))
    with pytest.raises(ProtocolError):
        w.decode_header(b"\x00" * 15)


def test_version_round_trip_and_rules() -> None:
    body = w.encode_version(0, 0, {"max_msg_fds": 8})
    assert w.decode_version(body) == (0, 0, {"max_msg_fds": 8})
    with pytest.raises(ProtocolError, match="NUL"):
        w.decode_version(body[:-1])
    with pytest.raises(ProtocolError, match="JSON"):
        w.decode_version(b"\x00\x00\x00\x00{nope\x00")
    with pytest.raises(ProtocolError, match="object"):
        w.decode_version(b"\x00\x00\x00\x00[1]\x00")


@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 20)), max_size=8))
def test_region_info_with_sparse_areas_round_trips(areas: list[tuple[int, int]]) -> None:
    size = 1 << 22
    full = w.encode_region_info(1 << 12, 7, 2, size, 0x1000, areas=tuple(areas))
    argsz, flags, index, rsize, offset, got = w.decode_region_info(full)
    caps = w.REGION_FLAG_CAPS if areas else 0
    assert (flags, index, rsize, offset, got) == (7 | caps, 2, size, 0x1000, tuple(areas))
    short = w.encode_region_info(32, 7, 2, size, 0x1000, areas=tuple(areas))
    assert len(short) == 32 and w.decode_region_info(short)[0] == argsz  # asks for more room...
    assert not w.decode_region_info(short)[1] & w.REGION_FLAG_CAPS  # ...and, as QEMU needs, no CAPS flag


def test_region_info_capability_chain_is_bounded() -> None:
    body = bytearray(w.encode_region_info(4096, 7, 2, 1 << 20, 0, areas=((0, 4096),)))
    w.CAP_HEADER.pack_into(body, 32, w.CAP_SPARSE_MMAP, 1, 32)  # next points at itself
    with pytest.raises(ProtocolError, match="backwards"):
        w.decode_region_info(bytes(body))
    body = bytearray(w.encode_region_info(4096, 7, 2, 4096, 0, areas=((0, 8192),)))
    with pytest.raises(ProtocolError, match="outside the region"):
        w.decode_region_info(bytes(body))


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bodies_only_raise_protocol_error(raw: bytes) -> None:
    for fn in (w.decode_header, w.decode_version, w.decode_region_info):
        try:
            fn(raw)
        except ProtocolError:
            pass
