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

import contextlib
import os
import socket
from collections import deque

from vhostpci_driver.errors import ProtocolError
from vhostpci_driver.wire import sock as wire
from vhostpci_driver.wire.sock import SockLimits, SockMessage
from vhostpci_host.framing import FramedReader, PeerClosedError, close_fds, send_with_fds

__all__ = ["Channel", "PeerClosedError"]


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
        self._reader = FramedReader(sock, wire.HEADER.size, self._body_len)
        self._out: deque[tuple[memoryview, list[int]]] = deque()
        self._out_bytes = 0
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def _body_len(self, header: bytes) -> int:
        return wire.decode_header(header, self.limits).msg_len

    # -- receiving -----------------------------------------------------------

    def receive(self) -> list[SockMessage]:
        """Read what is available; return the complete messages.

        Raises :class:`ProtocolError` for a malformed message (the caller
        drops the peer) and :class:`PeerClosedError` on end of stream.
        """
        out: list[SockMessage] = []
        for header, payload, fds in self._reader.read():
            try:
                hdr = wire.decode_header(header, self.limits)
                out.append(wire.decode_body(hdr, payload, fds, self.limits))
            except ProtocolError:
                close_fds(fds)
                raise
        return out

    def stalled_for(self) -> float:
        """Seconds a partial message has been waiting for its rest (0 when between messages)."""
        return self._reader.stalled_for()

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
            try:
                n = send_with_fds(self.sock, bytes(data), fds)
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
        self._reader.discard()
        self.sock.close()
