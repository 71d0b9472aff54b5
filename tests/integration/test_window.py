"""The remote window follows the driver VM's memory: a DEL unmaps, a re-ADD from a new memfd maps anew.

A driver VM written here by hand (its memory a fresh memfd each round, its
net frontend the simulator's) adds memory and a frontend, sends frames to a
well-behaved simulated driver VM through our switch, removes the frontend and
the memory, and does it again from a new memfd at the same offsets and sizes.
Each round must show the new memory (``vhostpci dump`` reads the region table)
and forward from it, and our process's fds and mappings of driver-VM memory,
and the server's fds, must be back to where they were after each round.
"""

from __future__ import annotations

import gc
import os
import select
import uuid
from pathlib import Path

from tests.integration.conftest import MAC_A, MAC_C
from tests.integration.test_host_side import settled_fds
from tests.integration.test_peer_limits import RawPeer
from vhostpci_driver.apps.net import net_policy
from vhostpci_driver.device import VhostPciDevice
from vhostpci_driver.wire import sock as sw
from vhostpci_driver.wire.ctrl import AckResult, DeviceInfo, FeatureBits, Op
from vhostpci_driver.wire.sock import SockAck, SockMemoryInfo, SockMsgType
from vhostpci_host import netpacket
from vhostpci_host.frontend import NetFrontend
from vhostpci_host.guestram import GuestRam
from vhostpci_host.harness import Rig

ROUNDS = 3
FRAMES = 20


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mappings_of(inodes: set[int]) -> int:
    """Our mappings of these files (the fifth field of /proc/self/maps is the inode)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return sum(len(f) > 5 and int(f[4]) in inodes for f in (line.split() for line in lines))


def answered(peer: RawPeer, rid: int, result: AckResult = AckResult.ADD_DONE) -> None:
    msg = peer.reply(10)
    assert msg is not None and msg.request_id == rid, msg
    assert isinstance(msg.body, SockAck) and msg.body.result == result, msg


def pong(peer: RawPeer) -> None:
    """Answer the server's heartbeat while we wait for something else (nothing else is due)."""
    if select.select([peer.ch.fileno()], [], [], 0)[0]:
        for msg in peer.ch.receive():
            assert msg.msg_type == SockMsgType.PING, msg
            peer.ch.send(sw.SockMessage(SockMsgType.PONG, peer.uuid, msg.request_id, sw.Empty()))


def from_c(rig: Rig) -> int:
    return rig.vms[0].stats()["frontends"][0]["from"].get(MAC_C, 0)  # type: ignore[no-any-return]


def test_a_re_added_memory_is_mapped_anew_and_the_old_one_released(rig: Rig) -> None:
    rig.add_vm(MAC_A)
    rig.serve()
    peer = RawPeer(rig.server.socket, memory=4096)
    peer.uuid = uuid.UUID(int=0xC0FFEE)
    dev: VhostPciDevice | None = None
    base_fds = base_server = -1
    inodes: set[int] = set()  # every memfd the peer used so far
    try:
        for rnd in range(ROUNDS):
            ram = GuestRam(32 << 20)
            inodes.add(os.fstat(ram.fd).st_ino)
            fe = NetFrontend(ram, netpacket.mac_bytes(MAC_C), 64)
            mark = f"round {rnd} of memfd {ram.fd}".encode()
            ram.view(0, len(mark))[:] = mark
            rid = peer.send(SockMsgType.MEMORY_INFO, SockMemoryInfo(Op.ADD, ram.socket_regions()))
            if dev is None:  # the first ADD creates the device: serve it with the others
                dev = VhostPciDevice(f"vfio-user:{rig.server.device_socket(peer.uuid)}",
                                     policies={1: net_policy})
                rig.devices.append(dev)
            answered(peer, rid)
            # What `vhostpci dump` shows: this round's memory, not an earlier round's.
            assert dev.table_dump(0, len(mark)) == mark, f"round {rnd}: BAR 2 shows an earlier memfd"
            body = sw.SockDeviceInfo(
                fe.device_info(), tuple(q.kick_fd for q in fe.queues), tuple(q.call_fd for q in fe.queues)
            )
            answered(peer, peer.send(SockMsgType.DEVICE_INFO, body))
            rid = peer.send(SockMsgType.FEATURE_BITS, FeatureBits(fe.device_type, fe.device_id, fe.offered))
            msg = peer.reply(10)  # the switch declines some bits: the subset comes back to confirm
            assert msg is not None and msg.request_id == rid and isinstance(msg.body, FeatureBits), msg
            fe.negotiated(msg.body.features)
            done = SockAck(AckResult.ADD_DONE)
            peer.ch.send(sw.SockMessage(SockMsgType.FEATURE_BITS_ACK, peer.uuid, rid, done))
            fe.start()
            fe.seq = rnd * FRAMES  # new frame numbers each round: the receiver counts each once
            # A frontend in this memory is served: its frames reach the other driver VM.
            before = from_c(rig)
            sent = 0
            for _ in range(200):
                if sent < FRAMES:
                    sent += fe.send(netpacket.mac_bytes(MAC_A), FRAMES - sent, lambda seq: 256)
                if from_c(rig) >= before + FRAMES:
                    break
                select.select([fe.tx.call_fd, peer.ch.fileno()], [], [], 0.05)
                fe.reclaim_tx()
                pong(peer)
            assert from_c(rig) == before + FRAMES, f"round {rnd}: the frontend in new memory was not served"
            # Frontend first, then memory (protocol.md 7.4), each acked.
            info = DeviceInfo(Op.DEL, fe.device_type, fe.device_id)
            rid = peer.send(SockMsgType.DEVICE_INFO, sw.SockDeviceInfo(info, (), ()))
            answered(peer, rid, AckResult.DEL_DONE)
            rid = peer.send(SockMsgType.MEMORY_INFO, SockMemoryInfo(Op.DEL, ram.socket_regions()))
            answered(peer, rid, AckResult.DEL_DONE)
            fe.close()
            ram.close()
            del fe, ram, body
            gc.collect()  # the peer's own mapping goes with its rings' views (GuestRam.close)
            # Each round releases what it took, before the DEL is acked: no mapping of any memfd so
            # far, and (from the second round: the first opened the device) the same number of fds.
            assert mappings_of(inodes) == 0, f"round {rnd}: a memfd is still mapped"
            if rnd == 0:
                base_fds, base_server = fds(), settled_fds(rig.server.pid)
            assert fds() == base_fds, f"round {rnd}: {fds()} fds, {base_fds} after the first"
            assert settled_fds(rig.server.pid) == base_server, f"round {rnd}: the server kept an fd"
            assert dev.dump()["window_mapped"] == 0  # nothing left mapped in the peer's BAR 2
    finally:
        peer.close()
