"""Framed vhost-pci socket messages with their fds, over a non-blocking UNIX stream socket.

The server and the driver-VM simulator both speak through a :class:`Channel`.
It reads a message in two parts (header, then exactly ``msg_len`` payload
bytes) so one ``recvmsg`` never runs into the next message, and takes the fds
that arrived with the header's bytes (Linux attaches ``SCM_RIGHTS`` to the
first byte of the ``sendmsg`` that carried them). Every fd it receives is
either handed out inside a decoded message or closed: nothing leaks, even when
the peer sends garbage or vanishes mid-message.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import time
from collections import deque

from vhostpci_driver.errors import ProtocolError
from vhostpci_driver.wire import sock as wire
from vhostpci_driver.wire.sock import SockHeader, SockLimits, SockMessage

_FD_SIZE = array.array("i").itemsize


class PeerClosedError(Exception):
    """The peer closed the connection (between messages, or mid-message)."""


class Channel:
    """One peer's socket, message-framed; call :meth:`receive` when it is readable."""

    def __init__(
        self,
        sock: socket.socket,
        limits: SockLimits | None = None,
        *,
        max_outbuf: int = 1 << 20,
        partial_timeout: float = 5.0,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.limits = limits or SockLimits()
        self.max_outbuf = max_outbuf
        self.partial_timeout = partial_timeout
        self._buf = bytearray()
        self._hdr: SockHeader | None = None
        self._fds: list[int] = []
        self._partial_since: float | None = None
        self._out: deque[tuple[memoryview, list[int]]] = deque()
        self._out_bytes = 0
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- receiving -----------------------------------------------------------

    def receive(self) -> list[SockMessage]:
        """Read what is available; return the complete messages.

        Raises :class:`ProtocolError` for a malformed message (the caller
        drops the peer) and :class:`PeerClosedError` on end of stream.
        """
        out: list[SockMessage] = []
        while True:
            need = (wire.HEADER.size if self._hdr is None else self._hdr.msg_len) - len(self._buf)
            if need > 0:
                try:
                    data, fds = self._recv(need)
                except BlockingIOError:
                    break
                if not data:
                    where = " mid-message" if self._buf or self._hdr else ""
                    raise PeerClosedError(f"peer closed the connection{where}")
                if fds and (self._hdr is not None or self._buf):
                    # fds belong to the first byte of a message; anywhere else is a framing error.
                    self._close_fds(fds)
                    raise ProtocolError("socket fds", "fds arrived after the start of a message")
                self._fds += fds
                self._buf += data
                if self._partial_since is None:
                    self._partial_since = time.monotonic()
                if len(data) < need:
                    continue
            if self._hdr is None:
                try:
                    self._hdr = wire.decode_header(self._buf, self.limits)
                except ProtocolError:
                    self._close_fds(self._fds)
                    self._fds = []
                    raise
                self._buf.clear()
                continue
            hdr, payload, fds = self._hdr, bytes(self._buf), self._fds
            self._hdr, self._fds, self._partial_since = None, [], None
            self._buf.clear()
            try:
                out.append(wire.decode_body(hdr, payload, fds, self.limits))
            except ProtocolError:
                self._close_fds(fds)
                raise
        return out

    def _recv(self, want: int) -> tuple[bytes, list[int]]:
        cmsg_space = socket.CMSG_SPACE(wire.SCM_MAX_FD * _FD_SIZE)
        data, anc, flags, _ = self.sock.recvmsg(want, cmsg_space, socket.MSG_CMSG_CLOEXEC)
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                fds += arr.tolist()
        if flags & socket.MSG_CTRUNC:
            self._close_fds(fds)
            raise ProtocolError("socket fds", "more fds than a message may carry (truncated)")
        return data, fds

    def stalled_for(self) -> float:
        """Seconds a partial message has been waiting for its rest (0 when between messages)."""
        return 0.0 if self._partial_since is None else time.monotonic() - self._partial_since

    def partial_timed_out(self) -> bool:
        """True when a peer has sat on half a message longer than ``partial_timeout``."""
        return self.stalled_for() > self.partial_timeout

    # -- sending -------------------------------------------------------------

    def send(self, msg: SockMessage) -> None:
        """Queue ``msg`` and write what the socket takes now.

        Raises :class:`ProtocolError` when the peer does not read and its
        output buffer passes ``max_outbuf`` (a stuck peer must not grow us).
        """
        data, fds = wire.encode(msg)
        self._out.append((memoryview(data), fds))
        self._out_bytes += len(data)
        if self._out_bytes > self.max_outbuf:
            raise ProtocolError("socket output", f"peer is not reading: {self._out_bytes} bytes queued")
        self.flush()

    def flush(self) -> bool:
        """Write queued bytes; True when the queue is empty."""
        while self._out:
            data, fds = self._out[0]
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
            try:
                n = self.sock.sendmsg([data], anc)
            except BlockingIOError:
                return False
            self._out_bytes -= n
            if n < len(data):
                self._out[0] = (data[n:], [])  # fds went with the first byte
                return False
            self._out.popleft()
        return True

    def wants_write(self) -> bool:
        """True while bytes are queued (register for EVENT_WRITE)."""
        return bool(self._out)

    # -- teardown ------------------------------------------------------------

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Close the socket and any fds of a half-received message; idempotent."""
        if self.closed:
            return
        self.closed = True
        self._close_fds(self._fds)
        self._fds = []
        self.sock.close()
