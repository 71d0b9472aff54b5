"""The seam between a vfio-user server and the device model it serves.

The server (protocol, sockets, fds, DMA map table) knows nothing of virtio; the
device model (config space, BARs, queues) knows nothing of sockets. They meet
here. The names follow Linux ``include/uapi/linux/vfio.h`` and QEMU's
``docs/interop/vfio-user.rst``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from vhostpci_driver.spec import vfio as v


class RegionFlag(enum.IntFlag):
    """``VFIO_REGION_INFO_FLAG_*``."""

    READ = v.VFIO_REGION_INFO_FLAG_READ
    WRITE = v.VFIO_REGION_INFO_FLAG_WRITE
    MMAP = v.VFIO_REGION_INFO_FLAG_MMAP
    CAPS = v.VFIO_REGION_INFO_FLAG_CAPS


class IrqFlag(enum.IntFlag):
    """``VFIO_IRQ_INFO_*``."""

    EVENTFD = v.VFIO_IRQ_INFO_EVENTFD
    MASKABLE = v.VFIO_IRQ_INFO_MASKABLE
    AUTOMASKED = v.VFIO_IRQ_INFO_AUTOMASKED
    NORESIZE = v.VFIO_IRQ_INFO_NORESIZE


class DeviceFlag(enum.IntFlag):
    """``VFIO_DEVICE_FLAGS_*``."""

    RESET = v.VFIO_DEVICE_FLAGS_RESET
    PCI = v.VFIO_DEVICE_FLAGS_PCI


@dataclass(frozen=True)
class MmapArea:
    """One sparse-mmap area, relative to the start of its region."""

    offset: int
    size: int


@dataclass(frozen=True)
class RegionSpec:
    """What ``DEVICE_GET_REGION_INFO`` reports for one region.

    ``fd`` (with ``fd_offset``, the file offset of region offset 0) is given to
    the client when the region or part of it is mmappable; ``areas`` lists the
    mmappable parts (empty with MMAP set means the whole region). Accesses to
    any part not covered go through ``region_read``/``region_write``.
    """

    index: int
    size: int
    flags: RegionFlag
    fd: int | None = None
    fd_offset: int = 0
    areas: tuple[MmapArea, ...] = ()


@dataclass(frozen=True)
class IrqSpec:
    """What ``DEVICE_GET_IRQ_INFO`` reports for one irq index."""

    index: int
    count: int
    flags: IrqFlag = IrqFlag.EVENTFD | IrqFlag.NORESIZE


@dataclass(frozen=True)
class IoEventFdSpec:
    """A register the client may write by eventfd instead of ``REGION_WRITE`` (``GET_REGION_IO_FDS``).

    A write of ``size`` bytes at ``offset`` (of ``datamatch``, when given: KVM
    ioeventfd semantics) becomes one ``eventfd_write(fd, 1)``; the device
    watches ``fd`` and does what the message would have done. Only for
    registers whose writes are pure triggers (doorbells, queue notify): the
    value is lost unless matched, and the write is not ordered with messages.
    The device owns ``fd``; the server sends copies.
    """

    offset: int
    size: int
    fd: int
    datamatch: int | None = None


@dataclass
class DmaMapping:
    """One ``DMA_MAP`` of the client's memory, mmapped by the server.

    ``view`` is the whole mapping (writable); ``iova`` its base address in the
    client's I/O address space. ``fd`` is kept open until unmapped.
    """

    iova: int
    size: int
    readable: bool
    writable: bool
    view: memoryview = field(repr=False)


class DmaSpace(Protocol):
    """The client's memory as the server has it mapped (the DMA map table).

    ``view(iova, length)`` returns a zero-copy view or raises
    :class:`vhostpci_driver.errors.RemoteMemoryError`; it satisfies
    :class:`vhostpci_driver.addr.GuestMemory`, so device-side virtqueues run
    straight over it.
    """

    def view(self, addr: int, length: int) -> memoryview: ...


class VfioUserDevice(Protocol):
    """A device model as the vfio-user server drives it.

    Every method is called from the server's single event-loop thread. A method
    that refuses a request raises :class:`VfioDeviceError` with an errno; the
    server turns it into an error reply for that message only.
    """

    flags: DeviceFlag

    def regions(self) -> list[RegionSpec]:
        """Every region, indexed by region index (length = num_regions)."""
        ...

    def irqs(self) -> list[IrqSpec]:
        """Every irq index (length = num_irqs)."""
        ...

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """``REGION_READ``; the server has checked index, offset and count against the region."""
        ...

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """``REGION_WRITE``; bounds checked by the server as for reads."""
        ...

    def io_fds(self, index: int) -> list[IoEventFdSpec]:
        """``GET_REGION_IO_FDS``: region ``index``'s ioeventfd-backed registers (often none).

        Made on the first request of a connection and closed by
        :meth:`disconnected`; the server hands out as many as the client takes.
        """
        ...

    def set_irqs(self, index: int, flags: int, start: int, count: int, fds: list[int]) -> None:
        """``DEVICE_SET_IRQS``; the device takes ownership of ``fds`` (closes them when replaced)."""
        ...

    def attach_dma(self, dma: DmaSpace) -> None:
        """Called once when the client connects: where the device reads and writes client memory."""
        ...

    def dma_unmapped(self, iova: int, size: int) -> None:
        """Called before a DMA range disappears, so the device drops views into it."""
        ...

    def reset(self) -> None:
        """``DEVICE_RESET``: back to the power-on state (interrupt routing stays)."""
        ...

    def disconnected(self) -> None:
        """The client is gone: reset, and close every fd it gave (interrupt eventfds)."""
        ...


class VfioDeviceError(Exception):
    """A device model refuses a request; ``errno`` goes back in the error reply."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_
