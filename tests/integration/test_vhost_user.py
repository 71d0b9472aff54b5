"""The vhost-user front door end to end: raw vhost-user peers replaying QEMU, the server, our driver.

Real processes (the server, one front door per driver VM), real sockets, memfds
and eventfds; the device VM side is our driver over vfio-user with the net
switch, in this process. The peers replay QEMU 11.1.3's start, stop and restart
sequences (tools/vhostpci_host/vhost_user_peer.py cites where each comes from).
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.conftest import MAC_A, MAC_B, MAC_C, UUIDS, wait_for
from tests.integration.test_host_side import fd_count
from vhostpci_driver.apps.net import SUPPORTED, NetBackend, net_policy
from vhostpci_driver.device import VhostPciDevice
from vhostpci_driver.events import FrontendRemoved, MemoryRemoved
from vhostpci_driver.service import Service
from vhostpci_host import vhost_user_wire as vu
from vhostpci_host.framing import send_with_fds
from vhostpci_host.harness import HostServer, JsonProcess, host_command
from vhostpci_host.vhost_user_peer import UVA_BASE, VhostUserPeer, exchange
from vhostpci_host.vhost_user_wire import Request

#: What a Linux guest acks of our offer (it would take more, but these are what we offer).
GUEST_FEATURES = SUPPORTED


class FrontDoor(JsonProcess):
    """``vhostpci-host vhost-user`` for one driver VM."""

    def __init__(self, directory: Path, server: Path, vm_uuid: uuid.UUID, mac: str, *extra: str) -> None:
        self.uuid = vm_uuid
        self.mac = mac
        self.socket = directory / f"vu-{str(vm_uuid)[-4:]}.sock"
        argv = ["vhost-user", "--socket", str(self.socket), "--server", str(server)]
        argv += ["--uuid", str(vm_uuid), "--mac", mac, "--json", *extra]
        super().__init__(host_command(*argv), f"vhost-user-{str(vm_uuid)[-4:]}")
        self.read_event("listening")


@dataclass
class VuRig:
    server: HostServer
    directory: Path
    doors: list[FrontDoor] = field(default_factory=list)
    peers: list[VhostUserPeer] = field(default_factory=list)
    devices: list[VhostPciDevice] = field(default_factory=list)
    backend: NetBackend = field(default_factory=lambda: NetBackend("switch"))
    service: Service | None = None
    thread: threading.Thread | None = None

    def door(self, vm_uuid: uuid.UUID, mac: str, *extra: str) -> FrontDoor:
        d = FrontDoor(self.directory, self.server.socket, vm_uuid, mac, *extra)
        self.doors.append(d)
        return d

    def peer(self, door: FrontDoor) -> VhostUserPeer:
        p = VhostUserPeer(str(door.socket), door.mac)
        door.read_event("connected")
        self.peers.append(p)
        return p

    def serve(self) -> None:
        for d in self.doors:
            path = self.server.device_socket(d.uuid)
            self.devices.append(VhostPciDevice(f"vfio-user:{path}", policies={1: net_policy}))
        self.service = Service(self.devices, self.backend)
        self.thread = threading.Thread(target=self.service.run, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop what the rig started, processes last and even when an earlier step fails."""
        try:
            if self.service is not None and self.thread is not None:
                self.service.stop.set()
                self.thread.join(10)
            for dev in self.devices:
                dev.close()
            for p in self.peers:
                p.close()
        finally:
            for d in self.doors:
                d.stop()
            self.server.stop()


@pytest.fixture
def vu_rig(short_dir: Path) -> Iterator[VuRig]:
    r = VuRig(HostServer(short_dir, ping_interval=0.2, ping_misses=3), short_dir)
    try:
        yield r
    finally:
        r.close()


def started_pair(rig: VuRig) -> tuple[VhostUserPeer, VhostUserPeer]:
    """Two driver VMs through init and DRIVER_OK, served by our switch, RX rings filled."""
    doors = [rig.door(UUIDS[0], MAC_A), rig.door(UUIDS[1], MAC_B)]
    peers = [rig.peer(d) for d in doors]
    for p in peers:
        p.init()
        p.start(GUEST_FEATURES)
    rig.serve()
    for d in doors:
        d.read_event("frontend-up", timeout=20)
    for p in peers:
        p.fe.start()
    return peers[0], peers[1]


def test_qemu_start_sequence_carries_frames_both_ways(vu_rig: VuRig) -> None:
    a, b = started_pair(vu_rig)
    assert a.offered >> 34 & 1 == 0, "VIRTIO_F_RING_PACKED must never be offered"
    assert a.offered & SUPPORTED == SUPPORTED
    exchange([a, b], 500, 1000)
    for p, other in ((a, b), (b, a)):
        r = p.fe.receiver
        assert r.corrupt == 0 and r.duplicates == 0
        assert r.seen[other.mac] and len(r.seen[other.mac]) == 500
    stats = vu_rig.backend.stats()
    assert stats[MAC_A]["tx_frames"] == 500 and stats[MAC_B]["rx_frames"] == 500


def test_stop_answers_the_rings_real_state_and_restart_resumes_there(vu_rig: VuRig) -> None:
    a, b = started_pair(vu_rig)
    exchange([a, b], 300, 200)
    bases = a.stop()
    # The device VM's state, handed back through DEVICE_INFO(DEL): every TX chain A sent was
    # taken, every RX buffer that carried one of B's frames was used; nothing is in flight.
    assert bases == [a.fe.rx.ring.last_used_idx, a.fe.tx.ring.last_used_idx]
    assert bases == [300, 300]
    ev = vu_rig.doors[0].read_event("frontend-down")
    assert [s["last_avail_idx"] for s in ev["states"]] == [300, 300]
    # Link down/up without a guest reset: QEMU gives the bases back, the rings go on.
    a.start(GUEST_FEATURES, bases)
    vu_rig.doors[0].read_event("frontend-up", timeout=20)
    exchange([a, b], 300, 200)
    assert a.fe.receiver.corrupt == 0 and a.fe.receiver.duplicates == 0
    assert a.stop() == [600, 600]


def test_guest_reset_restarts_from_zero_on_fresh_rings(vu_rig: VuRig) -> None:
    a, b = started_pair(vu_rig)
    exchange([a, b], 100, 100)
    a.stop()
    a.guest_reset()  # a new driver instance: fresh rings, base 0 (guest reboot, unbind/bind)
    a.start(GUEST_FEATURES)
    vu_rig.doors[0].read_event("frontend-up", timeout=20)
    a.fe.start()
    exchange([a, b], 100, 100)
    assert a.fe.receiver.corrupt == 0


def test_killed_qemu_is_removed_and_a_new_one_comes_back_with_its_uuid(vu_rig: VuRig) -> None:
    a, b = started_pair(vu_rig)
    exchange([a, b], 50, 100)
    dev_a = vu_rig.devices[0]
    assert vu_rig.service is not None
    a.close()  # QEMU killed: its socket closes, nothing else is said (no GET_VRING_BASE)
    vu_rig.peers.remove(a)
    assert "front-end" in vu_rig.doors[0].read_event("dropped")["why"]
    events = vu_rig.service.events

    def kinds() -> list[type]:
        return [type(e) for e in events if isinstance(e, FrontendRemoved | MemoryRemoved)]

    wait_for(lambda: MemoryRemoved in kinds(), 5, "the frontend, then its memory, removed")
    assert kinds() == [FrontendRemoved, MemoryRemoved]
    # A new QEMU (new memory, new memfd) with the same UUID: served again by the same device,
    # the other driver VM untouched, no restart of the device VM.
    a2 = vu_rig.peer(vu_rig.doors[0])
    a2.init()
    a2.start(GUEST_FEATURES)
    vu_rig.doors[0].read_event("frontend-up", timeout=20)
    a2.fe.seq = a.fe.seq
    a2.fe.start()
    exchange([a2, b], 50, 100)
    assert vu_rig.devices[0] is dev_a
    assert a2.fe.receiver.corrupt == 0 and b.fe.receiver.duplicates == 0 and b.fe.receiver.corrupt == 0


# -- hostile peers ---------------------------------------------------------------------------


def raw(door: FrontDoor) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(door.socket))
    door.read_event("connected")
    return s


def owner(s: socket.socket) -> None:
    s.sendall(vu.encode_request(Request.SET_OWNER))


def memfd(size: int = 1 << 20) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def table(*regions: tuple[int, int, int]) -> bytes:
    return vu.mem_table_payload([vu.Region(g, n, u, 0) for g, n, u in regions])


def send(s: socket.socket, data: bytes, fds: list[int]) -> None:
    send_with_fds(s, data, fds)
    for fd in fds:
        os.close(fd)


def _bad_version(s: socket.socket) -> None:
    s.sendall(vu.HEADER.pack(Request.GET_FEATURES, 0x2, 0))


def _oversized(s: socket.socket) -> None:
    s.sendall(vu.HEADER.pack(Request.SET_MEM_TABLE, vu.VERSION, 1 << 20))


def _before_owner(s: socket.socket) -> None:
    send(s, vu.encode_request(Request.SET_MEM_TABLE, table((0, 1 << 20, UVA_BASE))), [memfd()])


def _overlap(s: socket.socket) -> None:
    owner(s)
    body = table((0, 1 << 20, UVA_BASE), (0x80000, 1 << 20, UVA_BASE + (4 << 20)))
    send(s, vu.encode_request(Request.SET_MEM_TABLE, body), [memfd(), memfd()])


def _over_limit(s: socket.socket) -> None:
    owner(s)
    send(s, vu.encode_request(Request.SET_MEM_TABLE, table((0, 128 << 30, UVA_BASE))), [memfd()])


def _too_many_regions(s: socket.socket) -> None:
    owner(s)
    regions = [(i << 20, 1 << 20, UVA_BASE + (i << 20)) for i in range(9)]
    send(s, vu.encode_request(Request.SET_MEM_TABLE, table(*regions)), [memfd() for _ in regions])


def _ring_outside(s: socket.socket) -> None:
    owner(s)
    send(s, vu.encode_request(Request.SET_MEM_TABLE, table((0, 1 << 20, UVA_BASE))), [memfd()])
    s.sendall(vu.encode_request(Request.SET_VRING_NUM, vu.VRING_STATE.pack(0, 256)))
    addr = vu.VRING_ADDR.pack(0, 0, UVA_BASE + (2 << 20), UVA_BASE + (3 << 20), UVA_BASE + 0x1000, 0)
    s.sendall(vu.encode_request(Request.SET_VRING_ADDR, addr))


def _missing_fds(s: socket.socket) -> None:
    owner(s)
    s.sendall(vu.encode_request(Request.SET_MEM_TABLE, table((0, 1 << 20, UVA_BASE))))


def _extra_fds(s: socket.socket) -> None:
    send(s, vu.encode_request(Request.SET_OWNER), [memfd()])


def _unsupported(s: socket.socket) -> None:
    owner(s)
    s.sendall(vu.encode_request(Request.SET_LOG_BASE, bytes(16)))


def _closes_mid_message(s: socket.socket) -> None:
    owner(s)
    send(s, vu.encode_request(Request.SET_MEM_TABLE, table((0, 1 << 20, UVA_BASE)))[:20], [memfd()])


HOSTILE = {
    "bad-version": (_bad_version, "version"),
    "oversized": (_oversized, "over 4096"),
    "before-owner": (_before_owner, "before SET_OWNER"),
    "overlap": (_overlap, "overlaps"),
    "over-limit": (_over_limit, "over the limit"),
    "too-many-regions": (_too_many_regions, "more fds than a message may carry"),
    "missing-fds": (_missing_fds, "carries 0 fds"),
    "extra-fds": (_extra_fds, "carries 1 fds"),
    "unsupported": (_unsupported, "SET_LOG_BASE is not supported"),
    "closes-mid-message": (_closes_mid_message, "mid-message"),
    # Last: its memory table reaches the server, which makes a device for this UUID and keeps it.
    "ring-outside": (_ring_outside, "no region"),
}


def test_hostile_peers_lose_only_their_own_connection(vu_rig: VuRig) -> None:
    a, b = started_pair(vu_rig)
    c = vu_rig.door(UUIDS[2], MAC_C)
    base_door, base_server = fd_count(c.pid), fd_count(vu_rig.server.pid)
    for name, (attack, why) in HOSTILE.items():
        if name == "ring-outside":
            # Nothing of the bad peers reached the server so far: its fds are as they were.
            wait_for(lambda: fd_count(vu_rig.server.pid) == base_server, 5, "the server's fds at baseline")
        s = raw(c)
        attack(s)
        if name == "closes-mid-message":
            s.close()
        dropped = c.read_event("dropped")
        assert why in dropped["why"], (name, dropped)
        s.close()
        wait_for(lambda: fd_count(c.pid) == base_door, 5, f"{name}: the front door's fds back to {base_door}")
    assert c.proc.poll() is None
    # Every bad peer's server connection was dropped (each its own: none of A's or B's).
    dropped_uuids = {vu_rig.server.read_event("client-dropped")["uuid"] for _ in HOSTILE}
    assert dropped_uuids <= {None, str(UUIDS[2])}
    # The other driver VMs and the device VM never noticed.
    exchange([a, b], 200, 500)
    assert a.fe.receiver.corrupt == 0 and b.fe.receiver.corrupt == 0
    # And the front door still serves a well-behaved driver VM afterwards.
    p = vu_rig.peer(c)
    p.init()
    assert p.offered >> vu.F_PROTOCOL_FEATURES & 1
