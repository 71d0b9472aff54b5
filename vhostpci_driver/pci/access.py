"""Register access by message, for BARs that cannot be mapped.

A vfio-user server serves BAR 0 of the vhost-pci function by
``REGION_READ``/``REGION_WRITE`` (every access is a device action), and the
kernel VFIO backend can always fall back to ``pread``/``pwrite`` on the region.
:class:`AccessRegisters` gives such a region the same width-exact register API
as a mapping (:class:`vhostpci_driver.pci.mmio.MappedRegisters`), so the
virtio transport is written once. :func:`registers_for` picks the right one.
"""

from __future__ import annotations

from vhostpci_driver.errors import TransportError
from vhostpci_driver.pci.function import PciFunction
from vhostpci_driver.pci.mmio import MappedRegisters, Registers


class AccessRegisters:
    """Registers of region ``index`` of ``function``, one region access per register access."""

    def __init__(self, function: PciFunction, index: int, size: int) -> None:
        self.function = function
        self.index = index
        self.size = size

    def _check(self, offset: int, width: int) -> None:
        if offset < 0 or offset + width > self.size or offset % width:
            raise TransportError(
                f"{width}-byte access at {offset:#x} outside or misaligned", f"BAR{self.index}"
            )

    def _read(self, offset: int, width: int) -> int:
        self._check(offset, width)
        data = self.function.region_read(self.index, offset, width)
        if len(data) != width:
            raise TransportError(
                f"read of {width} bytes returned {len(data)}", f"BAR{self.index}+{offset:#x}"
            )
        return int.from_bytes(data, "little")

    def _write(self, offset: int, width: int, value: int) -> None:
        self._check(offset, width)
        self.function.region_write(
            self.index, offset, (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        )

    def _post(self, offset: int, width: int, value: int) -> None:
        self._check(offset, width)
        self.function.region_write_posted(
            self.index, offset, (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        )

    def read8(self, offset: int) -> int:
        return self._read(offset, 1)

    def read16(self, offset: int) -> int:
        return self._read(offset, 2)

    def read32(self, offset: int) -> int:
        return self._read(offset, 4)

    def read64(self, offset: int) -> int:
        return self._read(offset, 8)

    def write8(self, offset: int, value: int) -> None:
        self._write(offset, 1, value)

    def write16(self, offset: int, value: int) -> None:
        self._write(offset, 2, value)

    def write32(self, offset: int, value: int) -> None:
        self._write(offset, 4, value)

    def write64(self, offset: int, value: int) -> None:
        self._write(offset, 8, value)

    def post16(self, offset: int, value: int) -> None:
        self._post(offset, 2, value)

    def post32(self, offset: int, value: int) -> None:
        self._post(offset, 4, value)


def registers_for(function: PciFunction, index: int) -> Registers:
    """Width-exact registers for BAR ``index``: a mapping when the whole BAR is mappable, else messages."""
    info = function.region_info(index)
    if info.size == 0:
        raise TransportError("region is not implemented", f"BAR{index}")
    if info.mmappable and not info.sparse:
        return MappedRegisters(function.region_mmap(index, 0, info.size))
    return AccessRegisters(function, index, info.size)
