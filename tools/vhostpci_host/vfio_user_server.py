"""A vfio-user server (QEMU ``docs/interop/vfio-user.rst``) serving one device model.

One client at a time (a second connection is refused and logged). Requests are
answered in order; a bad request gets an error reply with an errno and the
connection carries on; a framing error or a vanished client closes the
connection, resets the device and drops every DMA mapping the client made, so
nothing leaks. The client's memory arrives by ``DMA_MAP`` with an fd and is
mmapped here: the :class:`DmaTable` is what the device reads and writes.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
import socket
import sys
from collections import deque

from vhostpci_driver.errors import ProtocolError, RemoteMemoryError
from vhostpci_driver.spec import vfio as sv
from vhostpci_driver.wire import vfio_user as w
from vhostpci_driver.wire.vfio_user import Command, Header
from vhostpci_host.framing import SCM_MAX_FD, FramedReader, PeerClosedError, close_fds, send_with_fds
from vhostpci_host.loop import SelectorLoop
from vhostpci_host.peer_fds import PeerFdError, take_eventfd
from vhostpci_host.vfio_device import (
    DmaMapping,
    IrqSpec,
    RegionFlag,
    VfioDeviceError,
    VfioUserDevice,
)

log = logging.getLogger(__name__)

MAX_MSG_FDS = 16
MAX_DATA_XFER = 1 << 20
MAX_DMA_MAPS = 4096


def _close_map(mm: mmap.mmap, view: memoryview) -> None:
    view.release()
    try:
        mm.close()
    except BufferError:
        pass  # a device view is still alive; the mapping goes when it does


class DmaTable:
    """The client's DMA mappings, mmapped; ``view`` satisfies ``GuestMemory`` (IOVA space)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._maps: list[DmaMapping] = []
        self._mms: list[mmap.mmap] = []
        self._files: list[tuple[int, int, tuple[int, int]]] = []  # (dup fd, file offset, (st_dev, st_ino))
        self._spans: dict[tuple[int, int], tuple[mmap.mmap, memoryview]] = {}  # ranges across mappings
        self._opaque: dict[int, int] = {}  # iova -> size of fd-less ranges

    def __len__(self) -> int:
        return len(self._maps)

    def map(self, iova: int, size: int, fd: int, offset: int, flags: int) -> None:
        if size <= 0 or iova + size > 1 << 64 or offset < 0:
            raise VfioDeviceError(errno.EINVAL, f"bad DMA range {iova:#x}+{size:#x}")
        if offset % mmap.PAGESIZE:
            raise VfioDeviceError(errno.EINVAL, f"fd offset {offset:#x} is not page-aligned")
        # DMA_MAP's size and offset are u64, mmap's length and offset signed (ssize_t, off_t):
        # past those no file can be mapped, and mmap would raise OverflowError, not OSError.
        if size > sys.maxsize or offset > sys.maxsize:
            raise VfioDeviceError(errno.EINVAL, f"DMA_MAP.size {size:#x} at {offset:#x} cannot be mapped")
        if len(self._maps) >= MAX_DMA_MAPS:
            raise VfioDeviceError(errno.ENOSPC, "too many DMA mappings")
        i = bisect.bisect_right(self._starts, iova)
        if (i > 0 and self._starts[i - 1] + self._maps[i - 1].size > iova) or (
            i < len(self._starts) and self._starts[i] < iova + size
        ):
            raise VfioDeviceError(errno.EEXIST, f"DMA range {iova:#x}+{size:#x} overlaps a mapping")
        prot = (mmap.PROT_READ if flags & sv.VFIO_DMA_MAP_FLAG_READ else 0) | (
            mmap.PROT_WRITE if flags & sv.VFIO_DMA_MAP_FLAG_WRITE else 0
        )
        try:
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot or mmap.PROT_READ, offset=offset)
        except (OSError, ValueError) as e:
            raise VfioDeviceError(errno.EINVAL, f"cannot map the DMA fd: {e}") from None
        view = memoryview(mm)
        st = os.fstat(fd)
        self._starts.insert(i, iova)
        self._maps.insert(i, DmaMapping(iova, size, bool(flags & 1), bool(flags & 2), view))
        self._mms.insert(i, mm)
        self._files.insert(i, (os.dup(fd), offset, (st.st_dev, st.st_ino)))

    def map_opaque(self, iova: int, size: int) -> None:
        """Record a range the client mapped without an fd (spec: reachable by DMA_READ/WRITE only)."""
        if len(self._opaque) >= MAX_DMA_MAPS:
            # Bounded like fd-backed maps: each costs memory and an O(n) overlap check.
            raise VfioDeviceError(errno.ENOSPC, "too many fd-less DMA ranges")
        if size <= 0 or any(a < iova + size and iova < a + s for a, s in self._opaque.items()):
            raise VfioDeviceError(errno.EEXIST, f"DMA range {iova:#x}+{size:#x} overlaps a mapping")
        self._opaque[iova] = size

    def unmap(self, iova: int, size: int) -> list[tuple[int, int]]:
        """Remove every mapping inside ``[iova, iova+size)`` (type1 semantics: none is not an error)."""
        gone = []
        i = bisect.bisect_left(self._starts, iova)
        while i < len(self._starts) and self._starts[i] + self._maps[i].size <= iova + size:
            gone.append((self._starts[i], self._maps[i].size))
            self._drop(i)
        for a, s in list(self._opaque.items()):
            if iova <= a and a + s <= iova + size:
                del self._opaque[a]
        return gone

    def unmap_all(self) -> list[tuple[int, int]]:
        self._opaque.clear()
        gone = [(m.iova, m.size) for m in self._maps]
        while self._maps:
            self._drop(len(self._maps) - 1)
        return gone

    def _drop(self, i: int) -> None:
        start = self._starts.pop(i)
        m = self._maps.pop(i)
        mm = self._mms.pop(i)
        fd, _, _ = self._files.pop(i)
        os.close(fd)
        for key in [k for k in self._spans if k[0] < start + m.size and start < k[1]]:
            smm, sview = self._spans.pop(key)
            _close_map(smm, sview)
        _close_map(mm, m.view)

    def view(self, addr: int, length: int) -> memoryview:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and length >= 0:
            m = self._maps[i]
            off = addr - m.iova
            if off + length <= m.size and m.writable:
                return m.view[off : off + length]
            if m.writable and off < m.size:
                span = self._span(i, addr + length)
                if span is not None:
                    return span[off : off + length]
        raise RemoteMemoryError(f"IOVA range {addr:#x}+{length:#x} is not DMA-mapped (writable)")

    def _span(self, i: int, end: int) -> memoryview | None:
        """A range over adjacent mappings of one file at consecutive offsets, mapped as one.

        A VM behind a virtual IOMMU maps its DMA memory page by page (one DMA_MAP per
        IOTLB entry); a ring or buffer crossing a page then spans mappings.
        """
        j, (_, offset, ident) = i, self._files[i]
        while self._starts[j] + self._maps[j].size < end:
            nxt = j + 1
            if nxt == len(self._starts) or self._starts[nxt] != self._starts[j] + self._maps[j].size:
                return None
            _, noff, nident = self._files[nxt]
            if (
                nident != ident
                or noff != offset + (self._starts[nxt] - self._starts[i])
                or not self._maps[nxt].writable
            ):
                return None
            j = nxt
        key = (self._starts[i], self._starts[j] + self._maps[j].size)
        if key not in self._spans:
            try:
                mm = mmap.mmap(self._files[i][0], key[1] - key[0], mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)  # fmt: skip
            except (OSError, ValueError):
                return None
            self._spans[key] = (mm, memoryview(mm))
        return self._spans[key][1]


class VfioUserServer(SelectorLoop):
    """Serves ``device`` on a UNIX socket at ``path``: drive it by :meth:`run_once`, or nest it by its fd."""

    def __init__(self, path: str, device: VfioUserDevice, *, backlog: int = 4) -> None:
        self.path = path
        super().__init__()
        self.device = device
        self.dma = DmaTable()
        self.conn: socket.socket | None = None
        self._reader: FramedReader | None = None
        self._out: deque[tuple[bytes, list[int]]] = deque()  # replies and the fd copies they own
        self._negotiated = False
        self._peer_max_fds = 1
        self.stats = {"messages": 0, "errors": 0, "connections": 0, "refused": 0}
        device.attach_dma(self.dma)
        if os.path.lexists(path):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # born 0600: nobody else connects in the window before a chmod
        try:
            self.listener.bind(path)
        finally:
            os.umask(old)
        self.listener.listen(backlog)
        self.listener.setblocking(False)
        self.add_reader(self.listener, self._accept)

    # -- connections ---------------------------------------------------------------

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.conn is not None:
            log.warning("%s: refused a second vfio-user client (one at a time)", self.path)
            self.stats["refused"] += 1
            conn.close()
            return
        conn.setblocking(False)
        self.conn = conn
        self._reader = FramedReader(conn, w.HEADER_SIZE, self._body_len, MAX_MSG_FDS)
        self._negotiated = False
        self._peer_max_fds = 1
        self.stats["connections"] += 1
        self.add_reader(conn, self._readable)

    @staticmethod
    def _body_len(raw: bytes) -> int:
        return w.decode_header(raw).size - w.HEADER_SIZE

    def _readable(self) -> None:
        assert self._reader is not None
        try:
            for raw, body, fds in self._reader.read():
                self._handle(w.decode_header(raw), body, fds)
        except PeerClosedError as e:
            self.disconnect(str(e))
        except ProtocolError as e:
            log.warning("%s: framing error, closing the client: %s", self.path, e)
            self.disconnect(str(e))
        except OSError as e:
            self.disconnect(f"socket error: {e}")

    def disconnect(self, why: str) -> None:
        """Drop the client: reset the device, unmap its memory, close everything it gave."""
        if self.conn is None:
            return
        log.info("%s: client gone: %s", self.path, why)
        self.remove_reader(self.conn.fileno())
        if self._reader is not None:
            self._reader.discard()
        self.conn.close()
        self.conn, self._reader = None, None
        for _, fds in self._out:
            close_fds(fds)
        self._out.clear()
        self.device.disconnected()
        for iova, size in self.dma.unmap_all():
            self.device.dma_unmapped(iova, size)

    # -- requests ------------------------------------------------------------------

    def _handle(self, hdr: Header, body: bytes, fds: list[int]) -> None:
        self.stats["messages"] += 1
        if hdr.is_reply:
            log.warning("%s: unexpected reply %d to nothing; ignored", self.path, hdr.msg_id)
            close_fds(fds)
            return
        reply_fds: list[int] = []
        try:
            reply, reply_fds = self._dispatch(hdr, body, fds)
        except VfioDeviceError as e:
            self._error(hdr, e.errno, str(e))
            return
        except ProtocolError as e:
            self._error(hdr, errno.EINVAL, str(e))
            return
        finally:
            close_fds(fds)  # every fd a request brought has been dup'ed or mmapped where kept
        if not hdr.no_reply:
            # The queue owns copies: the device may close its fds before a full socket takes the reply.
            self._send(w.encode(hdr.msg_id, hdr.command, reply, reply=True), [os.dup(fd) for fd in reply_fds])

    def _error(self, hdr: Header, err: int, why: str) -> None:
        self.stats["errors"] += 1
        log.info("%s: %s refused (%s): %s", self.path, _name(hdr.command), errno.errorcode.get(err, err), why)
        if not hdr.no_reply:
            self._send(w.encode(hdr.msg_id, hdr.command, reply=True, error=err), [])

    def _dispatch(self, hdr: Header, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        cmd = hdr.command
        if cmd == Command.VERSION:
            major, _minor, caps = w.decode_version(body)
            if major != 0:
                raise VfioDeviceError(errno.ENOTSUP, f"version {major} not supported")
            self._negotiated = True
            # vfio-user "Version": max_msg_fds is what the client takes in one message; absent, 1.
            peer_fds = caps.get("max_msg_fds", 1)
            if not isinstance(peer_fds, int) or peer_fds < 1:
                peer_fds = 1
            self._peer_max_fds = min(peer_fds, SCM_MAX_FD)
            # Short on purpose: QEMU rejects a reply longer than its own request.
            return w.encode_version(
                0, 0, {"max_msg_fds": MAX_MSG_FDS, "max_data_xfer_size": MAX_DATA_XFER}
            ), []
        if not self._negotiated:
            raise VfioDeviceError(errno.EINVAL, "VERSION must come first")
        if cmd != Command.DMA_MAP and fds and cmd != Command.DEVICE_SET_IRQS:
            raise VfioDeviceError(errno.EINVAL, f"{len(fds)} unexpected fds")
        if cmd == Command.DMA_MAP:
            _argsz, flags, offset, iova, size = w.unpack(w.DMA_MAP, body, "DMA_MAP")
            if len(fds) > 1:
                raise VfioDeviceError(errno.EINVAL, f"DMA_MAP with {len(fds)} fds")
            if fds:
                self.dma.map(iova, size, fds[0], offset, flags)
            else:
                # Memory the client cannot share (a VM's ROMs): recorded, never touched. Our
                # queues must live in fd-backed memory; a device access there is refused.
                self.dma.map_opaque(iova, size)
                log.info("%s: DMA range %#x+%#x has no fd; the device will not use it", self.path, iova, size)
            return b"", []
        if cmd == Command.DMA_UNMAP:
            _argsz, flags, iova, size = w.unpack(w.DMA_UNMAP, body, "DMA_UNMAP")
            gone = self.dma.unmap_all() if flags & sv.VFIO_DMA_UNMAP_FLAG_ALL else self._unmap_one(iova, size)
            for a, s in gone:
                self.device.dma_unmapped(a, s)
            return w.DMA_UNMAP.pack(w.DMA_UNMAP.size, flags, iova, size), []
        regions, irqs = self.device.regions(), self.device.irqs()
        if cmd == Command.DEVICE_GET_INFO:
            w.unpack(w.DEVICE_INFO, body, "DEVICE_GET_INFO")
            # Exactly 16 bytes: vfio-user has no cap_offset here (QEMU checks the size).
            return w.DEVICE_INFO.pack(w.DEVICE_INFO.size, self.device.flags, len(regions), len(irqs)), []
        if cmd == Command.DEVICE_GET_REGION_INFO:
            argsz, _flags, index, _cap, _size, _off = w.unpack(w.REGION_INFO, body, "GET_REGION_INFO")
            if index >= len(regions):
                raise VfioDeviceError(errno.EINVAL, f"no region {index}")
            r = regions[index]
            areas = tuple((a.offset, a.size) for a in r.areas)
            reply = w.encode_region_info(argsz, r.flags, index, r.size, r.fd_offset, areas=areas)
            # The fd goes with the full answer only: a too-small argsz is asked again.
            need = w.unpack(w.REGION_INFO, reply, "REGION_INFO")[0]
            send_fd = r.fd is not None and r.flags & RegionFlag.MMAP and argsz >= need
            return reply, [r.fd] if send_fd and r.fd is not None else []
        if cmd == Command.DEVICE_GET_REGION_IO_FDS:
            return self._region_io_fds(body, len(regions))
        if cmd == Command.DEVICE_GET_IRQ_INFO:
            _argsz, _flags, index, _count = w.unpack(w.IRQ_INFO, body, "GET_IRQ_INFO")
            if index >= len(irqs):
                raise VfioDeviceError(errno.EINVAL, f"no irq index {index}")
            i = irqs[index]
            return w.IRQ_INFO.pack(w.IRQ_INFO.size, i.flags, index, i.count), []
        if cmd == Command.DEVICE_SET_IRQS:
            return self._set_irqs(body, fds, irqs), []
        if cmd in (Command.REGION_READ, Command.REGION_WRITE):
            offset, index, count = w.unpack(w.REGION_RW, body, _name(cmd))
            if index >= len(regions):
                raise VfioDeviceError(errno.EINVAL, f"no region {index}")
            if count > MAX_DATA_XFER or offset + count > regions[index].size:
                raise VfioDeviceError(errno.EINVAL, f"{count} bytes at {offset:#x} outside region {index}")
            head = w.REGION_RW.pack(offset, index, count)
            if cmd == Command.REGION_READ:
                data = self.device.region_read(index, offset, count)
                return head + data, []
            data = body[w.REGION_RW.size :]
            if len(data) != count:
                raise VfioDeviceError(
                    errno.EINVAL, f"REGION_WRITE carries {len(data)} bytes, count says {count}"
                )
            self.device.region_write(index, offset, data)
            return head, []
        if cmd == Command.DEVICE_RESET:
            self.device.reset()
            return b"", []
        raise VfioDeviceError(errno.ENOSYS, f"command {cmd} not supported")

    def _region_io_fds(self, body: bytes, num_regions: int) -> tuple[bytes, list[int]]:
        """The registers of a region the client may write by eventfd; the rest stay messages.

        No more fds than the client takes in one message (its max_msg_fds); the
        device lists the hottest registers first. QEMU never asks: for it
        nothing here exists.
        """
        argsz, index = w.decode_region_io_fds_request(body)
        if index >= num_regions:
            raise VfioDeviceError(errno.EINVAL, f"no region {index}")
        subs: list[w.SubRegionIoFd] = []
        fd_index: dict[int, int] = {}  # fd -> its place in the reply's fds (sub-regions may share one)
        for spec in self.device.io_fds(index):
            if spec.fd not in fd_index:
                if len(fd_index) == self._peer_max_fds:
                    continue
                fd_index[spec.fd] = len(fd_index)
            flags = w.IOEVENTFD_FLAG_DATAMATCH if spec.datamatch is not None else 0
            subs.append(w.SubRegionIoFd(spec.offset, spec.size, fd_index[spec.fd], flags=flags,
                                        data=spec.datamatch or 0))  # fmt: skip
        reply = w.encode_region_io_fds_reply(argsz, index, tuple(subs))
        # As for region info: the fds go with the full answer only, a too-small argsz asks again.
        return reply, list(fd_index) if len(reply) > w.REGION_IO_FDS.size else []

    def _unmap_one(self, iova: int, size: int) -> list[tuple[int, int]]:
        self.device.dma_unmapped(iova, size)  # the device drops its views first
        return self.dma.unmap(iova, size)

    def _set_irqs(self, body: bytes, fds: list[int], irqs: list[IrqSpec]) -> bytes:
        _argsz, flags, index, start, count = w.unpack(w.IRQ_SET, body, "SET_IRQS")
        if index >= len(irqs):
            raise VfioDeviceError(errno.EINVAL, f"no irq index {index}")
        total = irqs[index].count
        data = flags & sv.VFIO_IRQ_SET_DATA_TYPE_MASK
        if (
            data not in (sv.VFIO_IRQ_SET_DATA_NONE, sv.VFIO_IRQ_SET_DATA_BOOL, sv.VFIO_IRQ_SET_DATA_EVENTFD)
            or bin(data).count("1") != 1
        ):
            raise VfioDeviceError(errno.EINVAL, f"bad data flags {flags:#x}")
        if start + count > total and not (count == 0 and data == sv.VFIO_IRQ_SET_DATA_NONE):
            raise VfioDeviceError(errno.EINVAL, f"vectors {start}..{start + count} beyond {total}")
        if data == sv.VFIO_IRQ_SET_DATA_EVENTFD and len(fds) not in (0, count):
            raise VfioDeviceError(errno.EINVAL, f"{len(fds)} eventfds for {count} vectors")
        if data != sv.VFIO_IRQ_SET_DATA_EVENTFD and fds:
            raise VfioDeviceError(errno.EINVAL, "eventfds without DATA_EVENTFD")
        for i, fd in enumerate(fds):
            # The device writes these from its loop, where a pipe would fail or block; VFIO
            # refuses a non-eventfd the same way (vfio_msi_set_vector_signal: eventfd_ctx_fdget).
            try:
                take_eventfd(fd, f"SET_IRQS fds[{i}]")  # and non-blocking: the loop never waits on it
            except PeerFdError as e:
                raise VfioDeviceError(errno.EINVAL, str(e)) from None
        given = [os.dup(fd) for fd in fds]  # the device owns its copies; ours are closed by _handle
        try:
            self.device.set_irqs(index, flags, start, count, given)
        except BaseException:
            close_fds(given)
            raise
        return b""

    # -- replies -------------------------------------------------------------------

    def _send(self, data: bytes, fds: list[int]) -> None:
        self._out.append((data, fds))
        self._flush()

    def _flush(self) -> None:
        conn = self.conn
        if conn is None:
            return
        while self._out:
            data, fds = self._out[0]
            try:
                n = send_with_fds(conn, data, fds)
            except BlockingIOError:
                break
            except OSError as e:
                self.disconnect(f"send failed: {e}")
                return
            close_fds(fds)  # the kernel holds the client's references now
            if n < len(data):
                self._out[0] = (data[n:], [])
                break
            self._out.popleft()
        self.set_writer(conn, self._readable, self._flush if self._out else None)

    def close(self) -> None:
        """Stop serving: the client (if any) is dropped, the socket removed."""
        self.disconnect("server closing")
        super().close()
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _name(cmd: int) -> str:
    try:
        return Command(cmd).name
    except ValueError:
        return f"command {cmd}"
