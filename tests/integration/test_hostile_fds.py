"""Every fd a driver VM hands the server is checked for its kind, and closed when refused.

Real processes: the vhost-pci server, three simulated driver VMs (A and B well
behaved, H the hostile one) and ``vhostpci run ... --app net-switch`` serving
all three devices; raw peers written by hand send the fds no simulator would.
Each attack runs three rounds; after each, the server's fd count (and the
toolkit's) is back where it was, the attacker got the FAIL the protocol
promises (reason ``BAD_FD``, the connection kept), and A still forwards to B.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import MAC_A, MAC_B, MAC_C, wait_for
from tests.integration.test_host_side import settled_fds
from tests.integration.test_peer_limits import RawPeer
from tests.integration.test_reconnect import forwards
from vhostpci_driver.apps.net import NetBackend, net_policy
from vhostpci_driver.device import VhostPciDevice
from vhostpci_driver.errors import FailReason
from vhostpci_driver.service import Service
from vhostpci_driver.spec.virtio import Feature
from vhostpci_driver.wire import sock as sw
from vhostpci_driver.wire.ctrl import AckResult, DeviceInfo, Op, VirtqInfo
from vhostpci_driver.wire.sock import Empty, SockAck, SocketRegion, SockMemoryInfo, SockMsgType
from vhostpci_host.frontend import NET_FEATURES
from vhostpci_host.harness import DriverVmProcess, HostServer, Rig

M = 1 << 20
ROUNDS = 3
GRACE = 0.5


@dataclass
class Hostile:
    server: HostServer
    a: DriverVmProcess
    b: DriverVmProcess
    h: DriverVmProcess
    toolkit: subprocess.Popen[str]


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    d = Path(tempfile.mkdtemp(prefix="vp-", dir="/tmp"))
    server = HostServer(d, ping_interval=0.5, extra=("--gone-grace", str(GRACE)))
    vms = [
        DriverVmProcess(server.socket, [mac], vm_uuid=uuid.uuid4(), memory="64M")
        for mac in (MAC_A, MAC_B, MAC_C)
    ]
    addresses = [f"vfio-user:{server.device_socket(vm.uuid)}" for vm in vms]
    toolkit = subprocess.Popen(
        [sys.executable, "-m", "vhostpci_driver", "run", *addresses, "--app", "net-switch"],
        env={**os.environ, "VHOSTPCI_RUN_DIR": str(d / "run")},
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for vm in vms:
            vm.read_event("ready", 30)
        yield Hostile(server, *vms, toolkit)
    finally:
        toolkit.send_signal(signal.SIGTERM)
        try:
            toolkit.wait(10)
        except subprocess.TimeoutExpired:
            toolkit.kill()
            toolkit.wait(5)
        for vm in vms:
            vm.stop()
        server.stop()
        for p in sorted(d.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        d.rmdir()


def still_serving(h: Hostile) -> None:
    assert h.toolkit.poll() is None, "vhostpci run died"
    forwards(h.a, h.b, MAC_B)


def answer(peer: RawPeer, rid: int) -> SockAck:
    msg = peer.reply()
    assert msg is not None, "the connection was dropped; a refused fd keeps it"
    assert msg.request_id == rid and isinstance(msg.body, SockAck)
    return msg.body


def memfd(size: int, *, sealing: bool = True) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0))
    os.ftruncate(fd, size)
    return fd


def regular_file(size: int) -> int:
    fd, path = tempfile.mkstemp(dir="/var/tmp")
    os.unlink(path)
    os.ftruncate(fd, size)
    return fd


def pipe_end() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def socket_end() -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def read_only_memfd(size: int) -> int:
    fd = memfd(size)
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    os.close(fd)
    return ro


#: where the attacks' regions sit in their files and in the window (the first 16 MiB are the peer's)
AT = 16 * M
#: name -> an fd that must be refused as guest memory of 4 MiB at file offset AT
BAD_MEMORY: dict[str, Callable[[], int]] = {
    "short memfd": lambda: memfd(AT + M),
    "memfd without sealing": lambda: memfd(2 * AT, sealing=False),
    "read-only memfd": lambda: read_only_memfd(2 * AT),
    "regular file": lambda: regular_file(2 * AT),
    "pipe": pipe_end,
    "socket": socket_end,
    "/dev/zero": lambda: os.open("/dev/zero", os.O_RDWR),
    "eventfd": lambda: os.eventfd(0),
}


def send_memory(peer: RawPeer, regions: list[tuple[int, int, int, int]]) -> int:
    """MEMORY_INFO(ADD) of ``(xgpa, size, mmap_offset, fd)`` regions; our copies of the fds are closed."""
    body = SockMemoryInfo(Op.ADD, tuple(SocketRegion(x, s, o, fd) for x, s, o, fd in regions))  # type: ignore[arg-type]
    try:
        return peer.send(SockMsgType.MEMORY_INFO, body)
    finally:
        for *_, fd in regions:
            if fd != peer.mem:
                os.close(fd)


def test_memory_that_is_not_shareable_sealed_and_long_enough_is_refused_and_closed(hostile: Hostile) -> None:
    """Items 1 and 3: short, unsealable, read-only, not a file, /dev/zero, huge offsets: FAIL, fds closed."""
    pid = hostile.server.pid
    initial, toolkit = settled_fds(pid), settled_fds(hostile.toolkit.pid)
    for _ in range(ROUNDS):
        # A first message whose window would be 2^63 bytes creates no device at all.
        fresh = RawPeer(hostile.server.socket, memory=8 * M)
        ack = answer(fresh, send_memory(fresh, [(0, 4 * M, 1 << 62, fresh.mem)]))
        assert (ack.result, ack.reason) == (AckResult.ADD_FAIL, FailReason.LIMIT)
        fresh.close()
        wraps = RawPeer(hostile.server.socket, memory=8 * M)
        send_memory(wraps, [(0, 8192, (1 << 64) - 4096, wraps.mem)])
        assert wraps.dropped()  # a range past 2^64 is malformed (protocol.md 7.2.4)
        wraps.close()
        peer = RawPeer(hostile.server.socket, memory=AT)
        send_memory(peer, [(0, AT, 0, peer.mem)])  # good: its device (a 32 MiB window) exists from now on
        hostile.server.device_socket(peer.uuid)
        base = settled_fds(pid)
        for i, (kind, make) in enumerate(BAD_MEMORY.items()):
            xgpa = (1 << 32) + i * 8 * M
            ack = answer(peer, send_memory(peer, [(xgpa, 4 * M, AT, make())]))
            assert (ack.result, ack.reason) == (AckResult.ADD_FAIL, FailReason.BAD_FD), kind
            assert settled_fds(pid) == base, kind
        # A good region and a bad one in one message: both fds are closed, nothing is mapped.
        good = memfd(2 * AT)
        pair = [(1 << 40, 4 * M, AT, good), (2 << 40, 4 * M, AT + 4 * M, pipe_end())]
        ack = answer(peer, send_memory(peer, pair))
        assert (ack.result, ack.reason) == (AckResult.ADD_FAIL, FailReason.BAD_FD)
        # Offsets past the window: refused, never a crash.
        for offset in (1 << 62, (1 << 63) - 4096, (1 << 64) - 8 * M):
            ack = answer(peer, send_memory(peer, [(3 << 40, 4 * M, offset, memfd(AT))]))
            assert (ack.result, ack.reason) == (AckResult.ADD_FAIL, FailReason.OUT_OF_WINDOW), offset
        assert settled_fds(pid) == base
        peer.close()
        hostile.server.read_event("device-freed", 10)
        assert settled_fds(pid) == initial
        still_serving(hostile)
        assert settled_fds(hostile.toolkit.pid) == toolkit


def test_memory_is_sealed_so_a_driver_vm_cannot_cut_it_under_the_device_vm(hostile: Hostile) -> None:
    """Item 2: the server sealed H's memfd (F_SEAL_SHRINK); a truncation fails, nobody takes a SIGBUS."""
    toolkit = settled_fds(hostile.toolkit.pid)
    for round_ in range(ROUNDS):
        hostile.h.send(f"truncate {round_ * M}")
        ev = hostile.h.read_event("truncate-refused", 10)
        assert ev["errno"] == 1  # EPERM: sealed
        forwards(hostile.a, hostile.h, MAC_C)  # H's rings and buffers, in the memory it tried to cut
        forwards(hostile.h, hostile.b, MAC_B)
        still_serving(hostile)
        assert settled_fds(hostile.toolkit.pid) == toolkit


def device_info(peer: RawPeer, device_id: int, kicks: list[int], calls: list[int]) -> int:
    vqs = tuple(
        VirtqInfo(i, 256, 0x10000 * i, 0x10000 * i + 4096, 0x10000 * i + 8192) for i in range(len(kicks))
    )  # type: ignore[arg-type]
    body = sw.SockDeviceInfo(DeviceInfo(Op.ADD, 1, device_id, vqs), tuple(kicks), tuple(calls))
    try:
        return peer.send(SockMsgType.DEVICE_INFO, body)
    finally:
        for fd in (*kicks, *calls):
            os.close(fd)


#: name -> an fd that must be refused as a kick or call eventfd
NOT_EVENTFDS: dict[str, Callable[[], int]] = {
    "pipe": pipe_end,
    "regular file": lambda: regular_file(4096),
    "socket": socket_end,
    "memfd": lambda: memfd(4096),
}


def test_kick_and_call_fds_must_be_eventfds(hostile: Hostile) -> None:
    """Item 4: a pipe, file, socket or memfd as kick or call is refused with its message's fds and slots."""
    pid = hostile.server.pid
    queues = 4  # 3 rounds x 8 refusals x 4 queues: more slots than the device has (64), if they leaked
    peer = RawPeer(hostile.server.socket, memory=8 * M)
    try:
        peer.memory(4 * M)
        hostile.server.device_socket(peer.uuid)
        base = settled_fds(pid)
        for round_ in range(ROUNDS):
            for kind, make in NOT_EVENTFDS.items():
                for as_kick in (True, False):
                    kicks = [make() if as_kick and q == 1 else os.eventfd(0) for q in range(queues)]
                    calls = [make() if not as_kick and q == 1 else os.eventfd(0) for q in range(queues)]
                    ack = answer(peer, device_info(peer, 100 + round_, kicks, calls))
                    assert (ack.result, ack.reason) == (AckResult.ADD_FAIL, FailReason.BAD_FD), kind
                    assert settled_fds(pid) == base, kind
        # No slot leaked: a good frontend gets its four slots (no LIMIT answer), and keeps its 8 fds.
        device_info(peer, 7, [os.eventfd(0) for _ in range(queues)], [os.eventfd(0) for _ in range(queues)])
        assert peer.quiet_for(1.0)
        assert settled_fds(pid) == base + 2 * queues
    finally:
        peer.close()
    hostile.server.read_event("device-freed", 10)
    still_serving(hostile)


def test_a_call_fd_that_would_block_never_stops_the_server(hostile: Hostile) -> None:
    """Item 5: H makes its call eventfds blocking and full; the server's doorbell write must not wait."""
    hostile.h.send("fill-call")
    hostile.h.read_event("call-filled", 10)
    for _ in range(ROUNDS):
        # Frames to H make the toolkit ring H's doorbell: a blocking write there would hang the
        # server's only thread, and every device with it.
        hostile.a.send(f"send {MAC_C} 100 256")
        peer = RawPeer(hostile.server.socket)
        rid = peer.send(SockMsgType.PING, Empty())
        msg = peer.reply(5)  # any answer proves the loop turns (an unknown UUID's PING gets NOT_FOUND)
        assert msg is not None and msg.request_id == rid
        peer.close()
        assert hostile.toolkit.poll() is None
        # B to A, not A to B: A's frames for H wait for H's RX buffers, which H never gives back.
        forwards(hostile.b, hostile.a, MAC_A)


def test_a_net_frontend_without_version_1_is_refused(rig: Rig) -> None:
    """Item 14: net_policy requires VERSION_1; the features are acked FAIL(REJECTED), no port is made."""
    a = rig.add_vm(MAC_A, memory="64M")
    b = rig.add_vm(MAC_B, memory="64M")
    rig.serve()
    legacy = DriverVmProcess(
        rig.server.socket, [MAC_C], memory="64M", features=NET_FEATURES & ~(1 << Feature.VERSION_1)
    )
    dev = VhostPciDevice(f"vfio-user:{rig.server.device_socket(legacy.uuid)}", policies={1: net_policy})
    backend = NetBackend("switch")
    service = Service([dev], backend)
    thread = threading.Thread(target=service.run, args=(0.05,), daemon=True)
    thread.start()
    try:
        ev = legacy.read_event("ack-failed", 20)
        assert ev["request"].startswith("features") and ev["reason"] == FailReason.REJECTED
        assert not backend.ports and service.error is None
        for _ in range(ROUNDS):
            forwards(a, b, MAC_B)
            forwards(b, a, MAC_A)
    finally:
        service.stop.set()
        thread.join(10)
        dev.close()
        legacy.stop()


def emptied(dev: VhostPciDevice) -> Callable[[], bool]:
    """``dev`` holds no region and sees its driver VM down."""
    return lambda: len(dev.table) == 0 and not dev.remote_up


def test_a_teardown_of_many_regions_is_split_to_fit_the_controlq(rig: Rig) -> None:
    """Item 11: 256 regions' MEMORY_INFO(DEL) is 6168 bytes; the server sends it in parts that fit."""
    a = rig.add_vm(MAC_A, memory="64M")
    b = rig.add_vm(MAC_B, memory="64M")
    rig.serve()
    u = uuid.uuid4()
    dev: VhostPciDevice | None = None
    service: Service | None = None
    thread: threading.Thread | None = None
    base = -1
    try:
        for round_ in range(ROUNDS):
            peer = RawPeer(rig.server.socket, memory=4 * M)
            peer.uuid = u
            page = 8192
            rids = [
                send_memory(peer, [(j * page, 4096, j * page, peer.mem) for j in range(k * 64, k * 64 + 64)])
                for k in range(4)
            ]
            if dev is None:
                dev = VhostPciDevice(f"vfio-user:{rig.server.device_socket(u)}")
                service = Service([dev])
                thread = threading.Thread(target=service.run, args=(0.05,), daemon=True)
                thread.start()
            answers = {}
            for _ in rids:  # in any order
                msg = peer.reply()
                assert msg is not None and isinstance(msg.body, SockAck)
                answers[msg.request_id] = msg.body.result
            assert answers == dict.fromkeys(rids, AckResult.ADD_DONE)
            assert len(dev.table) == 256
            peer.close()
            wait_for(emptied(dev), 10, "the teardown applied")
            assert service is not None and service.error is None and dev.failed is None  # no NEEDS_RESET
            assert dev.engine.stats.acked_fail == 0
            now = settled_fds(rig.server.pid)
            if round_ == 0:
                base = now
            assert now == base
            forwards(a, b, MAC_B)
    finally:
        if service is not None and thread is not None:
            service.stop.set()
            thread.join(10)
        if dev is not None:
            dev.close()
