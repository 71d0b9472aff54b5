"""virtio-pci modern transport (virtio 1.2, 4.1) over any PciFunction.

Bring-up follows virtio 1.2, 3.1.1: reset, ACKNOWLEDGE, DRIVER, feature
negotiation with FEATURES_OK read back, queue setup, DRIVER_OK; FAILED on any
error. The device is checked as it is read: a status that never clears, a
queue size of 0 or not a power of two, a refused MSI-X vector, a notify
address outside its structure each raise :class:`TransportError` naming the
register.

Interrupts come as MSI-X vectors routed to eventfds, or, where the backend
cannot route vectors (UIO), as the one INTx line plus the ISR status register
that says what it was for (virtio 1.2, 4.1.5.4).
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from vhostpci_driver.errors import TransportError, VhostPciError
from vhostpci_driver.pci.access import registers_for
from vhostpci_driver.pci.function import PciFunction
from vhostpci_driver.pci.mmio import RegisterBlock, Registers
from vhostpci_driver.spec.pci import (
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_CONFIG_SIZE,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
)
from vhostpci_driver.spec.vfio import VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX
from vhostpci_driver.spec.virtio import Feature, Status, queue_size_ok
from vhostpci_driver.spec.virtio_pci import (
    CONFIG_GENERATION,
    CONFIG_MSIX_VECTOR,
    DEVICE_FEATURE,
    DEVICE_FEATURE_SELECT,
    DEVICE_STATUS,
    DRIVER_FEATURE,
    DRIVER_FEATURE_SELECT,
    NO_VECTOR,
    NUM_QUEUES,
    QUEUE_DESC,
    QUEUE_DEVICE,
    QUEUE_DRIVER,
    QUEUE_ENABLE,
    QUEUE_MSIX_VECTOR,
    QUEUE_NOTIFY_OFF,
    QUEUE_SELECT,
    QUEUE_SIZE,
)
from vhostpci_driver.virtio import caps
from vhostpci_driver.virtio.caps import Capabilities, VirtioCap


class IrqSource(Protocol):
    """An interrupt line as an fd to wait on (it polls readable when the line fired).

    ``consume`` takes what fired without blocking; ``rearm`` lets the line fire
    again, and is called only after the device was acknowledged, so a line that
    is still asserted fires again at once instead of being lost.
    """

    def fileno(self) -> int: ...
    def consume(self) -> bool: ...
    def rearm(self) -> None: ...


@runtime_checkable
class IntxOwner(Protocol):
    """A backend that delivers INTx itself rather than routing it to an eventfd.

    uio_pci_generic is one: the line is read from ``/dev/uioN`` and re-armed
    through the command register, and no vector can be routed anywhere.
    """

    def intx_source(self) -> IrqSource: ...


class VirtioPciTransport:
    """One virtio-pci modern function: its structures, status, features, queues and interrupts."""

    def __init__(self, function: PciFunction, *, reset_timeout: float = 1.0) -> None:
        self.function = function
        self.reset_timeout = reset_timeout
        config = function.config_read(0, PCI_CONFIG_SIZE)
        bar_sizes = {}
        for bar in range(6):
            try:
                size = function.region_info(bar).size
            except TransportError:
                continue
            if size:
                bar_sizes[bar] = size
        self.caps: Capabilities = caps.parse(config, bar_sizes)
        self._bars: dict[int, Registers] = {}
        self.common = self._block(self.caps.common)
        self.isr = self._block(self.caps.isr)
        self.notify_block = self._block(self.caps.notify)
        self.device_cfg = self._block(self.caps.device) if self.caps.device else None
        self.eventfds: list[int] = []
        self.intx: IrqSource | None = None
        self._notify_offsets: dict[int, int] = {}

    def _block(self, cap: VirtioCap) -> RegisterBlock:
        regs = self._bars.get(cap.bar)
        if regs is None:
            regs = self._bars[cap.bar] = registers_for(self.function, cap.bar)
        return RegisterBlock(regs, cap.offset, cap.length)

    # -- status (virtio 1.2, 2.1 and 3.1) -----------------------------------

    @property
    def status(self) -> Status:
        return Status(self.common.read8(DEVICE_STATUS))

    def add_status(self, bits: Status) -> None:
        self.common.write8(DEVICE_STATUS, self.common.read8(DEVICE_STATUS) | bits)

    def reset(self) -> None:
        """Write 0 and wait, bounded, for the device to read back 0 (virtio 1.2, 4.1.4.3.2)."""
        self.common.write8(DEVICE_STATUS, 0)
        deadline = time.monotonic() + self.reset_timeout
        delay = 1e-5
        while self.common.read8(DEVICE_STATUS) != 0:
            if time.monotonic() > deadline:
                raise TransportError(f"still non-zero {self.reset_timeout}s after reset", "device_status")
            # A register has no fd to wait on: poll with a growing, bounded back-off.
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        self._notify_offsets.clear()

    def fail(self) -> None:
        """Tell the device we gave up (FAILED); never raises, it is called on error paths."""
        with contextlib.suppress(VhostPciError, OSError):
            self.add_status(Status.FAILED)

    def enable_bus_master(self) -> None:
        """Memory space and bus mastering on (the device must be allowed to DMA to our rings)."""
        (cmd,) = struct.unpack("<H", self.function.config_read(PCI_COMMAND, 2))
        want = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        if want != cmd:
            self.function.config_write(PCI_COMMAND, struct.pack("<H", want))

    # -- features (virtio 1.2, 2.2 and 3.1.1 steps 4-6) ----------------------

    def device_features(self) -> int:
        feats = 0
        for page in (0, 1):
            self.common.write32(DEVICE_FEATURE_SELECT, page)
            feats |= self.common.read32(DEVICE_FEATURE) << (32 * page)
        return feats

    def negotiate(self, wanted: int) -> int:
        """ACKNOWLEDGE, DRIVER, accept ``wanted & offered``, FEATURES_OK read back.

        Returns the accepted bits.
        """
        self.add_status(Status.ACKNOWLEDGE)
        self.add_status(Status.DRIVER)
        offered = self.device_features()
        if not offered >> Feature.VERSION_1 & 1:
            raise TransportError("device does not offer VIRTIO_F_VERSION_1 (legacy only)", "device_feature")
        accepted = offered & wanted | (1 << Feature.VERSION_1)
        for page in (0, 1):
            self.common.write32(DRIVER_FEATURE_SELECT, page)
            self.common.write32(DRIVER_FEATURE, (accepted >> (32 * page)) & 0xFFFFFFFF)
        self.add_status(Status.FEATURES_OK)
        # virtio 1.2, 3.1.1 step 6: re-read; a clear FEATURES_OK means the subset is refused.
        if not self.status & Status.FEATURES_OK:
            raise TransportError(f"device refused features {accepted:#x}", "device_status.FEATURES_OK")
        return accepted

    def driver_ok(self) -> None:
        self.add_status(Status.DRIVER_OK)

    # -- queues (virtio 1.2, 4.1.5.1.3) --------------------------------------

    def num_queues(self) -> int:
        return self.common.read16(NUM_QUEUES)

    def queue_max_size(self, index: int) -> int:
        self.common.write16(QUEUE_SELECT, index)
        return self.common.read16(QUEUE_SIZE)

    def setup_queue(
        self, index: int, size: int, desc: int, driver: int, device: int, *, vector: int = NO_VECTOR
    ) -> None:
        """Program and enable queue ``index``; ``size`` must not exceed what the device offers."""
        if index >= self.num_queues():
            raise TransportError(f"queue {index} does not exist ({self.num_queues()} queues)", "num_queues")
        self.common.write16(QUEUE_SELECT, index)
        max_size = self.common.read16(QUEUE_SIZE)
        if max_size == 0:
            raise TransportError(f"queue {index} is not available (size 0)", "queue_size")
        if not queue_size_ok(max_size):
            raise TransportError(f"queue {index} size {max_size} is not a power of two", "queue_size")
        if not queue_size_ok(size, max_size):
            raise TransportError(f"queue {index}: size {size} not a power of two <= {max_size}", "queue_size")
        self.common.write16(QUEUE_SIZE, size)
        self.common.write64(QUEUE_DESC, desc)
        self.common.write64(QUEUE_DRIVER, driver)
        self.common.write64(QUEUE_DEVICE, device)
        if vector != NO_VECTOR:
            self.common.write16(QUEUE_MSIX_VECTOR, vector)
            # virtio 1.2, 4.1.4.3.1: the device answers NO_VECTOR when it cannot map the vector.
            if self.common.read16(QUEUE_MSIX_VECTOR) != vector:
                raise TransportError(f"queue {index} refused MSI-X vector {vector}", "queue_msix_vector")
        off = self.common.read16(QUEUE_NOTIFY_OFF) * self.caps.notify.notify_off_multiplier
        if off + 2 > self.caps.notify.length:
            raise TransportError(
                f"queue {index} notify address {off:#x} outside the notify structure", "queue_notify_off"
            )
        self._notify_offsets[index] = off
        self.common.write16(QUEUE_ENABLE, 1)

    def notify(self, index: int) -> None:
        """Kick queue ``index`` (virtio 1.2, 4.1.5.2: write the queue index at its notify address)."""
        self.notifier(index)()

    def notifier(self, index: int) -> Callable[[], None]:
        """A bound kick for one queue, for the hot path.

        A posted 16-bit write: one store through a mapping, a message that waits
        for no answer otherwise (a kick needs none, and the next access is
        ordered after it).
        """
        off, post = self._notify_offsets[index], self.notify_block.post16
        return lambda: post(off, index)

    # -- interrupts (virtio 1.2, 4.1.5.1.2) ----------------------------------

    def set_config_vector(self, vector: int) -> None:
        self.common.write16(CONFIG_MSIX_VECTOR, vector)
        if self.common.read16(CONFIG_MSIX_VECTOR) != vector:
            raise TransportError(f"device refused config MSI-X vector {vector}", "config_msix_vector")

    def enable_msix(self, count: int) -> list[int]:
        """Route MSI-X vectors 0..count-1 to fresh eventfds (non-blocking, for selectors/asyncio)."""
        msix = self.caps.msix
        if msix is None:
            raise TransportError("function has no MSI-X capability", "config.msix")
        if count > msix.table_size:
            raise TransportError(f"{count} vectors wanted, table has {msix.table_size}", "config.msix")
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        try:
            self.function.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 0, fds)
            # The kernel's vfio-pci enables MSI-X itself; a vfio-user device learns it from config space.
            ctrl_off = msix.cap_offset + PCI_MSIX_FLAGS
            (ctrl,) = struct.unpack("<H", self.function.config_read(ctrl_off, 2))
            if not ctrl & PCI_MSIX_FLAGS_ENABLE:
                self.function.config_write(ctrl_off, struct.pack("<H", ctrl | PCI_MSIX_FLAGS_ENABLE))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.eventfds = fds
        return fds

    def read_isr(self) -> int:
        """Read (and so clear) the ISR status (virtio 1.2, 4.1.4.5)."""
        return self.isr.read8(0)

    def intx_available(self) -> bool:
        """Whether INTx can stand in for MSI-X: the backend delivers it and the function has a line."""
        fn = self.function
        return isinstance(fn, IntxOwner) and fn.irq_info(VFIO_PCI_INTX_IRQ_INDEX).count > 0

    def enable_intx(self) -> IrqSource:
        """Take interrupts on the INTx line instead of MSI-X vectors; see :meth:`intx_isr`."""
        fn = self.function
        if not isinstance(fn, IntxOwner):
            raise TransportError(
                f"{type(fn).__name__} routes interrupts to eventfds and offers no INTx source", "irq.intx"
            )
        if fn.irq_info(VFIO_PCI_INTX_IRQ_INDEX).count < 1:
            raise TransportError("the function has no INTx line (interrupt pin 0)", "config.interrupt_pin")
        msix = self.caps.msix
        if msix is not None:
            # virtio 1.2, 4.1.5.4: only with MSI-X disabled does the device signal through
            # INTx and the ISR; a previous driver may have left it enabled.
            ctrl_off = msix.cap_offset + PCI_MSIX_FLAGS
            (ctrl,) = struct.unpack("<H", self.function.config_read(ctrl_off, 2))
            if ctrl & PCI_MSIX_FLAGS_ENABLE:
                self.function.config_write(ctrl_off, struct.pack("<H", ctrl & ~PCI_MSIX_FLAGS_ENABLE))
        source = fn.intx_source()
        source.rearm()  # the line may have been left disabled (by the kernel or a previous driver)
        self.intx = source
        return source

    def intx_isr(self) -> int:
        """If the INTx line fired: the ISR bits, with the device and the line acknowledged.

        virtio 1.2, 4.1.5.4: with MSI-X disabled the driver reads the ISR status,
        which clears it and de-asserts the line; bit 0 means "look at every
        queue", bit 1 "the configuration changed". Only then is the line
        re-armed: re-arming first would take the still-asserted line again.
        Returns 0, without touching the device, when the line did not fire.
        """
        source = self.intx
        if source is None or not source.consume():
            return 0
        isr = self.read_isr()
        source.rearm()
        return isr

    def config_generation(self) -> int:
        return self.common.read8(CONFIG_GENERATION)

    def read_device_config(self, offset: int, size: int) -> bytes:
        """A consistent snapshot of device config bytes.

        virtio 1.2, 2.5.1: read again until ``config_generation`` holds across the read.
        """
        if self.device_cfg is None:
            raise TransportError("device has no DEVICE capability", "config.device_cap")
        for _ in range(16):
            gen = self.config_generation()
            data = bytearray()
            pos = offset
            while pos < offset + size:
                width = 4 if pos % 4 == 0 and offset + size - pos >= 4 else 1
                value = self.device_cfg.read32(pos) if width == 4 else self.device_cfg.read8(pos)
                data += value.to_bytes(width, "little")
                pos += width
            if self.config_generation() == gen:
                return bytes(data)
        raise TransportError("config_generation keeps changing", "config_generation")

    def close(self) -> None:
        """Disable interrupts and close our eventfds; idempotent, best effort on a dying device."""
        fds, self.eventfds = self.eventfds, []
        if fds:
            with contextlib.suppress(TransportError):
                self.function.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX)
        for fd in fds:
            os.close(fd)
        if self.intx is not None:
            self.intx = None  # the source belongs to the function, which closes it
            with contextlib.suppress(TransportError):
                self.function.disable_irqs(VFIO_PCI_INTX_IRQ_INDEX)
