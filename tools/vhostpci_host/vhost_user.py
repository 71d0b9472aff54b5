"""The vhost-user front door: a stock QEMU driver VM on one side, the vhost-pci server on the other.

One process per driver VM (``vhostpci-host vhost-user``). It listens on the
socket QEMU's ``-chardev socket,path=SOCK`` connects to, speaks vhost-user as a
back end (vhost_user_wire, vhost_user_session), and is an ordinary client of
the vhost-pci server (docs/protocol.md section 7), as the driver-VM simulator
is. It forwards QEMU's memory fds and kick eventfds to the server, and relays
calls: the device VM signals an eventfd of ours, we signal QEMU's current call
fd, which QEMU changes whenever the guest masks or unmasks the queue's vector.

One thread, one selector. One QEMU connection at a time; each gets a fresh
server connection with this driver VM's UUID, so when QEMU goes (killed,
powered off) the server's removal rule applies (frontends, then memory), and
when it comes back the same UUID is served again. A peer's bad input closes
that connection with a log line saying why; the process stays for the next.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vhostpci_driver.errors import ProtocolError
from vhostpci_host import vhost_user_wire as vu
from vhostpci_host.channel import Channel, PeerClosedError
from vhostpci_host.endpoint import StatusLog, listen_unix, run_until_signalled
from vhostpci_host.framing import FramedReader, close_fds, send_with_fds
from vhostpci_host.loop import SelectorLoop
from vhostpci_host.vhost_user_session import FrontendConfig, VhostUserSession

log = logging.getLogger(__name__)

#: A front-end that sends this many requests while one waits for the device VM is flooding us.
MAX_QUEUED = 64


@dataclass
class DoorConfig:
    """What ``vhostpci-host vhost-user`` takes."""

    socket_path: Path
    server_path: Path
    vm_uuid: uuid.UUID
    frontend: FrontendConfig
    partial_timeout: float = 5.0
    json_status: bool = False


class _Connection:
    """One QEMU connection, its server connection and its session."""

    def __init__(self, qemu: socket.socket, server: Channel, session: VhostUserSession) -> None:
        qemu.setblocking(False)
        self.qemu = qemu
        self.reader = FramedReader(qemu, vu.HEADER.size, lambda h: vu.decode_header(h).size, vu.MAX_FDS)
        self.server = server
        self.session = session
        self.queued: list[tuple[bytes, bytes, list[int]]] = []
        self.relays: set[int] = set()


class VhostUserDoor(SelectorLoop):
    """The front door's event loop."""

    def __init__(self, config: DoorConfig) -> None:
        super().__init__()
        self.config = config
        self.conn: _Connection | None = None
        self._listener: socket.socket | None = None
        self.connections = 0
        self.status = StatusLog(log, config.json_status)

    # -- set-up ---------------------------------------------------------------------------

    def listen(self) -> None:
        self._listener = listen_unix(self.config.socket_path, 4, "a vhost-user front door")
        self.add_reader(self._listener, self._accept)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            qemu, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self.conn is not None:
            # One driver VM per front door: a second front-end would fight over one UUID.
            log.warning("refused a second vhost-user connection: one is already served")
            self.status("refused", why="a front-end is already connected")
            qemu.close()
            return
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(self.config.server_path))
        except OSError as e:
            s.close()
            log.error("cannot reach the vhost-pci server at %s: %s", self.config.server_path, e)
            self.status("dropped", why=f"vhost-pci server unreachable: {e}")
            qemu.close()
            return
        session = VhostUserSession(self.config.frontend, self.config.vm_uuid)
        conn = _Connection(qemu, Channel(s, partial_timeout=self.config.partial_timeout), session)
        self.conn = conn
        self.connections += 1
        # Callbacks name their connection: events of one select() may still come for a connection
        # a previous callback of the same batch dropped.
        self.add_reader(qemu, lambda: self._qemu_readable(conn))
        self.add_reader(conn.server.sock, lambda: self._server_readable(conn))
        self.status("connected", uuid=str(self.config.vm_uuid), connection=self.connections)

    # -- QEMU --------------------------------------------------------------------------------

    def _qemu_readable(self, conn: _Connection) -> None:
        if conn is not self.conn:
            return
        with self._dropping_on_error("front-end"):
            conn.queued += conn.reader.read()
            if len(conn.queued) > MAX_QUEUED:
                raise ProtocolError(
                    "vhost-user requests", f"{len(conn.queued)} sent without waiting for replies"
                )
            self._run_queue(conn)

    @contextlib.contextmanager
    def _dropping_on_error(self, peer: str) -> Iterator[None]:
        """One peer's failure ends this connection pair (with the reason), never the process."""
        try:
            yield
        except PeerClosedError as e:
            self._drop(f"{peer}: {e}")
        except ProtocolError as e:
            self._drop(f"{peer} protocol error: {e}")
        except OSError as e:
            self._drop(f"{peer}: {e}")

    def _run_queue(self, conn: _Connection) -> None:
        """Handle queued requests in order; stop while one waits for the device VM."""
        s = conn.session
        while conn.queued and s.waiting is None:
            header, payload, fds = conn.queued.pop(0)
            try:
                msg = vu.decode_body(vu.decode_header(header), payload, fds)
            except ProtocolError:
                close_fds(fds)
                raise
            log.debug("front-end: %s", msg.header.name())
            s.handle(msg)
            self._flush(conn)

    def _flush(self, conn: _Connection) -> None:
        s = conn.session
        for data in s.replies:
            # Replies are small and QEMU waits for each: a socket that cannot take one is not read.
            n = send_with_fds(conn.qemu, data, [])
            if n != len(data):
                raise ProtocolError("vhost-user reply", "the front-end does not read its replies")
        s.replies.clear()
        for m in s.requests:
            conn.server.send(m)
        s.requests.clear()
        for name, fields in s.events:
            self.status(name, uuid=str(self.config.vm_uuid), **fields)
        s.events.clear()
        for fd in s.retired:
            if fd in conn.relays:
                self.remove_reader(fd)
                conn.relays.discard(fd)
            os.close(fd)
        s.retired.clear()
        for fd, index in s.relays():
            if fd not in conn.relays:
                self.add_reader(fd, functools.partial(self._call, conn, fd, index))
                conn.relays.add(fd)

    def _call(self, conn: _Connection, fd: int, index: int) -> None:
        """The device VM used buffers of ring ``index``: interrupt the guest through QEMU's call fd."""
        if conn is not self.conn:
            return
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
        target = conn.session.call_fd(index)
        if target is not None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(target, 1)

    # -- the vhost-pci server -----------------------------------------------------------------

    def _server_readable(self, conn: _Connection) -> None:
        if conn is not self.conn:
            return
        with self._dropping_on_error("vhost-pci server"):
            for msg in conn.server.receive():
                conn.session.on_server(msg)
            self._flush(conn)
            self._run_queue(conn)  # a GET_VRING_BASE may have got its answer

    # -- teardown and the loop ----------------------------------------------------------------

    def _drop(self, why: str) -> None:
        """Close this connection pair; the server removes the driver VM's frontends and memory."""
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        log.warning("closing the front-end connection: %s", why)
        for fd in conn.relays:
            self.remove_reader(fd)
        self.remove_reader(conn.qemu)
        self.remove_reader(conn.server.sock)
        for _, _, fds in conn.queued:
            close_fds(fds)
        conn.reader.discard()
        conn.session.close()
        conn.qemu.close()
        conn.server.close()
        self.status("dropped", uuid=str(self.config.vm_uuid), why=why)

    def _tick(self) -> None:
        conn = self.conn
        if conn is None:
            return
        with self._dropping_on_error("front-end"):
            if conn.reader.stalled_for() > self.config.partial_timeout:
                raise ProtocolError(
                    "vhost-user message", f"stalled mid-message for {conn.reader.stalled_for():.1f}s"
                )
            conn.session.tick()
            self._flush(conn)
            self._run_queue(conn)
            conn.server.flush()

    def serve_forever(self) -> int:
        """Run until SIGTERM/SIGINT/SIGHUP; then close the connections and the socket; returns the signal."""
        try:
            return run_until_signalled(self, 0.1, self._tick, self._ready)
        finally:
            self.close()

    def _ready(self) -> None:
        self.status("listening", socket=str(self.config.socket_path), uuid=str(self.config.vm_uuid))

    def close(self) -> None:
        self._drop("front door shutting down")
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.config.socket_path.unlink()
        super().close()
        self.status("stopped", at=time.time())
