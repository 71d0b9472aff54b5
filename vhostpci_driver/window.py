"""The remote window as this process maps it: BAR 2 of the vhost-pci function.

Through kernel VFIO (inside a real device VM) the whole BAR maps at once. Through
vfio-user the server offers sparse areas, one per block of driver-VM memory,
and changes them as memory comes and goes: an area is mapped (after one fresh
look at the region info) when a region first needs it, and unmapped, its fd
closed, when the last region in it is removed.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from vhostpci_driver.errors import RemoteMemoryError, TransportError
from vhostpci_driver.memory import SparseWindow
from vhostpci_driver.pci.function import PciFunction


@dataclass
class _Area:
    """One mapped sparse area: its mapping, what it showed when mapped, and how many regions use it."""

    size: int
    mm: mmap.mmap
    backing: tuple[int, int, int] | None
    claims: int = 0


class BarWindow:
    """A :class:`~vhostpci_driver.memory.Window` over a BAR, mapped whole or by sparse areas.

    Sparse areas follow the region table: an area is mapped when a region first
    needs it, after a fresh look at the region info (the memory behind an offset
    may have changed since an area there was last mapped: a DEL, then an ADD from
    another memfd), and is unmapped, its fd closed, when the last region using it
    is removed.
    """

    def __init__(self, function: PciFunction, index: int) -> None:
        self.function = function
        self.index = index
        info = function.region_info(index)
        if info.size == 0:
            raise TransportError("the remote window BAR is not implemented", f"BAR{index}")
        self.size = info.size
        self._whole: memoryview | None = None
        self._whole_map: mmap.mmap | None = None
        self._sparse = SparseWindow(self.size)
        self._areas: dict[int, _Area] = {}  # offset -> area
        self._retired: list[mmap.mmap] = []  # unmapped while a view still pointed in: closed later
        self.refresh()

    def refresh(self) -> None:
        """Look at the region info again: map areas the device added, drop unused ones that changed."""
        info = self.function.region_info(self.index)
        if not info.mmappable:
            self._drop_unused({})
            return  # no memory yet (or none that maps): areas appear with MEMORY_INFO
        if not info.sparse:
            if self._whole is None:
                self._whole_map = self.function.region_mmap(self.index, 0, info.size)
                self._whole = memoryview(self._whole_map)
            return
        listed = {a.offset: a.size for a in info.sparse}
        self._drop_unused(listed, info.backing)
        for off, size in listed.items():
            if off in self._areas:
                continue  # in use: the memory of a live region does not change under it
            mm = self.function.region_mmap(self.index, off, size)
            try:
                self._sparse.add_area(off, mm)
            except RemoteMemoryError:
                mm.close()  # it overlaps an area still in use: not mappable until that one goes
                continue
            self._areas[off] = _Area(size, mm, info.backing)

    def _drop_unused(self, listed: dict[int, int], backing: tuple[int, int, int] | None = None) -> None:
        for off, area in list(self._areas.items()):
            if area.claims == 0 and (listed.get(off) != area.size or area.backing != backing):
                self._drop(off)
        self._collect()

    def _area_of(self, offset: int, length: int) -> _Area | None:
        for off, area in self._areas.items():
            if off <= offset and offset + length <= off + area.size:
                return area
        return None

    def view(self, offset: int, length: int) -> memoryview:
        """A view for a region; the region table gives it back with :meth:`release`."""
        if self._whole is not None:
            if offset < 0 or length < 0 or offset + length > self.size:
                raise RemoteMemoryError(f"window range {offset:#x}+{length:#x} outside {self.size:#x} bytes")
            return self._whole[offset : offset + length]
        area = self._area_of(offset, length)
        if area is None or area.claims == 0:
            self.refresh()  # what is mapped here, if anything, may be another file's memory by now
            area = self._area_of(offset, length)
        view = self._sparse.view(offset, length)
        if area is not None:
            area.claims += 1
        return view

    def release(self, offset: int, length: int) -> None:
        """A region's view is no longer used: unmap its area when no other region uses it."""
        for off, area in list(self._areas.items()):
            if off <= offset and offset + length <= off + area.size and area.claims > 0:
                area.claims -= 1
                if area.claims == 0:
                    self._drop(off)
                break
        self._collect()

    def _drop(self, off: int) -> None:
        self._sparse.remove_area(off)
        self._retired.append(self._areas.pop(off).mm)

    def _collect(self) -> None:
        """Close the mappings dropped so far; one that a view still points into waits for the next call."""
        kept = []
        for mm in self._retired:
            try:
                mm.close()
            except BufferError:
                kept.append(mm)
        self._retired = kept

    def close(self) -> None:
        """Drop our views of the BAR, so the backend can unmap it."""
        if self._whole is not None:
            self._whole.release()
            self._whole = None
        self._whole_map = None
        for off in list(self._areas):
            self._drop(off)
        self._collect()
        self._retired.clear()  # the function closes them (collecting cycles first) at its close

    def mapped_bytes(self) -> int:
        return self.size if self._whole is not None else sum(a.size for a in self._areas.values())
