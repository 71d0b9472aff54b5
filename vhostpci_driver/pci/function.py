"""The one interface every PCI backend implements (after ixy's device ops table).

Higher layers (the virtio-pci transport, the DMA pool) see only this: config
space, regions, interrupts as eventfds, DMA map/unmap, reset, close. Region and
irq indices are vfio-pci's (``include/uapi/linux/vfio.h``: BAR0-5 = 0-5, ROM 6,
CONFIG 7; INTx 0, MSI 1, MSI-X 2; declared in :mod:`vhostpci_driver.spec.vfio`), whatever
the backend.
"""

from __future__ import annotations

import abc
import mmap
from dataclasses import dataclass

from vhostpci_driver.addr import Iova


@dataclass(frozen=True)
class SparseArea:
    """An mmappable part of a region, relative to the region's start."""

    offset: int
    size: int


@dataclass(frozen=True)
class RegionInfo:
    """One region as the backend reports it (``vfio_region_info``)."""

    index: int
    size: int
    readable: bool
    writable: bool
    mmappable: bool
    # Mmappable parts; empty with ``mmappable`` set means the whole region.
    sparse: tuple[SparseArea, ...] = ()
    # What a mapping of it shows, where the backend can tell ((st_dev, st_ino, file offset) of the
    # fd a vfio-user server gave): when it changes, areas mapped before show other memory.
    backing: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class IrqInfo:
    """One interrupt index (``vfio_irq_info``): how many vectors it has."""

    index: int
    count: int
    eventfd: bool


class PciFunction(abc.ABC):
    """A PCI function opened from userspace.

    Every method raises :class:`~vhostpci_driver.errors.TransportError` on
    failure (never a bare ``OSError``). ``close()`` is idempotent and releases
    every fd, mapping and DMA map the function holds, in reverse order of
    acquisition.
    """

    #: a human-readable address ("0000:00:05.0" or "vfio-user:/run/x.sock")
    address: str

    @property
    @abc.abstractmethod
    def backend(self) -> str:
        """How the function is reached, for status: vfio-cdev, vfio-group, vfio-noiommu, uio, vfio-user."""

    @abc.abstractmethod
    def config_read(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of PCI config space at ``offset``."""

    @abc.abstractmethod
    def config_write(self, offset: int, data: bytes) -> None:
        """Write PCI config space at ``offset``."""

    @abc.abstractmethod
    def region_info(self, index: int) -> RegionInfo:
        """Describe region ``index`` (a BAR, ROM or config)."""

    @abc.abstractmethod
    def region_read(self, index: int, offset: int, size: int) -> bytes:
        """Read a region by access (not mmap): ``size`` is 1, 2, 4 or 8 for registers."""

    @abc.abstractmethod
    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Write a region by access (not mmap)."""

    def region_write_posted(self, index: int, offset: int, data: bytes) -> None:
        """A write that need not wait for completion: for pure triggers (doorbells, queue notify) only.

        A backend may deliver it out of order with later accesses (vfio-user
        sends it by ioeventfd where the server offers one), as KVM ioeventfds do.
        """
        self.region_write(index, offset, data)

    def posted_targets_changed(self, index: int) -> None:
        """Where region ``index``'s posted writes end up may have changed: learn it again.

        The vhost-pci device may hand a doorbell as the frontend's own call eventfd
        (protocol.md 6), which is only right while that frontend holds the slot: the
        driver calls this when a frontend comes or goes. Nothing to do for a backend
        whose posted writes are plain writes.
        """
        return

    @abc.abstractmethod
    def region_mmap(self, index: int, offset: int, size: int) -> mmap.mmap:
        """Map ``size`` bytes of region ``index`` at ``offset`` (inside one mmappable area).

        The mapping is owned by the function and unmapped by ``close()``; the
        caller must drop views into it before then.
        """

    @abc.abstractmethod
    def irq_info(self, index: int) -> IrqInfo:
        """Describe interrupt index ``index``."""

    @abc.abstractmethod
    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        """Route vectors ``start..start+len(fds)-1`` of ``index`` to eventfds; -1 de-assigns one."""

    @abc.abstractmethod
    def disable_irqs(self, index: int) -> None:
        """Tear down every vector of ``index``."""

    @abc.abstractmethod
    def dma_map(self, fd: int, fd_offset: int, vaddr_view: memoryview, iova: Iova) -> None:
        """Make ``vaddr_view`` (backed by ``fd`` at ``fd_offset``) visible to the device at ``iova``.

        Backends use what they need: VFIO type1 the virtual address, vfio-user
        the fd, no-IOMMU/UIO nothing (the caller uses physical addresses, see
        :meth:`iova_for`).
        """

    @abc.abstractmethod
    def dma_unmap(self, iova: Iova, size: int) -> None:
        """Remove a DMA mapping made by :meth:`dma_map`."""

    def iova_for(self, vaddr_view: memoryview, proposed: Iova) -> Iova:
        """The device address to use for ``vaddr_view``; ``proposed`` unless the backend is physical."""
        return proposed

    def removal_fd(self) -> int | None:
        """A readable fd that fires when the function is being taken away, or None.

        Hot-unplug of a function bound to vfio-pci waits until every user
        closes it; the kernel says so on the device-request interrupt (vfio.h
        ``VFIO_PCI_REQ_IRQ_INDEX``). A service watches this fd and lets go, so
        the unplug (``device_del``) completes instead of hanging. The fd is
        owned by the function and closed with it.
        """
        return None

    @abc.abstractmethod
    def reset(self) -> None:
        """Function-level reset (``VFIO_DEVICE_RESET`` / ``DEVICE_RESET``)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything; idempotent."""

    def __enter__(self) -> PciFunction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
