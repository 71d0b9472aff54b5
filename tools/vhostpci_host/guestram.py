"""A simulated driver VM's physical memory: one memfd split into regions, as a PC's RAM is.

QEMU backs a guest's RAM with one memfd (``memory-backend-memfd``) and shows
it as two regions, below and above 4 GiB; this does the same, so the vhost-pci
server can map every region from one fd (protocol.md, section 9). Translation
uses the same region table as the device VM's driver: here the "window" is the
memfd and a region's window offset is its file offset.
"""

from __future__ import annotations

import mmap
import os

from vhostpci_driver.addr import WindowOffset, Xgpa
from vhostpci_driver.errors import RemoteMemoryError
from vhostpci_driver.memory import BufferWindow, RegionTable
from vhostpci_driver.wire.ctrl import MemoryRegion
from vhostpci_driver.wire.sock import SocketRegion

GIB = 1 << 30
#: Where the second region starts in guest-physical space, as on a PC (RAM above the 4 GiB hole).
HIGH_RAM = 4 * GIB


class GuestRam:
    """``size`` bytes of guest memory in ``nregions`` regions, with a simple allocator."""

    def __init__(self, size: int, nregions: int = 2) -> None:
        page = mmap.PAGESIZE
        if size < nregions * page or nregions < 1:
            raise ValueError(f"{size} bytes cannot hold {nregions} regions")
        self.size = size
        self.fd = os.memfd_create("driver-vm-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.table = RegionTable(BufferWindow(self._mm))
        per = size // nregions // page * page
        self.regions: list[MemoryRegion] = []
        for i in range(nregions):
            length = per if i < nregions - 1 else size - per * (nregions - 1)
            xgpa = 0 if i == 0 else HIGH_RAM + (i - 1) * GIB * 64
            self.regions.append(MemoryRegion(Xgpa(xgpa), length, WindowOffset(i * per)))
        self.table.add(self.regions)
        self._next = [r.xgpa for r in self.regions]

    def alloc(self, size: int, align: int = 4096) -> Xgpa:
        """Guest-physical memory for rings and buffers: first region with room."""
        for i, r in enumerate(self.regions):
            start = (self._next[i] + align - 1) & ~(align - 1)
            if start + size <= r.xgpa + r.size:
                self._next[i] = Xgpa(start + size)
                return Xgpa(start)
        raise RemoteMemoryError(f"guest RAM exhausted allocating {size} bytes")

    def view(self, addr: int, length: int) -> memoryview:
        """``GuestMemory``: guest-physical range to a view (the frontend driver's own rings)."""
        return self.table.view(addr, length)

    def socket_regions(self) -> tuple[SocketRegion, ...]:
        """The regions as MEMORY_INFO(ADD) sends them: all from this memfd."""
        return tuple(SocketRegion(r.xgpa, r.size, r.window_offset, self.fd) for r in self.regions)

    def close(self) -> None:
        """Close the memfd; the mapping goes now, or with the last view a ring still holds."""
        self.table.clear()
        try:
            self._mm.close()
        except BufferError:
            pass  # views into it are alive (a frontend's rings); unmapped when they are collected
        os.close(self.fd)
