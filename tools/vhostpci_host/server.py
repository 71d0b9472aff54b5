"""The vhost-pci server: driver VMs connect here; each gets a vhost-pci device on its own vfio-user socket.

One thread, one selector: the listening socket, every driver VM's channel,
every device's vfio-user server and the frontends' kick eventfds all wait in
the same loop, so nothing needs a lock and a stuck peer cannot block another
(every socket is non-blocking; a peer that stalls mid-message past its timeout
is dropped). Status goes to stdout as JSON lines when asked.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vhostpci_driver.errors import FailReason, ProtocolError
from vhostpci_driver.wire.ctrl import AckResult, Op
from vhostpci_driver.wire.sock import SockAck, SockLimits, SockMemoryInfo, SockMessage, SockMsgType
from vhostpci_host.channel import Channel, PeerClosedError
from vhostpci_host.device_model import VhostPciDeviceModel
from vhostpci_host.endpoint import StartError, StatusLog, listen_unix, run_until_signalled
from vhostpci_host.loop import SelectorLoop
from vhostpci_host.session import PeerLimits, Session
from vhostpci_host.vfio_device import VfioDeviceError
from vhostpci_host.vfio_user_server import VfioUserServer

log = logging.getLogger(__name__)

MIN_WINDOW = 2 << 20


#: The server cannot start as configured (the command says so in one line, exit 1).
ServerError = StartError


def window_size_for(regions_end: int) -> int:
    """A power of two at least twice the driver VM's memory (protocol.md 2.2), so hot-plug fits."""
    size = MIN_WINDOW
    while size < 2 * regions_end:
        size <<= 1
    return size


@dataclass
class ServerConfig:
    """What ``vhostpci-host serve`` takes."""

    socket_path: Path
    devices_dir: Path
    ping_interval: float = 1.0
    ping_misses: int = 3
    virtio_id: int = 63
    window_size: int | None = None
    limits: SockLimits = field(default_factory=SockLimits)
    peer_limits: PeerLimits = field(default_factory=PeerLimits)
    partial_timeout: float = 5.0
    allow_uids: frozenset[int] = field(default_factory=lambda: frozenset({0, os.getuid()}))
    json_status: bool = False
    #: seconds a gone driver VM's device is kept for it to come back with its UUID (protocol.md 7.5)
    gone_grace: float = 30.0
    #: accept memory fds that cannot be sealed against shrinking (docs/security.md)
    trust_driver_memory: bool = False
    #: doorbells handed as the driver VMs' call eventfds (docs/host.md): a driver VM that makes its
    #: call eventfd blocking and full could then stall the device VM's driver (docs/security.md)
    direct_doorbells: bool = False
    #: a returning driver VM takes its gone device over (protocol.md 7.5, GONE -> UP); False frees
    #: a gone device once its teardown is acked, so a comeback gets a new device (``--no-takeover``:
    #: for a device VM whose vfio-user client maps BAR 2 once, as QEMU's vfio-user-pci does)
    takeover: bool = True


@dataclass
class _Device:
    model: VhostPciDeviceModel
    vfio: VfioUserServer
    session: Session
    path: Path
    #: the uid that first claimed this UUID: only it may connect as this driver VM (docs/security.md)
    owner_uid: int


class VhostPciServer(SelectorLoop):
    """Accepts driver VMs and serves one vhost-pci device per UUID, from one loop."""

    def __init__(self, config: ServerConfig) -> None:
        super().__init__()
        self.config = config
        self.devices: dict[uuid.UUID, _Device] = {}
        self.clients: dict[Channel, uuid.UUID | None] = {}
        self.client_uids: dict[Channel, int] = {}
        #: peers to drop at the next tick, and why (found while inside a device callback)
        self._doomed: dict[Channel, str] = {}
        #: the signal that stopped serve_forever(), if one did (the command exits 128 + it)
        self.stopped_by: int | None = None
        self._listener: socket.socket | None = None
        self._made_devices_dir = False
        self._status = StatusLog(log, config.json_status)

    # -- status ----------------------------------------------------------------

    def status(self, event: str, **fields: object) -> None:
        self._status(event, **fields)

    # -- set-up ----------------------------------------------------------------

    def listen(self) -> None:
        """Bind the socket; refuse one a live server answers on, or a path that is not a socket.

        Nothing is created above the socket's own directory; the devices directory
        is made if missing (and removed again by :meth:`close`).
        """
        path = self.config.socket_path
        if not path.parent.is_dir():
            raise ServerError(f"{path.parent} does not exist: create it first")
        devices = self.config.devices_dir
        if not devices.is_dir():
            if not devices.parent.is_dir():
                raise ServerError(f"{devices.parent} does not exist: create it first")
            devices.mkdir(mode=0o700)
            self._made_devices_dir = True
        s = listen_unix(path, 16, "a vhost-pci server")
        self._listener = s
        self.add_reader(s, self._accept)

    # -- driver VMs --------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid not in self.config.allow_uids:
            log.warning(
                "refused a driver VM connection from uid %d (pid %d): not in the allow list", uid, pid
            )
            self.status("refused", uid=uid, pid=pid, why="uid not allowed")
            conn.close()
            return
        held = sum(1 for u in self.client_uids.values() if u == uid)
        if held >= self.config.peer_limits.max_connections_per_uid:
            # One local user must not exhaust the server's fds for the others.
            log.warning("refused a connection from uid %d (pid %d): it already holds %d", uid, pid, held)
            self.status("refused", uid=uid, pid=pid, why="max_connections_per_uid")
            conn.close()
            return
        ch = Channel(
            conn,
            self.config.limits,
            partial_timeout=self.config.partial_timeout,
            max_outbuf=self.config.peer_limits.max_outbuf,
        )
        self.clients[ch] = None
        self.client_uids[ch] = uid
        self.add_reader(conn, lambda: self._client_readable(ch))
        self.status("client-connected", pid=pid, uid=uid)

    def _client_readable(self, ch: Channel) -> None:
        try:
            for msg in ch.receive():
                self._client_message(ch, msg)
        except PeerClosedError as e:
            self._drop_client(ch, str(e))
        except ProtocolError as e:
            self._drop_client(ch, f"protocol error: {e}")
        except (OSError, VfioDeviceError) as e:
            # One peer's failure (a device socket that cannot be made, a refused mapping) ends that
            # peer's connection, never the server.
            log.warning("driver VM request failed: %s", e)
            self._drop_client(ch, f"request failed: {e}")

    def _client_message(self, ch: Channel, msg: SockMessage) -> None:
        bound = self.clients[ch]
        if bound is not None and bound != msg.vm_uuid:
            raise ProtocolError("socket header.vm_uuid", f"connection belongs to {bound}, not {msg.vm_uuid}")
        if bound is None:
            dev = self._bind(ch, msg)
            if dev is None:
                return
        else:
            dev = self.devices[bound]
        dev.session.on_message(msg)

    def _bind(self, ch: Channel, msg: SockMessage) -> _Device | None:
        """The first message of a connection names its driver VM (protocol.md 7.2 step 1, 7.5).

        A UUID belongs to the uid that first claimed it while its device lives:
        another uid naming it is refused and dropped, never evicting the owner.
        The owner's older connection of the same UUID is dropped first (UP ->
        GONE), then the new one takes the device over (GONE -> UP).
        """
        uid = self.client_uids[ch]
        dev = self.devices.get(msg.vm_uuid)
        if dev is not None and dev.owner_uid != uid:
            self._answer_fail(ch, msg, FailReason.REJECTED)
            self.status("refused", uid=uid, uuid=str(msg.vm_uuid), why=f"uuid owned by uid {dev.owner_uid}")
            self._doomed[ch] = f"uuid {msg.vm_uuid} belongs to uid {dev.owner_uid}"
            return None
        for other, u in list(self.clients.items()):
            if u == msg.vm_uuid and other is not ch:
                self._drop_client(other, "replaced by a new connection of the same UUID")
        if dev is not None and not self.config.takeover:
            # Its client may hold the old memory mapped for good: the comeback gets a new device.
            self._free_device(msg.vm_uuid, "its driver VM came back (no takeover)")
            dev = None
        if dev is None:
            if not (isinstance(msg.body, SockMemoryInfo) and msg.body.op == Op.ADD):
                self._answer_fail(ch, msg, FailReason.NOT_FOUND)
                return None
            dev = self._create_device(ch, msg.vm_uuid, msg)
            if dev is None:
                return None
        else:
            dev.session.teardown()  # a no-op when it is GONE already, as it is after the drop above
            dev.session.reconnect()
        self.clients[ch] = msg.vm_uuid
        dev.session.send = self._sender(ch)
        dev.model.set_remote(msg.vm_uuid.bytes, True)
        self.status("remote-up", uuid=str(msg.vm_uuid))
        return dev

    def _answer_fail(self, ch: Channel, msg: SockMessage, reason: FailReason) -> None:
        """FAIL a request the server answers before any session has it; its fds are closed."""
        for fd in msg.fds():
            os.close(fd)
        ack_type = {
            SockMsgType.MEMORY_INFO: SockMsgType.MEMORY_INFO_ACK,
            SockMsgType.DEVICE_INFO: SockMsgType.DEVICE_INFO_ACK,
        }.get(msg.msg_type, SockMsgType.FEATURE_BITS_ACK)
        self._sender(ch)(
            SockMessage(ack_type, msg.vm_uuid, msg.request_id, SockAck(AckResult.ADD_FAIL, reason))
        )

    def _sender(self, ch: Channel) -> Callable[[SockMessage], None]:
        """``ch.send`` for a session; a peer that stopped reading is dropped at the next tick.

        Acks reach the session from inside the device model's callbacks, so the
        drop (which tears the session down) must not happen there and then.
        """

        def send(msg: SockMessage) -> None:
            if ch in self._doomed or ch.closed:
                return
            try:
                ch.send(msg)
            except ProtocolError as e:
                self._doomed[ch] = str(e)
            except OSError as e:
                self._doomed[ch] = f"send failed: {e}"

        return send

    def _create_device(self, ch: Channel, vm_uuid: uuid.UUID, msg: SockMessage) -> _Device | None:
        """ABSENT -> UP: a device for a new UUID, within the uid's and the window's limits."""
        assert isinstance(msg.body, SockMemoryInfo)
        limits = self.config.peer_limits
        uid = self.client_uids[ch]
        end = max(r.mmap_offset + r.memory_size for r in msg.body.regions)
        size = self.config.window_size or window_size_for(end)
        if size > limits.max_window_bytes:
            log.warning("%s: a window of %#x bytes passes max_window_bytes", vm_uuid, size)
            self._answer_fail(ch, msg, FailReason.LIMIT)
            return None
        held = [(d.session.gone_since, u) for u, d in self.devices.items() if d.owner_uid == uid]
        if len(held) >= limits.max_devices_per_uid:
            gone = sorted((since, u) for since, u in held if self.devices[u].session.gone)
            if not gone:
                self._answer_fail(ch, msg, FailReason.LIMIT)
                self.status("refused", uid=uid, uuid=str(vm_uuid), why="max_devices_per_uid")
                return None
            self._free_device(gone[0][1], "max_devices_per_uid: the uid's oldest gone device makes room")
        model = VhostPciDeviceModel(
            window_size=size,
            virtio_id=self.config.virtio_id,
            max_regions=self.config.limits.max_regions,
            max_frontends=self.config.peer_limits.max_frontends,
            direct_doorbells=self.config.direct_doorbells,
        )
        path = self.config.devices_dir / f"{vm_uuid}.sock"
        vfio = VfioUserServer(str(path), model)
        model.attach_loop(self.add_reader, self.remove_reader)
        self.add_reader(vfio.fileno(), lambda: vfio.run_once(0))
        session = Session(
            vm_uuid,
            model,
            lambda _m: None,
            self.config.ping_interval,
            self.config.ping_misses,
            limits=self.config.peer_limits,
            trust_memory=self.config.trust_driver_memory,
        )
        model.on_ack = session.on_ack
        model.on_reset = session.on_reset
        model.on_driver_ok = session.on_driver_ok
        model.on_ack_error = lambda reason, rid: self.status(
            "ack-error", uuid=str(vm_uuid), reason=reason, id=rid
        )
        dev = _Device(model, vfio, session, path, uid)
        self.devices[vm_uuid] = dev
        self.status("device", uuid=str(vm_uuid), socket=str(path), window_size=size)
        return dev

    def _free_device(self, vm_uuid: uuid.UUID, why: str) -> None:
        """GONE -> ABSENT: the device is unplugged, its socket removed, everything it held closed."""
        dev = self.devices.pop(vm_uuid)
        self.remove_reader(dev.vfio.fileno())
        dev.vfio.close()  # drops its client: the model resets, its eventfds close
        dev.session.close()
        self.status("device-freed", uuid=str(vm_uuid), why=why)

    def _drop_client(self, ch: Channel, why: str) -> None:
        vm = self.clients.pop(ch, None)
        self.client_uids.pop(ch, None)
        self._doomed.pop(ch, None)
        self.remove_reader(ch.fileno())
        ch.close()
        self.status("client-dropped", uuid=str(vm) if vm else None, why=why)
        if vm is not None and vm in self.devices:
            self.devices[vm].session.teardown()
            self.status("remote-down", uuid=str(vm), why=why)

    # -- the loop ----------------------------------------------------------------

    def _tick(self) -> None:
        for ch, why in list(self._doomed.items()):
            del self._doomed[ch]
            if ch in self.clients:
                self._drop_client(ch, why)
        for ch, vm in list(self.clients.items()):
            if ch.partial_timed_out():
                self._drop_client(ch, f"stalled mid-message for {ch.stalled_for():.1f}s")
                continue
            if vm is not None and not self.devices[vm].session.tick():
                self._drop_client(ch, f"missed {self.config.ping_misses} heartbeats")
                continue
            try:
                ch.flush()
            except OSError as e:
                self._drop_client(ch, f"send failed: {e}")
        now = time.monotonic()
        for vm, dev in list(self.devices.items()):
            if not dev.session.gone:
                continue
            if now - dev.session.gone_since > self.config.gone_grace:
                self._free_device(vm, f"gone for {self.config.gone_grace:g}s")
            elif not self.config.takeover and dev.session.outstanding() == 0:
                # The device VM let go of the frontends and the memory: nothing waits for the device.
                self._free_device(vm, "gone, teardown acked (no takeover)")

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT/SIGHUP; then close every device and socket."""
        assert self._listener is not None
        tick = min(0.1, self.config.ping_interval / 4)
        try:
            self.stopped_by = run_until_signalled(self, tick, self._tick, self._ready)
        finally:
            self.close()

    def _ready(self) -> None:
        # Said once everything the loop holds is open: whoever waits for it (tests counting our
        # fds, the harness) sees the server as it will stay while idle.
        self.status(
            "listening", socket=str(self.config.socket_path), devices_dir=str(self.config.devices_dir)
        )

    def close(self) -> None:
        for ch in list(self.clients):
            self._drop_client(ch, "server shutting down")
        for vm in list(self.devices):
            self._free_device(vm, "server shutting down")
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                self.config.socket_path.unlink()
            except FileNotFoundError:
                pass
        if self._made_devices_dir:
            self._made_devices_dir = False
            try:
                self.config.devices_dir.rmdir()  # empty once every device's socket is gone
            except OSError as e:
                log.warning("cannot remove %s: %s", self.config.devices_dir, e.strerror)
        super().close()
        self.status("stopped", at=time.time())
