"""PCI configuration space of the reference vhost-pci function (PCI 3.0, 6; virtio 1.2, 4.1.4).

A 4 KiB space (QEMU's vfio-user-pci then treats the function as PCIe) held as
bytes plus a write mask: the guest may change only the command register, the
BARs (whose masks implement sizing: write all ones, read back the size), the
interrupt line, the MSI-X enable and function-mask bits, and the fields of the
virtio PCI_CFG access capability. Everything else is read-only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from vhostpci_driver.spec.pci import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_REVISION_ID,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STATUS_INTERRUPT,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCIE_CONFIG_SIZE,
)
from vhostpci_driver.spec.virtio_pci import (
    CAP_BAR,
    CAP_LENGTH,
    CAP_OFFSET,
    CAP_SIZE,
    MODERN_REVISION,
    NOTIFY_CAP_SIZE,
    PCI_CFG_CAP_SIZE,
    PCI_CFG_DATA,
    VIRTIO_PCI_VENDOR,
    CfgType,
)
from vhostpci_driver.wire import device as d

CONFIG_SIZE = PCIE_CONFIG_SIZE
COMMAND_WRITABLE = PCI_COMMAND_MEMORY | PCI_COMMAND_IO | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE

# Where this function's capabilities sit in its config space (its own layout, not the spec's)
MSIX_CAP = 0x40
COMMON_CAP = 0x4C
NOTIFY_CAP = 0x5C
ISR_CAP = 0x70
DEVICE_CAP = 0x80
PCI_CFG_CAP = 0x90
COMMON_LEN = 64
NUM_QUEUES = 2


class PciConfig:
    """The function's config space; ``on_msix`` is told of MSI-X control changes."""

    def __init__(self, virtio_id: int, window_size: int, msix_vectors: int) -> None:
        self.space = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.on_msix: Callable[[bool, bool], None] = lambda enabled, masked: None
        self.on_command: Callable[[], None] = lambda: None
        s = self.space
        struct.pack_into("<HH", s, 0, VIRTIO_PCI_VENDOR, d.pci_device_id(virtio_id))
        struct.pack_into("<H", s, PCI_STATUS, PCI_STATUS_CAP_LIST)
        s[PCI_REVISION_ID] = MODERN_REVISION  # a modern (non-transitional) virtio device
        s[0x0B] = 0xFF  # class: unassigned
        struct.pack_into("<HH", s, PCI_SUBSYSTEM_VENDOR_ID, VIRTIO_PCI_VENDOR, virtio_id)
        s[PCI_CAPABILITY_LIST] = MSIX_CAP
        s[PCI_INTERRUPT_PIN] = 1  # INTA
        self._mask16(PCI_COMMAND, COMMAND_WRITABLE)
        self.wmask[PCI_INTERRUPT_LINE] = 0xFF
        self.bar_sizes = {
            d.BAR_VIRTIO: d.BAR_VIRTIO_SIZE,
            d.BAR_MSIX: d.BAR_MSIX_SIZE,
            d.BAR_WINDOW: window_size,
        }
        self._bar(d.BAR_VIRTIO, d.BAR_VIRTIO_SIZE, 0)
        self._bar(d.BAR_MSIX, d.BAR_MSIX_SIZE, 0)
        self._bar(d.BAR_WINDOW, window_size, PCI_BASE_ADDRESS_MEM_TYPE_64 | PCI_BASE_ADDRESS_MEM_PREFETCH)
        # MSI-X (PCI 3.0, 6.8.2): table size - 1, table and PBA in BAR 1.
        struct.pack_into(
            "<BBHII",
            s,
            MSIX_CAP,
            PCI_CAP_ID_MSIX,
            COMMON_CAP,
            msix_vectors - 1,
            d.MSIX_TABLE_OFFSET | d.BAR_MSIX,
            d.MSIX_PBA_OFFSET | d.BAR_MSIX,
        )
        self._mask16(MSIX_CAP + PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        self._vcap(COMMON_CAP, NOTIFY_CAP, CfgType.COMMON, d.COMMON_OFFSET, COMMON_LEN)
        self._vcap(
            NOTIFY_CAP,
            ISR_CAP,
            CfgType.NOTIFY,
            d.NOTIFY_OFFSET,
            NUM_QUEUES * d.NOTIFY_OFF_MULTIPLIER,
            NOTIFY_CAP_SIZE,
        )
        struct.pack_into("<I", s, NOTIFY_CAP + CAP_SIZE, d.NOTIFY_OFF_MULTIPLIER)
        self._vcap(ISR_CAP, DEVICE_CAP, CfgType.ISR, d.ISR_OFFSET, 1)
        self._vcap(DEVICE_CAP, PCI_CFG_CAP, CfgType.DEVICE, d.DEVICE_CFG_OFFSET, d.VHOST_PCI_CONFIG.size)
        self._vcap(PCI_CFG_CAP, 0, CfgType.PCI, 0, 0, PCI_CFG_CAP_SIZE)
        # virtio 1.2, 4.1.4.9: bar, offset, length and the data window are the driver's to write.
        self.wmask[PCI_CFG_CAP + CAP_BAR] = 0xFF
        for off in (PCI_CFG_CAP + CAP_OFFSET, PCI_CFG_CAP + CAP_LENGTH, PCI_CFG_CAP + PCI_CFG_DATA):
            self.wmask[off : off + 4] = b"\xff" * 4

    def _mask16(self, off: int, mask: int) -> None:
        struct.pack_into("<H", self.wmask, off, mask)

    def _bar(self, index: int, size: int, flags: int) -> None:
        off = PCI_BASE_ADDRESS_0 + 4 * index
        mask = ~(size - 1) & 0xFFFFFFFFFFFFFFFF
        struct.pack_into("<I", self.space, off, flags)
        struct.pack_into("<I", self.wmask, off, mask & 0xFFFFFFF0)
        if flags & PCI_BASE_ADDRESS_MEM_TYPE_64:
            struct.pack_into("<I", self.wmask, off + 4, mask >> 32)

    def _vcap(
        self, off: int, nxt: int, cfg_type: int, offset: int, length: int, cap_len: int = CAP_SIZE
    ) -> None:
        struct.pack_into(
            "<BBBBBBHII",
            self.space,
            off,
            PCI_CAP_ID_VNDR,
            nxt,
            cap_len,
            cfg_type,
            d.BAR_VIRTIO,
            0,
            0,
            offset,
            length,
        )

    @property
    def command(self) -> int:
        return int(struct.unpack_from("<H", self.space, PCI_COMMAND)[0])

    @property
    def msix_control(self) -> int:
        return int(struct.unpack_from("<H", self.space, MSIX_CAP + PCI_MSIX_FLAGS)[0])

    @property
    def msix_enabled(self) -> bool:
        return bool(self.msix_control & PCI_MSIX_FLAGS_ENABLE)

    @property
    def msix_masked(self) -> bool:
        return bool(self.msix_control & PCI_MSIX_FLAGS_MASKALL)

    def pci_cfg_window(self) -> tuple[int, int, int]:
        """(bar, offset, length) the PCI_CFG capability points at."""
        bar = self.space[PCI_CFG_CAP + CAP_BAR]
        off, length = struct.unpack_from("<II", self.space, PCI_CFG_CAP + CAP_OFFSET)
        return bar, off, length

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.space[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        before, command = self.msix_control, self.command
        for i, b in enumerate(data):
            m = self.wmask[offset + i]
            self.space[offset + i] = (self.space[offset + i] & ~m) | (b & m)
        if self.msix_control != before:
            self.on_msix(self.msix_enabled, self.msix_masked)
        if self.command != command:
            self.on_command()

    def set_interrupt_status(self, asserted: bool) -> None:
        """PCI 3.0, 6.2.3: status bit 3 mirrors the INTx line as the function drives it, whatever
        the command register's Interrupt Disable says (uio_pci_generic reads it to claim the IRQ)."""
        status = struct.unpack_from("<H", self.space, PCI_STATUS)[0]
        status = status | PCI_STATUS_INTERRUPT if asserted else status & ~PCI_STATUS_INTERRUPT
        struct.pack_into("<H", self.space, PCI_STATUS, status)
