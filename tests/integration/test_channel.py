"""The socket channel over a real socketpair, with real fds: framing, fd ownership, leaks."""

from __future__ import annotations

import array
import os
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from vhostpci_driver.addr import Xgpa
from vhostpci_driver.errors import ProtocolError
from vhostpci_driver.wire import sock as wire
from vhostpci_driver.wire.ctrl import Op
from vhostpci_driver.wire.sock import Empty, SocketRegion, SockMemoryInfo, SockMessage, SockMsgType
from vhostpci_host.channel import Channel, PeerClosedError

U = uuid.UUID(int=0x1234)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair() -> Iterator[tuple[Channel, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = Channel(a, partial_timeout=0.05)
    yield ch, b
    ch.close()
    b.close()


def memfds(n: int) -> list[int]:
    fds = []
    for i in range(n):
        fd = os.memfd_create(f"test{i}")
        os.ftruncate(fd, 4096)
        os.pwrite(fd, bytes([i + 1]), 0)
        fds.append(fd)
    return fds


def mem_msg(fds: list[int]) -> SockMessage:
    regs = tuple(SocketRegion(Xgpa(i << 20), 4096, 0, fd) for i, fd in enumerate(fds))
    return SockMessage(SockMsgType.MEMORY_INFO, U, 7, SockMemoryInfo(Op.ADD, regs))


def send_raw(s: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    s.sendmsg([data], anc)


def test_messages_arrive_with_their_fds(pair: tuple[Channel, socket.socket]) -> None:
    ch, peer = pair
    fds = memfds(3)
    data, out_fds = wire.encode(mem_msg(fds))
    send_raw(peer, data, out_fds)
    ping, _ = wire.encode(SockMessage(SockMsgType.PING, U, 8, Empty()))
    send_raw(peer, ping)
    for fd in fds:
        os.close(fd)
    got = ch.receive()
    assert [m.msg_type for m in got] == [SockMsgType.MEMORY_INFO, SockMsgType.PING]
    body = got[0].body
    assert isinstance(body, SockMemoryInfo)
    for i, r in enumerate(body.regions):
        assert os.pread(r.fd, 1, 0) == bytes([i + 1])  # a real, working fd
        os.close(r.fd)


def test_a_message_dribbled_byte_by_byte(pair: tuple[Channel, socket.socket]) -> None:
    ch, peer = pair
    fds = memfds(1)
    data, _ = wire.encode(mem_msg(fds))
    send_raw(peer, data[:1], fds)
    os.close(fds[0])
    assert ch.receive() == []
    for i in range(1, len(data)):
        assert ch.receive() == []
        send_raw(peer, data[i : i + 1])
    (msg,) = ch.receive()
    assert isinstance(msg.body, SockMemoryInfo)
    os.close(msg.body.regions[0].fd)


def test_fds_after_the_first_byte_are_refused_and_closed(pair: tuple[Channel, socket.socket]) -> None:
    ch, peer = pair
    base = open_fds()
    fds = memfds(1)
    data, _ = wire.encode(mem_msg(fds))
    # Linux glues stream segments into one recvmsg until fds are met, so split at the header:
    # the header's recvmsg ends there and the fds come with the payload.
    send_raw(peer, data[: wire.HEADER.size])
    send_raw(peer, data[wire.HEADER.size :], fds)
    os.close(fds[0])
    with pytest.raises(ProtocolError, match="after the start"):
        ch.receive()
    assert open_fds() == base


def test_wrong_fd_count_is_refused_and_fds_closed(pair: tuple[Channel, socket.socket]) -> None:
    ch, peer = pair
    base = open_fds()
    fds = memfds(2)
    data, _ = wire.encode(mem_msg(fds[:1]))
    send_raw(peer, data, fds)  # two fds for one region
    for fd in fds:
        os.close(fd)
    with pytest.raises(ProtocolError, match="carries 2 fds, needs 1"):
        ch.receive()
    assert open_fds() == base


def test_bad_header_closes_its_fds(pair: tuple[Channel, socket.socket]) -> None:
    ch, peer = pair
    base = open_fds()
    fds = memfds(1)
    send_raw(peer, b"\xff" * wire.HEADER.size, fds)
    os.close(fds[0])
    with pytest.raises(ProtocolError):
        ch.receive()
    assert open_fds() == base


def test_peer_vanishing_mid_message(pair: tuple[Channel, socket.socket]) -> None:
    ch, peer = pair
    base = open_fds()
    fds = memfds(1)
    data, _ = wire.encode(mem_msg(fds))
    send_raw(peer, data[:40], fds)
    os.close(fds[0])
    assert ch.receive() == []
    peer.close()
    with pytest.raises(PeerClosedError, match="mid-message"):
        ch.receive()
    ch.close()  # releases the fd of the half message
    assert open_fds() == base - 2  # both ends of the pair are closed now


def test_partial_message_timeout(pair: tuple[Channel, socket.socket]) -> None:
    ch, peer = pair
    send_raw(peer, b"\x06\x00")
    ch.receive()
    assert not ch.partial_timed_out() or ch.stalled_for() > 0.05
    deadline = time.monotonic() + 2
    while not ch.partial_timed_out():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_peer_that_does_not_read_is_capped() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = Channel(a, max_outbuf=64 << 10)
    try:
        with pytest.raises(ProtocolError, match="not reading"):
            for i in range(100_000):
                ch.send(SockMessage(SockMsgType.PING, U, i, Empty()))
    finally:
        ch.close()
        b.close()


def test_send_round_trip_between_two_channels() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = Channel(a), Channel(b)
    try:
        fds = memfds(2)
        left.send(mem_msg(fds))
        for fd in fds:
            os.close(fd)
        (msg,) = right.receive()
        assert isinstance(msg.body, SockMemoryInfo)
        assert [os.pread(r.fd, 1, 0) for r in msg.body.regions] == [b"\x01", b"\x02"]
        for r in msg.body.regions:
            os.close(r.fd)
    finally:
        left.close()
        right.close()
