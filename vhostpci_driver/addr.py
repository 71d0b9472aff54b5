"""Address spaces, kept apart by type (after rust-vmm vm-memory's GuestAddress).

Three spaces meet in this toolkit and must never be confused:

* ``Xgpa``: a physical address in the *driver VM* (what its virtio rings and
  descriptors contain);
* ``WindowOffset``: an offset into the remote window BAR of the vhost-pci
  function (where the host placed the driver VM's memory);
* ``Iova``: an I/O virtual address in the *device VM*, what our own controlq
  and ackq descriptors carry and the IOMMU (or vfio-user DMA map) translates.

``NewType`` costs nothing at run time, so the hot path pays nothing for it,
while ``mypy --strict`` refuses an ``Xgpa`` where a ``WindowOffset`` is meant.
Translation between spaces happens in one place each: the region table
(xgpa -> window) and the DMA pool (iova -> local buffer).
"""

from __future__ import annotations

from typing import NewType, Protocol

Xgpa = NewType("Xgpa", int)
WindowOffset = NewType("WindowOffset", int)
Iova = NewType("Iova", int)


class GuestMemory(Protocol):
    """What a virtqueue needs from the memory its descriptors point into.

    ``view`` returns a writable ``memoryview`` of exactly ``length`` bytes at
    ``addr``, without copying, or raises :class:`~vhostpci_driver.errors.RemoteMemoryError`
    when any byte of the range is not mapped. Implementations: the region table
    (driver VM memory through the remote window) and the DMA pool (our own
    queue memory).
    """

    def view(self, addr: int, length: int) -> memoryview: ...
