"""vhost-user messages (QEMU ``docs/interop/vhost-user.rst``), as a back end receives and answers them.

Every message is a 12-byte header (``request``, ``flags``, ``size``) and
``size`` payload bytes; fds ride as ``SCM_RIGHTS`` with the header. The
front-end (QEMU) sends requests; the back end (our front door) sends replies
with the REPLY flag, repeating the request. This module is pure: it decodes
and validates what a peer sent and encodes what we answer. Decoders raise only
:class:`~vhostpci_driver.errors.ProtocolError` naming the field.

fd ownership is :mod:`vhostpci_driver.wire.sock`'s: :func:`decode_body` takes
the received fds; on success they belong to the returned message, on error the
*caller* still owns them and closes them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from vhostpci_driver.errors import FailReason, ProtocolError
from vhostpci_driver.wire.layout import WireStruct, check_exact, check_reserved

#: vhost-user's structures, kept apart from our own contract's (docs/protocol.md lists ours).
REGISTRY: dict[str, WireStruct] = {}

HEADER = WireStruct("VhostUserHeader", [("request", "I"), ("flags", "I"), ("size", "I")], REGISTRY)
U64 = WireStruct("u64", [("u64", "Q")], REGISTRY)
VRING_STATE = WireStruct("vhost_vring_state", [("index", "I"), ("num", "I")], REGISTRY)
VRING_ADDR = WireStruct(
    "vhost_vring_addr",
    [
        ("index", "I"),
        ("flags", "I"),
        ("desc_user_addr", "Q"),
        ("used_user_addr", "Q"),
        ("avail_user_addr", "Q"),
        ("log_guest_addr", "Q"),
    ],
    REGISTRY,
)
MEMORY = WireStruct("VhostUserMemory", [("nregions", "I"), ("padding", "I")], REGISTRY)
MEMORY_REGION = WireStruct(
    "VhostUserMemoryRegion",
    [("guest_phys_addr", "Q"), ("memory_size", "Q"), ("userspace_addr", "Q"), ("mmap_offset", "Q")],
    REGISTRY,
)

VERSION = 0x1
VERSION_MASK = 0x3
REPLY = 0x1 << 2
NEED_REPLY = 0x1 << 3
#: VHOST_MEMORY_BASELINE_NREGIONS: a SET_MEM_TABLE carries at most 8 regions (and 8 fds).
MAX_REGIONS = 8
MAX_FDS = MAX_REGIONS
#: Bigger than every request we accept (SET_MEM_TABLE: 8 + 8 * 32) and every one QEMU sends a
#: back end that offered what we offer; a header announcing more is refused before it is read.
MAX_PAYLOAD = 4096
#: SET_VRING_KICK/CALL/ERR: the ring index in bits 0-7, "no fd" in bit 8 (vhost-user.rst).
VRING_IDX_MASK = 0xFF
VRING_NOFD = 0x1 << 8
#: vhost_vring_addr.flags bit 0 (VHOST_VRING_F_LOG): log used-ring writes; we offer no logging.
VRING_F_LOG = 0x1
U64_END = 1 << 64


class Request(enum.IntEnum):
    """Front-end requests (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntEnum):
    """``VHOST_USER_PROTOCOL_F_*`` bit numbers (the ones we name)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CONFIG = 9
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


#: VHOST_USER_F_PROTOCOL_FEATURES: a device-feature bit that only means "protocol features exist".
F_PROTOCOL_FEATURES = 30

#: Requests we serve; anything else is refused (the connection closes, the log says which).
SUPPORTED = frozenset(
    {
        Request.GET_FEATURES,
        Request.SET_FEATURES,
        Request.SET_OWNER,
        Request.RESET_OWNER,
        Request.SET_MEM_TABLE,
        Request.SET_VRING_NUM,
        Request.SET_VRING_ADDR,
        Request.SET_VRING_BASE,
        Request.GET_VRING_BASE,
        Request.SET_VRING_KICK,
        Request.SET_VRING_CALL,
        Request.SET_VRING_ERR,
        Request.GET_PROTOCOL_FEATURES,
        Request.SET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.SET_VRING_ENABLE,
    }
)
#: Requests whose answer is a message of their own (REPLY_ACK adds nothing to them).
ANSWERED = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
    }
)


@dataclass(frozen=True)
class Header:
    """A decoded header; ``request`` is kept as a number so an unknown one can be named in the log."""

    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY)

    def name(self) -> str:
        try:
            return f"VHOST_USER_{Request(self.request).name}"
        except ValueError:
            return f"request {self.request}"


@dataclass(frozen=True)
class Region:
    """One SET_MEM_TABLE region: ``memory_size`` bytes of ``fd`` at ``mmap_offset``."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    fd: int = field(default=-1, compare=False)


@dataclass(frozen=True)
class MemTable:
    regions: tuple[Region, ...]


@dataclass(frozen=True)
class VringState:
    index: int
    num: int


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR: ``fd`` None when the front-end set the no-fd flag."""

    index: int
    fd: int | None = field(compare=False)


@dataclass(frozen=True)
class U64Value:
    value: int


@dataclass(frozen=True)
class NoPayload:
    pass


Body = MemTable | VringState | VringAddr | VringFile | U64Value | NoPayload


@dataclass(frozen=True)
class Message:
    """One decoded front-end request."""

    header: Header
    body: Body

    @property
    def request(self) -> Request:
        return Request(self.header.request)

    def fds(self) -> list[int]:
        b = self.body
        if isinstance(b, MemTable):
            return [r.fd for r in b.regions]
        if isinstance(b, VringFile) and b.fd is not None:
            return [b.fd]
        return []


def decode_header(buf: bytes | bytearray | memoryview) -> Header:
    """Check a 12-byte header: version 1, a request (not a reply), a payload we would read."""
    request, flags, size = HEADER.unpack_from(buf, 0, "VhostUserHeader")
    hdr = Header(request, flags, size)
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError("VhostUserHeader.flags", f"version {flags & VERSION_MASK} is not {VERSION}")
    if flags & REPLY:
        raise ProtocolError(
            "VhostUserHeader.flags", f"{hdr.name()} has the reply flag: a front-end sends requests"
        )
    if flags & ~(VERSION_MASK | REPLY | NEED_REPLY):
        raise ProtocolError("VhostUserHeader.flags", f"unknown flag bits {flags:#x}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(
            "VhostUserHeader.size",
            f"{hdr.name()} announces {size} bytes, over {MAX_PAYLOAD}",
            FailReason.LIMIT,
        )
    return hdr


def _expect_fds(fds: list[int], n: int, what: str) -> None:
    if len(fds) != n:
        raise ProtocolError(f"{what}.fds", f"carries {len(fds)} fds, needs {n}")


def _mem_table(payload: memoryview, fds: list[int]) -> MemTable:
    what = "SET_MEM_TABLE"
    nregions, padding = MEMORY.unpack_from(payload, 0, what)
    check_reserved(padding, f"{what}.padding")
    if not 1 <= nregions <= MAX_REGIONS:
        raise ProtocolError(f"{what}.nregions", f"{nregions} not in 1..{MAX_REGIONS}", FailReason.LIMIT)
    check_exact(len(payload), MEMORY.size + nregions * MEMORY_REGION.size, f"{what}.nregions")
    _expect_fds(fds, nregions, what)
    regions = []
    for i in range(nregions):
        f = f"{what}.regions[{i}]"
        gpa, size, uva, moff = MEMORY_REGION.unpack_from(payload, MEMORY.size + i * MEMORY_REGION.size, f)
        if size == 0:
            raise ProtocolError(f"{f}.memory_size", "must not be 0")
        for name, base in (("guest_phys_addr", gpa), ("userspace_addr", uva), ("mmap_offset", moff)):
            if base + size > U64_END:
                raise ProtocolError(f"{f}.{name}", f"{base:#x} + {size:#x} wraps past 2**64")
        regions.append(Region(gpa, size, uva, moff, fds[i]))
    return MemTable(tuple(regions))


def decode_body(hdr: Header, payload: bytes | bytearray | memoryview, fds: list[int]) -> Message:
    """Decode the payload of a supported request; an unsupported one is a ProtocolError naming it."""
    view = memoryview(payload)
    check_exact(len(view), hdr.size, "VhostUserHeader.size")
    try:
        req = Request(hdr.request)
    except ValueError:
        raise ProtocolError("VhostUserHeader.request", f"unknown request {hdr.request}") from None
    if req not in SUPPORTED:
        raise ProtocolError("VhostUserHeader.request", f"{hdr.name()} is not supported by this back end")
    what = req.name
    body: Body
    if req == Request.SET_MEM_TABLE:
        body = _mem_table(view, fds)
    elif req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        check_exact(len(view), U64.size, what)
        (value,) = U64.unpack_from(view, 0, what)
        if value & ~(VRING_IDX_MASK | VRING_NOFD):
            raise ProtocolError(f"{what}.u64", f"unknown bits in {value:#x}")
        nofd = bool(value & VRING_NOFD)
        _expect_fds(fds, 0 if nofd else 1, what)
        body = VringFile(value & VRING_IDX_MASK, None if nofd else fds[0])
    else:
        _expect_fds(fds, 0, what)
        if req in (Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES):
            check_exact(len(view), U64.size, what)
            body = U64Value(U64.unpack_from(view, 0, what)[0])
        elif req in (
            Request.SET_VRING_NUM,
            Request.SET_VRING_BASE,
            Request.GET_VRING_BASE,
            Request.SET_VRING_ENABLE,
        ):
            check_exact(len(view), VRING_STATE.size, what)
            body = VringState(*VRING_STATE.unpack_from(view, 0, what))
        elif req == Request.SET_VRING_ADDR:
            check_exact(len(view), VRING_ADDR.size, what)
            body = VringAddr(*VRING_ADDR.unpack_from(view, 0, what))
        else:
            # GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER, RESET_OWNER: no payload.
            # (QEMU's GET_* send none; a u64 of slack is what some front-ends add: refuse it too.)
            check_exact(len(view), 0, what)
            body = NoPayload()
    return Message(hdr, body)


def _reply(request: Request, payload: bytes) -> bytes:
    return HEADER.pack(request, VERSION | REPLY, len(payload)) + payload


def reply_u64(request: Request, value: int) -> bytes:
    """A reply carrying a u64: GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, and REPLY_ACK's status."""
    return _reply(request, U64.pack(value))


def reply_ack(request: Request, ok: bool) -> bytes:
    """REPLY_ACK (vhost-user.rst): 0 for success, non-zero for failure."""
    return reply_u64(request, 0 if ok else 1)


def reply_vring_state(request: Request, index: int, num: int) -> bytes:
    """GET_VRING_BASE's answer: the ring's index and its last avail index."""
    return _reply(request, VRING_STATE.pack(index, num))


# -- the front-end side, for test peers that play QEMU (never used by the back end) --


def encode_request(request: Request | int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    flags = VERSION | (NEED_REPLY if need_reply else 0)
    return HEADER.pack(int(request), flags, len(payload)) + payload


def mem_table_payload(regions: list[Region]) -> bytes:
    return MEMORY.pack(len(regions), 0) + b"".join(
        MEMORY_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset) for r in regions
    )


def decode_reply(buf: bytes | bytearray | memoryview, request: Request) -> bytes:
    """Check a back end's reply header as QEMU does (flags exactly REPLY | VERSION, same request)."""
    req, flags, size = HEADER.unpack_from(buf, 0, "reply header")
    if flags != REPLY | VERSION:
        raise ProtocolError("reply header.flags", f"{flags:#x} is not {REPLY | VERSION:#x}")
    if req != request:
        raise ProtocolError("reply header.request", f"{req} answers {int(request)}")
    payload = bytes(buf[HEADER.size :])
    check_exact(len(payload), size, "reply header.size")
    return payload
