"""Reading framed messages with fds from a non-blocking UNIX stream socket.

Both host-side protocols frame the same way: a fixed header that says how long
the body is, fds (``SCM_RIGHTS``) riding on the header's bytes. The reader
takes a message in two ``recvmsg`` calls sized to the part it wants, so it
never reads into the next message and the fds stay with their own message
(Linux glues stream segments into one read until it meets fds). Every fd it
receives is handed out with a whole message or closed: nothing leaks when a
peer sends garbage or vanishes mid-message.
"""

from __future__ import annotations

import array
import os
import socket
import time
from collections.abc import Callable

from vhostpci_driver.errors import ProtocolError

FD_SIZE = array.array("i").itemsize
SCM_MAX_FD = 253  # include/net/scm.h


class PeerClosedError(Exception):
    """The peer closed the connection (between messages, or mid-message)."""


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_with_fds(sock: socket.socket, want: int, max_fds: int = SCM_MAX_FD) -> tuple[bytes, list[int]]:
    """One ``recvmsg`` of at most ``want`` bytes; fds beyond ``max_fds`` are a ProtocolError (and closed)."""
    data, anc, flags, _ = sock.recvmsg(want, socket.CMSG_SPACE(SCM_MAX_FD * FD_SIZE), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % FD_SIZE])
            fds += arr.tolist()
    if flags & socket.MSG_CTRUNC or len(fds) > max_fds:
        close_fds(fds)
        raise ProtocolError("socket fds", f"more fds than a message may carry ({max_fds})")
    return data, fds


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> int:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    return sock.sendmsg([data], anc)


class FramedReader:
    """Splits a byte stream into ``(header, body, fds)``; ``body_len(header)`` validates the header."""

    def __init__(
        self,
        sock: socket.socket,
        header_size: int,
        body_len: Callable[[bytes], int],
        max_fds: int = SCM_MAX_FD,
    ) -> None:
        self.sock = sock
        self.header_size = header_size
        self.body_len = body_len
        self.max_fds = max_fds
        self._buf = bytearray()
        self._header: bytes | None = None
        self._want_body = 0
        self._fds: list[int] = []
        self._since: float | None = None

    def read(self) -> list[tuple[bytes, bytes, list[int]]]:
        """Everything complete that the socket has now; raises PeerClosedError or ProtocolError."""
        out: list[tuple[bytes, bytes, list[int]]] = []
        while True:
            need = (self.header_size if self._header is None else self._want_body) - len(self._buf)
            if need > 0:
                try:
                    data, fds = recv_with_fds(self.sock, need, self.max_fds)
                except BlockingIOError:
                    break
                if not data:
                    if out:
                        break  # hand out what came before the end; the next read (still readable) raises
                    where = " mid-message" if self._buf or self._header is not None else ""
                    raise PeerClosedError(f"peer closed the connection{where}")
                if fds and (self._header is not None or self._buf):
                    close_fds(fds)
                    raise ProtocolError("socket fds", "fds arrived after the start of a message")
                self._fds += fds
                self._buf += data
                if self._since is None:
                    self._since = time.monotonic()
                if len(data) < need:
                    continue
            if self._header is None:
                header = bytes(self._buf)
                try:
                    self._want_body = self.body_len(header)
                except ProtocolError:
                    self.discard()
                    raise
                self._header = header
                self._buf.clear()
                continue
            out.append((self._header, bytes(self._buf), self._fds))
            self._header, self._fds, self._since = None, [], None
            self._buf.clear()
        return out

    def stalled_for(self) -> float:
        """Seconds a partial message has waited for its rest (0 between messages)."""
        return 0.0 if self._since is None else time.monotonic() - self._since

    def discard(self) -> None:
        """Drop a half-read message and close its fds."""
        close_fds(self._fds)
        self._fds = []
        self._buf.clear()
        self._header = None
        self._since = None
