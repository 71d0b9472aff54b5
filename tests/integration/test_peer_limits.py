"""Peer limits on the vhost-pci server: each one refuses the peer that passes it, and only that peer.

One server runs with small limits (``vhostpci-host serve --limit ...``); two
well-behaved driver VMs exchange traffic through our driver the whole time. A
raw peer then breaks one limit per test, and each test checks three things:
the peer got the refusal the protocol promises (a FAIL ack with reason LIMIT
and the connection kept, or the connection dropped for a malformed message),
the well-behaved driver VMs still forward, and the fds the refused message
carried were closed in the server.
"""

from __future__ import annotations

import array
import os
import select
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import MAC_A, MAC_B, wait_for
from tests.integration.test_host_side import settled_fds
from vhostpci_driver.errors import FailReason
from vhostpci_driver.wire import sock as sw
from vhostpci_driver.wire.ctrl import AckResult, DeviceInfo, FeatureBits, Op, VirtqInfo
from vhostpci_driver.wire.sock import Empty, SockAck, SocketRegion, SockMemoryInfo, SockMessage, SockMsgType
from vhostpci_host.channel import Channel, PeerClosedError
from vhostpci_host.harness import HostServer, Rig

M = 1 << 20
LIMITS = {
    "max_payload": 4096,
    "max_regions": 4,
    "max_virtqs": 4,
    "max_mapped_bytes": 96 * M,
    "max_frontends": 2,
    "max_pending": 4,
    "max_connections_per_uid": 4,
    "max_outbuf": 64 * 1024,
}
PARTIAL_TIMEOUT = 1.5


class RawPeer:
    """A driver VM written by hand: it sends exactly what a test asks, limits or not."""

    def __init__(self, path: Path, memory: int = 256 * M) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        self.ch = Channel(s)
        self.uuid = uuid.uuid4()
        self.rid = 0
        self.backlog: list[SockMessage] = []
        self.mem = os.memfd_create("raw-peer-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.mem, memory)

    def send(self, msg_type: SockMsgType, body: object) -> int:
        self.rid += 1
        self.ch.send(SockMessage(msg_type, self.uuid, self.rid, body))  # type: ignore[arg-type]
        return self.rid

    def memory(self, *sizes: int, op: Op = Op.ADD) -> int:
        regions, at = [], 0
        for size in sizes:
            regions.append(SocketRegion(at, size, at, self.mem))  # type: ignore[arg-type]
            at += size
        return self.send(SockMsgType.MEMORY_INFO, SockMemoryInfo(op, tuple(regions)))

    def device(self, device_id: int, nqueues: int = 2) -> int:
        vqs = tuple(
            VirtqInfo(i, 256, 0x10000 * i, 0x10000 * i + 4096, 0x10000 * i + 8192) for i in range(nqueues)
        )  # type: ignore[arg-type]
        kicks = tuple(os.eventfd(0) for _ in vqs)
        calls = tuple(os.eventfd(0) for _ in vqs)
        try:
            return self.send(
                SockMsgType.DEVICE_INFO,
                sw.SockDeviceInfo(DeviceInfo(Op.ADD, 1, device_id, vqs), kicks, calls),
            )
        finally:
            for fd in (*kicks, *calls):
                os.close(fd)

    def reply(self, timeout: float = 5.0) -> SockMessage | None:
        """The next answer (PINGs answered on the way), or None when the server closed the connection."""
        if self.backlog:
            return self.backlog.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "no answer from the server"
            if not select.select([self.ch.fileno()], [], [], left)[0]:
                continue
            try:
                msgs = self.ch.receive()
            except (PeerClosedError, ConnectionResetError):
                return None
            for msg in msgs:
                if msg.msg_type == SockMsgType.PING:
                    try:
                        self.ch.send(SockMessage(SockMsgType.PONG, self.uuid, msg.request_id, Empty()))
                    except (BrokenPipeError, ConnectionResetError):
                        return None  # the PING came just before the server closed
                else:
                    self.backlog.append(msg)  # one read may bring several answers: keep them all
            if self.backlog:
                return self.backlog.pop(0)

    def quiet_for(self, seconds: float) -> bool:
        """Nothing but PINGs (answered) for ``seconds``, and not dropped."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.ch.fileno()], [], [], left)[0]:
                continue
            try:
                msgs = self.ch.receive()
            except (PeerClosedError, ConnectionResetError):
                return False
            for msg in msgs:
                if msg.msg_type != SockMsgType.PING:
                    return False
                try:
                    self.ch.send(SockMessage(SockMsgType.PONG, self.uuid, msg.request_id, Empty()))
                except (BrokenPipeError, ConnectionResetError):
                    return False
        return True

    def refused_for_limit(self, rid: int) -> bool:
        msg = self.reply()
        assert msg is not None, "the connection was dropped; a limit refusal keeps it"
        assert msg.request_id == rid
        assert isinstance(msg.body, SockAck)
        return msg.body.result == AckResult.ADD_FAIL and msg.body.reason == FailReason.LIMIT

    def dropped(self) -> bool:
        return self.reply() is None

    def close(self) -> None:
        self.ch.close()
        os.close(self.mem)


@pytest.fixture(scope="module")
def limited() -> Iterator[Rig]:
    d = Path(tempfile.mkdtemp(prefix="vp-", dir="/tmp"))
    extra: tuple[str, ...] = ("--partial-timeout", str(PARTIAL_TIMEOUT))
    for name, value in LIMITS.items():
        extra += ("--limit", f"{name}={value}")
    rig = Rig(HostServer(d, ping_interval=0.5, extra=extra))
    try:
        rig.add_vm(MAC_A, memory="64M")
        rig.add_vm(MAC_B, memory="64M")
        rig.serve()
        yield rig
    finally:
        rig.close()
        for p in sorted(d.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        d.rmdir()


@pytest.fixture
def peer(limited: Rig) -> Iterator[RawPeer]:
    p = RawPeer(limited.server.socket)
    yield p
    p.close()


def still_forwarding(rig: Rig, frames: int = 200) -> None:
    a, b = rig.vms
    before = b.stats()["frontends"][0]["received"]
    a.send(f"send {MAC_B} {frames} 256")
    wait_for(lambda: b.stats()["frontends"][0]["received"] >= before + frames, 30, "A->B traffic")
    assert b.stats()["frontends"][0]["corrupt"] == 0


# -- limits on one message: the peer is malformed, so it is dropped ----------------------------


def test_too_many_regions_in_one_message(limited: Rig, peer: RawPeer) -> None:
    peer.memory(*[M] * (LIMITS["max_regions"] + 1))
    assert peer.dropped()
    still_forwarding(limited)


def test_too_many_virtqueues_in_one_frontend(limited: Rig, peer: RawPeer) -> None:
    peer.memory(4 * M)
    peer.device(1, nqueues=LIMITS["max_virtqs"] + 1)
    assert peer.dropped()
    still_forwarding(limited)


def test_message_larger_than_max_payload(limited: Rig, peer: RawPeer) -> None:
    peer.ch.sock.sendall(
        sw.HEADER.pack(SockMsgType.MEMORY_INFO, 1, LIMITS["max_payload"] + 16, peer.uuid.bytes, 1)
    )
    assert peer.dropped()
    still_forwarding(limited)


def test_fds_that_do_not_match_the_message(limited: Rig, peer: RawPeer) -> None:
    data, _ = sw.encode(
        SockMessage(
            SockMsgType.MEMORY_INFO, peer.uuid, 1, SockMemoryInfo(Op.ADD, (SocketRegion(0, M, 0, peer.mem),))
        )
    )  # type: ignore[arg-type]
    three = array.array("i", [peer.mem] * 3).tobytes()  # three fds for one region
    peer.ch.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, three)])
    assert peer.dropped()
    still_forwarding(limited)


# -- limits on what a peer holds: a FAIL ack with reason LIMIT, the connection stays ------------


def test_mapped_bytes(limited: Rig, peer: RawPeer) -> None:
    pid = limited.server.pid
    peer.memory(32 * M)  # accepted (and never acked: nobody serves this peer's device)
    assert limited.server.device_socket(peer.uuid)
    base = settled_fds(pid)
    assert peer.refused_for_limit(peer.memory(40 * M, 40 * M))  # 32 + 80 > 96 MiB
    assert settled_fds(pid) == base  # the refused message's two fds were closed
    still_forwarding(limited)


def test_mapped_bytes_exactly_at_the_limit(limited: Rig, peer: RawPeer) -> None:
    """max_mapped_bytes is inclusive: exactly the limit is taken, one page more is not."""
    peer.memory(LIMITS["max_mapped_bytes"])  # taken (and never acked: nobody serves this peer's device)
    assert peer.refused_for_limit(peer.memory(4096))  # the first answer is this one's: the first was taken
    still_forwarding(limited)


def test_a_duplicate_xgpa_in_one_memory_info_is_refused_and_touching_regions_are_not(
    limited: Rig, peer: RawPeer
) -> None:
    pid = limited.server.pid
    peer.memory(4 * M)  # the device exists from here, its window twice that: 8 MiB
    assert limited.server.device_socket(peer.uuid)
    base = settled_fds(pid)
    # Each of the two fits the window on its own; only their xgpa collides.
    twice = (SocketRegion(1 << 32, M, 4 * M, peer.mem), SocketRegion(1 << 32, M, 6 * M, peer.mem))  # type: ignore[arg-type]
    rid = peer.send(SockMsgType.MEMORY_INFO, SockMemoryInfo(Op.ADD, twice))
    msg = peer.reply()
    assert msg is not None and msg.request_id == rid, msg
    assert isinstance(msg.body, SockAck) and msg.body.result == AckResult.ADD_FAIL
    assert settled_fds(pid) == base  # both fds closed, nothing mapped
    at = 2 << 32
    touching = (SocketRegion(at, M, 4 * M, peer.mem), SocketRegion(at + M, M, 5 * M, peer.mem))  # type: ignore[arg-type]
    peer.send(SockMsgType.MEMORY_INFO, SockMemoryInfo(Op.ADD, touching))  # taken: never acked here
    # A request the server answers at once: the first answer is its own, so the touching pair was taken.
    unknown = (SocketRegion(7 << 32, M, 0, peer.mem),)  # type: ignore[arg-type]
    probe = peer.send(SockMsgType.MEMORY_INFO, SockMemoryInfo(Op.DEL, unknown))
    msg = peer.reply()
    assert msg is not None and msg.request_id == probe, msg
    assert isinstance(msg.body, SockAck) and msg.body.reason == FailReason.NOT_FOUND
    still_forwarding(limited)


def test_frontends_per_device(limited: Rig, peer: RawPeer) -> None:
    peer.memory(8 * M)
    peer.device(1)
    peer.device(2)
    base = settled_fds(limited.server.pid)
    assert peer.refused_for_limit(peer.device(3))
    assert settled_fds(limited.server.pid) == base  # its four eventfds were closed
    still_forwarding(limited)


def test_requests_without_an_ack(limited: Rig, peer: RawPeer) -> None:
    # Nobody serves this peer's device, so nothing it sends is ever acked.
    peer.memory(8 * M)
    for i in range(LIMITS["max_pending"] - 1):
        peer.send(SockMsgType.FEATURE_BITS, FeatureBits(1, 100 + i, 1))
    rid = peer.send(SockMsgType.FEATURE_BITS, FeatureBits(1, 999, 1))
    assert peer.refused_for_limit(rid)
    still_forwarding(limited)


def test_connections_per_uid(limited: Rig) -> None:
    held = len(limited.vms)  # the two driver VMs are this uid's too
    extra = [RawPeer(limited.server.socket) for _ in range(LIMITS["max_connections_per_uid"] - held)]
    try:
        for p in extra:
            p.send(SockMsgType.PING, Empty())
            assert not p.dropped()  # accepted: it gets its PONG
        over = RawPeer(limited.server.socket)
        assert over.dropped()
        over.close()
        ev = limited.server.read_event("refused", 10)
        assert ev["why"] == "max_connections_per_uid"
    finally:
        for p in extra:
            p.close()
    still_forwarding(limited)


def test_a_peer_that_does_not_read(limited: Rig, peer: RawPeer) -> None:
    ping = sw.encode(SockMessage(SockMsgType.PING, peer.uuid, 1, Empty()))[0]
    # Far more answers than the socket buffers plus max_outbuf hold, and we read none of them:
    # the server must drop us rather than grow.
    peer.ch.sock.setblocking(True)
    peer.ch.sock.settimeout(10)
    try:
        for _ in range(64):
            peer.ch.sock.sendall(ping * 512)
    except (BrokenPipeError, ConnectionResetError):
        pass  # dropped while we were still writing
    why = ""
    while "peer is not reading" not in why:  # earlier tests' drops come first
        why = limited.server.read_event("client-dropped", 10)["why"]
    still_forwarding(limited)


def test_half_a_message_does_not_delay_other_peers(limited: Rig, peer: RawPeer) -> None:
    peer.ch.sock.sendall(sw.HEADER.pack(SockMsgType.MEMORY_INFO, 1, 64, peer.uuid.bytes, 1)[:10])
    stalled_at = time.monotonic()
    # While it sits on half a header, a well-behaved driver VM's request goes through the server, the
    # device, our driver and back (a DEVICE_INFO with rings outside memory, acked FAIL by our engine).
    a = limited.vms[0]
    a.send("rings-outside")
    ev = a.read_event("ack-failed", PARTIAL_TIMEOUT)
    assert ev["reason"] == FailReason.RING_OUTSIDE_MEMORY
    assert time.monotonic() - stalled_at < PARTIAL_TIMEOUT  # answered while the other still stalled
    still_forwarding(limited, 100)
    assert peer.dropped()  # and once its timeout passed, the stalled peer was dropped
    assert PARTIAL_TIMEOUT <= time.monotonic() - stalled_at < PARTIAL_TIMEOUT + 3
