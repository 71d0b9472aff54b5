"""A strict virtio-pci modern function (virtio 1.2, 4.1), the base of the reference vhost-pci device.

Everything here is generic virtio-pci register emulation over the reference
function's layout (``wire/device.py``: BAR 0 for the virtio structures, BAR 1
for MSI-X): config space and the PCI_CFG window, the common configuration
(``spec.virtio_pci.COMMON_CFG``), queue registers, device status and feature
negotiation, the ISR, MSI-X (table, PBA, masking) and INTx with VFIO's
semantics. It is strict, so a driver cannot pass against a lenient device:
queue registers only before DRIVER_OK, FEATURES_OK only for offered features
including VERSION_1, DEVICE_NEEDS_RESET (and a config interrupt) when the
driver breaks a rule. What the device *is* comes from a subclass
(``device_model.VhostPciDeviceModel``): its device config, what a queue notify
does, the rest of BAR 0, other regions, and what happens at DRIVER_OK.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from vhostpci_driver.errors import RingError
from vhostpci_driver.spec import vfio
from vhostpci_driver.spec.pci import (
    PCI_COMMAND_INTX_DISABLE,
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
)
from vhostpci_driver.spec.virtio import Feature, Status
from vhostpci_driver.spec.virtio_pci import COMMON_FIELDS, ISR_CONFIG, NO_VECTOR, PCI_CFG_DATA
from vhostpci_driver.virtqueue.device import DeviceQueue
from vhostpci_driver.wire import device as d
from vhostpci_host.pci_config import NUM_QUEUES, PCI_CFG_CAP, PciConfig
from vhostpci_host.peer_fds import drain_eventfd, signal_eventfd
from vhostpci_host.vfio_device import (
    DeviceFlag,
    DmaSpace,
    IrqFlag,
    IrqSpec,
    RegionFlag,
    RegionSpec,
    VfioDeviceError,
)

log = logging.getLogger(__name__)

FIELD_AT = {off: (name, width) for name, (off, width) in COMMON_FIELDS.items()}
# The field every byte belongs to: a read may start anywhere inside a field and must still
# return exactly the bytes asked for (a lookup by field start alone read wrong, or forever).
FIELD_OF_BYTE = {
    off + i: (name, off, width) for name, (off, width) in COMMON_FIELDS.items() for i in range(width)
}


@dataclass
class QueueState:
    """One virtqueue's registers (virtio 1.2, 4.1.4.3)."""

    size: int = d.MAX_QUEUE_SIZE
    vector: int = NO_VECTOR
    enable: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0


class VirtioPciFunction:
    """The virtio-pci part of a ``VfioUserDevice``; a subclass supplies the device."""

    flags = DeviceFlag.PCI | DeviceFlag.RESET
    #: bytes of the device-specific configuration structure (virtio 1.2, 4.1.4.6)
    device_config_size = 0

    def __init__(self, *, virtio_id: int, window_size: int, nvectors: int) -> None:
        self.nvectors = nvectors
        self.config = PciConfig(virtio_id, window_size, nvectors)
        self.config.on_msix = lambda enabled, masked: self._deliver_pending()
        self.config.on_command = self._intx_update
        # Vector control 0: unmasked (QEMU masks in its own copy).
        self.msix_table = bytearray(d.BAR_MSIX_SIZE)
        self.pba = 0
        self.msix_fds: dict[int, int] = {}
        self.intx_fd: int | None = None
        # VFIO INTx semantics (vfio.h): the line is masked when it fires (AUTOMASKED) and the
        # client unmasks it after the guest's EOI, by message or through an unmask eventfd.
        self.intx_masked = False
        self.intx_unmask_fd: int | None = None
        self.dma: DmaSpace | None = None
        self._add_reader: Callable[[int, Callable[[], None]], None] | None = None
        self._remove_reader: Callable[[int], None] | None = None
        self.counters = {"interrupts": 0, "driver_errors": 0}

    def _power_on(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_vector = NO_VECTOR
        self.config_generation = 0
        self.queue_select = 0
        self.queues = [QueueState() for _ in range(NUM_QUEUES)]
        self.rings: list[DeviceQueue | None] = [None] * NUM_QUEUES
        self.isr = 0

    # -- what the device supplies ------------------------------------------------------

    def _device_config(self) -> bytes:
        """The device-specific configuration structure, as it reads now."""
        return b""

    def _queue_notify(self, index: int) -> None:
        """The driver notified queue ``index`` (virtio 1.2, 4.1.5.2)."""

    def _queues_started(self) -> None:
        """DRIVER_OK: every enabled queue has its ring."""

    def _bar0_device_read(self, offset: int, count: int) -> bytes:
        """BAR 0 outside the virtio structures: reserved, reads as 0."""
        return bytes(count)

    def _bar0_device_write(self, offset: int, count: int, value: int) -> None:
        """BAR 0 outside the virtio structures: reserved, writes are ignored."""

    def _region_read(self, index: int, offset: int, count: int) -> bytes:
        raise VfioDeviceError(errno.EINVAL, f"region {index} is not implemented")

    def _region_write(self, index: int, offset: int, data: bytes) -> None:
        raise VfioDeviceError(errno.EINVAL, f"region {index} is not implemented")

    # -- VfioUserDevice: regions and irqs ------------------------------------------------

    def regions(self) -> list[RegionSpec]:
        rw = RegionFlag.READ | RegionFlag.WRITE
        specs = [RegionSpec(i, 0, RegionFlag(0)) for i in range(vfio.VFIO_PCI_NUM_REGIONS)]
        specs[d.BAR_VIRTIO] = RegionSpec(d.BAR_VIRTIO, d.BAR_VIRTIO_SIZE, rw)
        specs[d.BAR_MSIX] = RegionSpec(d.BAR_MSIX, d.BAR_MSIX_SIZE, rw)
        specs[vfio.VFIO_PCI_CONFIG_REGION_INDEX] = RegionSpec(vfio.VFIO_PCI_CONFIG_REGION_INDEX, 4096, rw)
        return specs

    def irqs(self) -> list[IrqSpec]:
        return [
            IrqSpec(vfio.VFIO_PCI_INTX_IRQ_INDEX, 1, IrqFlag.EVENTFD | IrqFlag.MASKABLE | IrqFlag.AUTOMASKED),
            IrqSpec(vfio.VFIO_PCI_MSI_IRQ_INDEX, 0),
            IrqSpec(vfio.VFIO_PCI_MSIX_IRQ_INDEX, self.nvectors),
            IrqSpec(vfio.VFIO_PCI_ERR_IRQ_INDEX, 0),
            IrqSpec(vfio.VFIO_PCI_REQ_IRQ_INDEX, 0),
        ]

    def set_irqs(self, index: int, flags: int, start: int, count: int, fds: list[int]) -> None:
        data = flags & vfio.VFIO_IRQ_SET_DATA_TYPE_MASK
        if index == vfio.VFIO_PCI_MSIX_IRQ_INDEX:
            targets = range(start, start + count) if count else list(self.msix_fds)
            for i, v in enumerate(targets):
                old = self.msix_fds.pop(v, None)
                if old is not None:
                    os.close(old)
                # DATA_EVENTFD with an fd assigns; without, de-assigns
                if data == vfio.VFIO_IRQ_SET_DATA_EVENTFD and i < len(fds):
                    self.msix_fds[v] = fds[i]
        elif index == vfio.VFIO_PCI_INTX_IRQ_INDEX:
            self._set_intx(flags & vfio.VFIO_IRQ_SET_ACTION_TYPE_MASK, data, count, fds)
            return
        else:
            for fd in fds:
                os.close(fd)
            raise VfioDeviceError(errno.EINVAL, f"irq index {index} has no vectors")
        for fd in fds[count:]:
            os.close(fd)

    def _set_intx(self, action: int, data: int, count: int, fds: list[int]) -> None:
        """SET_IRQS on the INTx index: TRIGGER sets or clears the eventfd, MASK/UNMASK the mask,
        UNMASK with an eventfd names the fd whose writes unmask (vfio.h, VFIO_DEVICE_SET_IRQS).
        The model owns ``fds``: the one it keeps stays open, any other is closed."""
        given = fds[0] if fds and data == vfio.VFIO_IRQ_SET_DATA_EVENTFD and count else None
        for fd in fds:
            if fd != given:
                os.close(fd)
        if action == vfio.VFIO_IRQ_SET_ACTION_TRIGGER:
            if self.intx_fd is not None:
                os.close(self.intx_fd)
            self.intx_fd, given = given, None
            self.intx_masked = False
        elif action == vfio.VFIO_IRQ_SET_ACTION_MASK and data == vfio.VFIO_IRQ_SET_DATA_NONE and count:
            self.intx_masked = True
        elif action == vfio.VFIO_IRQ_SET_ACTION_UNMASK and data == vfio.VFIO_IRQ_SET_DATA_NONE and count:
            self._intx_unmask()
        elif action == vfio.VFIO_IRQ_SET_ACTION_UNMASK and data == vfio.VFIO_IRQ_SET_DATA_EVENTFD:
            # an eventfd whose writes unmask: a resample fd
            if self.intx_unmask_fd is not None:
                if self._remove_reader is not None:
                    self._remove_reader(self.intx_unmask_fd)
                os.close(self.intx_unmask_fd)
                self.intx_unmask_fd = None
            self.intx_unmask_fd, given = given, None
            if self.intx_unmask_fd is not None and self._add_reader is not None:
                self._add_reader(self.intx_unmask_fd, self._intx_unmask_by_fd)
        if given is not None:  # an eventfd this action has no use for
            os.close(given)
        self._intx_update()

    def _intx_unmask_by_fd(self) -> None:
        assert self.intx_unmask_fd is not None
        if drain_eventfd(self.intx_unmask_fd):
            self._intx_unmask()

    def _intx_unmask(self) -> None:
        self.intx_masked = False
        self._intx_update()

    def _intx_update(self) -> None:
        """Drive INTx from the ISR: asserted while it is non-zero and MSI-X is off (virtio 1.2, 4.1.4.5)."""
        asserted = bool(self.isr) and not self.config.msix_enabled
        self.config.set_interrupt_status(asserted)
        if (
            asserted
            and not self.intx_masked
            and self.intx_fd is not None
            and not self.config.command & PCI_COMMAND_INTX_DISABLE
        ):
            self.intx_masked = True  # AUTOMASKED: one trigger until the client unmasks
            signal_eventfd(self.intx_fd)

    def attach_dma(self, dma: DmaSpace) -> None:
        self.dma = dma

    def dma_unmapped(self, iova: int, size: int) -> None:
        for i, q in enumerate(self.queues):
            if self.rings[i] is not None and any(
                iova <= a < iova + size for a in (q.desc, q.driver, q.device)
            ):
                self._driver_error(f"queue {i}'s memory was unmapped while in use")

    def attach_loop(
        self, add_reader: Callable[[int, Callable[[], None]], None], remove_reader: Callable[[int], None]
    ) -> None:
        """Where to watch the frontends' kick eventfds (the server's selector)."""
        self._add_reader, self._remove_reader = add_reader, remove_reader

    def reset(self) -> None:
        """Power-on state (a write of 0 to device_status, or a new client)."""
        self._power_on()

    def disconnected(self) -> None:
        self.reset()
        for fd in self.msix_fds.values():
            os.close(fd)
        self.msix_fds.clear()
        if self.intx_fd is not None:
            os.close(self.intx_fd)
            self.intx_fd = None
        if self.intx_unmask_fd is not None:
            if self._remove_reader is not None:
                self._remove_reader(self.intx_unmask_fd)
            os.close(self.intx_unmask_fd)
            self.intx_unmask_fd = None
        self.intx_masked = False

    # -- region access -----------------------------------------------------------------

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == vfio.VFIO_PCI_CONFIG_REGION_INDEX:
            return self._config_read(offset, count)
        if index == d.BAR_VIRTIO:
            return self._bar0_read(offset, count)
        if index == d.BAR_MSIX:
            if offset >= d.MSIX_PBA_OFFSET:
                pba = self.pba.to_bytes(d.BAR_MSIX_SIZE - d.MSIX_PBA_OFFSET, "little")
                rel = offset - d.MSIX_PBA_OFFSET
                return pba[rel : rel + count]
            return bytes(self.msix_table[offset : offset + count])
        return self._region_read(index, offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == vfio.VFIO_PCI_CONFIG_REGION_INDEX:
            self._config_write(offset, data)
        elif index == d.BAR_VIRTIO:
            self._bar0_write(offset, data)
        elif index == d.BAR_MSIX:
            if offset + len(data) <= d.MSIX_PBA_OFFSET:  # the PBA is read-only
                self.msix_table[offset : offset + len(data)] = data
                self._deliver_pending()
        else:
            self._region_write(index, offset, data)

    # -- BAR 0: the virtio structures ------------------------------------------------------

    def _bar0_read(self, offset: int, count: int) -> bytes:
        if count not in (1, 2, 4, 8) or offset % count:
            raise VfioDeviceError(errno.EINVAL, f"{count}-byte read at {offset:#x}")
        if offset < d.ISR_OFFSET:
            return self._common_read(offset, count)
        if offset == d.ISR_OFFSET:
            isr, self.isr = self.isr, 0  # virtio 1.2, 4.1.4.5: reading clears, and deasserts INTx
            self._intx_update()
            return bytes([isr]) + bytes(count - 1)
        if d.DEVICE_CFG_OFFSET <= offset < d.DEVICE_CFG_OFFSET + self.device_config_size:
            rel = offset - d.DEVICE_CFG_OFFSET
            return self._device_config()[rel : rel + count].ljust(count, b"\0")
        return self._bar0_device_read(offset, count)

    def _bar0_write(self, offset: int, data: bytes) -> None:
        count = len(data)
        if count not in (1, 2, 4, 8) or offset % count:
            raise VfioDeviceError(errno.EINVAL, f"{count}-byte write at {offset:#x}")
        value = int.from_bytes(data, "little")
        if offset < d.ISR_OFFSET:
            self._common_write(offset, count, value)
        elif d.NOTIFY_OFFSET <= offset < d.NOTIFY_OFFSET + NUM_QUEUES * d.NOTIFY_OFF_MULTIPLIER:
            self._queue_notify((offset - d.NOTIFY_OFFSET) // d.NOTIFY_OFF_MULTIPLIER)
        else:
            self._bar0_device_write(offset, count, value)

    def _start_queues(self) -> None:
        if self.dma is None:
            self._driver_error("DRIVER_OK with no DMA memory mapped")
            return
        event_idx = bool(self.driver_features >> Feature.RING_EVENT_IDX & 1)
        for i, q in enumerate(self.queues):
            if not q.enable:
                continue
            try:
                self.rings[i] = DeviceQueue(self.dma, q.size, q.desc, q.driver, q.device, event_idx=event_idx)
            except RingError as e:
                self._driver_error(f"queue {i}: {e}")
                return
        self._queues_started()

    def _config_read(self, offset: int, count: int) -> bytes:
        bar, off, length = self.config.pci_cfg_window()
        data_at = PCI_CFG_CAP + PCI_CFG_DATA
        raw = bytearray(self.config.read(offset, count))
        if offset < data_at + 4 and data_at < offset + count and bar == d.BAR_VIRTIO and length in (1, 2, 4):
            # virtio 1.2, 4.1.4.9: pci_cfg_data reads through to the BAR.
            val = self._bar0_read(off, length).ljust(4, b"\0")
            for i in range(4):
                if offset <= data_at + i < offset + count:
                    raw[data_at + i - offset] = val[i]
        return bytes(raw)

    def _config_write(self, offset: int, data: bytes) -> None:
        self.config.write(offset, data)
        bar, off, length = self.config.pci_cfg_window()
        data_at = PCI_CFG_CAP + PCI_CFG_DATA
        if offset == data_at and bar == d.BAR_VIRTIO and length in (1, 2, 4) and len(data) >= length:
            self._bar0_write(off, data[:length])

    def _common_read(self, offset: int, count: int) -> bytes:
        out = bytearray()
        pos, end = offset, offset + count
        while pos < end:
            field = FIELD_OF_BYTE.get(pos)
            if field is None:
                out.append(0)  # reserved bytes read as 0
                pos += 1
                continue
            name, base, width = field
            value = self._common_value(name).to_bytes(width, "little")
            take = min(base + width, end) - pos  # >= 1: pos lies inside the field
            out += value[pos - base : pos - base + take]
            pos += take
        return bytes(out)

    def _common_value(self, name: str) -> int:
        q = self.queues[self.queue_select] if self.queue_select < NUM_QUEUES else None
        if name == "device_feature":
            return (
                (d.OFFERED_FEATURES >> (32 * self.device_feature_select)) & 0xFFFFFFFF
                if self.device_feature_select < 2
                else 0
            )
        if name == "driver_feature":
            return (
                (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
                if self.driver_feature_select < 2
                else 0
            )
        simple = {
            "device_feature_select": self.device_feature_select,
            "driver_feature_select": self.driver_feature_select,
            "config_msix_vector": self.config_vector, "num_queues": NUM_QUEUES, "device_status": self.status,
            "config_generation": self.config_generation & 0xFF, "queue_select": self.queue_select,
        }  # fmt: skip
        if name in simple:
            return simple[name]
        if q is None:
            return 0  # virtio 1.2, 4.1.4.3: a queue that does not exist reads as size 0
        per_queue = {
            "queue_size": q.size, "queue_msix_vector": q.vector, "queue_enable": q.enable,
            "queue_notify_off": self.queue_select, "queue_desc": q.desc, "queue_driver": q.driver,
            "queue_device": q.device, "queue_notify_data": self.queue_select, "queue_reset": 0,
        }  # fmt: skip
        return per_queue[name]

    def _common_write(self, offset: int, count: int, value: int) -> None:
        entry = FIELD_AT.get(offset)
        high = False
        if entry is None:
            entry = FIELD_AT.get(offset - 4)
            high = True
            if entry is None or entry[1] != 8 or count != 4:
                return  # not a field: ignored, as a device ignores writes to reserved space
        name, width = entry
        if count != width and not (width == 8 and count == 4):
            raise VfioDeviceError(errno.EINVAL, f"{count}-byte write to {name} ({width} bytes)")
        if name == "device_feature_select":
            self.device_feature_select = value
        elif name == "driver_feature_select":
            self.driver_feature_select = value
        elif name == "driver_feature":
            if self.status & Status.FEATURES_OK or self.driver_feature_select > 1:
                return
            shift = 32 * self.driver_feature_select
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif name == "config_msix_vector":
            self.config_vector = value if value < self.nvectors else NO_VECTOR
        elif name == "device_status":
            self._set_status(value)
        elif name == "queue_select":
            self.queue_select = value
        elif self.queue_select < NUM_QUEUES:
            self._queue_write(name, value, high, count)

    def _queue_write(self, name: str, value: int, high: bool, count: int) -> None:
        q = self.queues[self.queue_select]
        if name == "queue_msix_vector":
            q.vector = value if value < self.nvectors else NO_VECTOR
            return
        # virtio 1.2, 4.1.4.3.2: queue setup only before DRIVER_OK, and not on an enabled queue.
        if self.status & Status.DRIVER_OK or q.enable:
            if name != "queue_enable" or value != 1:
                self._driver_error(f"{name} written on a live queue {self.queue_select}")
            return
        if name == "queue_size":
            if value == 0 or value & (value - 1) or value > d.MAX_QUEUE_SIZE:
                self._driver_error(f"queue_size {value} is not a power of two <= {d.MAX_QUEUE_SIZE}")
                return
            q.size = value
        elif name == "queue_enable":
            q.enable = 1 if value == 1 else q.enable  # writing 0 is not allowed: ignored
        elif name in ("queue_desc", "queue_driver", "queue_device"):
            # virtio 1.2, 4.1.3.1: 64-bit fields may come as two 32-bit halves.
            attr = name.removeprefix("queue_")
            old = getattr(q, attr)
            if count == 8:
                new = value
            elif high:
                new = (old & 0xFFFFFFFF) | (value << 32)
            else:
                new = (old & ~0xFFFFFFFF) | value
            setattr(q, attr, new)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & ~self.status & Status.FEATURES_OK:
            feats = self.driver_features
            if feats & ~d.OFFERED_FEATURES or not feats >> Feature.VERSION_1 & 1:
                # virtio 1.2, 2.2.2: the device refuses; the driver reads it back
                value &= ~Status.FEATURES_OK
        if value & ~self.status & Status.DRIVER_OK:
            self.status = value
            self._start_queues()
            return
        self.status = (self.status & Status.DEVICE_NEEDS_RESET) | value

    def _driver_error(self, why: str) -> None:
        """The driver broke a rule: DEVICE_NEEDS_RESET and a config interrupt (virtio 1.2, 2.1.2)."""
        log.warning("driver error: %s", why)
        self.counters["driver_errors"] += 1
        self.status |= Status.DEVICE_NEEDS_RESET
        self.rings = [None] * NUM_QUEUES
        self._config_changed()

    # -- interrupts ------------------------------------------------------------------

    def _raise(self, vector: int, isr_bit: int) -> None:
        self.counters["interrupts"] += 1
        control = self.config.msix_control  # the hot path: one read for both bits
        if control & PCI_MSIX_FLAGS_ENABLE:
            if vector >= self.nvectors:
                return
            masked = control & PCI_MSIX_FLAGS_MASKALL or self._vector_masked(vector)
            fd = self.msix_fds.get(vector)
            if masked or fd is None:
                self.pba |= 1 << vector  # pending: delivered when unmasked
                return
            signal_eventfd(fd)  # the client's eventfd: never waited on (peer_fds)
        else:
            self.isr |= isr_bit
            self._intx_update()

    def _vector_masked(self, vector: int) -> bool:
        """PCI 3.0, 6.8.2.9: the entry's Vector Control Mask bit."""
        ctrl = self.msix_table[PCI_MSIX_ENTRY_SIZE * vector + PCI_MSIX_ENTRY_VECTOR_CTRL]
        return bool(ctrl & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def _deliver_pending(self) -> None:
        if not self.config.msix_enabled or self.config.msix_masked:
            return
        for vec in range(self.nvectors):
            if self.pba >> vec & 1 and not self._vector_masked(vec) and vec in self.msix_fds:
                self.pba &= ~(1 << vec)
                signal_eventfd(self.msix_fds[vec])

    def _config_changed(self) -> None:
        self.config_generation += 1
        self._raise(self.config_vector, ISR_CONFIG)
