"""The UIO backend: a PCI function bound to uio_pci_generic, driven through sysfs and /dev/uioN.

uio_pci_generic (Documentation/driver-api/uio-howto.rst, "Generic PCI UIO
driver") gives userspace the INTx line and nothing else; the rest is plain PCI
sysfs (Documentation/PCI/sysfs-pci.rst):

* config space: ``<dev>/config`` by pread/pwrite. The kernel turns an aligned
  1, 2 or 4-byte access into one config cycle of that width. Beyond byte 64
  it needs CAP_SYS_ADMIN (unprivileged reads come back short).
* BARs: ``<dev>/resource`` gives the layout, one ``start end flags`` line per
  resource; ``<dev>/resourceN`` maps a memory BAR (mmap at an offset) or reads
  and writes an I/O port BAR. Every register access is one load or store of
  its width, through periphery's MMIO (:class:`~vhostpci_driver.pci.mmio.FileMMIO`).
* INTx: ``/dev/uioN`` (named by ``<dev>/uio/uioN``). A 4-byte read returns the
  interrupt count, and the fd polls readable when it moved. On every interrupt
  uio_pci_generic sets the PCI 2.3 Interrupt Disable bit, and it has no
  ``irqcontrol``, so writing to /dev/uioN fails with ENOSYS (drivers/uio/uio.c,
  ``uio_write``). The line is re-armed by clearing that bit in the command
  register, as the howto's example does. :class:`UioIntx` is that line as the
  virtio transport's ``IrqSource``.
* reset: ``<dev>/reset``, when the kernel knows a reset method.

There is no MSI or MSI-X (nothing routes their vectors), and there is no IOMMU.
The device gets physical addresses (``/proc/self/pagemap``: CAP_SYS_ADMIN, and
physically contiguous memory, i.e. huge pages). It can read and write all of
the device VM's memory, and we have no way to stop it. This is the unsafe
fallback for a device VM that has neither a (virtual) IOMMU nor VFIO's
no-IOMMU mode; prefer vfio-pci.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from vhostpci_driver.addr import Iova
from vhostpci_driver.errors import TransportError
from vhostpci_driver.pci import sysfs
from vhostpci_driver.pci.dma import physical_iova
from vhostpci_driver.pci.function import IrqInfo, PciFunction, RegionInfo
from vhostpci_driver.pci.mmio import FileMMIO
from vhostpci_driver.spec.pci import (
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_INTERRUPT_PIN,
    PCI_STD_HEADER_SIZE,
)
from vhostpci_driver.spec.vfio import (
    VFIO_PCI_BAR5_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS,
    VFIO_PCI_ROM_REGION_INDEX,
)

DRIVER = "uio_pci_generic"
NUM_BARS = VFIO_PCI_BAR5_REGION_INDEX + 1
# include/linux/ioport.h
IORESOURCE_IO = 0x100
IORESOURCE_MEM = 0x200
# The Interrupt Disable bit is bit 10 of the command register, bit 2 of its high byte
# (the byte the uio-howto example writes).
PCI_COMMAND_HIGH = PCI_COMMAND + 1
COMMAND_HIGH_INTX_DISABLE = PCI_COMMAND_INTX_DISABLE >> 8
_HEX = re.compile(r"0x[0-9a-fA-F]{1,16}")


@dataclass(frozen=True)
class Resource:
    """One line of sysfs ``resource``: a BAR, the ROM, or (bridges, SR-IOV) a further window."""

    start: int
    end: int
    flags: int

    @property
    def size(self) -> int:
        # include/linux/pci.h pci_resource_len(): a resource ending at 0 is not there.
        return 0 if self.end == 0 else self.end - self.start + 1


def parse_resource(text: str, name: str = "resource") -> tuple[Resource, ...]:
    """The BARs and the ROM from a sysfs ``resource`` file (drivers/pci/pci-sysfs.c resource_show).

    Each line is ``0x%016llx 0x%016llx 0x%016llx`` (start, end, flags); only
    the first seven (BAR 0-5 and the ROM) mean anything here. Anything else is
    a :class:`TransportError` naming the line.
    """
    lines = text.splitlines()
    if len(lines) < NUM_BARS:
        raise TransportError(f"{len(lines)} lines, expected one per BAR (at least {NUM_BARS})", name)
    out = []
    for i, line in enumerate(lines[: NUM_BARS + 1]):
        fields = line.split()
        if len(fields) != 3 or not all(_HEX.fullmatch(f) for f in fields):
            raise TransportError(f"line {i + 1} is not 'start end flags' in hex: {line[:80]!r}", name)
        start, end, flags = (int(f, 16) for f in fields)
        r = Resource(start, end, flags)
        if end and end < start:
            raise TransportError(f"line {i + 1}: end {end:#x} is below start {start:#x}", name)
        if i < NUM_BARS and r.size and bool(flags & IORESOURCE_IO) == bool(flags & IORESOURCE_MEM):
            raise TransportError(f"line {i + 1}: BAR{i} is neither I/O ports nor memory ({flags:#x})", name)
        out.append(r)
    return tuple(out)


def _pread(fd: int, size: int, offset: int, path: Path, register: str) -> bytes:
    try:
        data = os.pread(fd, size, offset)
    except OSError as e:
        raise TransportError(f"reading {path} at {offset:#x}: {e.strerror}", register) from None
    if len(data) != size:
        # sysfs config: an unprivileged read past byte 64 comes back short (pci_read_config).
        hint = " (past byte 64 needs CAP_SYS_ADMIN)" if path.name == "config" else ""
        raise TransportError(
            f"short read of {path}: {len(data)} of {size} bytes at {offset:#x}{hint}", register
        )
    return data


def _pwrite(fd: int, data: bytes, offset: int, path: Path, register: str) -> None:
    try:
        done = os.pwrite(fd, data, offset)
    except OSError as e:
        raise TransportError(f"writing {path} at {offset:#x}: {e.strerror}", register) from None
    if done != len(data):
        raise TransportError(f"short write to {path}: {done} of {len(data)} bytes at {offset:#x}", register)


@dataclass
class _Bar:
    index: int
    start: int
    size: int
    io: bool
    path: Path
    fd: int

    @property
    def mappable(self) -> bool:
        # resourceN maps from the page holding the BAR (pci_mmap_resource_range), so only a
        # page-aligned memory BAR maps with its offset 0 at the mapping's offset 0.
        return not self.io and self.start % mmap.PAGESIZE == 0


class UioIntx:
    """The INTx line of a uio_pci_generic function, as the virtio transport's ``IrqSource``."""

    def __init__(self, function: UioFunction, fd: int, path: Path) -> None:
        self._function = function
        self._fd = fd
        self.path = path
        #: the kernel's interrupt count at the last read (None before the first)
        self.count: int | None = None

    def fileno(self) -> int:
        return self._fd

    def consume(self) -> bool:
        """Take the interrupt if the line fired (one non-blocking 4-byte read); False if it did not."""
        try:
            raw = os.read(self._fd, 4)
        except BlockingIOError:
            return False
        except OSError as e:  # uio.c: EIO once the device has gone away (unbound, unplugged)
            raise TransportError(f"reading {self.path}: {e.strerror}", self.path.name) from None
        if len(raw) != 4:
            raise TransportError(
                f"read {len(raw)} bytes from {self.path}, not the 4-byte interrupt count", self.path.name
            )
        # uio-howto, "Waiting for interrupts": a signed 32-bit count, in host byte order.
        self.count = int.from_bytes(raw, sys.byteorder, signed=True)
        return True

    def rearm(self) -> None:
        """Clear Interrupt Disable, which uio_pci_generic set when the line fired."""
        self._function.mask_intx(False)


class UioFunction(PciFunction):
    """A PCI function bound to uio_pci_generic, opened through sysfs and /dev/uioN."""

    @property
    def backend(self) -> str:
        return "uio"

    def __init__(self, address: str, *, sysfs_root: str = "/sys", dev_root: str = "/dev") -> None:
        self.address = sysfs.parse_address(address)
        self._stack = contextlib.ExitStack()
        self._bars: dict[int, _Bar] = {}
        self._mmio: list[FileMMIO] = []  # every mapping, in the order made
        self._access: dict[int, FileMMIO] = {}  # BAR -> the mapping region_read/region_write use
        self._maps: list[mmap.mmap] = []  # region_mmap's, for the window
        self._closed = False
        try:
            self._open(sysfs_root, Path(dev_root))
        except BaseException:
            self._stack.close()
            self._closed = True
            raise

    def _fd(self, path: Path, flags: int) -> int:
        try:
            fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as e:
            raise TransportError(f"cannot open {path}: {e.strerror}", path.name) from None
        self._stack.callback(os.close, fd)
        return fd

    def _open(self, root: str, dev_root: Path) -> None:
        pci = sysfs.info(self.address, root)
        if pci.driver != DRIVER:
            raise TransportError(
                f"{self.address} is bound to {pci.driver or 'no driver'}, not {DRIVER}; "
                f"run 'vhostpci bind {self.address} --driver {DRIVER}'",
                "driver",
            )
        dev = self.sysfs_dir = Path(root) / "bus/pci/devices" / self.address
        self.uio_path = dev_root / self._uio_name(dev / "uio")
        uio_fd = self._fd(self.uio_path, os.O_RDONLY | os.O_NONBLOCK)
        self.config_path = dev / "config"
        self._config = self._fd(self.config_path, os.O_RDWR)
        self.config_size = os.fstat(self._config).st_size
        if self.config_size < PCI_STD_HEADER_SIZE:
            raise TransportError(
                f"{self.config_path} has {self.config_size} bytes, not a config space (256 or 4096)", "config"
            )
        try:
            text = (dev / "resource").read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise TransportError(f"cannot read {dev / 'resource'}: {e}", "resource") from None
        for i, r in enumerate(parse_resource(text)[:NUM_BARS]):
            if r.size == 0:
                continue
            path = dev / f"resource{i}"
            fd = self._fd(path, os.O_RDWR)
            # sysfs gives resourceN the BAR's size; mapping past the end of a file is a SIGBUS.
            have = os.fstat(fd).st_size
            if have < r.size:
                raise TransportError(
                    f"{path} has {have:#x} bytes but {dev / 'resource'} gives BAR{i} {r.size:#x}: "
                    "refusing to map past its end",
                    path.name,
                )
            self._bars[i] = _Bar(i, r.start, r.size, bool(r.flags & IORESOURCE_IO), path, fd)
        self._intx = UioIntx(self, uio_fd, self.uio_path)

    def _uio_name(self, uio_dir: Path) -> str:
        try:
            names = sorted(p.name for p in uio_dir.iterdir() if re.fullmatch(r"uio\d+", p.name))
        except OSError as e:
            raise TransportError(
                f"{uio_dir}: {e.strerror}; {DRIVER} registered no UIO device for {self.address} (see dmesg)",
                "uio",
            ) from None
        if len(names) != 1:
            raise TransportError(f"{uio_dir} holds {names or 'no uioN entry'}, expected one uioN", "uio")
        return names[0]

    def _live(self) -> None:
        if self._closed:
            raise TransportError(f"{self.address} is closed", "uio")

    # -- config space ----------------------------------------------------------------

    def _check_config(self, offset: int, size: int) -> None:
        self._live()
        if size < 1 or offset < 0 or offset + size > self.config_size:
            raise TransportError(
                f"{size} bytes at {offset:#x} outside the {self.config_size}-byte config space", "config"
            )

    def config_read(self, offset: int, size: int) -> bytes:
        self._check_config(offset, size)
        return _pread(self._config, size, offset, self.config_path, "config")

    def config_write(self, offset: int, data: bytes) -> None:
        self._check_config(offset, len(data))
        _pwrite(self._config, data, offset, self.config_path, "config")

    # -- regions ---------------------------------------------------------------------

    def region_info(self, index: int) -> RegionInfo:
        if 0 <= index < NUM_BARS:
            bar = self._bars.get(index)
            if bar is None:
                return RegionInfo(index, 0, False, False, False)
            return RegionInfo(index, bar.size, True, True, bar.mappable)
        if index == VFIO_PCI_ROM_REGION_INDEX:
            # The rom file reads only after a write enables it, and nothing here needs the ROM.
            return RegionInfo(index, 0, False, False, False)
        if index == VFIO_PCI_CONFIG_REGION_INDEX:
            return RegionInfo(index, self.config_size, True, True, False)
        raise TransportError(f"no region {index} (BARs 0-5, ROM 6, config 7)", "region")

    def _bar(self, index: int, offset: int, size: int) -> _Bar:
        self._live()
        bar = self._bars.get(index)
        if bar is None:
            raise TransportError(f"BAR{index} is not implemented", f"resource{index}")
        if size < 1 or offset < 0 or offset + size > bar.size:
            raise TransportError(
                f"{size} bytes at {offset:#x} outside BAR{index} ({bar.size:#x} bytes)", bar.path.name
            )
        return bar

    def _registers(self, bar: _Bar) -> FileMMIO:
        mmio = self._access.get(bar.index)
        if mmio is None:
            # The whole BAR, from the page holding its start (see _Bar.mappable).
            mmio = self._map(bar, bar.start % mmap.PAGESIZE, bar.size)
            self._access[bar.index] = mmio
        return mmio

    def _map(self, bar: _Bar, offset: int, size: int) -> FileMMIO:
        try:
            mmio = FileMMIO(str(bar.path), offset, size)
        except TransportError as e:
            raise TransportError(f"{bar.path}: {e}", bar.path.name) from None
        self._mmio.append(mmio)
        return mmio

    @staticmethod
    def _io_width(bar: _Bar, offset: int, size: int) -> None:
        # drivers/pci/pci-sysfs.c pci_resource_io(): one inb/inw/inl (outb/outw/outl) per access.
        if size not in (1, 2, 4) or offset % size:
            raise TransportError(
                f"I/O port BAR{bar.index} takes aligned 1, 2 or 4-byte accesses, not {size} at {offset:#x}",
                bar.path.name,
            )

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        if index == VFIO_PCI_CONFIG_REGION_INDEX:
            return self.config_read(offset, size)
        bar = self._bar(index, offset, size)
        if bar.io:
            self._io_width(bar, offset, size)
            return _pread(bar.fd, size, offset, bar.path, bar.path.name)
        regs = self._registers(bar)
        if size == 1:
            return regs.read8(offset).to_bytes(1, "little")
        if size == 2:
            return regs.read16(offset).to_bytes(2, "little")
        if size == 4:
            return regs.read32(offset).to_bytes(4, "little")
        if size == 8:
            return regs.read64(offset).to_bytes(8, "little")
        return regs.read(offset, size)  # not a register: a plain copy

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == VFIO_PCI_CONFIG_REGION_INDEX:
            self.config_write(offset, data)
            return
        size = len(data)
        bar = self._bar(index, offset, size)
        if bar.io:
            self._io_width(bar, offset, size)
            _pwrite(bar.fd, data, offset, bar.path, bar.path.name)
            return
        regs = self._registers(bar)
        value = int.from_bytes(data, "little")
        if size == 1:
            regs.write8(offset, value)
        elif size == 2:
            regs.write16(offset, value)
        elif size == 4:
            regs.write32(offset, value)
        elif size == 8:
            regs.write64(offset, value)
        else:
            regs.write(offset, data)  # not a register: a plain copy

    def region_mmap(self, index: int, offset: int, size: int) -> mmap.mmap:
        bar = self._bar(index, offset, size)
        if not bar.mappable:
            why = "I/O ports" if bar.io else "its start is not page-aligned"
            raise TransportError(f"BAR{index} cannot be mapped: {why}", bar.path.name)
        if offset % mmap.ALLOCATIONGRANULARITY:
            raise TransportError(f"offset {offset:#x} of BAR{index} is not page-aligned", bar.path.name)
        try:
            mm = mmap.mmap(bar.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except OSError as e:
            raise TransportError(f"mmap of {bar.path} failed: {e.strerror}", bar.path.name) from None
        self._maps.append(mm)
        return mm

    # -- interrupts ------------------------------------------------------------------

    def _has_intx(self) -> bool:
        # PCI 3.0, 6.2.4: Interrupt Pin 0 means the function uses no INTx line; and
        # uio_pci_generic registers without an interrupt when none was routed ("irq" is 0).
        if self.config_read(PCI_INTERRUPT_PIN, 1) == b"\0":
            return False
        try:
            irq = (self.sysfs_dir / "irq").read_text().strip()
        except (OSError, UnicodeDecodeError):
            return True  # no irq attribute to tell us otherwise; a read of /dev/uioN will
        return irq != "0"

    def irq_info(self, index: int) -> IrqInfo:
        """INTx has one vector but no eventfd (see :meth:`intx_source`); MSI and MSI-X have none."""
        if index == VFIO_PCI_INTX_IRQ_INDEX:
            return IrqInfo(index, 1 if self._has_intx() else 0, False)
        if 0 <= index < VFIO_PCI_NUM_IRQS:
            return IrqInfo(index, 0, False)
        raise TransportError(f"no irq index {index}", "irq")

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        raise TransportError(
            f"{DRIVER} routes no interrupt to an eventfd: INTx is read from {self.uio_path} "
            "(intx_source), and MSI/MSI-X are not available",
            f"irq {index}",
        )

    def disable_irqs(self, index: int) -> None:
        if index == VFIO_PCI_INTX_IRQ_INDEX:
            self.mask_intx(True)
        # Nothing else was ever routed: nothing to tear down.

    def intx_source(self) -> UioIntx:
        """The INTx line: wait on its fd, ``consume`` it, acknowledge the device, then ``rearm`` it."""
        self._live()
        if not self._has_intx():
            raise TransportError(f"{self.address} has no INTx line (interrupt pin 0 or no irq)", "irq 0")
        return self._intx

    def mask_intx(self, masked: bool) -> None:
        """Set or clear the command register's Interrupt Disable bit (one byte, as the uio-howto does)."""
        (high,) = self.config_read(PCI_COMMAND_HIGH, 1)
        want = high | COMMAND_HIGH_INTX_DISABLE if masked else high & ~COMMAND_HIGH_INTX_DISABLE
        if want != high:
            self.config_write(PCI_COMMAND_HIGH, bytes([want]))

    # -- DMA: no IOMMU ---------------------------------------------------------------

    def iova_for(self, vaddr_view: memoryview, proposed: Iova) -> Iova:
        """The physical address: the device sees memory as it is, unprotected."""
        return physical_iova(vaddr_view)

    def dma_map(self, fd: int, fd_offset: int, vaddr_view: memoryview, iova: Iova) -> None:
        """Nothing to do: with no IOMMU every page is already visible to the device."""

    def dma_unmap(self, iova: Iova, size: int) -> None:
        """Nothing to do, and nothing is withdrawn: the device can still reach the memory."""

    def reset(self) -> None:
        self._live()
        path = self.sysfs_dir / "reset"
        if not path.exists():
            raise TransportError(
                f"{path} is missing: the kernel knows no reset method for {self.address}", "reset"
            )
        try:
            path.write_text("1")
        except OSError as e:
            raise TransportError(f"writing 1 to {path}: {e.strerror}", "reset") from None

    def __enter__(self) -> UioFunction:
        return self

    def close(self) -> None:
        """Unmap the BAR mappings (newest first), then close resourceN, config and uio fds; idempotent."""
        if self._closed:
            return
        self._closed = True
        for mm in reversed(self._maps):
            with contextlib.suppress(BufferError):  # a view still held: the mapping goes with it
                mm.close()
        self._maps.clear()
        for mmio in reversed(self._mmio):
            mmio.close()
        self._mmio.clear()
        self._access.clear()
        self._stack.close()
