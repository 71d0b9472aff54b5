"""The remote window as this process maps it: BAR 2 of the vhost-pci function.

Through kernel VFIO (inside a real device VM) the whole BAR maps at once. Through
vfio-user the server offers sparse areas, one per block of driver-VM memory,
and adds areas when memory is hot-added: a view that misses triggers one
refresh of the region info, mapping the new areas, before it is refused.
"""

from __future__ import annotations

import mmap

from vhostpci_driver.errors import RemoteMemoryError, TransportError
from vhostpci_driver.memory import SparseWindow
from vhostpci_driver.pci.function import PciFunction


class BarWindow:
    """A :class:`~vhostpci_driver.memory.Window` over a BAR, mapped whole or by sparse areas."""

    def __init__(self, function: PciFunction, index: int) -> None:
        self.function = function
        self.index = index
        info = function.region_info(index)
        if info.size == 0:
            raise TransportError("the remote window BAR is not implemented", f"BAR{index}")
        self.size = info.size
        self._whole: memoryview | None = None
        self._sparse = SparseWindow(self.size)
        self._areas: dict[int, int] = {}  # offset -> size of each mapped area
        self._maps: list[mmap.mmap] = []
        self.refresh()

    def refresh(self) -> None:
        """Map areas the device added since the last look (memory hot-add)."""
        info = self.function.region_info(self.index)
        if not info.mmappable:
            return  # no memory yet (or none that maps): areas appear with MEMORY_INFO
        if not info.sparse:
            if self._whole is None:
                mm = self.function.region_mmap(self.index, 0, info.size)
                self._maps.append(mm)
                self._whole = memoryview(mm)
            return
        for area in info.sparse:
            if self._areas.get(area.offset) == area.size:
                continue
            if area.offset in self._areas:
                self._sparse.remove_area(area.offset)  # the area changed size: map it anew
            mm = self.function.region_mmap(self.index, area.offset, area.size)
            self._maps.append(mm)
            self._sparse.add_area(area.offset, mm)
            self._areas[area.offset] = area.size

    def view(self, offset: int, length: int) -> memoryview:
        if self._whole is not None:
            if offset < 0 or length < 0 or offset + length > self.size:
                raise RemoteMemoryError(f"window range {offset:#x}+{length:#x} outside {self.size:#x} bytes")
            return self._whole[offset : offset + length]
        try:
            return self._sparse.view(offset, length)
        except RemoteMemoryError:
            self.refresh()
            return self._sparse.view(offset, length)

    def close(self) -> None:
        """Drop our views of the BAR, so the backend can unmap it."""
        if self._whole is not None:
            self._whole.release()
            self._whole = None
        for off in list(self._areas):
            self._sparse.remove_area(off)
        self._areas.clear()
        self._maps.clear()

    def mapped_bytes(self) -> int:
        return self.size if self._whole is not None else sum(self._areas.values())
