"""The vfio-user backend: a PCI function served over a UNIX socket (no VM, no kernel driver).

This is how the toolkit attaches the reference vhost-pci device with no VM at
all, for the demo and the fast tests. Regions are mapped from the fds the
server gives; our DMA memory is shared with the server by memfd (``DMA_MAP``
with the fd); interrupts are eventfds handed over by ``DEVICE_SET_IRQS``.
Every request waits for its reply with a timeout: a dead server is a
:class:`TransportError`, never a hang.
"""

from __future__ import annotations

import errno
import gc
import mmap
import os
import socket
import struct

from vhostpci_driver.addr import Iova
from vhostpci_driver.errors import ProtocolError, TransportError
from vhostpci_driver.pci.function import IrqInfo, PciFunction, RegionInfo, SparseArea
from vhostpci_driver.spec import vfio as sv
from vhostpci_driver.spec.vfio import VFIO_PCI_CONFIG_REGION_INDEX
from vhostpci_driver.wire import vfio_user as w
from vhostpci_driver.wire.vfio_user import Command

DEVICE_FLAG_PCI = 2
REGION_READ, REGION_WRITE, REGION_MMAP = 1, 2, 4
IRQ_EVENTFD = 1
MAX_FDS_DEFAULT = 8
MAX_FDS_IN = 253  # SCM_MAX_FD: the most one message can bring, and what VERSION says we take
IO_FDS_ARGSZ = w.REGION_IO_FDS.size + 128 * w.SUB_REGION_IO_FD.size  # first guess; the reply says if short


class _PeerClosedError(TransportError):
    """The server closed the socket: the function is gone for good."""


#: send errors that mean the server closed its end
_PEER_CLOSED = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN})


def _recv_exact(sock: socket.socket, n: int) -> tuple[bytes, list[int]]:
    """Exactly ``n`` bytes (and the fds that came with them), or TransportError."""
    buf = bytearray()
    fds: list[int] = []
    while len(buf) < n:
        try:
            data, anc, flags, _ = sock.recvmsg(
                n - len(buf), socket.CMSG_SPACE(MAX_FDS_IN * 4), socket.MSG_CMSG_CLOEXEC
            )
        except TimeoutError:
            raise TransportError("no reply from the vfio-user server (timeout)", "vfio-user socket") from None
        except OSError as e:
            raise TransportError(f"socket error: {e}", "vfio-user socket") from None
        if not data:
            for fd in fds:
                os.close(fd)
            raise _PeerClosedError("the vfio-user server closed the connection", "vfio-user socket")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += list(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("vfio-user reply fds", f"more than the {MAX_FDS_IN} one message may carry")
        buf += data
    return bytes(buf), fds


class _RefusedError(TransportError):
    """The server answered with an error reply (``errno``): the connection itself is fine."""

    def __init__(self, message: str, register: str, errno_: int) -> None:
        super().__init__(message, register)
        self.errno = errno_


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class _Region:
    def __init__(self, info: RegionInfo, fd: int | None, fd_offset: int) -> None:
        self.info = info
        self.fd = fd
        self.fd_offset = fd_offset


class VfioUserFunction(PciFunction):
    """A :class:`PciFunction` over vfio-user."""

    @property
    def backend(self) -> str:
        return "vfio-user"

    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.address = f"vfio-user:{path}"
        self.path = path
        self._closed = False
        #: the server closed the socket (its host went away): nothing it held is there any more
        self._peer_gone = False
        self._next_id = 0
        self._regions: dict[int, _Region] = {}
        self._maps: list[mmap.mmap] = []
        self._dma: dict[int, int] = {}
        # GET_REGION_IO_FDS, asked per region at its first posted write: (offset, size) ->
        # [(datamatch bytes or None, eventfd)], size 0 meaning any (KVM ioeventfd semantics).
        self._io_fds: dict[int, dict[tuple[int, int], list[tuple[bytes | None, int]]]] = {}
        self._io_fds_owned: list[int] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            self._closed = True
            raise TransportError(f"cannot connect to {path}: {e.strerror or e}", "vfio-user socket") from None
        try:
            self._negotiate()
        except BaseException:
            self.close()
            raise

    def _negotiate(self) -> None:
        caps_out: dict[str, object] = {"max_msg_fds": MAX_FDS_IN, "max_data_xfer_size": 1 << 20}
        body, _ = self._request(Command.VERSION, w.encode_version(0, 0, caps_out))
        major, _minor, caps = w.decode_version(body)
        if major != 0:
            raise TransportError(f"server speaks vfio-user {major}.x", "VERSION")
        max_fds = caps.get("max_msg_fds", MAX_FDS_DEFAULT)
        self.max_fds = max_fds if isinstance(max_fds, int) and 0 < max_fds <= 253 else MAX_FDS_DEFAULT
        info, _ = self._request(Command.DEVICE_GET_INFO, w.DEVICE_INFO.pack(w.DEVICE_INFO.size, 0, 0, 0))
        _argsz, flags, self.num_regions, self.num_irqs = w.unpack(w.DEVICE_INFO, info, "DEVICE_GET_INFO")
        if not flags & DEVICE_FLAG_PCI:
            raise TransportError("the device is not a PCI device", "DEVICE_GET_INFO.flags")
        if self.num_regions <= VFIO_PCI_CONFIG_REGION_INDEX:
            raise TransportError(f"only {self.num_regions} regions: no config space", "DEVICE_GET_INFO")

    # -- messages -----------------------------------------------------------------

    def _request(
        self, cmd: Command, body: bytes = b"", fds: list[int] | None = None, *, no_reply: bool = False
    ) -> tuple[bytes, list[int]]:
        if self._closed:
            raise TransportError("function is closed", cmd.name)
        self._next_id = (self._next_id + 1) & 0xFFFF
        msg_id = self._next_id
        data = w.encode(msg_id, cmd, body, flags=w.FLAG_NO_REPLY if no_reply else 0)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        try:
            self.sock.sendmsg([data], anc)
        except OSError as e:
            self._peer_gone = self._peer_gone or e.errno in _PEER_CLOSED
            raise TransportError(f"send failed: {e}", cmd.name) from None
        if no_reply:
            return b"", []
        try:
            raw, fds_in = _recv_exact(self.sock, w.HEADER_SIZE)
        except _PeerClosedError:
            self._peer_gone = True
            raise
        try:
            hdr = w.decode_header(raw)
            if not hdr.is_reply or hdr.msg_id != msg_id or hdr.command != cmd:
                raise ProtocolError(
                    "vfio-user reply", f"reply {hdr.msg_id}/{hdr.command} to request {msg_id}/{cmd}"
                )
            rest, more = _recv_exact(self.sock, hdr.size - w.HEADER_SIZE)
        except BaseException:
            for fd in fds_in:
                os.close(fd)
            raise
        fds_in += more
        if hdr.is_error:
            for fd in fds_in:
                os.close(fd)
            err = hdr.error or errno.EIO
            raise _RefusedError(f"refused: {os.strerror(err)}", cmd.name, err)
        return rest, fds_in

    # -- config and regions ---------------------------------------------------------

    def config_read(self, offset: int, size: int) -> bytes:
        return self.region_read(VFIO_PCI_CONFIG_REGION_INDEX, offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        self.region_write(VFIO_PCI_CONFIG_REGION_INDEX, offset, data)

    def _region(self, index: int) -> _Region:
        r = self._regions.get(index)
        if r is None:
            r = self._query_region(index)
            self._regions[index] = r
        return r

    def _query_region(self, index: int) -> _Region:
        if not 0 <= index < self.num_regions:
            raise TransportError(f"no region {index} ({self.num_regions} regions)", "GET_REGION_INFO")
        argsz = w.REGION_INFO.size
        for _ in range(3):
            body, fds = self._request(
                Command.DEVICE_GET_REGION_INFO, w.REGION_INFO.pack(argsz, 0, index, 0, 0, 0)
            )
            try:
                need, flags, idx, size, offset, areas = w.decode_region_info(body)
            except ProtocolError:
                for fd in fds:
                    os.close(fd)
                raise
            if need > argsz and need <= 1 << 16:
                for fd in fds:
                    os.close(fd)
                argsz = need  # vfio.h: ask again with the size the reply needs
                continue
            if idx != index or len(fds) > 1:
                for fd in fds:
                    os.close(fd)
                raise TransportError(f"bad reply for region {index}", "GET_REGION_INFO")
            backing = None
            if fds:
                st = os.fstat(fds[0])
                backing = (st.st_dev, st.st_ino, offset)
            info = RegionInfo(
                index,
                size,
                bool(flags & REGION_READ),
                bool(flags & REGION_WRITE),
                bool(flags & REGION_MMAP) and bool(fds),
                tuple(SparseArea(o, s) for o, s in areas),
                backing,
            )
            return _Region(info, fds[0] if fds else None, offset)
        raise TransportError("region info argsz keeps growing", "GET_REGION_INFO")

    def region_info(self, index: int) -> RegionInfo:
        # Sparse areas change as the host adds memory: ask afresh each time (cheap, rare).
        old = self._regions.pop(index, None)
        if old is not None and old.fd is not None:
            os.close(old.fd)
        return self._region(index).info

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        body, _ = self._request(Command.REGION_READ, w.REGION_RW.pack(offset, index, size))
        off, idx, count = w.unpack(w.REGION_RW, body, "REGION_READ")
        data = body[w.REGION_RW.size :]
        if (off, idx, count) != (offset, index, size) or len(data) != size:
            raise TransportError(f"read of {size} at {offset:#x} answered with {len(data)}", "REGION_READ")
        return data

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._request(Command.REGION_WRITE, w.REGION_RW.pack(offset, index, len(data)) + data)

    def region_write_posted(self, index: int, offset: int, data: bytes) -> None:
        """An eventfd write where the server gave an ioeventfd for the register, else a NO_REPLY message.

        Either way nothing waits for the server. By message the server handles
        requests in order, so a later access sees this write; by ioeventfd it
        does not (as with KVM ioeventfds), which is why servers offer them only
        for registers whose writes are pure triggers (doorbells, queue notify).
        """
        table = self._io_fds.get(index)
        if table is None:
            table = self._load_io_fds(index)
        if table:
            # KVM ioeventfd matching: the same offset, the same size (or any, for size 0), and
            # with datamatch the same value; anything else still goes by message.
            for key in ((offset, len(data)), (offset, 0)):
                for match, fd in table.get(key, ()):
                    if match is None or match == data:
                        try:
                            os.eventfd_write(fd, 1)
                            return
                        except BlockingIOError:
                            break  # the counter is full (the server stops reading it): say it by message
                        except OSError as e:
                            raise TransportError(f"ioeventfd write failed: {e}", f"region {index}") from None
        self._request(Command.REGION_WRITE, w.REGION_RW.pack(offset, index, len(data)) + data, no_reply=True)

    def posted_targets_changed(self, index: int) -> None:
        """Drop region ``index``'s ioeventfds: the next posted write asks GET_REGION_IO_FDS again."""
        table = self._io_fds.pop(index, None)
        if not table:
            return
        gone = {fd for entries in table.values() for _, fd in entries}
        self._io_fds_owned = [fd for fd in self._io_fds_owned if fd not in gone]
        for fd in gone:
            os.close(fd)

    def ioeventfd_registers(self, index: int) -> list[tuple[int, int]]:
        """``(offset, size)`` of region ``index``'s registers written by eventfd (size 0: any width).

        Empty until the first posted write to the region, and when the server offers none.
        """
        return sorted(self._io_fds.get(index, {}))

    def _load_io_fds(self, index: int) -> dict[tuple[int, int], list[tuple[bytes | None, int]]]:
        """Ask which registers of region ``index`` are ioeventfds; keep the usable ones, close the rest.

        A server that refuses (ENOSYS: it predates the command; QEMU's own server
        code has no such command) or offers none leaves every write a message.
        Replies are checked against the region's size and the fds that came; a
        hostile one is a ProtocolError and leaves nothing open.
        """
        table: dict[tuple[int, int], list[tuple[bytes | None, int]]] = {}
        region_size = self._region(index).info.size
        argsz = IO_FDS_ARGSZ
        for _ in range(2):
            try:
                body, fds = self._request(
                    Command.DEVICE_GET_REGION_IO_FDS, w.encode_region_io_fds_request(argsz, index)
                )
            except _RefusedError:
                break
            try:
                need, subs = w.decode_region_io_fds_reply(
                    body, argsz=argsz, index=index, region_size=region_size, nfds=len(fds)
                )
                for i, fd in enumerate(fds):
                    # We write these from the hot path: a pipe or socket could block or take data.
                    if not _is_eventfd(fd):
                        raise ProtocolError(f"REGION_IO_FDS.fds[{i}]", "not an eventfd")
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            if need > argsz:
                for fd in fds:
                    os.close(fd)
                argsz = need  # vfio-user "Message sizes": ask again with the size the reply needs
                continue
            used: set[int] = set()
            for sub in subs:
                # ioregionfds and port I/O (or CCW) ioeventfds mean nothing to a PCI memory BAR
                # written from userspace: those registers stay messages.
                if sub.type != w.IO_FD_TYPE_IOEVENTFD or sub.flags & ~w.IOEVENTFD_FLAG_DATAMATCH:
                    continue
                dm = sub.datamatch
                match = None if dm is None else dm.to_bytes(sub.size, "little")
                table.setdefault((sub.offset, sub.size), []).append((match, fds[sub.fd_index]))
                used.add(sub.fd_index)
            for i, fd in enumerate(fds):
                if i in used:
                    os.set_blocking(fd, False)  # a full counter must not hang a doorbell
                    self._io_fds_owned.append(fd)
                else:
                    os.close(fd)
            break
        self._io_fds[index] = table
        return table

    def region_mmap(self, index: int, offset: int, size: int) -> mmap.mmap:
        r = self._region(index)
        if r.fd is None or not r.info.mmappable:
            raise TransportError("region is not mappable", f"region {index}")
        areas = r.info.sparse or (SparseArea(0, r.info.size),)
        if not any(a.offset <= offset and offset + size <= a.offset + a.size for a in areas):
            raise TransportError(
                f"{size:#x} bytes at {offset:#x} are not inside one mappable area", f"region {index}"
            )
        try:
            mm = mmap.mmap(
                r.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=r.fd_offset + offset
            )
        except (OSError, ValueError) as e:
            raise TransportError(f"mmap failed: {e}", f"region {index}") from None
        # Kept to be closed at close(); the caller may close one before (each holds an fd).
        self._maps = [m for m in self._maps if not m.closed]
        self._maps.append(mm)
        return mm

    # -- interrupts -----------------------------------------------------------------

    def irq_info(self, index: int) -> IrqInfo:
        body, _ = self._request(Command.DEVICE_GET_IRQ_INFO, w.IRQ_INFO.pack(w.IRQ_INFO.size, 0, index, 0))
        _argsz, flags, idx, count = w.unpack(w.IRQ_INFO, body, "GET_IRQ_INFO")
        return IrqInfo(idx, count, bool(flags & IRQ_EVENTFD))

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        flags = sv.VFIO_IRQ_SET_DATA_EVENTFD | sv.VFIO_IRQ_SET_ACTION_TRIGGER
        i = 0
        while i < len(fds):
            if fds[i] < 0:  # de-assign one vector: DATA_EVENTFD with no fd
                self._request(
                    Command.DEVICE_SET_IRQS, w.IRQ_SET.pack(w.IRQ_SET.size, flags, index, start + i, 1)
                )
                i += 1
                continue
            run: list[int] = []
            while i + len(run) < len(fds) and fds[i + len(run)] >= 0 and len(run) < self.max_fds:
                run.append(fds[i + len(run)])
            body = w.IRQ_SET.pack(w.IRQ_SET.size, flags, index, start + i, len(run))
            self._request(Command.DEVICE_SET_IRQS, body, run)
            i += len(run)

    def disable_irqs(self, index: int) -> None:
        flags = sv.VFIO_IRQ_SET_DATA_NONE | sv.VFIO_IRQ_SET_ACTION_TRIGGER
        self._request(Command.DEVICE_SET_IRQS, w.IRQ_SET.pack(w.IRQ_SET.size, flags, index, 0, 0))

    # -- DMA ------------------------------------------------------------------------

    def dma_map(self, fd: int, fd_offset: int, vaddr_view: memoryview, iova: Iova) -> None:
        size = len(vaddr_view)
        body = w.DMA_MAP.pack(
            w.DMA_MAP.size, sv.VFIO_DMA_MAP_FLAG_READ | sv.VFIO_DMA_MAP_FLAG_WRITE, fd_offset, iova, size
        )
        self._request(Command.DMA_MAP, body, [fd])
        self._dma[iova] = size

    def dma_unmap(self, iova: Iova, size: int) -> None:
        if self._peer_gone:
            # The server dropped every DMA region with the connection (vfio-user.rst, "VFIO_USER_DMA_MAP":
            # the server must not access a client's memory once it disconnected): nothing to undo.
            self._dma.pop(iova, None)
            return
        self._request(Command.DMA_UNMAP, w.DMA_UNMAP.pack(w.DMA_UNMAP.size, 0, iova, size))
        self._dma.pop(iova, None)

    def reset(self) -> None:
        self._request(Command.DEVICE_RESET)

    def removal_fd(self) -> int | None:
        """The socket: the server answers every request before the next is sent, so between
        requests it turns readable only when the server closed it (the host went away)."""
        return None if self._closed else self.sock.fileno()

    def close(self) -> None:
        """Unmap DMA (best effort), unmap regions, close region fds and the socket; idempotent."""
        if self._closed:
            return
        for iova, size in list(self._dma.items()):
            try:
                self.dma_unmap(Iova(iova), size)
            except TransportError:
                break
        self._closed = True
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:
                gc.collect()  # views caught in reference cycles: collect them, then try once more
                try:
                    mm.close()
                except BufferError:
                    pass  # an app still holds a view; the mapping (and its fd) go when the view does
        self._maps.clear()
        for r in self._regions.values():
            if r.fd is not None:
                os.close(r.fd)
        self._regions.clear()
        self._io_fds.clear()
        for fd in self._io_fds_owned:
            os.close(fd)
        self._io_fds_owned.clear()
        self.sock.close()
