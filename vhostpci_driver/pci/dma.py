"""DMA memory: a pool of device-visible buffers for our own controlq and ackq.

One memfd (hugetlbfs-backed when the system has huge pages, so the pool is
physically contiguous for the no-IOMMU backends), mapped once into our address
space and once into the device's, through whichever :class:`PciFunction`
backend is in use: VFIO type1 maps our virtual address at an IOVA, vfio-user
hands the server the fd, no-IOMMU/UIO use the physical address. The pool hands
out aligned slices and translates IOVAs back to views, so it serves as the
``GuestMemory`` of the driver-side rings. Closing unmaps it from the device
first, then from us.

The physical-address helpers live here because two backends need them: VFIO
in no-IOMMU mode and UIO. Both are the unsafe fallback: with no IOMMU between
the device and memory, the device can reach every byte of the machine, and we
can only hand it addresses, not limits.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass

from vhostpci_driver.addr import Iova
from vhostpci_driver.errors import RemoteMemoryError, TransportError
from vhostpci_driver.pci.function import PciFunction

PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20
#: Where the pool sits in the device's I/O address space: above the x86 MSI window
#: (0xfee00000) and low enough for a 39-bit virtual IOMMU.
DEFAULT_IOVA = Iova(0x4000_0000)

# Documentation/admin-guide/mm/pagemap.rst: bits 0-54 the frame number, bit 63 "present".
PAGEMAP_PFN_MASK = (1 << 55) - 1
PAGEMAP_PRESENT = 1 << 63


def physical_address(vaddr: int, pagemap: str = "/proc/self/pagemap") -> int:
    """The physical address behind ``vaddr`` (Documentation/admin-guide/mm/pagemap.rst)."""
    page = mmap.PAGESIZE
    try:
        with open(pagemap, "rb") as f:
            f.seek(vaddr // page * 8)
            raw = f.read(8)
    except OSError as e:
        raise TransportError(f"cannot read {pagemap}: {e.strerror}", "pagemap") from None
    if len(raw) != 8:
        raise TransportError(f"no pagemap entry for {vaddr:#x}", "pagemap")
    (entry,) = struct.unpack("<Q", raw)
    if not entry & PAGEMAP_PRESENT:
        raise TransportError(f"page at {vaddr:#x} is not present (touch it first)", "pagemap")
    pfn = entry & PAGEMAP_PFN_MASK
    if pfn == 0:
        # pagemap.rst: since 4.2 the PFN reads as 0 without CAP_SYS_ADMIN.
        raise TransportError("pagemap hides frame numbers: no-IOMMU DMA needs CAP_SYS_ADMIN", "pagemap")
    return int(pfn * page + vaddr % page)


def virtual_address(view: memoryview) -> int:
    """Where ``view``'s first byte is in our address space."""
    return int(ctypes.addressof(ctypes.c_char.from_buffer(view)))


def physical_iova(view: memoryview, pagemap: str = "/proc/self/pagemap") -> Iova:
    """The physical address of ``view`` as the device's address for it, for backends with no IOMMU.

    The device gets one base address per buffer, so the buffer must be
    physically contiguous: every page must follow the one before it (huge
    pages give that; ordinary pages almost never do).
    """
    start = virtual_address(view)
    phys = physical_address(start, pagemap)
    first_page = start - start % mmap.PAGESIZE
    for page in range(first_page + mmap.PAGESIZE, start + len(view), mmap.PAGESIZE):
        if physical_address(page, pagemap) != phys - start % mmap.PAGESIZE + (page - first_page):
            raise TransportError(
                "DMA memory is not physically contiguous: reserve huge pages "
                "(vm.nr_hugepages) for a backend without an IOMMU (VFIO no-IOMMU, UIO)",
                "pagemap",
            )
    return Iova(phys)


@dataclass(frozen=True)
class DmaBuffer:
    """A slice of the pool: ``view`` for us, ``iova`` for the device."""

    iova: Iova
    view: memoryview

    @property
    def size(self) -> int:
        return len(self.view)


def _try_map(size: int, flags: int) -> tuple[int, mmap.mmap] | None:
    """A shared mapping of a fresh memfd, or None when the kernel refuses (no huge pages left)."""
    fd = os.memfd_create("vhostpci-dma", os.MFD_CLOEXEC | flags)
    try:
        os.ftruncate(fd, size)
        # hugetlbfs reserves its pages at mmap time: a refusal here is clean, a SIGBUS later is not.
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        os.close(fd)
        return None


def _allocate(size: int, hugepages: bool | None) -> tuple[int, int, bool, mmap.mmap]:
    """``(fd, rounded size, is_huge, mapping)``; ``hugepages=None`` tries huge pages, then falls back."""
    if hugepages is not False:
        huge_size = -(-size // HUGE_PAGE) * HUGE_PAGE
        got = _try_map(huge_size, os.MFD_HUGETLB)
        if got is not None:
            return got[0], huge_size, True, got[1]
        if hugepages:
            raise TransportError(f"no {huge_size} bytes of huge pages (vm.nr_hugepages?)", "dma pool")
    size = -(-size // PAGE) * PAGE
    got = _try_map(size, 0)
    if got is None:
        raise TransportError(f"cannot map {size} bytes of memfd", "dma pool")
    return got[0], size, False, got[1]


class DmaPool:
    """A bump allocator over one device-mapped memfd."""

    def __init__(
        self, function: PciFunction, size: int, *, iova: Iova = DEFAULT_IOVA, hugepages: bool | None = None
    ) -> None:
        self.function = function
        self.fd, self.size, self.huge, self._mm = _allocate(size, hugepages)
        self._closed = False
        self._mapped = False
        try:
            # Touch every page so a physical backend sees populated memory (pagemap reads 0 otherwise).
            self._mm.write(bytes(self.size))
            self._view = memoryview(self._mm)
            self.iova = function.iova_for(self._view, iova)
            function.dma_map(self.fd, 0, self._view, self.iova)
            self._mapped = True
        except BaseException:
            self.close()
            raise
        self._next = 0

    def alloc(self, size: int, align: int = 16) -> DmaBuffer:
        """``size`` zeroed bytes aligned to ``align`` (a power of two) in both address spaces."""
        if self._closed:
            raise TransportError("pool is closed", "dma pool")
        start = (self._next + align - 1) & ~(align - 1)
        if size <= 0 or start + size > self.size:
            raise TransportError(f"cannot allocate {size} bytes ({self.size - self._next} left)", "dma pool")
        self._next = start + size
        return DmaBuffer(Iova(self.iova + start), self._view[start : start + size])

    def view(self, addr: int, length: int) -> memoryview:
        """IOVA range to a view of the pool (``GuestMemory`` for the driver-side rings)."""
        off = addr - self.iova
        if self._closed or off < 0 or length < 0 or off + length > self.size:
            raise RemoteMemoryError(f"IOVA range {addr:#x}+{length:#x} is not in the DMA pool")
        return self._view[off : off + length]

    def close(self) -> None:
        """Unmap from the device, then from us; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._mapped:
                self._mapped = False
                self.function.dma_unmap(self.iova, self.size)
        finally:
            if hasattr(self, "_view"):
                self._view.release()
            try:
                self._mm.close()
            except BufferError:
                pass  # a ring still holds a view: the mapping goes with the last view
            os.close(self.fd)

    def __enter__(self) -> DmaPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
