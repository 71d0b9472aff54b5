"""Remote memory: the region table that turns driver-VM addresses into views of the window.

The host maps the driver VM's memory into the remote window (BAR 2) and tells
us, by MEMORY_INFO, where each region sits: ``xgpa`` (its base in the driver
VM), ``size`` and ``window_offset``. Every address the driver VM hands us (ring
bases, descriptor buffers) is translated here and nowhere else (one translation
point, as rust-vmm's ``vm-memory`` has), into a zero-copy ``memoryview`` of the
window, after checking that the whole range lies inside one region. Lookups
are ``O(log n)`` by bisection, with a one-entry cache for the common case of
consecutive descriptors in one region.

A range that spans two regions is refused even when they are adjacent in both
spaces (protocol.md 5.3): simple, and no real driver needs otherwise.
"""

from __future__ import annotations

import bisect
import mmap
from collections.abc import Sequence
from typing import Protocol

from vhostpci_driver.errors import FailReason, RemoteMemoryError
from vhostpci_driver.wire.ctrl import MemoryRegion

Region = MemoryRegion  # (xgpa, size, window_offset): one definition, shared with the wire
U64_END = 1 << 64


class Window(Protocol):
    """The remote window as mapped: a buffer, or separately mapped areas."""

    size: int

    def view(self, offset: int, length: int) -> memoryview: ...

    def release(self, offset: int, length: int) -> None:
        """The region table no longer uses the view it took of this range."""


class BufferWindow:
    """A window over one contiguous writable buffer (``bytearray``, ``mmap``, ``memoryview``)."""

    def __init__(self, buf: bytearray | mmap.mmap | memoryview) -> None:
        self._view = memoryview(buf).cast("B")
        if self._view.readonly:
            raise RemoteMemoryError("the window buffer must be writable")
        self.size = len(self._view)

    def view(self, offset: int, length: int) -> memoryview:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RemoteMemoryError(f"window range {offset:#x}+{length:#x} outside {self.size:#x} bytes")
        return self._view[offset : offset + length]

    def release(self, offset: int, length: int) -> None:
        pass  # one buffer, mapped for the window's life


class SparseWindow:
    """A window of ``size`` bytes made of separately mapped areas (sparse-mmap BARs)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts: list[int] = []
        self._areas: list[memoryview] = []

    def add_area(self, offset: int, buf: bytearray | mmap.mmap | memoryview) -> None:
        """Map ``buf`` at ``offset``; areas must not overlap and must fit the window."""
        view = memoryview(buf).cast("B")
        end = offset + len(view)
        if offset < 0 or end > self.size:
            raise RemoteMemoryError(
                f"area {offset:#x}+{len(view):#x} outside the window", FailReason.OUT_OF_WINDOW
            )
        i = bisect.bisect_right(self._starts, offset)
        if i > 0 and self._starts[i - 1] + len(self._areas[i - 1]) > offset:
            raise RemoteMemoryError(f"area at {offset:#x} overlaps another", FailReason.OVERLAP)
        if i < len(self._starts) and self._starts[i] < end:
            raise RemoteMemoryError(f"area at {offset:#x} overlaps another", FailReason.OVERLAP)
        self._starts.insert(i, offset)
        self._areas.insert(i, view)

    def remove_area(self, offset: int) -> None:
        i = bisect.bisect_left(self._starts, offset)
        if i == len(self._starts) or self._starts[i] != offset:
            raise RemoteMemoryError(f"no area at {offset:#x}", FailReason.NOT_FOUND)
        del self._starts[i]
        self._areas.pop(i).release()

    def view(self, offset: int, length: int) -> memoryview:
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0 and length >= 0:
            rel = offset - self._starts[i]
            area = self._areas[i]
            if rel + length <= len(area):
                return area[rel : rel + length]
        raise RemoteMemoryError(f"window range {offset:#x}+{length:#x} is not mapped")

    def release(self, offset: int, length: int) -> None:
        pass  # areas come and go by add_area/remove_area


class RegionTable:
    """xgpa -> window translation; satisfies :class:`vhostpci_driver.addr.GuestMemory`."""

    def __init__(self, window: Window, *, max_regions: int = 512) -> None:
        self.window = window
        self.max_regions = max_regions
        self._starts: list[int] = []  # sorted xgpa of each region
        self._regions: list[Region] = []
        self._views: list[memoryview] = []
        # One-entry cache: (start, end, view) of the last region hit.
        self._hit: tuple[int, int, memoryview] | None = None

    def __len__(self) -> int:
        return len(self._regions)

    def regions(self) -> list[Region]:
        """Every region, sorted by xgpa."""
        return list(self._regions)

    def add(self, regions: Sequence[Region]) -> None:
        """Add all of ``regions`` or none (protocol.md 5.3)."""
        if len(self._regions) + len(regions) > self.max_regions:
            raise RemoteMemoryError(
                f"{len(self._regions)} + {len(regions)} regions exceed {self.max_regions}", FailReason.LIMIT
            )
        pending: list[Region] = []
        for r in regions:
            if r.size <= 0 or r.xgpa < 0 or r.window_offset < 0 or r.xgpa + r.size > U64_END:
                raise RemoteMemoryError(f"region {r.xgpa:#x}+{r.size:#x} is malformed", FailReason.MALFORMED)
            if r.window_offset + r.size > self.window.size:
                raise RemoteMemoryError(
                    f"region {r.xgpa:#x}: window range {r.window_offset:#x}+{r.size:#x} "
                    f"outside the {self.window.size:#x}-byte window",
                    FailReason.OUT_OF_WINDOW,
                )
            for other in (*self._regions, *pending):
                if r.xgpa < other.xgpa + other.size and other.xgpa < r.xgpa + r.size:
                    raise RemoteMemoryError(
                        f"region {r.xgpa:#x} overlaps {other.xgpa:#x} in xgpa", FailReason.OVERLAP
                    )
                if (
                    r.window_offset < other.window_offset + other.size
                    and other.window_offset < r.window_offset + r.size
                ):
                    raise RemoteMemoryError(
                        f"region {r.xgpa:#x} overlaps {other.xgpa:#x} in the window", FailReason.OVERLAP
                    )
            pending.append(r)
        views: list[memoryview] = []
        try:
            for r in pending:
                views.append(self.window.view(r.window_offset, r.size))
        except RemoteMemoryError:
            for r, _ in zip(pending, views, strict=False):  # may refuse: give back what was taken
                self.window.release(r.window_offset, r.size)
            raise
        for r, v in zip(pending, views, strict=True):
            i = bisect.bisect_left(self._starts, r.xgpa)
            self._starts.insert(i, r.xgpa)
            self._regions.insert(i, r)
            self._views.insert(i, v)
        self._hit = None

    def remove(self, regions: Sequence[Region]) -> None:
        """Remove all of ``regions`` (exact matches) or none."""
        idx = []
        for r in regions:
            i = bisect.bisect_left(self._starts, r.xgpa)
            if i == len(self._starts) or self._regions[i] != r or i in idx:
                raise RemoteMemoryError(
                    f"no region {r.xgpa:#x}+{r.size:#x} at {r.window_offset:#x}", FailReason.NOT_FOUND
                )
            idx.append(i)
        self._hit = None
        for i in sorted(idx, reverse=True):
            del self._starts[i]
            r = self._regions.pop(i)
            del self._views[i]
            self.window.release(r.window_offset, r.size)

    def clear(self) -> None:
        self._hit = None
        self._views.clear()
        for r in self._regions:
            self.window.release(r.window_offset, r.size)
        self._starts.clear()
        self._regions.clear()

    def lookup(self, addr: int) -> Region | None:
        """The region holding ``addr``, if any."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._starts[i] + self._regions[i].size:
            return self._regions[i]
        return None

    def view(self, addr: int, length: int) -> memoryview:
        """``length`` bytes at driver-VM address ``addr`` as a view of the window (no copy)."""
        hit = self._hit
        if hit is not None and hit[0] <= addr and addr + length <= hit[1] and length >= 0:
            off = addr - hit[0]
            return hit[2][off : off + length]
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and length >= 0:
            start = self._starts[i]
            end = start + self._regions[i].size
            if addr + length <= end:
                view = self._views[i]
                self._hit = (start, end, view)
                return view[addr - start : addr - start + length]
        raise RemoteMemoryError(f"driver-VM range {addr:#x}+{length:#x} is not inside one mapped region")

    def locate(self, addr: int, length: int) -> tuple[int, int]:
        """Where :meth:`view` would slice: ``(region index, offset in that region's view)``.

        For the ring's array batch (DeviceQueue.pop_direct), which describes buffers
        without an object per buffer; the index holds until the table next changes.
        Raises as :meth:`view` does, with the same message.
        """
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and length >= 0:
            start = self._starts[i]
            if addr + length <= start + self._regions[i].size:
                return i, addr - start
        raise RemoteMemoryError(f"driver-VM range {addr:#x}+{length:#x} is not inside one mapped region")

    def region_view(self, index: int) -> memoryview:
        """The whole view of region ``index`` (as :meth:`locate` numbers them)."""
        return self._views[index]

    def native_regions(self) -> tuple[list[int], list[memoryview]]:
        """The live lists behind :meth:`view` (sorted xgpa, one view per region), for the compiled
        ring walker (virtqueue/native.py), which bisects them exactly as :meth:`view` does.

        The same list objects for the table's whole life (changed in place), so a queue may keep them.
        """
        return self._starts, self._views

    def covers(self, addr: int, length: int) -> bool:
        """True when ``view(addr, length)`` would succeed."""
        try:
            self.view(addr, length)
        except RemoteMemoryError:
            return False
        return True
