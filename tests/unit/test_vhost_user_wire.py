"""The vhost-user codec: QEMU's layouts, and every field a peer controls refused by name."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostpci_driver.errors import ProtocolError
from vhostpci_driver.wire.layout import REGISTRY
from vhostpci_host import vhost_user_wire as vu
from vhostpci_host.vhost_user_wire import Request


def test_layouts_match_qemus_structs() -> None:
    # hw/virtio/vhost-user.c: VhostUserHeader is packed u32 x3; linux/vhost_types.h for the vring ones.
    sizes = {name: s.size for name, s in vu.REGISTRY.items()}
    assert sizes == {
        "VhostUserHeader": 12,
        "u64": 8,
        "vhost_vring_state": 8,
        "vhost_vring_addr": 40,
        "VhostUserMemory": 8,
        "VhostUserMemoryRegion": 32,
    }
    assert [o for o, _, _ in vu.VRING_ADDR.offsets()] == [0, 4, 8, 16, 24, 32]


def test_our_contracts_registry_does_not_list_vhost_user() -> None:
    assert not set(vu.REGISTRY) & set(REGISTRY)


@pytest.fixture
def fds() -> Iterator[list[int]]:
    made: list[int] = []
    yield made
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass


def decode(data: bytes, fds: list[int] | None = None) -> vu.Message:
    hdr = vu.decode_header(data)
    return vu.decode_body(hdr, data[vu.HEADER.size :], fds or [])


def test_mem_table_round_trip(fds: list[int]) -> None:
    fds += [os.eventfd(0), os.eventfd(0)]
    regions = [
        vu.Region(0, 1 << 20, 0x7F0000000000, 0, fds[0]),
        vu.Region(1 << 32, 1 << 20, 0x7F0000100000, 1 << 20, fds[1]),
    ]
    msg = decode(
        vu.encode_request(Request.SET_MEM_TABLE, vu.mem_table_payload(regions), need_reply=True), list(fds)
    )
    assert msg.header.need_reply and isinstance(msg.body, vu.MemTable)
    assert msg.body.regions == tuple(regions) and msg.fds() == fds


@pytest.mark.parametrize(
    ("data", "nfds", "field"),
    [
        (vu.HEADER.pack(1, 0x2, 0), 0, "VhostUserHeader.flags"),  # version 2
        (vu.HEADER.pack(1, 0x1 | vu.REPLY, 0), 0, "VhostUserHeader.flags"),  # a reply sent to us
        (vu.HEADER.pack(1, 0x1 | 0x40, 0), 0, "VhostUserHeader.flags"),  # unknown flag
        (vu.HEADER.pack(5, 0x1, 1 << 16), 0, "VhostUserHeader.size"),  # oversized
        (vu.HEADER.pack(99, 0x1, 0), 0, "VhostUserHeader.request"),  # unknown
        (vu.encode_request(Request.SET_LOG_BASE, bytes(16)), 0, "VhostUserHeader.request"),  # refused
        (vu.encode_request(Request.SET_OWNER), 1, "SET_OWNER.fds"),  # an extra fd
        (vu.encode_request(Request.SET_VRING_KICK, vu.U64.pack(0)), 0, "SET_VRING_KICK.fds"),  # missing
        (vu.encode_request(Request.SET_VRING_CALL, vu.U64.pack(0x1000)), 1, "SET_VRING_CALL.u64"),
        (vu.encode_request(Request.SET_VRING_NUM, vu.U64.pack(0)[:4]), 0, "SET_VRING_NUM"),  # short
        (vu.encode_request(Request.GET_FEATURES, bytes(8)), 0, "GET_FEATURES"),  # slack
        (vu.encode_request(Request.SET_MEM_TABLE, vu.MEMORY.pack(9, 0)), 0, "SET_MEM_TABLE.nregions"),
        (
            vu.encode_request(Request.SET_MEM_TABLE, vu.MEMORY.pack(1, 7) + bytes(32)),
            1,
            "SET_MEM_TABLE.padding",
        ),
        (vu.encode_request(Request.SET_MEM_TABLE, vu.MEMORY.pack(1, 0) + bytes(32)), 1, "memory_size"),
        (
            vu.encode_request(
                Request.SET_MEM_TABLE, vu.mem_table_payload([vu.Region((1 << 64) - 4096, 8192, 0, 0)])
            ),
            1,
            "guest_phys_addr",
        ),
    ],
)
def test_bad_requests_name_their_field(data: bytes, nfds: int, field: str, fds: list[int]) -> None:
    fds += [os.eventfd(0) for _ in range(nfds)]
    with pytest.raises(ProtocolError) as e:
        decode(data, list(fds))
    assert field in e.value.field


def test_no_fd_flag() -> None:
    msg = decode(vu.encode_request(Request.SET_VRING_CALL, vu.U64.pack(1 | vu.VRING_NOFD)))
    assert msg.body == vu.VringFile(1, None) and msg.fds() == []


def test_replies_are_what_qemu_accepts() -> None:
    raw = vu.reply_u64(Request.GET_FEATURES, 0x1234)
    assert vu.decode_reply(raw, Request.GET_FEATURES) == vu.U64.pack(0x1234)
    with pytest.raises(ProtocolError):
        vu.decode_reply(raw, Request.GET_PROTOCOL_FEATURES)
    assert vu.reply_ack(Request.SET_MEM_TABLE, True)[vu.HEADER.size :] == bytes(8)
    state = vu.decode_reply(vu.reply_vring_state(Request.GET_VRING_BASE, 1, 300), Request.GET_VRING_BASE)
    assert vu.VRING_STATE.unpack_from(state, 0, "s") == (1, 300)


@given(st.binary(min_size=12, max_size=80))
def test_decoding_anything_raises_only_protocol_errors(data: bytes) -> None:
    try:
        hdr = vu.decode_header(data)
        vu.decode_body(hdr, data[12 : 12 + hdr.size], [])
    except ProtocolError:
        pass
