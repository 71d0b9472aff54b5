"""The Linux iommufd uAPI (``include/uapi/linux/iommufd.h``): the part a VFIO cdev user needs.

The vfio cdev path (Documentation/userspace-api/iommufd.rst, "VFIO device
cdev") replaces container and group with one ``/dev/iommu`` file: allocate an
I/O address space (IOAS), attach the device to it, map user memory at fixed
IOVAs. Declared as the header declares it (``_IO(IOMMUFD_TYPE,
IOMMUFD_CMD_*)``, every struct starting with its own ``size``); the VFIO side
of the path (BIND / ATTACH / DETACH) lives in :mod:`vfio_uapi` beside the other
``vfio.h`` declarations. tests/unit/test_vfio_uapi.py compiles these against the
installed header where it has them, and the VM tier runs it against the 7.2
header of the kernel it boots.
"""

from __future__ import annotations

import ctypes

from vhostpci_driver.pci import vfio_uapi

IOMMUFD_TYPE = ord(";")  # the same ioctl type as VFIO; commands start at 0x80
IOMMUFD_CMD_BASE = 0x80


def _io(nr: int) -> int:
    return (IOMMUFD_TYPE << 8) | nr


IOMMU_DESTROY = _io(IOMMUFD_CMD_BASE + 0)
IOMMU_IOAS_ALLOC = _io(IOMMUFD_CMD_BASE + 1)
IOMMU_IOAS_IOVA_RANGES = _io(IOMMUFD_CMD_BASE + 4)
IOMMU_IOAS_MAP = _io(IOMMUFD_CMD_BASE + 5)
IOMMU_IOAS_UNMAP = _io(IOMMUFD_CMD_BASE + 6)

# enum iommufd_ioas_map_flags
IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2


class iommu_destroy(ctypes.Structure):  # noqa: N801  (the header's names)
    _fields_ = (("size", ctypes.c_uint32), ("id", ctypes.c_uint32))


class iommu_ioas_alloc(ctypes.Structure):  # noqa: N801
    _fields_ = (("size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("out_ioas_id", ctypes.c_uint32))


class iommu_iova_range(ctypes.Structure):  # noqa: N801
    _fields_ = (("start", ctypes.c_uint64), ("last", ctypes.c_uint64))


class iommu_ioas_iova_ranges(ctypes.Structure):  # noqa: N801
    """``allowed_iovas`` points at an array of :class:`iommu_iova_range`, ``num_iovas`` long."""

    _fields_ = (
        ("size", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("num_iovas", ctypes.c_uint32),
        ("__reserved", ctypes.c_uint32),
        ("allowed_iovas", ctypes.c_uint64),
        ("out_iova_alignment", ctypes.c_uint64),
    )


class iommu_ioas_map(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("__reserved", ctypes.c_uint32),
        ("user_va", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
    )


class iommu_ioas_unmap(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("size", ctypes.c_uint32),
        ("ioas_id", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
    )


STRUCTS: tuple[type[ctypes.Structure], ...] = (
    iommu_destroy,
    iommu_ioas_alloc,
    iommu_iova_range,
    iommu_ioas_iova_ranges,
    iommu_ioas_map,
    iommu_ioas_unmap,
)
IOCTLS = {
    "IOMMU_DESTROY": IOMMU_DESTROY,
    "IOMMU_IOAS_ALLOC": IOMMU_IOAS_ALLOC,
    "IOMMU_IOAS_IOVA_RANGES": IOMMU_IOAS_IOVA_RANGES,
    "IOMMU_IOAS_MAP": IOMMU_IOAS_MAP,
    "IOMMU_IOAS_UNMAP": IOMMU_IOAS_UNMAP,
}
# vfio_uapi.ioctl names the failing call in its error; teach it these.
vfio_uapi.IOCTL_NAMES.update({v: k for k, v in IOCTLS.items()})
