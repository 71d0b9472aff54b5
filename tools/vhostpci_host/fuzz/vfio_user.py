"""Fuzz target ``vfio-user``: the reference device server's message handling, in process.

Mode byte bit 7 clear: a client session. Each input gets a fresh
:class:`VfioUserServer` serving a fresh :class:`VhostPciDeviceModel` (so a
finding replays alone), a socketpair in place of the accepted connection, and
its messages handed to the server as its reader does (``decode_header``, then
``_handle`` with the body and real fds: memfds, eventfds, ``/dev/null``, a
pipe). No socket round trip for requests: the fuzzer drives the dispatch
code directly. The contract: every request is answered once (or not at all
when it says NO_REPLY), by a well-formed reply our own client decodes; the
server closes every fd a request brought; when the client goes, nothing the
session opened stays open. Anything escaping ``_handle`` is a finding: the
server promises an error reply for a bad request, not an exception.
Mode bit 1: each memfd the client sends carries an image of the client's
memory from the input (its rings and buffers); bit 2: the host has queued a
controlq message before the driver starts, so DRIVER_OK and the ackq kick
make the device walk rings the input wrote.

Mode byte bit 7 set: the client-side decoders (header, VERSION, region info
with its capability chain) on the rest of the input, which a hostile server
would write.
"""

from __future__ import annotations

import array
import atexit
import functools
import gc
import json
import os
import shutil
import socket
import struct
import tempfile

from vhostpci_driver.addr import WindowOffset, Xgpa
from vhostpci_driver.errors import ProtocolError
from vhostpci_driver.spec import vfio as sv
from vhostpci_driver.spec.vfio import VFIO_PCI_CONFIG_REGION_INDEX as CONFIG_REGION
from vhostpci_driver.spec.vfio import VFIO_PCI_MSIX_IRQ_INDEX as MSIX_IRQ
from vhostpci_driver.spec.virtio import Feature
from vhostpci_driver.virtqueue.driver import DriverQueue
from vhostpci_driver.wire import ctrl
from vhostpci_driver.wire import device as d
from vhostpci_driver.wire import vfio_user as w
from vhostpci_driver.wire.vfio_user import Command, Header
from vhostpci_host.device_model import VhostPciDeviceModel
from vhostpci_host.framing import FramedReader
from vhostpci_host.fuzz.contract import FuzzInput, InvariantError, Target, check, fd_is_open, open_fds
from vhostpci_host.vfio_user_server import MAX_MSG_FDS, VfioUserServer

MAX_MESSAGES = 32
CONTROL_MESSAGE = ctrl.MemoryInfo(ctrl.Op.ADD, (ctrl.MemoryRegion(Xgpa(1 << 32), 1 << 20, WindowOffset(0)),))
MEMFD_SIZE = 64 << 10
FD_MEMFD, FD_EVENTFD, FD_DEVNULL, FD_PIPE = range(4)
CLIENT_DECODERS = 0x80
HANDSHAKE = 0x01
IMAGES = 0x02
CONTROL = 0x04


@functools.cache
def _socket_path() -> str:
    # One directory per process, removed at exit (libFuzzer exits without running atexit
    # handlers: tools/fuzz points TMPDIR at a directory it removes itself).
    directory = tempfile.mkdtemp(prefix="vhostpci-fuzz-")
    atexit.register(shutil.rmtree, directory, True)
    return os.path.join(directory, "vfio-user.sock")


def _make_fd(kind: int) -> int:
    if kind == FD_MEMFD:
        fd = os.memfd_create("fuzz-dma", os.MFD_CLOEXEC)
        os.ftruncate(fd, MEMFD_SIZE)
        return fd
    if kind == FD_EVENTFD:
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    if kind == FD_DEVNULL:
        return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    # The read end of a pipe nobody writes: no client should send one, a hostile one may.
    r, wr = os.pipe()
    os.close(wr)
    return r


def _fds_for(spec: int, images: FuzzInput | None) -> list[int]:
    """``spec`` bits 0-1: how many fds (0-3); then two bits of kind per fd. With ``images``,
    each memfd starts with bytes from there (a u16 length, then the bytes)."""
    fds = [_make_fd(spec >> (2 + 2 * i) & 3) for i in range(spec & 3)]
    if images is not None:
        for i, fd in enumerate(fds):
            if spec >> (2 + 2 * i) & 3 == FD_MEMFD:
                os.pwrite(fd, images.take(images.u16() % (MEMFD_SIZE + 1)), 0)
    return fds


class _Session:
    """One client connection to a fresh server, with the client's end kept here."""

    def __init__(self, *, control: bool) -> None:
        self.fds_before = open_fds()
        self.device = VhostPciDeviceModel(window_size=1 << 24)
        if control:
            self.device.send_control(CONTROL_MESSAGE)  # waits for the driver's controlq buffers
        self.server = VfioUserServer(_socket_path(), self.device)
        self.device.attach_loop(self.server.add_reader, self.server.remove_reader)  # as server.py does
        conn, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.setblocking(False)
        self.peer.setblocking(False)
        # What VfioUserServer._accept does for a new client.
        srv = self.server
        srv.conn = conn
        srv._reader = FramedReader(conn, w.HEADER_SIZE, srv._body_len, MAX_MSG_FDS)
        srv.add_reader(conn, srv._readable)
        self.stream = bytearray()
        self.reply_fds: list[int] = []

    def request(self, hdr: Header, body: bytes, fds: list[int]) -> None:
        self.server._handle(hdr, body, fds)
        kept = [fd for fd in fds if fd_is_open(fd)]
        check(not kept, f"{_name(hdr.command)}: the server left request fds {kept} open")
        replies = self._replies()
        want = 0 if hdr.is_reply or hdr.no_reply else 1
        check(len(replies) == want, f"{_name(hdr.command)}: {len(replies)} replies, expected {want}")
        for rhdr, rbody in replies:
            check(
                rhdr.is_reply and rhdr.msg_id == hdr.msg_id and rhdr.command == hdr.command,
                f"{_name(hdr.command)}: the reply {rhdr} does not answer the request",
            )
            if rhdr.is_error:
                check(rhdr.error != 0 and not rbody, f"{_name(hdr.command)}: error reply {rhdr} is malformed")
            else:
                _check_reply(hdr, body, rbody)

    def _replies(self) -> list[tuple[Header, bytes]]:
        """Read what the server sent, letting it flush what the socket could not take at once."""
        while True:
            try:
                data, anc, _, _ = self.peer.recvmsg(1 << 20, socket.CMSG_SPACE(MAX_MSG_FDS * 4))
            except BlockingIOError:
                if not self.server._out or self.server.conn is None:
                    break
                self.server._flush()  # what the selector does when the socket drains
                continue
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self.reply_fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
            if not data:
                break
            self.stream += data
        out = []
        while self.stream:
            try:
                rhdr = w.decode_header(bytes(self.stream[: w.HEADER_SIZE]))
            except ProtocolError as e:
                raise InvariantError(f"the server sent a reply our client cannot frame: {e}") from None
            check(len(self.stream) >= rhdr.size, f"the server sent half a reply ({rhdr})")
            out.append((rhdr, bytes(self.stream[w.HEADER_SIZE : rhdr.size])))
            del self.stream[: rhdr.size]
        return out

    def close(self) -> None:
        """The client goes away: everything the session opened must be closed again."""
        self.server.close()
        self.peer.close()
        for fd in self.reply_fds:
            os.close(fd)
        left = open_fds() - self.fds_before
        if left:
            gc.collect()  # an mmap still viewed when unmapped is closed when its last view goes
            left = open_fds() - self.fds_before
        check(not left, f"fds {sorted(left)} still open after the client went away")


def _check_reply(hdr: Header, body: bytes, reply: bytes) -> None:
    """A successful reply must be one our own client decodes, of the size the request asked for."""
    try:
        if hdr.command == Command.VERSION:
            w.decode_version(reply)
        elif hdr.command == Command.DEVICE_GET_REGION_INFO:
            w.decode_region_info(reply)
        elif hdr.command == Command.DEVICE_GET_REGION_IO_FDS:
            argsz, index = w.decode_region_io_fds_request(body)
            w.decode_region_io_fds_reply(reply, argsz=argsz, index=index, region_size=1 << 64, nfds=253)
        elif hdr.command == Command.REGION_READ:
            count = w.REGION_RW.unpack_from(body)[2]
            check(len(reply) == w.REGION_RW.size + count, f"REGION_READ of {count} bytes sent {len(reply)}")
    except ProtocolError as e:
        raise InvariantError(f"the server's {_name(hdr.command)} reply does not decode: {e}") from None


def _name(cmd: int) -> str:
    return Command(cmd).name if cmd in Command._value2member_map_ else f"command {cmd}"


def fuzz_vfio_user(data: bytes) -> None:
    """Mode byte (bit 0: VERSION handshake first; bit 7: client decoders), then messages, each
    an fd spec byte, a 16-byte header and the body the header's size announces."""
    inp = FuzzInput(data)
    mode = inp.u8()
    if mode & CLIENT_DECODERS:
        _client_decoders(inp.rest())
        return
    session = _Session(control=bool(mode & CONTROL))
    try:
        if mode & HANDSHAKE:
            raw = w.encode(0, Command.VERSION, w.encode_version(0, 0, {}))
            session.request(w.decode_header(raw), raw[w.HEADER_SIZE :], [])
        for _ in range(MAX_MESSAGES):
            if inp.remaining() < 1 + w.HEADER_SIZE:
                break
            spec = inp.u8()
            try:
                hdr = w.decode_header(inp.take(w.HEADER_SIZE))
            except ProtocolError:
                break  # a framing error: the server drops the client, as close() below does
            body = inp.take(hdr.size - w.HEADER_SIZE)
            if len(body) < hdr.size - w.HEADER_SIZE:
                break  # the rest of the message never comes
            session.request(hdr, body, _fds_for(spec, inp if mode & IMAGES else None))
    finally:
        session.close()


def _client_decoders(buf: bytes) -> None:
    try:
        hdr = w.decode_header(buf)
        check(w.HEADER_SIZE <= hdr.size <= w.MAX_MESSAGE, f"accepted header size {hdr.size}")
    except ProtocolError:
        pass
    try:
        major, minor, caps = w.decode_version(buf)
    except ProtocolError:
        pass
    else:
        again = w.decode_version(w.encode_version(major, minor, caps))
        same = json.dumps(again[2], sort_keys=True) == json.dumps(caps, sort_keys=True)
        check(again[:2] == (major, minor) and same, "VERSION does not survive a re-encoding")
    # A hostile server's GET_REGION_IO_FDS reply: what our client accepts stays inside the region,
    # names only fds that came, and matches a write to at most one eventfd.
    region_size, nfds = 0x8000, 3
    try:
        _need, subs = w.decode_region_io_fds_reply(
            buf, argsz=len(buf), index=0, region_size=region_size, nfds=nfds
        )
    except ProtocolError:
        pass
    else:
        check(all(s.offset + s.size <= region_size for s in subs), "accepted an io fd outside its region")
        check(all(s.fd_index < nfds for s in subs), "accepted an fd index past the fds that came")
    try:
        _argsz, flags, index, size, offset, areas = w.decode_region_info(buf)
    except ProtocolError:
        return
    check(all(o + s <= size for o, s in areas), "accepted a sparse area outside its region")
    if len(areas) <= 4096:  # a re-encoding puts every area in one capability, which holds 4096
        again_ri = w.decode_region_info(
            w.encode_region_info(0xFFFFFFFF, flags, index, size, offset, areas=areas)
        )
        check(again_ri[2:] == (index, size, offset, areas), "region info does not survive a re-encoding")


# -- seeds ---------------------------------------------------------------------------------

IOVA = 0x100000
COMMON = {"dfs": 0, "gfs": 8, "gf": 12, "cvec": 16, "status": 20, "qsel": 22, "qsize": 24, "qvec": 26,
          "qen": 28, "qdesc": 32, "qdrv": 40, "qdev": 48}  # fmt: skip


def _msg(spec: int, msg_id: int, cmd: int, body: bytes = b"") -> bytes:
    return bytes([spec]) + w.encode(msg_id, cmd, body)


def _write(msg_id: int, index: int, offset: int, data: bytes) -> bytes:
    return _msg(0, msg_id, Command.REGION_WRITE, w.REGION_RW.pack(offset, index, len(data)) + data)


def _common(msg_id: int, field: str, value: int, width: int) -> bytes:
    return _write(msg_id, d.BAR_VIRTIO, COMMON[field], value.to_bytes(width, "little"))


def vfio_user_seeds() -> dict[str, bytes]:
    """QEMU's realize sequence, a driver bringing the device up, a storm of bad requests,
    and replies for the client decoders."""
    version = _msg(0, 1, Command.VERSION, w.encode_version(0, 0, {"max_msg_fds": 16, "pgsizes": 4096}))
    dma_map = _msg(1 | FD_MEMFD << 2, 2, Command.DMA_MAP, w.DMA_MAP.pack(32, 3, 0, IOVA, MEMFD_SIZE))
    eventfd1 = 1 | FD_EVENTFD << 2
    trigger = sv.VFIO_IRQ_SET_ACTION_TRIGGER
    irq = sv.VFIO_IRQ_SET_DATA_EVENTFD | trigger
    realize = b"".join([
        version, dma_map,
        _msg(0, 3, Command.DEVICE_GET_INFO, w.DEVICE_INFO.pack(16, 0, 0, 0)),
        _msg(0, 4, Command.DEVICE_GET_REGION_INFO, w.REGION_INFO.pack(32, 0, d.BAR_WINDOW, 0, 0, 0)),
        _msg(0, 5, Command.DEVICE_GET_REGION_INFO, w.REGION_INFO.pack(64, 0, CONFIG_REGION, 0, 0, 0)),
        _msg(0, 6, Command.DEVICE_GET_IRQ_INFO, w.IRQ_INFO.pack(16, 0, MSIX_IRQ, 0)),
        _msg(0, 7, Command.REGION_READ, w.REGION_RW.pack(0, CONFIG_REGION, 256)),
        _msg(0, 8, Command.DEVICE_SET_IRQS, w.IRQ_SET.pack(20, sv.VFIO_IRQ_SET_DATA_NONE | trigger, 0, 0, 0)),
        _msg(eventfd1, 9, Command.DEVICE_SET_IRQS, w.IRQ_SET.pack(20, irq, MSIX_IRQ, 0, 1)),
        _write(10, CONFIG_REGION, 0x42, struct.pack("<H", 0x8000)),
        _msg(0, 11, Command.DEVICE_RESET),
    ])  # fmt: skip
    features = 1 << Feature.VERSION_1
    intx = _msg(eventfd1, 3, Command.DEVICE_SET_IRQS, w.IRQ_SET.pack(20, irq, 0, 0, 1))
    # Our own client asks for BAR 0's notify registers as eventfds (argsz, flags, index, count).
    io_fds = _msg(0, 50, Command.DEVICE_GET_REGION_IO_FDS, struct.pack("<IIII", 4096, 0, d.BAR_VIRTIO, 0))
    bring_up = [version, dma_map, intx, io_fds]
    bring_up += [
        _common(4, "status", 3, 1), _common(5, "gfs", 1, 4), _common(6, "gf", features >> 32, 4),
        _common(7, "status", 11, 1), _common(8, "cvec", 0, 2),
    ]  # fmt: skip
    for q in (d.Queue.CONTROLQ, d.Queue.ACKQ):
        base = IOVA + 0x4000 * q
        bring_up += [
            _common(10 + 10 * q, "qsel", q, 2), _common(11 + 10 * q, "qsize", 8, 2),
            _common(12 + 10 * q, "qdesc", base, 8), _common(13 + 10 * q, "qdrv", base + 0x80, 8),
            _common(14 + 10 * q, "qdev", base + 0x100, 8), _common(15 + 10 * q, "qen", 1, 2),
        ]  # fmt: skip
    # A driver reads back what it set up (virtio 1.2, 4.1.4.3): every width the fields have.
    bring_up += [
        _msg(0, 30 + i, Command.REGION_READ, w.REGION_RW.pack(off, d.BAR_VIRTIO, count))
        for i, (off, count) in enumerate(
            [(4, 4), (18, 2), (20, 1), (21, 1), (24, 2), (30, 2), (32, 8), (36, 4)]
        )
    ]
    bring_up += [
        _common(40, "status", 15, 1),
        _write(41, d.BAR_VIRTIO, d.NOTIFY_OFFSET + d.NOTIFY_OFF_MULTIPLIER * d.Queue.ACKQ, bytes(2)),
        _msg(0, 42, Command.REGION_READ, w.REGION_RW.pack(d.ISR_OFFSET, d.BAR_VIRTIO, 1)),
        _msg(0, 43, Command.DMA_UNMAP, w.DMA_UNMAP.pack(24, 0, IOVA, MEMFD_SIZE)),
    ]
    storm = b"".join([
        version,
        _msg(0, 2, 99),
        _msg(0, 3, Command.REGION_READ, w.REGION_RW.pack(1 << 40, CONFIG_REGION, 4)),
        _msg(0, 4, Command.REGION_WRITE, w.REGION_RW.pack(0, 0, 64) + b"x"),
        _msg(0, 5, Command.DEVICE_GET_REGION_INFO, b"\0" * 3),
        _msg(0, 6, Command.DEVICE_SET_IRQS, w.IRQ_SET.pack(20, irq, MSIX_IRQ, 500, 1)),
        dma_map, dma_map,
        _msg(1 | FD_DEVNULL << 2, 9, Command.DEVICE_GET_INFO, w.DEVICE_INFO.pack(16, 0, 0, 0)),
        _msg(0, 10, Command.DMA_MAP, w.DMA_MAP.pack(32, 3, 0, 0x1000, 4096)),
        _msg(0, 11, Command.DMA_UNMAP, w.DMA_UNMAP.pack(24, sv.VFIO_DMA_UNMAP_FLAG_ALL, 0, 0)),
    ])  # fmt: skip
    region_info = w.encode_region_info(
        0xFFFF, 7, d.BAR_WINDOW, 1 << 24, 0, areas=((0, 1 << 20), (1 << 21, 4096))
    )
    reply = w.encode(1, Command.VERSION, w.encode_version(0, 0, {"max_msg_fds": 16}), reply=True)
    notify = d.NOTIFY_OFFSET + d.NOTIFY_OFF_MULTIPLIER * d.Queue.ACKQ
    subs = (
        w.SubRegionIoFd(notify, 2, 0, flags=w.IOEVENTFD_FLAG_DATAMATCH, data=d.Queue.ACKQ),
        w.SubRegionIoFd(d.DOORBELL_OFFSET, 4, 1),
    )
    io_fds = w.encode_region_io_fds_reply(4096, 0, subs)
    return {
        "realize": bytes([0]) + realize,
        "bring-up": bytes([0]) + b"".join(bring_up),
        "storm": bytes([0]) + storm,
        "controlq-ackq": bytes([IMAGES | CONTROL]) + _controlq_ackq(version, intx),
        "client-region-info": bytes([CLIENT_DECODERS]) + region_info,
        "client-version": bytes([CLIENT_DECODERS]) + reply[w.HEADER_SIZE :],
        "client-region-io-fds": bytes([CLIENT_DECODERS]) + io_fds,
    }


class _ClientMemory:
    """The client's memory at IOVA as a bytearray, for our own driver side to write rings into."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)

    def view(self, addr: int, length: int) -> memoryview:
        return memoryview(self.buf)[addr - IOVA : addr - IOVA + length]


def _controlq_ackq(version: bytes, intx: bytes) -> bytes:
    """A driver that posts a controlq buffer and an ACK for request 1, then starts the device:
    the host's queued message lands in the buffer, and the ACK is taken off the ackq."""
    mem = _ClientMemory(0x268)
    desc, avail, used, _ = DriverQueue.layout(8)
    rings = {q: (IOVA + 0x100 * q + desc, IOVA + 0x100 * q + avail, IOVA + 0x100 * q + used) for q in d.Queue}
    controlq, ackq = (DriverQueue(mem, 8, *rings[q]) for q in d.Queue)
    controlq.add([], [(IOVA + 0x200, 64)], "message")
    ack = ctrl.encode_ack(1, ctrl.Ack(ctrl.MsgType.MEMORY_INFO, ctrl.AckResult.ADD_DONE))
    mem.view(IOVA + 0x240, len(ack))[:] = ack
    ackq.add([(IOVA + 0x240, len(ack))], [], "ack")
    controlq.publish()
    ackq.publish()
    image = bytes(mem.buf)
    dma_map = _msg(1 | FD_MEMFD << 2, 2, Command.DMA_MAP, w.DMA_MAP.pack(32, 3, 0, IOVA, MEMFD_SIZE))
    msgs = [version, dma_map + struct.pack("<H", len(image)) + image, intx]
    msgs += [
        _common(4, "status", 3, 1),
        _common(5, "gfs", 1, 4),
        _common(6, "gf", 1, 4),
        _common(7, "status", 11, 1),
    ]
    for q, (qdesc, qavail, qused) in rings.items():
        msgs += [
            _common(10 + 10 * q, "qsel", q, 2), _common(11 + 10 * q, "qsize", 8, 2),
            _common(12 + 10 * q, "qdesc", qdesc, 8), _common(13 + 10 * q, "qdrv", qavail, 8),
            _common(14 + 10 * q, "qdev", qused, 8), _common(15 + 10 * q, "qen", 1, 2),
        ]  # fmt: skip
    msgs += [
        _common(40, "status", 15, 1),  # DRIVER_OK: the message goes into the controlq buffer
        _write(41, d.BAR_VIRTIO, d.NOTIFY_OFFSET + d.NOTIFY_OFF_MULTIPLIER * d.Queue.ACKQ, bytes(2)),
        _msg(0, 42, Command.REGION_READ, w.REGION_RW.pack(d.ISR_OFFSET, d.BAR_VIRTIO, 1)),
    ]
    return b"".join(msgs)


TARGET = Target(
    "vfio-user",
    "vfio-user decoders and the reference server's dispatch on a real device model",
    fuzz_vfio_user,
    vfio_user_seeds,
    max_len=16384,
)
