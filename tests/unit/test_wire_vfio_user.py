"""vfio-user codec: round trips, the capability chain, hostile bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostpci_driver.errors import ProtocolError
from vhostpci_driver.spec import vfio as sv
from vhostpci_driver.wire import vfio_user as w


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
    caps = sv.VFIO_REGION_INFO_FLAG_CAPS if areas else 0
    assert (flags, index, rsize, offset, got) == (7 | caps, 2, size, 0x1000, tuple(areas))
    short = w.encode_region_info(32, 7, 2, size, 0x1000, areas=tuple(areas))
    assert len(short) == 32 and w.decode_region_info(short)[0] == argsz  # asks for more room...
    assert (
        not w.decode_region_info(short)[1] & sv.VFIO_REGION_INFO_FLAG_CAPS
    )  # ...and, as QEMU needs, no CAPS flag


def test_region_info_capability_chain_is_bounded() -> None:
    body = bytearray(w.encode_region_info(4096, 7, 2, 1 << 20, 0, areas=((0, 4096),)))
    w.CAP_HEADER.pack_into(body, 32, sv.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, 32)  # next points at itself
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


# -- GET_REGION_IO_FDS ---------------------------------------------------------------------

REGION = 0x8000


def test_region_io_fds_layout_matches_the_spec_tables() -> None:
    # vfio-user.rst: request/reply head argsz 0, flags 4, index 8, count 12; an ioeventfd
    # entry offset 0, size 8, fd_index 16, type 20, flags 24, padding 28, datamatch 32.
    assert (w.REGION_IO_FDS.size, w.SUB_REGION_IO_FD.size) == (16, 40)
    raw = w.SUB_REGION_IO_FD.pack(1, 2, 3, 4, 5, 6, 7)
    fields = ((0, 8), (8, 8), (16, 4), (20, 4), (24, 4), (28, 4), (32, 8))
    assert [int.from_bytes(raw[o : o + n], "little") for o, n in fields] == [1, 2, 3, 4, 5, 6, 7]


def test_region_io_fds_request_rules() -> None:
    assert w.decode_region_io_fds_request(w.encode_region_io_fds_request(4096, 0)) == (4096, 0)
    with pytest.raises(ProtocolError, match=r"GET_REGION_IO_FDS\.flags"):
        w.decode_region_io_fds_request(w.REGION_IO_FDS.pack(4096, 1, 0, 0))
    with pytest.raises(ProtocolError, match=r"GET_REGION_IO_FDS\.count"):
        w.decode_region_io_fds_request(w.REGION_IO_FDS.pack(4096, 0, 0, 3))
    with pytest.raises(ProtocolError, match=r"GET_REGION_IO_FDS\.argsz"):
        w.decode_region_io_fds_request(w.REGION_IO_FDS.pack(15, 0, 0, 0))
    with pytest.raises(ProtocolError, match="GET_REGION_IO_FDS"):
        w.decode_region_io_fds_request(w.encode_region_io_fds_request(4096, 0) + b"\0")


@st.composite
def _sub_regions(draw: st.DrawFn) -> tuple[tuple[w.SubRegionIoFd, ...], int]:
    """Valid sub-regions at distinct offsets (no two collide), and how many fds they use."""
    nfds = draw(st.integers(1, 8))
    offsets = draw(st.lists(st.integers(0, REGION // 8 - 1), unique=True, max_size=12))
    subs = []
    for slot in offsets:
        fd_index = draw(st.integers(0, nfds - 1))
        if draw(st.booleans()):
            size = draw(st.sampled_from(w.IOEVENTFD_SIZES))
            flags = draw(st.sampled_from([0, w.IOEVENTFD_FLAG_PIO, w.IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY]))
            data = 0
            if size and draw(st.booleans()):
                flags |= w.IOEVENTFD_FLAG_DATAMATCH
                data = draw(st.integers(0, (1 << (8 * size)) - 1))
            subs.append(w.SubRegionIoFd(slot * 8, size, fd_index, w.IO_FD_TYPE_IOEVENTFD, flags, data))
        else:
            size = draw(st.sampled_from([1, 2, 4, 8]))
            flags = draw(st.sampled_from([0, w.IOREGION_FLAG_PIO, w.IOREGION_FLAG_POSTED_WRITES]))
            data = draw(st.integers(0, (1 << 64) - 1))  # user_data: opaque
            subs.append(w.SubRegionIoFd(slot * 8, size, fd_index, w.IO_FD_TYPE_IOREGIONFD, flags, data))
    return tuple(subs), nfds


@given(_sub_regions(), st.integers(0, 8))
def test_region_io_fds_reply_round_trips(drawn: tuple[tuple[w.SubRegionIoFd, ...], int], index: int) -> None:
    subs, nfds = drawn
    argsz = w.MAX_IO_FDS_ARGSZ
    raw = w.encode_region_io_fds_reply(argsz, index, subs)
    need = len(raw)
    assert w.decode_region_io_fds_reply(raw, argsz=argsz, index=index, region_size=REGION, nfds=nfds) == (
        need,
        subs,
    )
    for s in subs:
        expect = s.data if s.type == w.IO_FD_TYPE_IOEVENTFD and s.flags & w.IOEVENTFD_FLAG_DATAMATCH else None
        assert s.datamatch == expect
    if subs:
        # vfio-user "Message sizes": too small a buffer gets the head alone, saying what to ask for.
        short = w.encode_region_io_fds_reply(need - 1, index, subs)
        assert len(short) == w.REGION_IO_FDS.size
        got = w.decode_region_io_fds_reply(short, argsz=need - 1, index=index, region_size=REGION, nfds=0)
        assert got == (need, ())


def _reply(*entries: tuple[int, ...], flags: int = 0, index: int = 0, argsz: int | None = None) -> bytes:
    body = b"".join(w.SUB_REGION_IO_FD.pack(*e) for e in entries)
    need = w.REGION_IO_FDS.size + len(body) if argsz is None else argsz
    return w.REGION_IO_FDS.pack(need, flags, index, len(entries)) + body


def _decode(raw: bytes, nfds: int = 2, argsz: int = 4096) -> tuple[int, tuple[w.SubRegionIoFd, ...]]:
    return w.decode_region_io_fds_reply(raw, argsz=argsz, index=0, region_size=REGION, nfds=nfds)


IOE, IOR, DM = w.IO_FD_TYPE_IOEVENTFD, w.IO_FD_TYPE_IOREGIONFD, w.IOEVENTFD_FLAG_DATAMATCH


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (_reply(flags=1), r"REGION_IO_FDS\.flags"),
        (_reply(index=3), r"REGION_IO_FDS\.index"),
        (w.REGION_IO_FDS.pack(16, 0, 0, w.MAX_SUB_REGIONS + 1), r"REGION_IO_FDS\.count"),
        (w.REGION_IO_FDS.pack(16, 0, 0, 2), r"REGION_IO_FDS\.argsz"),  # argsz too small for count
        (w.REGION_IO_FDS.pack(1 << 31, 0, 0, 1), r"REGION_IO_FDS\.argsz"),  # beyond any sane reply
        (_reply((0, 4, 0, IOE, 0, 0, 0))[:-8], r"REGION_IO_FDS\.argsz"),  # truncated array
        (_reply((0, 4, 0, IOE, 0, 0, 0)) + b"\0" * 8, r"REGION_IO_FDS\.argsz"),  # bytes past argsz
        (_reply((0, 4, 0, IOE, 0, 0, 0), (8, 4, 0, IOE, 0, 0, 0), argsz=16 + 81) + b"\0", r"whole number"),
        (_reply((0, 4, 2, IOE, 0, 0, 0)), r"sub_regions\[0\]\.fd_index"),
        (_reply((0, 4, 0, 7, 0, 0, 0)), r"sub_regions\[0\]\.type"),
        (_reply((0, 4, 0, IOE, 4, 0, 0)), r"sub_regions\[0\]\.flags"),  # KVM's DEASSIGN: not for a reply
        (_reply((0, 3, 0, IOE, 0, 0, 0)), r"sub_regions\[0\]\.size"),
        (_reply((0, 0, 0, IOE, DM, 0, 1)), r"sub_regions\[0\]\.datamatch"),  # KVM: datamatch needs a length
        (_reply((0, 2, 0, IOE, DM, 0, 0x10000)), r"sub_regions\[0\]\.datamatch"),  # wider than the write
        (_reply((0, 4, 0, IOR, 4, 0, 0)), r"sub_regions\[0\]\.flags"),
        (_reply((0, 0, 0, IOR, 0, 0, 0)), r"sub_regions\[0\]\.size"),  # size 0 needs POSTED_WRITES
        (_reply((REGION, 0, 0, IOE, 0, 0, 0)), r"sub_regions\[0\]\.offset"),
        (_reply((REGION - 2, 4, 0, IOE, 0, 0, 0)), r"sub_regions\[0\]\.offset"),
        (_reply(((1 << 64) - 4, 8, 0, IOE, 0, 0, 0)), r"sub_regions\[0\]\.offset"),  # wraps around
        (_reply((0, 4, 0, IOE, 0, 0, 0), (0, 4, 1, IOE, DM, 0, 1)), r"sub_regions\[1\]: collides"),
        (_reply((0, 4, 0, IOE, DM, 0, 1), (0, 4, 1, IOE, DM, 0, 1)), r"sub_regions\[1\]: collides"),
        (_reply((0, 4, 0, IOE, DM, 0, 1), (0, 0, 1, IOE, 0, 0, 0)), r"sub_regions\[1\]: collides"),
    ],
)
def test_hostile_region_io_fds_replies_name_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(ProtocolError, match=field):
        _decode(raw)


def test_region_io_fds_replies_that_kvm_would_accept() -> None:
    # Two datamatches at one offset, or one offset with two widths, do not collide (KVM agrees).
    ok = _reply(
        (0, 4, 0, IOE, DM, 0, 1), (0, 4, 1, IOE, DM, 0, 2), (8, 2, 0, IOE, 0, 0, 0), (8, 4, 1, IOE, 0, 0, 0)
    )
    assert len(_decode(ok)[1]) == 4
    # A wider stride than today's 40 bytes: the spec says not to rely on 40, so argsz decides.
    wide = w.REGION_IO_FDS.pack(16 + 2 * 48, 0, 0, 2)
    wide += w.SUB_REGION_IO_FD.pack(0, 4, 0, IOE, 0, 0, 0) + bytes(8)
    wide += w.SUB_REGION_IO_FD.pack(8, 4, 1, IOE, 0, 0, 0) + bytes(8)
    assert [s.offset for s in _decode(wide)[1]] == [0, 8]
    assert _decode(_reply(), nfds=0) == (16, ())  # none offered: no fd needed either
    # A short buffer: the head alone (no array) with the argsz to ask for.
    assert _decode(w.REGION_IO_FDS.pack(96, 0, 0, 2), nfds=0, argsz=16) == (96, ())
    with pytest.raises(ProtocolError, match="argsz"):  # ...and nothing else with it
        _decode(w.REGION_IO_FDS.pack(96, 0, 0, 2) + bytes(40), nfds=0, argsz=16)


@settings(max_examples=500)
@given(st.binary(max_size=300), st.integers(0, 4), st.integers(16, 1 << 16))
def test_random_region_io_fds_replies_only_raise_protocol_error(raw: bytes, nfds: int, argsz: int) -> None:
    try:
        _decode(raw, nfds=nfds, argsz=argsz)
    except ProtocolError:
        pass
    try:
        w.decode_region_io_fds_request(raw)
    except ProtocolError:
        pass
