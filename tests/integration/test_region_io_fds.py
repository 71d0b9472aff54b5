"""Doorbells and queue notifications by ioeventfd (vfio-user GET_REGION_IO_FDS), with real processes.

The device runs in its own process (tests/integration/loopback_device.py): its
slot 0 has one eventfd as kick and call, so a doorbell comes back as the slot's
interrupt, which the client routes to an eventfd of its own (MSI-X). Its stats
say whether a write came as a message or not.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import MAC_A, MAC_B, UUIDS, wait_for
from vhostpci_driver.errors import ProtocolError
from vhostpci_driver.pci.vfio_user_client import VfioUserFunction
from vhostpci_driver.spec.pci import PCI_MSIX_FLAGS_ENABLE as MSIX_ENABLE
from vhostpci_driver.spec.vfio import VFIO_PCI_MSIX_IRQ_INDEX as IRQ_MSIX
from vhostpci_driver.wire import device as dw
from vhostpci_driver.wire import vfio_user as w
from vhostpci_host.harness import HostServer, JsonProcess, Rig
from vhostpci_host.pci_config import MSIX_CAP

SLOT = 0
DOORBELL = dw.DOORBELL_OFFSET + 4 * SLOT
RING = b"\x01\x00\x00\x00"


class LoopbackDevice(JsonProcess):
    def __init__(self, directory: Path, mode: str) -> None:
        self.path = str(directory / f"{mode}.sock")
        argv = [sys.executable, "-m", "tests.integration.loopback_device", self.path, mode]
        super().__init__(argv, f"loopback-{mode}")
        self.read_event("listening")

    def stats(self) -> dict[str, Any]:
        self.send("stats")
        return self.read_event("stats")


@pytest.fixture(params=["ioeventfd", "none", "refuse"])
def device(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[LoopbackDevice]:
    dev = LoopbackDevice(short_dir, request.param)
    yield dev
    dev.stop()


def _route_slot_interrupt(fn: VfioUserFunction) -> int:
    """Slot 0's interrupt to a fresh eventfd, as the driver routes it: MSI-X on, a vector for the slot."""
    irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fn.config_write(MSIX_CAP + 2, struct.pack("<H", MSIX_ENABLE))
    fn.set_irq_eventfds(IRQ_MSIX, dw.Vector.FIRST_SLOT, [irq])
    fn.region_write(dw.BAR_VIRTIO, dw.VECTOR_OFFSET + 2 * SLOT, struct.pack("<H", dw.Vector.FIRST_SLOT))
    return irq


def _interrupted(irq: int) -> bool:
    ready, _, _ = select.select([irq], [], [], 5.0)
    if ready:
        os.eventfd_read(irq)
    return bool(ready)


def test_doorbell_and_notify_reach_the_device_by_ioeventfd_or_by_message(device: LoopbackDevice) -> None:
    by_eventfd = device.name.endswith("ioeventfd")
    with VfioUserFunction(device.path) as fn:
        irq = _route_slot_interrupt(fn)
        try:
            before = device.stats()
            fn.region_write_posted(dw.BAR_VIRTIO, DOORBELL, RING)
            assert _interrupted(irq), "the doorbell never came back as the slot's interrupt"
            registers = fn.ioeventfd_registers(dw.BAR_VIRTIO)
            if by_eventfd:
                # Both queue notify registers (virtio 1.2, 4.1.4.4) and every slot's doorbell.
                assert (dw.NOTIFY_OFFSET, 2) in registers and (dw.NOTIFY_OFFSET + 4, 2) in registers
                assert (DOORBELL, 4) in registers and len(registers) == 2 + 8
            else:
                assert registers == []
            after = device.stats()
            assert (after["doorbells"], after["kicks"]) == (before["doorbells"] + 1, before["kicks"] + 1)
            # The asking is two messages (region info for its size, the io fds); the doorbell
            # itself one more, unless it went by eventfd.
            assert after["messages"] - before["messages"] == (2 if by_eventfd else 3)

            # Queue notify: datamatch on the queue index. The matching value goes by eventfd,
            # another one (a driver bug, still a notify for the device) by message.
            fn.region_write_posted(dw.BAR_VIRTIO, dw.NOTIFY_OFFSET, struct.pack("<H", 0))
            wait_for(lambda: device.stats()["notifies"] == before["notifies"] + 1, 5, "controlq notify")
            fn.region_write_posted(dw.BAR_VIRTIO, dw.NOTIFY_OFFSET + 4, struct.pack("<H", 7))
            wait_for(lambda: device.stats()["notifies"] == before["notifies"] + 2, 5, "ackq notify")
            last = device.stats()
            assert last["messages"] - after["messages"] == (1 if by_eventfd else 2)

            # Many doorbells pile up in the counter: each is counted, the call comes.
            for _ in range(5):
                fn.region_write_posted(dw.BAR_VIRTIO, DOORBELL, RING)
            assert _interrupted(irq)
            wait_for(lambda: device.stats()["doorbells"] == after["doorbells"] + 5, 5, "five doorbells")
        finally:
            os.close(irq)


def test_open_and_close_fifty_times_leaks_no_fd_on_either_side(short_dir: Path) -> None:
    device = LoopbackDevice(short_dir, "ioeventfd")
    try:
        mine = len(os.listdir("/proc/self/fd"))
        theirs = device.stats()["fds"]
        for _ in range(50):
            with VfioUserFunction(device.path) as fn:
                irq = _route_slot_interrupt(fn)
                fn.region_write_posted(dw.BAR_VIRTIO, DOORBELL, RING)
                assert fn.ioeventfd_registers(dw.BAR_VIRTIO)
                assert _interrupted(irq)
            os.close(irq)
        assert len(os.listdir("/proc/self/fd")) == mine
        # The server closes its ioeventfds (and the client's irq fd) when it sees each client go.
        wait_for(lambda: device.stats()["fds"] == theirs, 5, "the device's fds back to where they were")
    finally:
        device.stop()


def test_a_hostile_reply_is_a_protocol_error_and_leaves_nothing_open(short_dir: Path) -> None:
    """A server (a thread here) whose ioeventfd lies outside the region: refused, its fd closed."""
    path = str(short_dir / "hostile.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while hdr_raw := conn.recv(w.HEADER_SIZE, socket.MSG_WAITALL):
                hdr = w.decode_header(hdr_raw)
                body = conn.recv(hdr.size - w.HEADER_SIZE, socket.MSG_WAITALL) if hdr.size > 16 else b""
                fds: list[int] = []
                if hdr.command == w.Command.VERSION:
                    reply = w.encode_version(0, 0, {})
                elif hdr.command == w.Command.DEVICE_GET_INFO:
                    reply = w.DEVICE_INFO.pack(16, 2, 9, 5)
                elif hdr.command == w.Command.DEVICE_GET_REGION_INFO:
                    reply = w.encode_region_info(32, 3, body[8], 0x1000, 0, areas=())
                elif hdr.command == w.Command.DEVICE_GET_REGION_IO_FDS:
                    sub = w.SubRegionIoFd(0x1000, 4, 0)  # at the region's end: outside it
                    reply = w.encode_region_io_fds_reply(4096, 0, (sub,))
                    fds = [os.eventfd(0)]
                elif hdr.command == w.Command.REGION_WRITE:
                    continue  # posted: no reply
                else:
                    reply = b""
                conn.sendmsg(
                    [w.encode(hdr.msg_id, hdr.command, reply, reply=True)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", *fds))] if fds else [],
                )
                for fd in fds:
                    os.close(fd)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        mine = len(os.listdir("/proc/self/fd"))
        with VfioUserFunction(path) as fn:
            with pytest.raises(ProtocolError, match=r"REGION_IO_FDS\.sub_regions\[0\]\.offset"):
                fn.region_write_posted(0, 0x10, RING)
            assert fn.ioeventfd_registers(0) == []
        thread.join(5)  # the fake server's end closes when ours does
        assert not thread.is_alive()
        assert len(os.listdir("/proc/self/fd")) == mine
    finally:
        listener.close()


def test_the_driver_vms_frontends_get_their_calls_by_ioeventfd(rig: Rig) -> None:
    """The whole stack: the net backend's doorbells (RX used) reach the simulated driver VM."""
    a = rig.add_vm(MAC_A, vm_uuid=UUIDS[0])
    b = rig.add_vm(MAC_B, vm_uuid=UUIDS[1])
    rig.serve()
    a.send(f"send {MAC_B} 500 64")
    # The simulator reads its RX ring only when the call eventfd fires: receiving is the proof.
    wait_for(lambda: b.stats()["frontends"][0]["received"] >= 500, 30, "500 frames at B")
    for dev in rig.devices:
        fn = dev.function
        assert isinstance(fn, VfioUserFunction)
        doorbells = [r for r in fn.ioeventfd_registers(dev.config.slot_bar) if r[1] == 4]
        assert doorbells, "the driver still rings its doorbells by message"


def _eventfd_id(fdinfo: Path) -> int | None:
    """An eventfd's kernel id (fdinfo's eventfd-id, Linux 6.0+): the same object, whoever holds a dup."""
    for line in fdinfo.read_text().splitlines():
        if line.startswith("eventfd-id:"):
            return int(line.split()[1])
    return None


def test_the_host_hands_doorbells_as_the_driver_vms_call_eventfds(short_dir: Path) -> None:
    """Issue 16 item 4: the device VM's doorbell is the driver VM's call eventfd, no host Python between.

    The simulator reads its RX only when its call eventfd fires, so receiving proves the
    interrupt came; the doorbell register's eventfd is the very eventfd the simulator
    made (the same eventfd-id), and the driver asked again when the frontend came.
    """
    rig = Rig(HostServer(short_dir, extra=("--direct-doorbells",)))
    try:
        _direct_doorbells(rig)
    finally:
        rig.close()


def _direct_doorbells(rig: Rig) -> None:
    a = rig.add_vm(MAC_A, vm_uuid=UUIDS[0])
    b = rig.add_vm(MAC_B, vm_uuid=UUIDS[1])
    rig.serve()
    a.send(f"send {MAC_B} 500 64")
    wait_for(lambda: b.stats()["frontends"][0]["received"] >= 500, 30, "500 frames at B")
    b.send(f"send {MAC_A} 500 64")
    wait_for(lambda: a.stats()["frontends"][0]["received"] >= 500, 30, "500 frames at A")
    rang = 0
    for vm, dev in zip((a, b), rig.devices, strict=True):
        theirs = {_eventfd_id(Path(f"/proc/{vm.pid}/fdinfo/{n}")) for n in os.listdir(f"/proc/{vm.pid}/fd")}
        fn = dev.function
        assert isinstance(fn, VfioUserFunction)
        table = fn._io_fds.get(dev.config.slot_bar, {})
        (fe,) = dev.frontends.values()
        for v in fe.virtqs:
            entries = table.get((dev.config.doorbell_offset + 4 * v.notify_slot, 4), [])
            for _, fd in entries:
                ours = _eventfd_id(Path(f"/proc/self/fdinfo/{fd}"))
                if ours is None:
                    pytest.skip("this kernel's fdinfo names no eventfd-id")
                assert ours in theirs, "the doorbell still goes through the host"
                rang += 1
    assert rang >= 2  # each device rang at least its RX doorbell
