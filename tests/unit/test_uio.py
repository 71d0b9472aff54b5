"""The UIO backend against a fake sysfs tree of real files, and the INTx + ISR path it needs.

The tree is test_sysfs's, with the function bound to uio_pci_generic and the
files UIO reads: ``config`` and ``resourceN`` are real regular files, so pread,
pwrite and mmap (hence periphery's MMIO) work on them for real. /dev/uioN is a
FIFO: a real kernel object that, like /dev/uioN, polls readable when data is
there, gives 4 bytes to a 4-byte read, and answers a non-blocking read with
EAGAIN when there is nothing. The test holds the FIFO open read-write as the
"kernel" (so the backend's reads never see EOF) and writes interrupt counts
into it. The real kernel (uio_pci_generic in a guest) is the VM tier's.

The INTx + ISR path of the transport and the device is also run against the
reference device model, in this process, behind a small PciFunction that, like
UIO, offers INTx and no MSI-X.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_sysfs import fake_tree
from vhostpci_driver.addr import Iova
from vhostpci_driver.device import VhostPciDevice
from vhostpci_driver.errors import TransportError
from vhostpci_driver.events import RemoteUp
from vhostpci_driver.pci.access import registers_for
from vhostpci_driver.pci.dma import PAGEMAP_PRESENT, physical_address, physical_iova, virtual_address
from vhostpci_driver.pci.function import (
    IrqInfo,
    PciFunction,
    RegionInfo,
)
from vhostpci_driver.pci.mmio import MappedRegisters
from vhostpci_driver.pci.open import open_function
from vhostpci_driver.pci.uio import UioFunction, parse_resource
from vhostpci_driver.spec.pci import PCI_MSIX_FLAGS_ENABLE as MSIX_ENABLE
from vhostpci_driver.spec.vfio import VFIO_PCI_CONFIG_REGION_INDEX as CONFIG_REGION
from vhostpci_driver.spec.vfio import VFIO_PCI_INTX_IRQ_INDEX as INTX_IRQ
from vhostpci_driver.spec.vfio import VFIO_PCI_INTX_IRQ_INDEX as IRQ_INTX
from vhostpci_driver.spec.vfio import VFIO_PCI_MSI_IRQ_INDEX as IRQ_MSI
from vhostpci_driver.spec.vfio import VFIO_PCI_MSIX_IRQ_INDEX as IRQ_MSIX
from vhostpci_driver.spec.virtio_pci import ISR_CONFIG, ISR_QUEUE, VIRTIO_PCI_VENDOR
from vhostpci_driver.virtio.transport import VirtioPciTransport
from vhostpci_driver.wire import ctrl
from vhostpci_driver.wire import device as d
from vhostpci_host.device_model import VhostPciDeviceModel
from vhostpci_host.pci_config import MSIX_CAP, PciConfig
from vhostpci_host.vfio_user_server import DmaTable

ADDR = "0000:00:04.0"  # fake_tree's vhost-pci function
WINDOW = 1 << 20
# (start, size, flags) as resource_show prints them: include/linux/ioport.h flags with SIZEALIGN
BARS = {
    0: (0xFE00_0000, d.BAR_VIRTIO_SIZE, 0x0004_0200),  # memory
    1: (0xFE00_8000, d.BAR_MSIX_SIZE, 0x0004_0200),
    2: (0x8_0000_0000, WINDOW, 0x0014_220C),  # 64-bit prefetchable memory
    4: (0xC000, 0x20, 0x0004_0101),  # I/O ports
}
COMMAND_HIGH = 5  # the command register's high byte: bit 2 is Interrupt Disable
INTX_DISABLE = 0x04


def resource_text(bars: dict[int, tuple[int, int, int]]) -> str:
    """``resource`` as drivers/pci/pci-sysfs.c prints it: 6 BARs, the ROM, the SR-IOV BARs."""
    lines = []
    for i in range(13):
        start, size, flags = bars.get(i, (0, 0, 0))
        end = start + size - 1 if size else 0
        lines.append(f"0x{start:016x} 0x{end:016x} 0x{flags:016x}")
    return "\n".join(lines) + "\n"


@dataclass
class Rig:
    root: Path
    dev: Path  # the function's sysfs directory (real path)
    dev_root: Path
    kernel: int  # our end of the FIFO standing in for /dev/uio0

    def open(self) -> UioFunction:
        return UioFunction(ADDR, sysfs_root=str(self.root), dev_root=str(self.dev_root))

    def config(self, offset: int, size: int) -> bytes:
        return (self.dev / "config").read_bytes()[offset : offset + size]

    def poke_config(self, offset: int, data: bytes) -> None:
        fd = os.open(self.dev / "config", os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def fire(self, count: int) -> None:
        """What uio_pci_generic's handler does: mask the line (Interrupt Disable), count the event."""
        self.poke_config(COMMAND_HIGH, bytes([self.config(COMMAND_HIGH, 1)[0] | INTX_DISABLE]))
        os.write(self.kernel, count.to_bytes(4, sys.byteorder, signed=True))

    def bar_file(self, index: int) -> Path:
        return self.dev / f"resource{index}"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    root = fake_tree(tmp_path / "sys")
    dev = Path(os.path.realpath(root / "bus/pci/devices" / ADDR))
    drv = root / "bus/pci/drivers/uio_pci_generic"
    drv.mkdir(parents=True)
    (dev / "driver").unlink()
    (dev / "driver").symlink_to(drv)
    # The reference device's real config space: virtio capabilities, MSI-X, interrupt pin A.
    (dev / "config").write_bytes(bytes(PciConfig(d.DEFAULT_VIRTIO_ID, WINDOW, 3 + d.DEFAULT_SLOTS).space))
    (dev / "resource").write_text(resource_text(BARS))
    for i, (_start, size, _flags) in BARS.items():
        with open(dev / f"resource{i}", "wb") as f:
            f.truncate(size)  # sysfs gives resourceN the BAR's size
    (dev / "uio/uio0").mkdir(parents=True)
    (dev / "irq").write_text("11\n")
    (dev / "reset").write_text("")
    dev_root = tmp_path / "dev"
    dev_root.mkdir()
    os.mkfifo(dev_root / "uio0")
    kernel = os.open(dev_root / "uio0", os.O_RDWR | os.O_NONBLOCK)
    try:
        yield Rig(root, dev, dev_root, kernel)
    finally:
        os.close(kernel)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mappings_of(path: Path) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if str(path) in line]


# -- regions -------------------------------------------------------------------------------


def test_regions_come_from_the_resource_file(rig: Rig) -> None:
    with rig.open() as fn:
        assert fn.region_info(0) == RegionInfo(0, d.BAR_VIRTIO_SIZE, True, True, True)
        assert fn.region_info(2) == RegionInfo(2, WINDOW, True, True, True)
        assert fn.region_info(3).size == 0  # the upper half of BAR 2
        assert fn.region_info(4) == RegionInfo(4, 0x20, True, True, False)  # I/O ports never map
        assert fn.region_info(5).size == 0
        assert fn.region_info(6).size == 0  # the ROM is not offered
        assert fn.region_info(CONFIG_REGION) == RegionInfo(CONFIG_REGION, 4096, True, True, False)
        with pytest.raises(TransportError, match="no region 8"):
            fn.region_info(8)


def test_register_access_is_width_exact_through_a_mapping_of_resource_n(rig: Rig) -> None:
    bar0 = rig.bar_file(0)
    with rig.open() as fn:
        fn.region_write(0, 0x10, struct.pack("<I", 0xDEADBEEF))
        fn.region_write(0, 0x16, struct.pack("<H", 0x1234))
        fn.region_write(0, 0x19, b"\xab")
        fn.region_write(0, 0x20, struct.pack("<Q", 0x0102030405060708))
        raw = bar0.read_bytes()
        assert raw[0x10:0x28] == bytes.fromhex("efbeadde 0000 3412 00ab 000000000000 0807060504030201")
        assert raw[:0x10] == bytes(0x10)  # nothing else was touched
        with open(bar0, "r+b") as f:  # the "device" changes a register behind our back
            f.seek(0x30)
            f.write(struct.pack("<I", 0xCAFEF00D))
        assert fn.region_read(0, 0x30, 4) == struct.pack("<I", 0xCAFEF00D)
        assert fn.region_read(0, 0x32, 2) == struct.pack("<H", 0xCAFE)
        assert fn.region_read(0, 0x20, 8) == struct.pack("<Q", 0x0102030405060708)
        # The accesses went through a shared mapping of resource0 (periphery MMIO), not pread.
        assert mappings_of(bar0)
        with pytest.raises(TransportError, match="aligned"):
            fn.region_read(0, 0x11, 4)
        with pytest.raises(TransportError, match="outside BAR0"):
            fn.region_read(0, d.BAR_VIRTIO_SIZE - 2, 4)
        with pytest.raises(TransportError, match="BAR3 is not implemented"):
            fn.region_read(3, 0, 4)


def test_the_transport_maps_bars_it_can_and_writes_land_in_the_file(rig: Rig) -> None:
    with rig.open() as fn:
        regs = registers_for(fn, 1)
        assert isinstance(regs, MappedRegisters)
        regs.write32(0x800, 0x55AA55AA)
        assert rig.bar_file(1).read_bytes()[0x800:0x804] == bytes.fromhex("aa55aa55")
        window = fn.region_mmap(2, 0x1000, 0x2000)
        window[:4] = b"xgpa"
        assert rig.bar_file(2).read_bytes()[0x1000:0x1004] == b"xgpa"
        with pytest.raises(TransportError, match="not page-aligned"):
            fn.region_mmap(2, 0x10, 0x1000)
        with pytest.raises(TransportError, match="outside BAR2"):
            fn.region_mmap(2, 0, WINDOW + 0x1000)
        with pytest.raises(TransportError, match="I/O ports"):
            fn.region_mmap(4, 0, 0x20)


def test_io_port_bars_are_read_and_written_one_port_access_at_a_time(rig: Rig) -> None:
    with rig.open() as fn:
        fn.region_write(4, 2, b"\x34\x12")
        fn.region_write(4, 8, struct.pack("<I", 0x89ABCDEF))
        assert rig.bar_file(4).read_bytes()[:12] == bytes.fromhex("0000 3412 00000000 efcdab89")
        assert fn.region_read(4, 8, 4) == struct.pack("<I", 0x89ABCDEF)
        for size, offset in ((8, 0), (3, 0), (2, 1)):
            with pytest.raises(TransportError, match="1, 2 or 4-byte"):
                fn.region_read(4, offset, size)


def test_config_space_by_pread_and_pwrite(rig: Rig) -> None:
    with rig.open() as fn:
        assert fn.config_read(0, 4) == struct.pack("<HH", VIRTIO_PCI_VENDOR, d.pci_device_id())
        assert fn.region_read(CONFIG_REGION, 0, 2) == struct.pack("<H", VIRTIO_PCI_VENDOR)
        fn.config_write(0x3C, b"\x0b")
        fn.region_write(CONFIG_REGION, 0x04, struct.pack("<H", 0x0006))
        assert rig.config(0x3C, 1) == b"\x0b" and rig.config(0x04, 2) == b"\x06\x00"
        with pytest.raises(TransportError, match="outside the 4096-byte config space"):
            fn.config_read(4094, 4)
        with pytest.raises(TransportError, match="config"):
            fn.config_write(-1, b"\0")


# -- interrupts ----------------------------------------------------------------------------


def test_intx_only_no_vector_can_be_routed(rig: Rig) -> None:
    with rig.open() as fn:
        assert fn.irq_info(IRQ_INTX) == IrqInfo(IRQ_INTX, 1, False)
        assert fn.irq_info(IRQ_MSI).count == 0 and fn.irq_info(IRQ_MSIX).count == 0
        efd = os.eventfd(0)
        try:
            with pytest.raises(TransportError, match="routes no interrupt to an eventfd"):
                fn.set_irq_eventfds(IRQ_MSIX, 0, [efd])
        finally:
            os.close(efd)
        with pytest.raises(TransportError, match="no irq index 9"):
            fn.irq_info(9)
    rig.poke_config(0x3D, b"\0")  # interrupt pin 0: the function has no INTx line
    with rig.open() as fn:
        assert fn.irq_info(IRQ_INTX).count == 0
        with pytest.raises(TransportError, match="no INTx line"):
            fn.intx_source()


def test_intx_wait_take_and_rearm(rig: Rig) -> None:
    rig.poke_config(COMMAND_HIGH, bytes([0x01]))  # SERR# enable: a neighbour that must survive
    with rig.open() as fn:
        line = fn.intx_source()
        assert not line.consume()  # nothing yet: EAGAIN, not a block
        assert select.select([line], [], [], 0)[0] == []
        rig.fire(41)
        assert select.select([line], [], [], 5)[0] == [line]
        assert rig.config(COMMAND_HIGH, 1)[0] & INTX_DISABLE  # the "kernel" masked it
        assert line.consume() and line.count == 41
        assert not line.consume()
        line.rearm()
        assert rig.config(COMMAND_HIGH, 1) == b"\x01"  # Interrupt Disable cleared, SERR# kept
        fn.disable_irqs(IRQ_INTX)
        assert rig.config(COMMAND_HIGH, 1) == bytes([0x01 | INTX_DISABLE])


def test_a_gone_uio_device_is_a_transport_error(rig: Rig) -> None:
    with rig.open() as fn:
        line = fn.intx_source()
        os.write(rig.kernel, b"\x01\x00")  # not a 4-byte count
        with pytest.raises(TransportError, match="not the 4-byte interrupt count"):
            line.consume()


# -- the transport's INTx + ISR path over UIO ------------------------------------------------


def test_transport_takes_intx_and_reads_the_isr_only_when_the_line_fired(rig: Rig) -> None:
    ctrl_off = MSIX_CAP + 2
    # A previous driver left MSI-X on: with it on, the device would not use the ISR.
    rig.poke_config(ctrl_off, struct.pack("<H", MSIX_ENABLE | (3 + d.DEFAULT_SLOTS - 1)))
    with rig.open() as fn:
        t = VirtioPciTransport(fn)
        assert t.caps.msix is not None  # the device has MSI-X; UIO just cannot route it
        assert t.intx_available()
        t.enable_intx()
        assert not struct.unpack("<H", rig.config(ctrl_off, 2))[0] & MSIX_ENABLE
        with open(rig.bar_file(0), "r+b") as f:  # the "device" sets both ISR bits
            f.seek(d.ISR_OFFSET)
            f.write(bytes([ISR_QUEUE | ISR_CONFIG]))
        assert t.intx_isr() == 0  # the line did not fire: the ISR is left alone
        rig.fire(1)
        assert t.intx_isr() == ISR_QUEUE | ISR_CONFIG
        assert not rig.config(COMMAND_HIGH, 1)[0] & INTX_DISABLE  # re-armed after the ISR read
        t.close()
        assert rig.config(COMMAND_HIGH, 1)[0] & INTX_DISABLE  # closing masks the line again


# -- hostile or broken input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "0 lines"),
        ("0x0 0x0 0x0\n" * 5, "5 lines"),
        ("0x0 0x0\n" + "0x0 0x0 0x0\n" * 6, "line 1 is not"),
        ("0x0 0x0 0x0\n" * 6 + "0x10 zz 0x0\n", "line 7 is not"),
        ("0x1000 0x0fff 0x200\n" + "0x0 0x0 0x0\n" * 6, "line 1: end 0xfff is below"),
        ("0x1000 0x1fff 0x0\n" + "0x0 0x0 0x0\n" * 6, "neither I/O ports nor memory"),
        ("0x1000 0x1fff 0x300\n" + "0x0 0x0 0x0\n" * 6, "neither I/O ports nor memory"),
        ("0x00000000000000001 0x0 0x0\n" + "0x0 0x0 0x0\n" * 6, "line 1 is not"),  # 17 digits
    ],
)
def test_garbage_in_resource_is_refused_naming_the_line(text: str, why: str) -> None:
    with pytest.raises(TransportError, match=why):
        parse_resource(text)


LINE = st.from_regex(r"0x[0-9a-f]{1,16} 0x[0-9a-f]{1,16} 0x[0-9a-f]{1,8}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=60), LINE), max_size=14))
def test_resource_parser_raises_nothing_but_transport_errors(lines: list[str]) -> None:
    try:
        out = parse_resource("\n".join(lines))
    except TransportError:
        return
    assert 6 <= len(out) <= 7 and all(r.size >= 0 for r in out)


def test_garbage_resource_file_fails_open_and_leaves_nothing_open(rig: Rig) -> None:
    fds = open_fds()
    (rig.dev / "resource").write_text("0xfe000000 garbage\n")
    with pytest.raises(TransportError, match="resource: 1 lines"):
        rig.open()
    (rig.dev / "resource").write_text(resource_text(BARS).replace("0x0000000000040200", "0x40200z", 1))
    with pytest.raises(TransportError, match="resource: line 1 is not"):
        rig.open()
    assert open_fds() == fds


def test_a_bar_larger_than_its_resource_file_is_never_mapped(rig: Rig) -> None:
    fds = open_fds()
    os.truncate(rig.bar_file(2), WINDOW // 2)
    with pytest.raises(TransportError, match="resource2 has 0x80000 bytes but .* BAR2 0x100000"):
        rig.open()
    assert open_fds() == fds and not mappings_of(rig.dev)


def test_missing_pieces_are_named(rig: Rig) -> None:
    fds = open_fds()
    (rig.dev_root / "uio0").unlink()
    with pytest.raises(TransportError, match=r"cannot open .*/dev/uio0"):
        rig.open()
    (rig.dev / "uio/uio0").rmdir()
    with pytest.raises(TransportError, match=r"0000:00:04.0/uio holds no uioN entry"):
        rig.open()
    (rig.dev / "uio").rmdir()
    with pytest.raises(TransportError, match=r"0000:00:04.0/uio: No such file.*registered no UIO device"):
        rig.open()
    (rig.dev / "uio/uio0").mkdir(parents=True)
    os.mkfifo(rig.dev_root / "uio0")
    os.unlink(rig.bar_file(1))
    with pytest.raises(TransportError, match=r"cannot open .*resource1"):
        rig.open()
    assert open_fds() == fds


def test_only_a_function_bound_to_uio_pci_generic_is_opened(rig: Rig) -> None:
    (rig.dev / "driver").unlink()
    (rig.dev / "driver").symlink_to(rig.root / "bus/pci/drivers/vfio-pci")
    with pytest.raises(TransportError, match="bound to vfio-pci, not uio_pci_generic; run 'vhostpci bind"):
        rig.open()


# -- lifetime, reset, DMA ----------------------------------------------------------------------


def test_close_releases_every_fd_and_mapping(rig: Rig) -> None:
    with rig.open() as fn:  # warm up imports and caches
        fn.region_read(0, 0, 4)
    fds = open_fds()
    for _ in range(20):
        fn = rig.open()
        t = VirtioPciTransport(fn)  # maps BAR 0 (the virtio structures) through FdMMIO
        t.enable_intx()
        window = fn.region_mmap(2, 0, WINDOW)
        fn.region_read(1, 0, 4)
        fn.region_write(4, 0, b"\0")
        assert mappings_of(rig.dev)
        del window  # callers drop their views first, as the PciFunction contract says
        t.close()
        fn.close()
        fn.close()  # idempotent
        assert open_fds() == fds and not mappings_of(rig.dev)
    with pytest.raises(TransportError, match="closed"):
        fn.region_read(0, 0, 4)


def test_reset_writes_the_reset_attribute(rig: Rig) -> None:
    with rig.open() as fn:
        fn.reset()
        assert (rig.dev / "reset").read_text() == "1"
        (rig.dev / "reset").unlink()
        with pytest.raises(TransportError, match="reset is missing"):
            fn.reset()


def test_dma_uses_physical_addresses_and_maps_nothing(rig: Rig) -> None:
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, page)
    buf.write(b"\1" * page)  # present
    view = memoryview(buf)
    try:
        try:
            phys = physical_address(virtual_address(view))
        except TransportError:
            pytest.skip("pagemap hides frame numbers here (no CAP_SYS_ADMIN)")
        with rig.open() as fn:
            assert fn.iova_for(view, Iova(0x4000_0000)) == phys
            fn.dma_map(-1, 0, view, Iova(phys))  # nothing to map: no IOMMU
            fn.dma_unmap(Iova(phys), page)
    finally:
        view.release()
        buf.close()


def test_physical_iova_needs_physically_contiguous_pages(tmp_path: Path) -> None:
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, 3 * page)
    view = memoryview(buf)
    first = virtual_address(view) // page
    pagemap = tmp_path / "pagemap"  # sparse: one entry per page, at the real virtual addresses

    def frames(*pfns: int) -> None:
        with open(pagemap, "wb") as f:
            for i, pfn in enumerate(pfns):
                f.seek((first + i) * 8)
                f.write((PAGEMAP_PRESENT | pfn).to_bytes(8, "little"))

    try:
        frames(0x100, 0x101, 0x102)
        assert physical_iova(view, str(pagemap)) == 0x100 * page
        assert physical_iova(view[100:], str(pagemap)) == 0x100 * page + 100
        frames(0x100, 0x101, 0x300)
        with pytest.raises(TransportError, match="not physically contiguous"):
            physical_iova(view, str(pagemap))
        assert physical_iova(view[: 2 * page], str(pagemap)) == 0x100 * page
    finally:
        view.release()
        buf.close()


# -- choosing the backend --------------------------------------------------------------------


def test_open_function_routes_by_driver_and_preference(rig: Rig) -> None:
    root = str(rig.root)
    # Bound to uio_pci_generic: UIO (which looks for /dev/uio0 in the real /dev, and says so).
    with pytest.raises(TransportError, match="/dev/uio0"):
        open_function(ADDR, sysfs_root=root)
    with pytest.raises(TransportError, match="not vfio-pci"):
        open_function(ADDR, prefer="vfio", sysfs_root=root)
    with pytest.raises(TransportError, match="0000:00:05.0 is bound to virtio-pci, not uio_pci_generic"):
        open_function("0000:00:05.0", prefer="uio", sysfs_root=root)
    with pytest.raises(TransportError, match="not one of auto, vfio, vfio-cdev, vfio-group, uio"):
        open_function(ADDR, prefer="igb_uio", sysfs_root=root)
    with pytest.raises(TransportError, match="served over vfio-user"):
        open_function("vfio-user:/nowhere.sock", prefer="uio")


# -- the INTx + ISR path of the device, against the reference device ---------------------------


class EventfdLine:
    """An INTx line the reference device signals on an eventfd.

    The device masks the line each time it fires (VFIO's AUTOMASKED INTx); re-arming
    unmasks it, as QEMU's vfio-user client does after the guest's EOI.
    """

    def __init__(self, fd: int, model: VhostPciDeviceModel) -> None:
        self.fd = fd
        self.model = model

    def fileno(self) -> int:
        return self.fd

    def consume(self) -> bool:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            return False
        return True

    def rearm(self) -> None:
        self.model.set_irqs(INTX_IRQ, 0x11, 0, 1, [])  # ACTION_UNMASK | DATA_NONE


class ModelFunction(PciFunction):
    """The reference device model in this process, offering INTx and no MSI-X vectors, as UIO does."""

    address = "in-process reference device"
    backend = "model"

    def __init__(self) -> None:
        self.model = VhostPciDeviceModel(window_size=1 << 24)
        self.dma = DmaTable()
        self.model.attach_dma(self.dma)
        self.line = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.model.set_irqs(INTX_IRQ, 0x24, 0, 1, [os.dup(self.line)])  # DATA_EVENTFD | ACTION_TRIGGER

    def config_read(self, offset: int, size: int) -> bytes:
        return self.model.region_read(CONFIG_REGION, offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        self.model.region_write(CONFIG_REGION, offset, data)

    def region_info(self, index: int) -> RegionInfo:
        spec = self.model.regions()[index]
        return RegionInfo(index, spec.size, bool(spec.flags & 1), bool(spec.flags & 2), False)

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        return self.model.region_read(index, offset, size)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self.model.region_write(index, offset, data)

    def region_mmap(self, index: int, offset: int, size: int) -> mmap.mmap:
        raise TransportError("nothing maps in this rig", f"region {index}")

    def irq_info(self, index: int) -> IrqInfo:
        return IrqInfo(index, 1 if index == IRQ_INTX else 0, False)

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        raise TransportError("no vectors here", f"irq {index}")

    def disable_irqs(self, index: int) -> None:
        pass

    def intx_source(self) -> EventfdLine:
        return EventfdLine(self.line, self.model)

    def dma_map(self, fd: int, fd_offset: int, vaddr_view: memoryview, iova: Iova) -> None:
        self.dma.map(iova, len(vaddr_view), fd, fd_offset, 3)

    def dma_unmap(self, iova: Iova, size: int) -> None:
        self.dma.unmap(iova, size)

    def reset(self) -> None:
        self.model.reset()

    def close(self) -> None:
        self.model.disconnected()
        self.dma.unmap_all()
        os.close(self.line)


def test_the_device_is_served_on_intx_and_the_isr() -> None:
    fn = ModelFunction()
    model = fn.model
    acks: list[tuple[int, ctrl.Ack]] = []
    model.on_ack = lambda rid, ack: acks.append((rid, ack))
    with VhostPciDevice(fn) as dev:
        assert dev.interrupts == "intx" and dev.irq_fds == []
        assert dev.fileno_list() == [fn.line]
        assert dev.dump()["interrupts"] == "intx"
        # A config change: the line fires, ISR bit 1 says what for.
        model.set_remote(uuid.UUID(int=7).bytes, True)
        assert dev.wait(5)
        assert any(isinstance(ev, RemoteUp) for ev in dev.process())
        assert model.isr == 0 and dev.stats["interrupts"] == 1  # the read acknowledged it
        # A controlq message: ISR bit 0; its ack goes back on the ackq.
        rid = model.send_control(ctrl.FeatureBits(1, 0x99, 1 << 32))  # no such frontend: FAIL
        assert dev.wait(5)
        dev.process()
        assert [r for r, _ in acks] == [rid] and acks[0][1].result.failed
        while dev.wait(0):  # the ackq's used buffers raise the line too
            dev.process()
        # The line did not fire: the ISR is not read (reading it would clear it).
        model.isr = ISR_CONFIG
        assert not dev.wait(0)
        dev.process()
        assert model.isr == ISR_CONFIG
        assert model.counters["driver_errors"] == 0
