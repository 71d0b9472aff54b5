"""The Linux VFIO uAPI (``include/uapi/linux/vfio.h``): its structures and ioctls, in header order.

The header's plain values (flags, region and irq indices) are in
:mod:`vhostpci_driver.spec.vfio`, which the vfio-user side shares. Structures
are ctypes ``Structure`` with ``_fields_`` as the header writes them; ioctl
numbers are computed as the header computes them, ``_IO(VFIO_TYPE, VFIO_BASE +
n)``. tests/unit/test_vfio_uapi.py compiles a C program against the installed
header and checks every size, offset, number and value of both. Higher layers
never build these by hand. :func:`ioctl` is the one call into the kernel: it
returns the ioctl's own return value (``VFIO_GROUP_GET_DEVICE_FD`` returns the
new fd; Python's ``fcntl.ioctl`` would hide it behind a buffer) and raises
:class:`TransportError` naming the ioctl.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from vhostpci_driver.errors import TransportError

VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _io(nr: int) -> int:
    """``_IO(type, nr)`` of asm-generic/ioctl.h: no direction, no size bits."""
    return (VFIO_TYPE << 8) | nr


VFIO_GET_API_VERSION = _io(VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _io(VFIO_BASE + 1)
VFIO_SET_IOMMU = _io(VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _io(VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _io(VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _io(VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _io(VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO = _io(VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _io(VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _io(VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _io(VFIO_BASE + 10)
VFIO_DEVICE_RESET = _io(VFIO_BASE + 11)
VFIO_IOMMU_GET_INFO = _io(VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = _io(VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _io(VFIO_BASE + 14)
# The device cdev (/dev/vfio/devices/vfioN), bound to an iommufd instead of a group (Linux 6.6+).
VFIO_DEVICE_BIND_IOMMUFD = _io(VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _io(VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _io(VFIO_BASE + 20)

# The header's flags and indices are plain values: vhostpci_driver.spec.vfio declares them.


class vfio_info_cap_header(ctypes.Structure):  # noqa: N801  (the header's names)
    _fields_ = (("id", ctypes.c_uint16), ("version", ctypes.c_uint16), ("next", ctypes.c_uint32))


class vfio_group_status(ctypes.Structure):  # noqa: N801
    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32))


class vfio_device_info(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("num_regions", ctypes.c_uint32),
        ("num_irqs", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
    )


class vfio_region_info(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
    )


class vfio_region_sparse_mmap_area(ctypes.Structure):  # noqa: N801
    _fields_ = (("offset", ctypes.c_uint64), ("size", ctypes.c_uint64))


class vfio_region_info_cap_sparse_mmap(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("header", vfio_info_cap_header),
        ("nr_areas", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    )


class vfio_irq_info(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    )


class vfio_irq_set(ctypes.Structure):  # noqa: N801
    """The fixed part; ``data`` (s32 eventfds, or u8 bools) follows it."""

    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("start", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    )


class vfio_iommu_type1_info(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova_pgsizes", ctypes.c_uint64),
        ("cap_offset", ctypes.c_uint32),
    )


class vfio_iommu_type1_dma_map(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("vaddr", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    )


class vfio_iommu_type1_dma_unmap(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    )


class vfio_device_bind_iommufd(ctypes.Structure):  # noqa: N801
    """Linux 7.2's layout; older kernels take the shorter prefix (``argsz`` says how much)."""

    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iommufd", ctypes.c_int32),
        ("out_devid", ctypes.c_uint32),
        ("token_uuid_ptr", ctypes.c_uint64),
    )


class vfio_device_attach_iommufd_pt(ctypes.Structure):  # noqa: N801
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pt_id", ctypes.c_uint32),
        ("pasid", ctypes.c_uint32),
    )


class vfio_device_detach_iommufd_pt(ctypes.Structure):  # noqa: N801
    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("pasid", ctypes.c_uint32))


STRUCTS: tuple[type[ctypes.Structure], ...] = (
    vfio_info_cap_header,
    vfio_group_status,
    vfio_device_info,
    vfio_region_info,
    vfio_region_sparse_mmap_area,
    vfio_region_info_cap_sparse_mmap,
    vfio_irq_info,
    vfio_irq_set,
    vfio_iommu_type1_info,
    vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap,
)
#: Tails newer headers added that we leave off: every VFIO call passes ``argsz``, and the
#: kernel reads only what it says (vfio.h), so the older, shorter layout stays valid.
#: (Linux 6.2 added ``pad`` to vfio_device_info.)
HEADER_TAILS = {"vfio_device_info": 4}
#: The cdev structures: in headers from Linux 6.6 on (the test checks them where the header has them).
CDEV_STRUCTS: tuple[type[ctypes.Structure], ...] = (
    vfio_device_bind_iommufd,
    vfio_device_attach_iommufd_pt,
    vfio_device_detach_iommufd_pt,
)
CDEV_IOCTLS = ("VFIO_DEVICE_BIND_IOMMUFD", "VFIO_DEVICE_ATTACH_IOMMUFD_PT", "VFIO_DEVICE_DETACH_IOMMUFD_PT")
IOCTLS = {name: value for name, value in globals().items() if name.startswith("VFIO_") and name[5:6].isupper()
          and isinstance(value, int) and (value >> 8) == VFIO_TYPE}  # fmt: skip

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int

IOCTL_NAMES = {v: k for k, v in IOCTLS.items()}


def ioctl(
    fd: int,
    request: int,
    arg: ctypes.Structure | ctypes.Array[ctypes.c_char] | ctypes.c_int32 | int | None = None,
) -> int:
    """Call ``ioctl(fd, request, arg)``; a struct or buffer goes by pointer, an int by value."""
    if arg is None or isinstance(arg, int):
        ptr: ctypes.c_void_p | int = ctypes.c_void_p(arg or 0)
    else:
        ptr = ctypes.addressof(arg)
    ret = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise TransportError(os.strerror(err), IOCTL_NAMES.get(request, f"ioctl {request:#x}"))
    return int(ret)
