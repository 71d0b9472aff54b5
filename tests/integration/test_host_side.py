"""The reference host side as real processes, driven through vfio-user and raw sockets."""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import MAC_A, MAC_B, UUIDS, wait_for
from vhostpci_driver.pci.vfio_user_client import VfioUserFunction
from vhostpci_driver.spec import vfio as sv
from vhostpci_driver.spec.virtio_pci import VIRTIO_PCI_VENDOR
from vhostpci_driver.virtio import caps
from vhostpci_driver.wire import device as dw
from vhostpci_driver.wire import sock as sw
from vhostpci_driver.wire import vfio_user as w
from vhostpci_driver.wire.ctrl import Op
from vhostpci_driver.wire.sock import SocketRegion, SockMemoryInfo, SockMessage, SockMsgType
from vhostpci_driver.wire.vfio_user import Command
from vhostpci_host.harness import DriverVmProcess, HostServer


@pytest.fixture
def host(short_dir: Path) -> Iterator[tuple[HostServer, DriverVmProcess, str]]:
    server = HostServer(short_dir, ping_interval=0.2)
    vm = DriverVmProcess(server.socket, [MAC_A], vm_uuid=UUIDS[0], memory="64M")
    path = server.device_socket(vm.uuid)
    yield server, vm, path
    vm.stop()
    server.stop()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int) -> int:
    """The server's fd count once it stops moving (it may still be closing a dropped peer)."""
    last = -1
    for _ in range(50):
        now = fd_count(pid)
        if now == last:
            return now
        last = now
        time.sleep(0.05)
    return last


def test_config_space_shows_the_virtio_capabilities(host: tuple[HostServer, DriverVmProcess, str]) -> None:
    _, _, path = host
    with VfioUserFunction(path) as fn:
        cfg = fn.config_read(0, 256)
        assert struct.unpack_from("<HH", cfg, 0) == (VIRTIO_PCI_VENDOR, dw.pci_device_id())
        assert cfg[8] >= 1  # revision: modern
        sizes = {i: fn.region_info(i).size for i in range(6) if fn.region_info(i).size}
        c = caps.parse(cfg, sizes)
        assert (c.common.bar, c.common.offset) == (dw.BAR_VIRTIO, dw.COMMON_OFFSET)
        assert (c.notify.offset, c.notify.notify_off_multiplier) == (
            dw.NOTIFY_OFFSET,
            dw.NOTIFY_OFF_MULTIPLIER,
        )
        assert c.device is not None and c.device.length == dw.VHOST_PCI_CONFIG.size
        assert c.msix is not None and c.msix.table_size == dw.Vector.FIRST_SLOT + dw.DEFAULT_SLOTS
        assert sizes[dw.BAR_WINDOW] >= 2 * (64 << 20)  # at least twice the driver VM's memory
        # BAR sizing as a guest kernel does it: all ones, read back the size mask.
        fn.config_write(0x10, b"\xff\xff\xff\xff")
        (mask,) = struct.unpack("<I", fn.config_read(0x10, 4))
        assert (~(mask & 0xFFFFFFF0) & 0xFFFFFFFF) + 1 == dw.BAR_VIRTIO_SIZE


def test_bar2_maps_the_driver_vms_memory(host: tuple[HostServer, DriverVmProcess, str]) -> None:
    _, vm, path = host
    vm.send("poke 0x4000 cafef00d")
    vm.read_event("poked")
    vm.send(f"poke {(4 << 30) + 0x10:#x} 0badc0de")  # the region above 4 GiB
    vm.read_event("poked")
    with VfioUserFunction(path) as fn:
        info = fn.region_info(dw.BAR_WINDOW)
        assert info.mmappable and len(info.sparse) == 2
        low = fn.region_mmap(dw.BAR_WINDOW, info.sparse[0].offset, info.sparse[0].size)
        high = fn.region_mmap(dw.BAR_WINDOW, info.sparse[1].offset, info.sparse[1].size)
        assert low[0x4000:0x4004] == bytes.fromhex("cafef00d")
        assert high[0x10:0x14] == bytes.fromhex("0badc0de")
        # the same bytes by message, for a client that cannot map
        assert fn.region_read(dw.BAR_WINDOW, 0x4000, 4) == bytes.fromhex("cafef00d")
        del low, high


def test_qemu_realize_sequence_is_accepted(host: tuple[HostServer, DriverVmProcess, str]) -> None:
    """The messages QEMU's vfio-user-pci sends at realize (hw/vfio-user/pci.c, proxy.c), as raw bytes."""
    _, _, path = host
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    ids = iter(range(1, 1 << 16))

    def call(cmd: int, body: bytes = b"", fds: list[int] | None = None) -> tuple[w.Header, bytes, list[int]]:
        msg = w.encode(next(ids), cmd, body)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        s.sendmsg([msg], anc)
        data, anc_in, _, _ = s.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 4))
        got: list[int] = []
        for _lvl, _kind, payload in anc_in:
            got += array.array("i", payload).tolist()
        hdr = w.decode_header(data)
        assert hdr.is_reply and hdr.size == len(data)
        return hdr, data[w.HEADER_SIZE :], got

    qemu_caps = {
        "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
        "max_msg_fds": 16,
        "max_data_xfer_size": 1048576,
        "pgsizes": 4096,
        "max_dma_maps": 65535,
        "write_multiple": True,
    }
    version = w.encode_version(0, 0, qemu_caps)
    hdr, body, _ = call(Command.VERSION, version)
    assert not hdr.is_error and len(body) <= len(version)  # QEMU: no reply longer than the request
    assert body[-1] == 0 and json.loads(body[4:-1])["capabilities"]["max_msg_fds"] <= 16
    ram = os.memfd_create("qemu-ram")
    os.ftruncate(ram, 1 << 20)
    hdr, _, _ = call(Command.DMA_MAP, w.DMA_MAP.pack(w.DMA_MAP.size, 3, 0, 0x100000, 1 << 20), [ram])
    assert not hdr.is_error
    hdr, body, _ = call(Command.DEVICE_GET_INFO, w.DEVICE_INFO.pack(16, 0, 0, 0))
    assert len(body) == 16  # exactly: vfio-user has no cap_offset here
    _, flags, nregions, nirqs = w.DEVICE_INFO.unpack(body)
    assert flags & 2 and 8 <= nregions <= 100 and 3 <= nirqs <= 50
    for index in (0, 1, 2, 3, 4, 5, 7, 6):
        hdr, body, fds = call(Command.DEVICE_GET_REGION_INFO, w.REGION_INFO.pack(32, 0, index, 0, 0, 0))
        assert len(body) <= 32 + 16  # QEMU's receive buffer for region info is argsz + 16
        argsz, rflags, _, cap_off = w.REGION_INFO.unpack_from(body)[:4]
        if (
            rflags & sv.VFIO_REGION_INFO_FLAG_CAPS
        ):  # hw/vfio-user/device.c: CAPS needs 32 <= cap_offset <= argsz
            assert 32 <= cap_off <= 32
        for fd in fds:
            os.close(fd)
        if argsz > 32:  # QEMU asks again with what the reply said it needs
            hdr, body, fds = call(
                Command.DEVICE_GET_REGION_INFO, w.REGION_INFO.pack(argsz, 0, index, 0, 0, 0)
            )
            assert len(body) <= argsz + 16 and len(fds) <= 1
            _, rflags, _, cap_offset = w.REGION_INFO.unpack_from(body)[:4]
            assert not rflags & sv.VFIO_REGION_INFO_FLAG_CAPS or 32 <= cap_offset <= argsz
            for fd in fds:
                os.close(fd)
    hdr, _, _ = call(Command.DEVICE_GET_IRQ_INFO, w.IRQ_INFO.pack(16, 0, 3, 0))  # ERR: an error is tolerated
    hdr, body, _ = call(Command.REGION_READ, w.REGION_RW.pack(0, 7, 256))
    assert not hdr.is_error and len(body) == w.REGION_RW.size + 256
    for bar in range(6):
        hdr, body, _ = call(Command.REGION_READ, w.REGION_RW.pack(0x10 + 4 * bar, 7, 4))
        assert not hdr.is_error
    hdr, body, _ = call(Command.DEVICE_GET_IRQ_INFO, w.IRQ_INFO.pack(16, 0, 2, 0))
    assert w.IRQ_INFO.unpack(body)[3] >= 3
    # MSI-X enable as QEMU does it: INTx off, a no-fd eventfd run, then one SET_IRQS per vector.
    trig = sv.VFIO_IRQ_SET_ACTION_TRIGGER
    assert not call(Command.DEVICE_SET_IRQS, w.IRQ_SET.pack(20, sv.VFIO_IRQ_SET_DATA_NONE | trig, 0, 0, 0))[
        0
    ].is_error
    assert not call(
        Command.DEVICE_SET_IRQS, w.IRQ_SET.pack(20, sv.VFIO_IRQ_SET_DATA_EVENTFD | trig, 2, 0, 1)
    )[0].is_error
    efds = [os.eventfd(0) for _ in range(3)]
    for v, fd in enumerate(efds):
        assert not call(
            Command.DEVICE_SET_IRQS, w.IRQ_SET.pack(20, sv.VFIO_IRQ_SET_DATA_EVENTFD | trig, 2, v, 1), [fd]
        )[0].is_error
    hdr, _, _ = call(Command.REGION_WRITE, w.REGION_RW.pack(0x42, 7, 2) + struct.pack("<H", 0x8000 | 66))
    assert not hdr.is_error
    hdr, _, _ = call(Command.DEVICE_RESET)
    assert not hdr.is_error
    s.close()
    for fd in (ram, *efds):
        os.close(fd)


def test_malformed_storm_leaves_the_server_serving_and_leaks_nothing(
    host: tuple[HostServer, DriverVmProcess, str],
) -> None:
    server, _, path = host
    with VfioUserFunction(path) as fn:  # settle: the first connection maps what it maps
        fn.config_read(0, 4)
    # Once the server has let go of that connection and taken the driver VM's requests: a single
    # read here may come before either, and then no later count equals it.
    base = settled_fds(server.pid)
    for round_ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(path)
        s.sendall(w.encode(1, Command.VERSION, w.encode_version(0, 0, {})))
        s.recv(4096)
        bad = [
            w.encode(2, 99),  # unknown command
            w.encode(3, Command.REGION_READ, w.REGION_RW.pack(1 << 40, 7, 4)),  # out of range
            w.encode(4, Command.REGION_WRITE, w.REGION_RW.pack(0, 0, 64) + b"x"),  # count disagrees
            w.encode(5, Command.DEVICE_GET_REGION_INFO, b"\x00" * 3),  # too short
            w.encode(6, Command.DEVICE_GET_IRQ_INFO, w.IRQ_INFO.pack(16, 0, 99, 0)),  # no such irq index
            w.encode(7, Command.DEVICE_SET_IRQS, w.IRQ_SET.pack(20, 0x24, 2, 500, 1)),  # vector out of range
        ]
        for msg in bad:
            s.sendall(msg)
            reply = s.recv(4096)
            assert w.decode_header(reply).is_error
        mem = os.memfd_create("m")
        os.ftruncate(mem, 8192)
        extra = os.memfd_create("extra")
        for i in range(2):  # the second DMA_MAP overlaps the first: EEXIST
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [mem]).tobytes())]
            s.sendmsg([w.encode(8 + i, Command.DMA_MAP, w.DMA_MAP.pack(32, 3, 0, 0x1000, 8192))], anc)
            assert w.decode_header(s.recv(4096)).is_error == (i == 1)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [extra]).tobytes())]
        s.sendmsg([w.encode(10, Command.DEVICE_GET_INFO, w.DEVICE_INFO.pack(16, 0, 0, 0))], anc)  # extra fd
        assert w.decode_header(s.recv(4096)).is_error
        os.close(mem)
        os.close(extra)
        if round_ == 2:
            s.sendall(w.encode(11, Command.REGION_READ, w.REGION_RW.pack(0, 7, 4))[:10])  # vanish mid-message
        else:
            s.sendall(struct.pack("<HHIII", 12, 1, 8, 0, 0))  # size smaller than a header: framing error
        s.close()
    # The server still serves, and holds exactly what it held before.
    with VfioUserFunction(path) as fn:
        assert struct.unpack("<H", fn.config_read(0, 2))[0] == VIRTIO_PCI_VENDOR
    wait_for(lambda: fd_count(server.pid) == base, 5, f"fd count back to {base}")


def test_bad_driver_vm_peers_are_dropped_and_others_served(short_dir: Path) -> None:
    server = HostServer(short_dir, ping_interval=0.2)
    try:
        base = fd_count(server.pid)
        peers = []
        for garbage in (b"\xff" * 32, sw.HEADER.pack(0, 1, 1 << 30, uuid.uuid4().bytes, 1)):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(server.socket))
            s.sendall(garbage)
            peers.append(s)
        # a MEMORY_INFO with the wrong number of fds
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(server.socket))
        mem = os.memfd_create("m")
        regs = (SocketRegion(0, 4096, 0, mem), SocketRegion(1 << 20, 4096, 4096, mem))  # type: ignore[arg-type]
        data, _ = sw.encode(
            SockMessage(SockMsgType.MEMORY_INFO, uuid.uuid4(), 1, SockMemoryInfo(Op.ADD, regs))
        )
        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [mem]).tobytes())])
        os.close(mem)
        peers.append(s)
        for p in peers:
            p.settimeout(5)
            assert p.recv(4096) == b""  # dropped
            p.close()
        wait_for(lambda: fd_count(server.pid) == base, 5, "the bad peers' fds released")
        vm = DriverVmProcess(server.socket, [MAC_B], vm_uuid=UUIDS[1], memory="64M")
        assert server.device_socket(vm.uuid)  # a well-behaved driver VM is still served
        vm.stop()
    finally:
        server.stop()
