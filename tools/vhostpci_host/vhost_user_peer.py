"""A raw vhost-user front-end that replays what stock QEMU sends, for tests of the front door.

The sequences are QEMU 11.1.3's for a ``-netdev vhost-user`` + ``virtio-net-pci``
driver VM (hw/virtio/vhost-user.c, hw/virtio/vhost.c, hw/net/vhost_net.c; and
what was seen on the wire, /work/shared/design/vhost-user-notes.md):

* netdev creation: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
  GET_QUEUE_NUM, SET_OWNER, GET_FEATURES, SET_VRING_CALL and SET_VRING_ERR per
  ring, SET_VRING_ENABLE(1) per ring;
* DRIVER_OK: SET_VRING_ENABLE(1) per ring, SET_FEATURES, SET_MEM_TABLE, then per
  ring SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL;
* stop (reset, reboot, power-off): GET_VRING_BASE per ring, SET_VRING_ENABLE(0) per ring.

Need-reply is set where QEMU sets it (SET_MEM_TABLE, SET_VRING_CALL/ERR/ENABLE
with REPLY_ACK), and every reply is checked as QEMU checks it. The guest side is
a simulated virtio-net driver (:class:`~vhostpci_host.frontend.NetFrontend`) in a
memfd, whose "user virtual addresses" are an arbitrary base plus the file offset,
as QEMU's mapping of its RAM would be. Real socket, memfd and eventfds.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Sequence

from vhostpci_driver.errors import ProtocolError
from vhostpci_host import netpacket
from vhostpci_host import vhost_user_wire as vu
from vhostpci_host.framing import send_with_fds
from vhostpci_host.frontend import NetFrontend
from vhostpci_host.guestram import GuestRam
from vhostpci_host.vhost_user_wire import ProtocolFeature, Request

#: Where "QEMU" has its RAM mapped: any page-aligned base; the back end only translates it.
UVA_BASE = 0x7F12_3400_0000
PEER_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)
)


class VhostUserPeer:
    """One driver VM's QEMU, as far as its vhost-user socket shows it."""

    def __init__(
        self,
        path: str,
        mac: str,
        *,
        memory: int = 64 << 20,
        nregions: int = 1,
        queue_size: int = 128,
        timeout: float = 10.0,
        ram: GuestRam | None = None,
    ) -> None:
        """``ram``: the memory of a QEMU that only reconnects its socket (``reconnect-ms``)."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.ram = ram if ram is not None else GuestRam(memory, nregions)
        self.mac = netpacket.mac_bytes(mac)
        self.queue_size = queue_size
        self.fe = NetFrontend(self.ram, self.mac, queue_size)
        self.err_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
        self.reply_ack = False
        self.offered = 0
        self.features = 0

    # -- one request ---------------------------------------------------------------------

    def request(
        self, req: Request | int, payload: bytes = b"", fds: Sequence[int] = (), *, need_reply: bool = False
    ) -> bytes | None:
        """Send one request; read its reply when it has one (its own, or REPLY_ACK's)."""
        send_with_fds(self.sock, vu.encode_request(req, payload, need_reply=need_reply), list(fds))
        if need_reply or req in vu.ANSWERED:
            return self.read_reply(Request(req))
        return None

    def read_reply(self, req: Request) -> bytes:
        head = self._read(vu.HEADER.size)
        _, _, size = vu.HEADER.unpack_from(head, 0, "reply header")
        return vu.decode_reply(head + self._read(size), req)

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the back end closed the connection")
            buf += chunk
        return buf

    def u64(self, req: Request) -> int:
        reply = self.request(req)
        assert reply is not None
        return int.from_bytes(reply, "little")

    def acked(self, req: Request, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """A request QEMU sends with need-reply (under REPLY_ACK); the status must be 0."""
        reply = self.request(req, payload, fds, need_reply=self.reply_ack)
        if reply is not None and int.from_bytes(reply, "little") != 0:
            raise ProtocolError(req.name, f"the back end answered failure {reply.hex()}")

    def _state(self, index: int, num: int) -> bytes:
        return vu.VRING_STATE.pack(index, num)

    def _file(self, index: int, fd: int | None) -> tuple[bytes, list[int]]:
        if fd is None:
            return vu.U64.pack(index | vu.VRING_NOFD), []
        return vu.U64.pack(index), [fd]

    # -- QEMU's sequences -------------------------------------------------------------------

    def init(self) -> None:
        """netdev creation (vhost_user_backend_init, vhost_dev_init, vhost_virtqueue_init)."""
        self.offered = self.u64(Request.GET_FEATURES)
        if self.offered >> vu.F_PROTOCOL_FEATURES & 1:
            pf = self.u64(Request.GET_PROTOCOL_FEATURES) & PEER_PROTOCOL_FEATURES
            pf &= ~(1 << ProtocolFeature.CONFIG)  # QEMU strips CONFIG for net
            self.request(Request.SET_PROTOCOL_FEATURES, vu.U64.pack(pf))
            self.reply_ack = bool(pf >> ProtocolFeature.REPLY_ACK & 1)
            if pf >> ProtocolFeature.MQ & 1 and self.u64(Request.GET_QUEUE_NUM) < 1:
                raise ProtocolError("GET_QUEUE_NUM", "the back end serves no queue pair")
        self.request(Request.SET_OWNER)
        self.u64(Request.GET_FEATURES)
        for i, q in enumerate(self.fe.queues):
            # vhost_virtqueue_init: the masked notifier until the guest unmasks the vector.
            self.acked(Request.SET_VRING_CALL, *self._file(i, q.call_fd))
            self.acked(Request.SET_VRING_ERR, *self._file(i, self.err_fds[i]))
        self.enable(True)

    def enable(self, on: bool) -> None:
        for i in range(len(self.fe.queues)):
            self.acked(Request.SET_VRING_ENABLE, self._state(i, int(on)))

    def regions(self) -> list[vu.Region]:
        return [
            vu.Region(r.xgpa, r.size, UVA_BASE + r.window_offset, r.window_offset, self.ram.fd)
            for r in self.ram.regions
        ]

    def uva(self, gpa: int) -> int:
        for r in self.ram.regions:
            if r.xgpa <= gpa < r.xgpa + r.size:
                return UVA_BASE + r.window_offset + gpa - r.xgpa
        raise ValueError(f"{gpa:#x} is not guest RAM")

    def start(self, guest_features: int, bases: Sequence[int] = (0, 0)) -> None:
        """DRIVER_OK: vhost_net_start -> vhost_dev_start -> vhost_virtqueue_start per ring."""
        self.enable(True)
        self.features = guest_features & self.offered
        self.request(Request.SET_FEATURES, vu.U64.pack(self.features | (1 << vu.F_PROTOCOL_FEATURES)))
        regions = self.regions()
        self.acked(Request.SET_MEM_TABLE, vu.mem_table_payload(regions), [r.fd for r in regions])
        for i, q in enumerate(self.fe.queues):
            self.request(Request.SET_VRING_NUM, self._state(i, q.size))
            self.request(Request.SET_VRING_BASE, self._state(i, bases[i]))
            addr = vu.VRING_ADDR.pack(i, 0, self.uva(q.desc), self.uva(q.used), self.uva(q.avail), q.used)
            self.request(Request.SET_VRING_ADDR, addr)
            self.request(Request.SET_VRING_KICK, *self._file(i, q.kick_fd))
            self.acked(Request.SET_VRING_CALL, *self._file(i, q.call_fd))
        self.fe.negotiated(self.features)

    def stop(self) -> list[int]:
        """Guest reset or power-off: GET_VRING_BASE per ring (QEMU blocks on each), then disable."""
        bases = []
        for i in range(len(self.fe.queues)):
            reply = self.request(Request.GET_VRING_BASE, self._state(i, 0))
            assert reply is not None
            index, num = vu.VRING_STATE.unpack_from(reply, 0, "GET_VRING_BASE reply")
            if index != i:
                raise ProtocolError("GET_VRING_BASE.index", f"reply for ring {index}, asked {i}")
            bases.append(num)
        self.enable(False)
        return bases

    def guest_reset(self) -> None:
        """The guest driver resets the device: fresh rings (a new driver instance), base 0."""
        seq = self.fe.seq
        self.fe.close()
        self.fe = NetFrontend(self.ram, self.mac, self.queue_size)
        self.fe.seq = seq  # the test traffic's sequence goes on, so the far end sees no duplicates

    # -- traffic -------------------------------------------------------------------------------

    def pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` for a call, then take what arrived and reclaim TX."""
        fds = [q.call_fd for q in self.fe.queues]
        ready, _, _ = select.select(fds, [], [], timeout)
        for q in self.fe.queues:
            q.drain_call()
        self.fe.receive()
        self.fe.reclaim_tx()
        del ready

    def close(self, keep_memory: bool = False) -> None:
        """QEMU gone (its socket closes, nothing else is said); ``keep_memory``: only the socket went."""
        self.sock.close()
        self.fe.close()
        for fd in self.err_fds:
            os.close(fd)
        if not keep_memory:
            self.ram.close()


def exchange(peers: Sequence[VhostUserPeer], count: int, size: int, timeout: float = 30.0) -> float:
    """Every peer sends ``count`` frames to the next one; returns seconds until all arrived."""
    t0 = time.monotonic()
    n = len(peers)
    want = [p.fe.receiver.received + count for p in peers]
    sent = [0] * n
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        for i, p in enumerate(peers):
            if sent[i] < count:
                sent[i] += p.fe.send(peers[(i + 1) % n].mac, min(64, count - sent[i]), lambda _s: size)
        for p in peers:
            p.pump(0.01)
        if all(p.fe.receiver.received >= want[i] for i, p in enumerate(peers)):
            return time.monotonic() - t0
    got = [p.fe.receiver.received for p in peers]
    raise TimeoutError(f"frames did not arrive in {timeout}s: received {got}, wanted {want}")
