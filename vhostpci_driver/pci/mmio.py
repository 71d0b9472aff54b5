"""Width-exact register access over any mapping, for all three PCI backends.

A device register must be accessed with exactly its width: a 32-bit register
read as four byte loads (what slicing an ``mmap`` does: a ``memcpy``) can tear
or trigger four side effects. Here every access is one load or store of that
width, through a ctypes scalar placed on the buffer. :class:`FileMMIO` is
python-periphery's ``MMIO`` (the design card's mmap helper) mapping a file (a
sysfs ``resourceN``) instead of ``/dev/mem``, through its public interface only.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
from typing import Protocol

from periphery import MMIO, MMIOError

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


class FileMMIO:
    """Registers and bulk data in a mappable file (a sysfs ``resourceN``), through periphery's MMIO.

    Only periphery's public interface (python-periphery 2.4, the range setup.cfg allows): ``MMIO(physaddr,
    size, path=...)`` maps the pages of ``path`` that hold ``size`` bytes at offset
    ``physaddr`` (any file, not only /dev/mem; the offset need not be page-aligned);
    its ``read8/16/32`` and ``write8/16/32`` are one load or store of their width;
    ``read``/``write`` copy bulk data; ``pointer`` is where the mapped range starts,
    which the 64-bit registers use (one ``c_uint64`` access: periphery has none);
    ``close`` unmaps.
    """

    def __init__(self, path: str, offset: int, size: int) -> None:
        try:
            self._mmio = MMIO(offset, size, path=path)
        except (MMIOError, OSError) as e:
            raise TransportError(
                f"mmap of {size:#x} bytes at {offset:#x} of {path} failed: {e}", "mmap"
            ) from None
        # Only the address is kept: the pointer object pins the mapping (a buffer export) and
        # would make close() fail.
        self._addr = self._mmio.pointer.value or 0
        self._size = size
        self._closed = False

    def _at(self, offset: int, width: int) -> int:
        if self._closed:
            raise TransportError("the mapping is closed", f"register+{offset:#x}")
        if offset < 0 or offset + width > self._size:
            raise TransportError(
                f"{width}-byte access at {offset:#x} outside {self._size:#x} bytes", f"register+{offset:#x}"
            )
        if offset % width:
            raise TransportError(
                f"{width}-byte access at {offset:#x} is not naturally aligned", f"register+{offset:#x}"
            )
        return offset

    def read8(self, offset: int) -> int:
        return int(self._mmio.read8(self._at(offset, 1)))

    def read16(self, offset: int) -> int:
        return int(self._mmio.read16(self._at(offset, 2)))

    def read32(self, offset: int) -> int:
        return int(self._mmio.read32(self._at(offset, 4)))

    def read64(self, offset: int) -> int:
        return ctypes.c_uint64.from_address(self._addr + self._at(offset, 8)).value

    def write8(self, offset: int, value: int) -> None:
        self._mmio.write8(self._at(offset, 1), value)

    def write16(self, offset: int, value: int) -> None:
        self._mmio.write16(self._at(offset, 2), value)

    def write32(self, offset: int, value: int) -> None:
        self._mmio.write32(self._at(offset, 4), value)

    def write64(self, offset: int, value: int) -> None:
        ctypes.c_uint64.from_address(self._addr + self._at(offset, 8)).value = value

    def _range(self, offset: int, length: int) -> int:
        if self._closed or offset < 0 or length < 0 or offset + length > self._size:
            raise TransportError(f"bulk range {offset:#x}+{length:#x} outside {self._size:#x} bytes", "bulk")
        return offset

    def read(self, offset: int, length: int) -> bytes:
        """A copy of bulk data (not registers)."""
        return bytes(self._mmio.read(self._range(offset, length), length))

    def write(self, offset: int, data: bytes) -> None:
        """Bulk data (not registers), copied in."""
        self._mmio.write(self._range(offset, len(data)), data)

    def close(self) -> None:
        """Unmap; idempotent."""
        if not self._closed:
            self._closed = True
            try:
                self._mmio.close()
            except BufferError:
                gc.collect()  # periphery's pointer is a reference cycle that pins the mapping
                self._mmio.close()


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
