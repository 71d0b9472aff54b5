"""Width-exact register access over any mapping, for all three PCI backends.

A device register must be accessed with exactly its width: a 32-bit register
read as four byte loads (what slicing an ``mmap`` does: a ``memcpy``) can tear
or trigger four side effects. Here every access is one load or store of that
width, through a ctypes scalar placed on the buffer. :class:`FdMMIO` is
python-periphery's ``MMIO`` (the design card's mmap helper) mapping an fd the
backend already holds (a VFIO device fd at a region offset, a sysfs
``resourceN`` file, a vfio-user region fd) instead of ``/dev/mem``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Protocol

from periphery import MMIO

from vhostpci_driver.errors import TransportError

_TYPES: dict[int, type[ctypes.c_uint8 | ctypes.c_uint16 | ctypes.c_uint32 | ctypes.c_uint64]] = {
    1: ctypes.c_uint8,
    2: ctypes.c_uint16,
    4: ctypes.c_uint32,
    8: ctypes.c_uint64,
}


class Registers(Protocol):
    """Little-endian registers addressed by byte offset.

    ``post16``/``post32`` are posted writes (PCIe 6.0, 2.4.1: a memory write needs
    no completion): for doorbells and queue notifies, whose store nothing waits
    on. Through a mapping a posted write is the same store; by message it is sent
    without waiting for the reply, and the next access is still ordered after it.
    """

    def read8(self, offset: int) -> int: ...
    def read16(self, offset: int) -> int: ...
    def read32(self, offset: int) -> int: ...
    def read64(self, offset: int) -> int: ...
    def write8(self, offset: int, value: int) -> None: ...
    def write16(self, offset: int, value: int) -> None: ...
    def write32(self, offset: int, value: int) -> None: ...
    def write64(self, offset: int, value: int) -> None: ...
    def post16(self, offset: int, value: int) -> None: ...
    def post32(self, offset: int, value: int) -> None: ...


class _WidthExact:
    """Loads and stores of exactly 1, 2, 4 or 8 bytes at naturally aligned offsets of ``_buf``."""

    _buf: mmap.mmap | bytearray | memoryview
    _base: int
    _limit: int

    def _scalar(
        self, offset: int, width: int
    ) -> ctypes.c_uint8 | ctypes.c_uint16 | ctypes.c_uint32 | ctypes.c_uint64:
        if offset < 0 or offset + width > self._limit:
            raise TransportError(
                f"{width}-byte access at {offset:#x} outside {self._limit:#x} bytes", f"register+{offset:#x}"
            )
        if offset % width:
            raise TransportError(
                f"{width}-byte access at {offset:#x} is not naturally aligned", f"register+{offset:#x}"
            )
        return _TYPES[width].from_buffer(self._buf, self._base + offset)

    def read8(self, offset: int) -> int:
        return self._scalar(offset, 1).value

    def read16(self, offset: int) -> int:
        return self._scalar(offset, 2).value

    def read32(self, offset: int) -> int:
        return self._scalar(offset, 4).value

    def read64(self, offset: int) -> int:
        return self._scalar(offset, 8).value

    def write8(self, offset: int, value: int) -> None:
        self._scalar(offset, 1).value = value

    def write16(self, offset: int, value: int) -> None:
        self._scalar(offset, 2).value = value

    def write32(self, offset: int, value: int) -> None:
        self._scalar(offset, 4).value = value

    def write64(self, offset: int, value: int) -> None:
        self._scalar(offset, 8).value = value

    # A store to a mapping is already posted: the CPU does not wait for the device.
    post16 = write16
    post32 = write32


class MappedRegisters(_WidthExact):
    """Registers over a writable buffer (an ``mmap`` of a BAR, or a ``bytearray`` in tests)."""

    def __init__(self, buf: mmap.mmap | bytearray | memoryview) -> None:
        self._buf = buf
        self._base = 0
        self._limit = len(buf)


class FdMMIO(_WidthExact, MMIO):
    """periphery's MMIO, mapping ``size`` bytes of an open ``fd`` at ``offset`` (the fd stays open).

    ``offset`` need not be page-aligned: the enclosing pages are mapped and
    accesses are shifted, as periphery does for physical addresses.
    """

    def __init__(
        self, fd: int, offset: int, size: int, *, prot: int = mmap.PROT_READ | mmap.PROT_WRITE
    ) -> None:
        page = mmap.PAGESIZE
        self._physaddr = offset
        self._size = size
        self._aligned_physaddr = offset - offset % page
        self._aligned_size = size + (offset - self._aligned_physaddr)
        try:
            self.mapping = mmap.mmap(
                fd, self._aligned_size, mmap.MAP_SHARED, prot, offset=self._aligned_physaddr
            )
        except OSError as e:
            raise TransportError(
                f"mmap of {size:#x} bytes at {offset:#x} failed: {os.strerror(e.errno or 0)}", "mmap"
            ) from None
        self._buf = self.mapping
        self._base = offset - self._aligned_physaddr
        self._limit = size

    def view(self, offset: int = 0, length: int | None = None) -> memoryview:
        """A zero-copy view for bulk data (never for registers)."""
        length = self._size - offset if length is None else length
        return bulk_view(self.mapping, self._base + offset, length, self._base + self._size)

    def close(self) -> None:
        """Unmap; the fd belongs to the caller. Idempotent."""
        if getattr(self, "mapping", None) is not None:
            MMIO.close(self)


class RegisterBlock:
    """A structure inside a BAR (a virtio capability's), addressed from its own offset 0."""

    def __init__(self, regs: Registers, base: int, length: int) -> None:
        self.regs = regs
        self.base = base
        self.length = length

    def _at(self, offset: int, width: int) -> int:
        if offset < 0 or offset + width > self.length:
            raise TransportError(
                f"{width}-byte access at {offset:#x} outside the {self.length:#x}-byte structure",
                f"structure@{self.base:#x}+{offset:#x}",
            )
        return self.base + offset

    def read8(self, offset: int) -> int:
        return self.regs.read8(self._at(offset, 1))

    def read16(self, offset: int) -> int:
        return self.regs.read16(self._at(offset, 2))

    def read32(self, offset: int) -> int:
        return self.regs.read32(self._at(offset, 4))

    def read64(self, offset: int) -> int:
        return self.regs.read64(self._at(offset, 8))

    def write8(self, offset: int, value: int) -> None:
        self.regs.write8(self._at(offset, 1), value)

    def write16(self, offset: int, value: int) -> None:
        self.regs.write16(self._at(offset, 2), value)

    def write32(self, offset: int, value: int) -> None:
        self.regs.write32(self._at(offset, 4), value)

    def write64(self, offset: int, value: int) -> None:
        # virtio 1.2, 4.1.3.1: 64-bit fields may be written as two 32-bit halves, low first;
        # a device must accept that, and it is what works through every transport.
        self.regs.write32(self._at(offset, 8), value & 0xFFFFFFFF)
        self.regs.write32(self.base + offset + 4, value >> 32)

    def post16(self, offset: int, value: int) -> None:
        self.regs.post16(self._at(offset, 2), value)

    def post32(self, offset: int, value: int) -> None:
        self.regs.post32(self._at(offset, 4), value)


def bulk_view(
    buf: mmap.mmap | bytearray | memoryview, offset: int, length: int, limit: int | None = None
) -> memoryview:
    """A bounds-checked zero-copy view of ``buf`` for bulk data."""
    end = len(buf) if limit is None else limit
    if offset < 0 or length < 0 or offset + length > end:
        raise TransportError(f"bulk range {offset:#x}+{length:#x} outside {end:#x} bytes", "bulk view")
    return memoryview(buf)[offset : offset + length]
