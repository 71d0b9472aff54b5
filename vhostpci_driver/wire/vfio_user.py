"""vfio-user messages (QEMU ``docs/interop/vfio-user.rst``), shared by our client and our server.

Every message is a 16-byte header (host byte order: little-endian here) and a
command-specific body; fds travel as ``SCM_RIGHTS`` with the header. Bodies are
the VFIO ioctl structures they are named after. Decoders validate sizes and
fields and raise only :class:`ProtocolError`, naming the field.

Layouts follow the specification; QEMU's own ``DMA_READ``/``DMA_WRITE`` differ
from it (see shared notes) and we never send those to QEMU.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass

from vhostpci_driver.errors import ProtocolError
from vhostpci_driver.spec.vfio import VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS

HEADER = struct.Struct("<HHIII")  # msg_id, command, size, flags, error
HEADER_SIZE = HEADER.size
MAX_MESSAGE = (1 << 20) + 64  # max_data_xfer_size plus headers
# The capabilities nest three deep; json-c (libvfio-user's parser) stops at 32 by default.
# Bounded, a decoded document also re-encodes without meeting the recursion limit.
MAX_JSON_DEPTH = 32

TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
TYPE_MASK = 0xF
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20

DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, offset (in fd), address (iova), size
DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, address, size
DEVICE_INFO = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs
REGION_INFO = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
CAP_HEADER = struct.Struct("<HHI")  # id, version, next
SPARSE_HEAD = struct.Struct("<II")  # nr_areas, reserved
SPARSE_AREA = struct.Struct("<QQ")  # offset, size
IRQ_INFO = struct.Struct("<IIII")  # argsz, flags, index, count
IRQ_SET = struct.Struct("<IIIII")  # argsz, flags, index, start, count
REGION_RW = struct.Struct("<QII")  # offset, region, count
DMA_RW = struct.Struct("<QQ")  # address, count (spec layout)
VERSION = struct.Struct("<HH")  # major, minor
REGION_IO_FDS = struct.Struct("<IIII")  # argsz, flags, index, count (request and reply head)
SUB_REGION_IO_FD = struct.Struct("<QQIIIIQ")  # offset, size, fd_index, type, flags, padding, datamatch

# GET_REGION_IO_FDS sub-region types, and their flags: KVM's (include/uapi/linux/kvm.h).
IO_FD_TYPE_IOEVENTFD = 0
IO_FD_TYPE_IOREGIONFD = 1
IOEVENTFD_FLAG_DATAMATCH = 1 << 0  # KVM_IOEVENTFD_FLAG_DATAMATCH
IOEVENTFD_FLAG_PIO = 1 << 1  # KVM_IOEVENTFD_FLAG_PIO
IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY = 1 << 3  # KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY (bit 2 is DEASSIGN)
IOEVENTFD_FLAGS = IOEVENTFD_FLAG_DATAMATCH | IOEVENTFD_FLAG_PIO | IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY
IOREGION_FLAG_PIO = 1 << 0  # KVM_IOREGION_PIO
IOREGION_FLAG_POSTED_WRITES = 1 << 1  # KVM_IOREGION_POSTED_WRITES
IOREGION_FLAGS = IOREGION_FLAG_PIO | IOREGION_FLAG_POSTED_WRITES
IOEVENTFD_SIZES = (0, 1, 2, 4, 8)  # KVM_IOEVENTFD: len 0 (any access) or an access width
MAX_SUB_REGIONS = 1024
MAX_IO_FDS_ARGSZ = REGION_IO_FDS.size + MAX_SUB_REGIONS * SUB_REGION_IO_FD.size


class Command(enum.IntEnum):
    """``vfio_user_command``."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16


@dataclass(frozen=True)
class Header:
    msg_id: int
    command: int
    size: int
    flags: int
    error: int = 0

    @property
    def is_reply(self) -> bool:
        return self.flags & TYPE_MASK == TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)


def decode_header(raw: bytes, max_size: int = MAX_MESSAGE) -> Header:
    """A header, checked for a sane size and type."""
    if len(raw) < HEADER_SIZE:
        raise ProtocolError("vfio-user header", f"{len(raw)} bytes, needs {HEADER_SIZE}")
    msg_id, command, size, flags, error = HEADER.unpack_from(raw, 0)
    if size < HEADER_SIZE or size > max_size:
        raise ProtocolError("vfio-user header.size", f"{size} not in {HEADER_SIZE}..{max_size}")
    if flags & TYPE_MASK not in (TYPE_COMMAND, TYPE_REPLY):
        raise ProtocolError("vfio-user header.flags", f"unknown message type {flags & TYPE_MASK}")
    return Header(msg_id, command, size, flags, error)


def encode(
    msg_id: int, command: int, body: bytes = b"", *, reply: bool = False, flags: int = 0, error: int = 0
) -> bytes:
    """Header plus body."""
    f = (TYPE_REPLY if reply else TYPE_COMMAND) | flags | (FLAG_ERROR if error else 0)
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(body), f, error) + body


def unpack(st: struct.Struct, body: bytes, what: str, *, exact: bool = False) -> tuple[int, ...]:
    """Unpack a fixed structure at the start of ``body``; short (or, with ``exact``, long) is an error."""
    if len(body) < st.size or (exact and len(body) != st.size):
        raise ProtocolError(what, f"{len(body)} bytes, needs {'exactly ' if exact else ''}{st.size}")
    return st.unpack_from(body, 0)


# -- VERSION ---------------------------------------------------------------------------


def encode_version(major: int, minor: int, caps: dict[str, object]) -> bytes:
    """A VERSION body: the JSON capabilities, NUL-terminated (QEMU checks the NUL)."""
    text = json.dumps({"capabilities": caps}, separators=(",", ":")).encode() + b"\0"
    return VERSION.pack(major, minor) + text


def _json_depth(doc: object) -> int:
    """How deeply arrays and objects nest in a decoded JSON value (iteratively: no recursion limit)."""
    deepest, todo = 0, [(doc, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            deepest = max(deepest, depth)
            todo += [(v, depth + 1) for v in value]
    return deepest


def decode_version(body: bytes) -> tuple[int, int, dict[str, object]]:
    major, minor = unpack(VERSION, body, "VERSION")
    text = body[VERSION.size :]
    if not text or text[-1] != 0:
        raise ProtocolError("VERSION.capabilities", "not NUL-terminated")
    try:
        doc = json.loads(text[:-1].decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError("VERSION.capabilities", f"not JSON: {e}") from None
    except RecursionError:
        # json recurses per nesting level: a 1 KiB message of "[" must be refused, not crash us.
        raise ProtocolError("VERSION.capabilities", "nested too deeply") from None
    if _json_depth(doc) > MAX_JSON_DEPTH:
        raise ProtocolError("VERSION.capabilities", f"nested deeper than {MAX_JSON_DEPTH}")
    if not isinstance(doc, dict):
        raise ProtocolError("VERSION.capabilities", "not a JSON object")
    caps = doc.get("capabilities", {})
    if not isinstance(caps, dict):
        raise ProtocolError("VERSION.capabilities", "'capabilities' is not an object")
    return major, minor, caps


# -- region info and its sparse-mmap capability -------------------------------------------


def encode_region_info(
    argsz: int, flags: int, index: int, size: int, offset: int, *, areas: tuple[tuple[int, int], ...]
) -> bytes:
    """A region info reply; with ``areas`` a sparse-mmap capability at offset 32 (when ``argsz`` allows).

    vfio.h: a too-small argsz gets the fixed part with ``argsz`` raised to what
    the whole reply needs, so the client can ask again.
    """
    caps = b""
    if areas:
        caps = CAP_HEADER.pack(VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, 0) + SPARSE_HEAD.pack(len(areas), 0)
        caps += b"".join(SPARSE_AREA.pack(o, s) for o, s in areas)
    need = REGION_INFO.size + len(caps)
    if caps and argsz >= need:
        return (
            REGION_INFO.pack(need, flags | VFIO_REGION_INFO_FLAG_CAPS, index, REGION_INFO.size, size, offset)
            + caps
        )
    # Without room for the chain, no CAPS flag either: QEMU refuses CAPS with cap_offset 0
    # (hw/vfio-user/device.c) and asks again with the argsz we return.
    return REGION_INFO.pack(need, flags & ~VFIO_REGION_INFO_FLAG_CAPS, index, 0, size, offset)


def decode_region_info(body: bytes) -> tuple[int, int, int, int, int, tuple[tuple[int, int], ...]]:
    """``(argsz, flags, index, size, offset, sparse areas)``, walking the capability chain bounded."""
    argsz, flags, index, cap_offset, size, offset = unpack(REGION_INFO, body, "REGION_INFO")
    areas: list[tuple[int, int]] = []
    seen = 0
    while cap_offset:
        seen += 1
        if seen > 16 or cap_offset < REGION_INFO.size or cap_offset + CAP_HEADER.size > len(body):
            raise ProtocolError("REGION_INFO.cap_offset", f"capability at {cap_offset} outside the reply")
        cap_id, _ver, nxt = CAP_HEADER.unpack_from(body, cap_offset)
        if cap_id == VFIO_REGION_INFO_CAP_SPARSE_MMAP:
            start = cap_offset + CAP_HEADER.size
            if start + SPARSE_HEAD.size > len(body):
                raise ProtocolError("REGION_INFO.sparse", "truncated sparse-mmap capability")
            (nr, _res) = SPARSE_HEAD.unpack_from(body, start)
            first = start + SPARSE_HEAD.size
            if nr > 4096 or first + nr * SPARSE_AREA.size > len(body):
                raise ProtocolError("REGION_INFO.sparse.nr_areas", f"{nr} areas do not fit the reply")
            for i in range(nr):
                o, s = SPARSE_AREA.unpack_from(body, first + i * SPARSE_AREA.size)
                if o + s > size:
                    raise ProtocolError(f"REGION_INFO.sparse.areas[{i}]", "area outside the region")
                areas.append((o, s))
        if nxt and nxt <= cap_offset:
            raise ProtocolError("REGION_INFO.cap.next", "capability chain goes backwards")
        cap_offset = nxt
    return argsz, flags, index, size, offset, tuple(areas)


# -- region I/O fds (GET_REGION_IO_FDS) ---------------------------------------------------


@dataclass(frozen=True)
class SubRegionIoFd:
    """One sub-region of a GET_REGION_IO_FDS reply (``vfio_user_sub_region_ioeventfd`` / ``_ioregionfd``).

    ``fd_index`` picks one of the fds that came with the reply (several
    sub-regions may share one); ``data`` is the datamatch of an ioeventfd or
    the user_data of an ioregionfd.
    """

    offset: int
    size: int
    fd_index: int
    type: int = IO_FD_TYPE_IOEVENTFD
    flags: int = 0
    data: int = 0

    @property
    def datamatch(self) -> int | None:
        """The one value a write must carry to go by this ioeventfd; None: any value."""
        if self.type == IO_FD_TYPE_IOEVENTFD and self.flags & IOEVENTFD_FLAG_DATAMATCH:
            return self.data
        return None


def encode_region_io_fds_request(argsz: int, index: int) -> bytes:
    """The request: the spec wants flags and count zero."""
    return REGION_IO_FDS.pack(argsz, 0, index, 0)


def decode_region_io_fds_request(body: bytes) -> tuple[int, int]:
    """``(argsz, index)``; argsz is the most reply payload the client takes."""
    argsz, flags, index, count = unpack(REGION_IO_FDS, body, "GET_REGION_IO_FDS", exact=True)
    if flags:
        raise ProtocolError("GET_REGION_IO_FDS.flags", f"{flags:#x}, must be 0")
    if count:
        raise ProtocolError("GET_REGION_IO_FDS.count", f"{count}, must be 0")
    if argsz < REGION_IO_FDS.size:
        raise ProtocolError("GET_REGION_IO_FDS.argsz", f"{argsz} < {REGION_IO_FDS.size}: no room for a reply")
    return argsz, index


def encode_region_io_fds_reply(argsz: int, index: int, subs: tuple[SubRegionIoFd, ...]) -> bytes:
    """The reply; when ``argsz`` is too small, the head alone with argsz raised to what the whole needs.

    vfio-user "Message sizes": a too-small reply says the size needed and the
    client asks again (libvfio-user sends no sub-region and no fd then).
    """
    need = REGION_IO_FDS.size + len(subs) * SUB_REGION_IO_FD.size
    head = REGION_IO_FDS.pack(need, 0, index, len(subs))
    if argsz < need:
        return head
    return head + b"".join(
        SUB_REGION_IO_FD.pack(s.offset, s.size, s.fd_index, s.type, s.flags, 0, s.data) for s in subs
    )


def decode_region_io_fds_reply(
    body: bytes, *, argsz: int, index: int, region_size: int, nfds: int
) -> tuple[int, tuple[SubRegionIoFd, ...]]:
    """``(argsz needed, sub-regions)`` of a reply to a request with ``argsz`` for region ``index``.

    The sub-regions are empty, and the needed argsz larger than ``argsz``, when
    the reply did not fit: ask again. Everything the server says is checked
    (the spec leaves it to the client, "for example, that the requested offset
    does not exceed the region's bounds"): the counts, the array stride, each
    fd index against the ``nfds`` fds that came with the reply, the types,
    flags and sizes KVM would accept, and no two ioeventfds that KVM would call
    colliding (so a write matches at most one).
    """
    need, flags, idx, count = unpack(REGION_IO_FDS, body, "REGION_IO_FDS")
    if flags:
        raise ProtocolError("REGION_IO_FDS.flags", f"{flags:#x}, must be 0")
    if idx != index:
        raise ProtocolError("REGION_IO_FDS.index", f"answers region {idx}, asked for {index}")
    if count > MAX_SUB_REGIONS:
        raise ProtocolError("REGION_IO_FDS.count", f"{count} sub-regions, at most {MAX_SUB_REGIONS}")
    if need < REGION_IO_FDS.size + count * SUB_REGION_IO_FD.size or need > MAX_IO_FDS_ARGSZ:
        raise ProtocolError("REGION_IO_FDS.argsz", f"{need} does not fit {count} sub-regions")
    if need > argsz:
        if len(body) != REGION_IO_FDS.size:
            raise ProtocolError("REGION_IO_FDS.argsz", f"{need} > {argsz}, yet {len(body)} bytes came")
        return need, ()
    if len(body) != need:
        raise ProtocolError("REGION_IO_FDS.argsz", f"says {need} bytes, the reply has {len(body)}")
    if not count:
        return need, ()
    # The array starts right after the head (the spec's table, libvfio-user); entries are 40
    # bytes today, but the spec says not to rely on it: the stride is what argsz gives.
    stride, rest = divmod(need - REGION_IO_FDS.size, count)
    if rest:
        raise ProtocolError("REGION_IO_FDS.argsz", f"{need} is not a whole number of {count} entries")
    subs: list[SubRegionIoFd] = []
    at_offset: dict[int, list[int]] = {}
    for i in range(count):
        offset, size, fd_index, kind, sflags, _pad, data = SUB_REGION_IO_FD.unpack_from(
            body, REGION_IO_FDS.size + i * stride
        )
        where = f"REGION_IO_FDS.sub_regions[{i}]"
        if fd_index >= nfds:
            raise ProtocolError(f"{where}.fd_index", f"{fd_index}, but the reply carried {nfds} fds")
        if kind == IO_FD_TYPE_IOEVENTFD:
            if sflags & ~IOEVENTFD_FLAGS:
                raise ProtocolError(f"{where}.flags", f"unknown ioeventfd flags {sflags:#x}")
            if size not in IOEVENTFD_SIZES:
                raise ProtocolError(f"{where}.size", f"{size}: an ioeventfd is 0, 1, 2, 4 or 8 bytes")
            if sflags & IOEVENTFD_FLAG_DATAMATCH and (size == 0 or data >> (8 * size)):
                # KVM refuses datamatch without a length; a value wider than the access never matches.
                raise ProtocolError(f"{where}.datamatch", f"{data:#x} cannot match a {size}-byte write")
        elif kind == IO_FD_TYPE_IOREGIONFD:
            if sflags & ~IOREGION_FLAGS:
                raise ProtocolError(f"{where}.flags", f"unknown ioregionfd flags {sflags:#x}")
            if size == 0 and not sflags & IOREGION_FLAG_POSTED_WRITES:
                raise ProtocolError(f"{where}.size", "0 needs KVM_IOREGION_POSTED_WRITES")
        else:
            raise ProtocolError(f"{where}.type", f"unknown type {kind}")
        if offset >= region_size or size > region_size - offset:
            raise ProtocolError(f"{where}.offset", f"{size} bytes at {offset:#x} outside the region")
        sub = SubRegionIoFd(offset, size, fd_index, kind, sflags, data)
        if kind == IO_FD_TYPE_IOEVENTFD:
            for j in at_offset.get(offset, []):
                if _ioeventfds_collide(subs[j], sub):
                    raise ProtocolError(where, f"collides with sub_regions[{j}] at {offset:#x}")
            at_offset.setdefault(offset, []).append(i)
        subs.append(sub)
    return need, tuple(subs)


def _ioeventfds_collide(a: SubRegionIoFd, b: SubRegionIoFd) -> bool:
    """KVM's ioeventfd_check_collision, for two at the same offset: a write could match both."""
    if a.size == 0 or b.size == 0:
        return True
    return a.size == b.size and (a.datamatch is None or b.datamatch is None or a.datamatch == b.datamatch)
