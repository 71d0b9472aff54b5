"""The kernel VFIO backend: one object per kernel handle, over either of the kernel's two interfaces.

Group interface (Documentation/driver-api/vfio.rst): open the container, check
the API version and the IOMMU extension, open the function's group (or its
``noiommu-N`` node), check it is viable, attach it to the container, set the
IOMMU type (type1v2, or no-IOMMU), get the device fd.

Device cdev interface (Documentation/userspace-api/iommufd.rst, Linux 6.6+):
open ``/dev/vfio/devices/vfioN`` and ``/dev/iommu``, bind the device to the
iommufd, allocate an I/O address space (IOAS), attach the device to it; DMA
maps go to the IOAS at fixed IOVAs. Chosen when the kernel offers it
(``interface="auto"``), or insisted on.

An ExitStack undoes the steps already taken when a later one fails, and
:meth:`VfioFunction.close` undoes all of them in reverse, DMA maps first.

No-IOMMU mode (group interface only: the kernel makes no cdev for such a
function) has no DMA mapping: the device sees physical addresses, read from
``/proc/self/pagemap`` (needs CAP_SYS_ADMIN; the DMA pool must be physically
contiguous, hence huge pages). Debian's packaged kernels have neither no-IOMMU
nor the cdev path; the VM tier runs all three (type1v2 and cdev behind a
virtual IOMMU, no-IOMMU without one) on kernels built by tools/vm/.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
from pathlib import Path

from vhostpci_driver.addr import Iova
from vhostpci_driver.errors import TransportError
from vhostpci_driver.pci import iommufd_uapi as iu
from vhostpci_driver.pci import sysfs
from vhostpci_driver.pci import vfio_uapi as u
from vhostpci_driver.pci.dma import PAGEMAP_PRESENT, physical_address, physical_iova, virtual_address
from vhostpci_driver.pci.function import IrqInfo, PciFunction, RegionInfo, SparseArea
from vhostpci_driver.spec import vfio as sv

# The pagemap helpers moved to dma.py (UIO needs them too); still importable from here.
__all__ = ["INTERFACES", "PAGEMAP_PRESENT", "VfioFunction", "physical_address"]

#: ``auto``: the device cdev where the kernel made one, else the group; or insist on one.
INTERFACES = ("auto", "cdev", "group")


class VfioFunction(PciFunction):
    """A PCI function bound to vfio-pci, opened through /dev/vfio."""

    def __init__(
        self, address: str, *, sysfs_root: str = "/sys", dev_root: str = "/dev", interface: str = "auto"
    ) -> None:
        if interface not in INTERFACES:
            raise TransportError(
                f"VFIO interface {interface!r} is not one of {', '.join(INTERFACES)}", "interface"
            )
        self.address = sysfs.parse_address(address)
        #: which kernel interface is in use: "cdev" (iommufd) or "group" (container)
        self.interface = "group"
        self.noiommu = False
        self.ioas = 0
        self._stack = contextlib.ExitStack()
        self._dma: dict[int, int] = {}
        self._maps: list[mmap.mmap] = []
        self._regions: dict[int, tuple[RegionInfo, int]] = {}
        self._request_fd: int | None = None
        self._closed = False
        try:
            self._open(sysfs_root, Path(dev_root), interface)
        except BaseException:
            self._stack.close()
            self._closed = True
            raise

    @property
    def backend(self) -> str:
        return "vfio-noiommu" if self.noiommu else f"vfio-{self.interface}"

    def _fd(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise TransportError(f"cannot open {path}: {e.strerror}", "open") from None
        self._stack.callback(os.close, fd)
        return fd

    def _open(self, root: str, dev: Path, interface: str) -> None:
        pci = sysfs.info(self.address, root)
        if pci.driver != "vfio-pci":
            raise TransportError(
                f"{self.address} is bound to {pci.driver or 'no driver'}, not vfio-pci; "
                f"run 'vhostpci bind {self.address}'",
                "driver",
            )
        if pci.iommu_group is None:
            raise TransportError(
                f"{self.address} has no IOMMU group: enable the IOMMU (intel_iommu=on) "
                "or VFIO's no-IOMMU mode",
                "iommu_group",
            )
        cdev = sysfs.vfio_cdev(self.address, root)
        have_iommufd = (dev / "iommu").exists()
        if interface == "cdev" and (cdev is None or not have_iommufd):
            raise TransportError(
                f"{self.address} has no VFIO device cdev and iommufd "
                f"({'no vfio-dev/ entry in sysfs' if cdev is None else f'no {dev}/iommu'}): the kernel "
                "needs CONFIG_VFIO_DEVICE_CDEV and CONFIG_IOMMUFD, and no-IOMMU functions have none; "
                "use the group interface",
                "interface",
            )
        if cdev is not None and have_iommufd and interface != "group":
            self._open_cdev(dev / "vfio/devices" / cdev, dev / "iommu")
        else:
            self._open_group(root, dev / "vfio", pci.iommu_group)
        dinfo = u.vfio_device_info(argsz=ctypes.sizeof(u.vfio_device_info))
        u.ioctl(self.device, u.VFIO_DEVICE_GET_INFO, dinfo)
        if not dinfo.flags & sv.VFIO_DEVICE_FLAGS_PCI:
            raise TransportError("the VFIO device is not a PCI device", "VFIO_DEVICE_GET_INFO")
        self.num_regions, self.num_irqs = dinfo.num_regions, dinfo.num_irqs
        #: the kernel can reset the function (FLR, PM or bus reset; vfio.h VFIO_DEVICE_FLAGS_RESET)
        self.can_reset = bool(dinfo.flags & sv.VFIO_DEVICE_FLAGS_RESET)

    def _open_group(self, root: str, vfio: Path, group_id: int) -> None:
        noiommu_node = vfio / f"noiommu-{group_id}"
        self.noiommu = noiommu_node.exists()
        container = self.container = self._fd(vfio / "vfio")
        if u.ioctl(container, u.VFIO_GET_API_VERSION) != sv.VFIO_API_VERSION:
            raise TransportError("unknown VFIO API version", "VFIO_GET_API_VERSION")
        iommu = sv.VFIO_NOIOMMU_IOMMU if self.noiommu else sv.VFIO_TYPE1v2_IOMMU
        if not u.ioctl(container, u.VFIO_CHECK_EXTENSION, iommu):
            raise TransportError(f"the kernel does not offer IOMMU type {iommu}", "VFIO_CHECK_EXTENSION")
        group = self.group = self._fd(noiommu_node if self.noiommu else vfio / str(group_id))
        status = u.vfio_group_status(argsz=ctypes.sizeof(u.vfio_group_status))
        u.ioctl(group, u.VFIO_GROUP_GET_STATUS, status)
        if not status.flags & sv.VFIO_GROUP_FLAGS_VIABLE:
            others = [a for a in sysfs.group_members(group_id, root) if a != self.address]
            raise TransportError(
                f"IOMMU group {group_id} is not viable: bind every device in it to "
                f"vfio-pci (it also holds {', '.join(others) or 'other devices'})",
                "group",
            )
        fd_arg = ctypes.c_int32(container)
        u.ioctl(group, u.VFIO_GROUP_SET_CONTAINER, fd_arg)
        self._stack.callback(self._unset_container)
        u.ioctl(container, u.VFIO_SET_IOMMU, iommu)
        name = ctypes.create_string_buffer(self.address.encode())
        self.device = u.ioctl(group, u.VFIO_GROUP_GET_DEVICE_FD, name)
        self._stack.callback(os.close, self.device)

    def _open_cdev(self, node: Path, iommu: Path) -> None:
        """iommufd.rst, "VFIO device cdev": bind, allocate an IOAS, attach; each undone on failure."""
        self.interface = "cdev"
        self.device = self._fd(node)  # closing it unbinds the device from the iommufd
        self.iommufd = self._fd(iommu)
        bind = u.vfio_device_bind_iommufd(
            argsz=ctypes.sizeof(u.vfio_device_bind_iommufd), iommufd=self.iommufd
        )
        u.ioctl(self.device, u.VFIO_DEVICE_BIND_IOMMUFD, bind)
        alloc = iu.iommu_ioas_alloc(size=ctypes.sizeof(iu.iommu_ioas_alloc))
        u.ioctl(self.iommufd, iu.IOMMU_IOAS_ALLOC, alloc)
        self.ioas = alloc.out_ioas_id
        self._stack.callback(self._destroy_ioas)
        attach = u.vfio_device_attach_iommufd_pt(
            argsz=ctypes.sizeof(u.vfio_device_attach_iommufd_pt), pt_id=self.ioas
        )
        u.ioctl(self.device, u.VFIO_DEVICE_ATTACH_IOMMUFD_PT, attach)
        self._stack.callback(self._detach_ioas)

    def _detach_ioas(self) -> None:
        detach = u.vfio_device_detach_iommufd_pt(argsz=ctypes.sizeof(u.vfio_device_detach_iommufd_pt))
        with contextlib.suppress(TransportError):
            u.ioctl(self.device, u.VFIO_DEVICE_DETACH_IOMMUFD_PT, detach)

    def _destroy_ioas(self) -> None:
        with contextlib.suppress(TransportError):
            u.ioctl(
                self.iommufd,
                iu.IOMMU_DESTROY,
                iu.iommu_destroy(size=ctypes.sizeof(iu.iommu_destroy), id=self.ioas),
            )

    def _unset_container(self) -> None:
        with contextlib.suppress(TransportError):
            u.ioctl(self.group, u.VFIO_GROUP_UNSET_CONTAINER)

    # -- regions -------------------------------------------------------------------

    def _region(self, index: int) -> tuple[RegionInfo, int]:
        if index in self._regions:
            return self._regions[index]
        if not 0 <= index < self.num_regions:
            raise TransportError(f"no region {index}", "VFIO_DEVICE_GET_REGION_INFO")
        size = ctypes.sizeof(u.vfio_region_info)
        for _ in range(3):
            buf = (ctypes.c_char * size)()
            head = u.vfio_region_info.from_buffer(buf)
            head.argsz, head.index = size, index
            u.ioctl(self.device, u.VFIO_DEVICE_GET_REGION_INFO, buf)
            if head.argsz <= size:
                break
            size = head.argsz  # vfio.h: the capability chain needs more room; ask again
        areas = self._sparse(bytes(buf), head) if head.flags & sv.VFIO_REGION_INFO_FLAG_CAPS else ()
        info = RegionInfo(index, head.size, bool(head.flags & sv.VFIO_REGION_INFO_FLAG_READ),
                          bool(head.flags & sv.VFIO_REGION_INFO_FLAG_WRITE),
                          bool(head.flags & sv.VFIO_REGION_INFO_FLAG_MMAP), areas)  # fmt: skip
        self._regions[index] = (info, head.offset)
        return info, head.offset

    @staticmethod
    def _sparse(raw: bytes, head: u.vfio_region_info) -> tuple[SparseArea, ...]:
        off, seen, areas = head.cap_offset, 0, []
        while off and seen < 16 and off + 8 <= len(raw):
            seen += 1
            cap_id, _ver, nxt = struct.unpack_from("<HHI", raw, off)
            if cap_id == sv.VFIO_REGION_INFO_CAP_SPARSE_MMAP and off + 16 <= len(raw):
                (nr,) = struct.unpack_from("<I", raw, off + 8)
                for i in range(min(nr, (len(raw) - off - 16) // 16)):
                    o, s = struct.unpack_from("<QQ", raw, off + 16 + 16 * i)
                    areas.append(SparseArea(o, s))
            if nxt <= off:
                break
            off = nxt
        return tuple(areas)

    def region_info(self, index: int) -> RegionInfo:
        return self._region(index)[0]

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        info, base = self._region(index)
        if offset < 0 or offset + size > info.size:
            raise TransportError(f"{size} bytes at {offset:#x} outside region {index}", "pread")
        data = os.pread(self.device, size, base + offset)
        if len(data) != size:
            raise TransportError(f"short read of region {index}", "pread")
        return data

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        info, base = self._region(index)
        if offset < 0 or offset + len(data) > info.size:
            raise TransportError(f"{len(data)} bytes at {offset:#x} outside region {index}", "pwrite")
        if os.pwrite(self.device, data, base + offset) != len(data):
            raise TransportError(f"short write to region {index}", "pwrite")

    def config_read(self, offset: int, size: int) -> bytes:
        return self.region_read(sv.VFIO_PCI_CONFIG_REGION_INDEX, offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        self.region_write(sv.VFIO_PCI_CONFIG_REGION_INDEX, offset, data)

    def region_mmap(self, index: int, offset: int, size: int) -> mmap.mmap:
        info, base = self._region(index)
        areas = info.sparse or (SparseArea(0, info.size),)
        if not info.mmappable or not any(
            a.offset <= offset and offset + size <= a.offset + a.size for a in areas
        ):
            raise TransportError(f"{size:#x} bytes at {offset:#x} of region {index} are not mappable", "mmap")
        try:
            mm = mmap.mmap(
                self.device, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=base + offset
            )
        except OSError as e:
            raise TransportError(f"mmap of region {index} failed: {e.strerror}", "mmap") from None
        self._maps.append(mm)
        return mm

    # -- interrupts --------------------------------------------------------------------

    def irq_info(self, index: int) -> IrqInfo:
        i = u.vfio_irq_info(argsz=ctypes.sizeof(u.vfio_irq_info), index=index)
        u.ioctl(self.device, u.VFIO_DEVICE_GET_IRQ_INFO, i)
        return IrqInfo(index, i.count, bool(i.flags & sv.VFIO_IRQ_INFO_EVENTFD))

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        size = ctypes.sizeof(u.vfio_irq_set) + 4 * len(fds)
        buf = (ctypes.c_char * size)()
        head = u.vfio_irq_set.from_buffer(buf)
        head.argsz, head.index, head.start, head.count = size, index, start, len(fds)
        head.flags = sv.VFIO_IRQ_SET_DATA_EVENTFD | sv.VFIO_IRQ_SET_ACTION_TRIGGER
        struct.pack_into(f"<{len(fds)}i", buf, ctypes.sizeof(u.vfio_irq_set), *fds)
        u.ioctl(self.device, u.VFIO_DEVICE_SET_IRQS, buf)

    def disable_irqs(self, index: int) -> None:
        head = u.vfio_irq_set(
            argsz=ctypes.sizeof(u.vfio_irq_set),
            index=index,
            flags=sv.VFIO_IRQ_SET_DATA_NONE | sv.VFIO_IRQ_SET_ACTION_TRIGGER,
        )
        u.ioctl(self.device, u.VFIO_DEVICE_SET_IRQS, head)

    # -- DMA -------------------------------------------------------------------------

    def iova_for(self, vaddr_view: memoryview, proposed: Iova) -> Iova:
        if not self.noiommu:
            return proposed
        # No IOMMU: the device sees physical addresses, and the buffer must be contiguous.
        return physical_iova(vaddr_view)

    def dma_map(self, fd: int, fd_offset: int, vaddr_view: memoryview, iova: Iova) -> None:
        if self.noiommu:
            return
        if self.interface == "cdev":
            self._ioas_map(vaddr_view, iova)
        else:
            m = u.vfio_iommu_type1_dma_map(
                argsz=ctypes.sizeof(u.vfio_iommu_type1_dma_map),
                flags=sv.VFIO_DMA_MAP_FLAG_READ | sv.VFIO_DMA_MAP_FLAG_WRITE,
                vaddr=virtual_address(vaddr_view),
                iova=iova,
                size=len(vaddr_view),
            )
            u.ioctl(self.container, u.VFIO_IOMMU_MAP_DMA, m)
        self._dma[iova] = len(vaddr_view)

    def _ioas_map(self, vaddr_view: memoryview, iova: Iova) -> None:
        im = iu.iommu_ioas_map(
            size=ctypes.sizeof(iu.iommu_ioas_map),
            flags=iu.IOMMU_IOAS_MAP_FIXED_IOVA | iu.IOMMU_IOAS_MAP_READABLE | iu.IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id=self.ioas,
            user_va=virtual_address(vaddr_view),
            length=len(vaddr_view),
            iova=iova,
        )
        try:
            u.ioctl(self.iommufd, iu.IOMMU_IOAS_MAP, im)
        except TransportError as e:
            # A fixed IOVA in a reserved window (the MSI range, say) is refused with a bare
            # errno; name the windows this IOAS does allow.
            ranges = ", ".join(f"{a:#x}-{b:#x}" for a, b in self.allowed_iovas())
            raise TransportError(
                f"IOVA {iova:#x} (+{len(vaddr_view):#x}) refused: {e}; this IOAS allows {ranges}",
                "IOMMU_IOAS_MAP",
            ) from None

    def allowed_iovas(self) -> list[tuple[int, int]]:
        """The IOAS's usable IOVA ranges, first to last byte (cdev only; IOMMU_IOAS_IOVA_RANGES).

        The kernel says how many ranges there are when the array is too small
        (iommufd.h); asked at most three times, in case they change in between.
        """
        if self.interface != "cdev":
            return []
        count = 0
        for _ in range(3):
            ranges = (iu.iommu_iova_range * max(count, 1))()
            q = iu.iommu_ioas_iova_ranges(
                size=ctypes.sizeof(iu.iommu_ioas_iova_ranges),
                ioas_id=self.ioas,
                num_iovas=count,
                allowed_iovas=ctypes.addressof(ranges),
            )
            try:
                u.ioctl(self.iommufd, iu.IOMMU_IOAS_IOVA_RANGES, q)
            except TransportError:
                if q.num_iovas <= count or q.num_iovas > 4096:
                    raise
                count = q.num_iovas
                continue
            return [(r.start, r.last) for r in ranges[: q.num_iovas]]
        raise TransportError("the IOAS's IOVA ranges kept changing", "IOMMU_IOAS_IOVA_RANGES")

    def dma_unmap(self, iova: Iova, size: int) -> None:
        if self.noiommu:
            return
        if self.interface == "cdev":
            um = iu.iommu_ioas_unmap(
                size=ctypes.sizeof(iu.iommu_ioas_unmap), ioas_id=self.ioas, iova=iova, length=size
            )
            u.ioctl(self.iommufd, iu.IOMMU_IOAS_UNMAP, um)
        else:
            m = u.vfio_iommu_type1_dma_unmap(
                argsz=ctypes.sizeof(u.vfio_iommu_type1_dma_unmap), iova=iova, size=size
            )
            u.ioctl(self.container, u.VFIO_IOMMU_UNMAP_DMA, m)
        self._dma.pop(iova, None)

    def removal_fd(self) -> int | None:
        if (
            self._request_fd is None
            and self.num_irqs > sv.VFIO_PCI_REQ_IRQ_INDEX
            and self.irq_info(sv.VFIO_PCI_REQ_IRQ_INDEX).count
        ):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._stack.callback(os.close, fd)
            self.set_irq_eventfds(sv.VFIO_PCI_REQ_IRQ_INDEX, 0, [fd])
            self._stack.callback(self._quietly_disable, sv.VFIO_PCI_REQ_IRQ_INDEX)
            self._request_fd = fd
        return self._request_fd

    def _quietly_disable(self, index: int) -> None:
        with contextlib.suppress(TransportError):
            self.disable_irqs(index)

    def reset(self) -> None:
        if not self.can_reset:
            # vfio-pci answers EINVAL; say why instead.
            raise TransportError(
                f"{self.address} offers no function reset (no FLR, PM or bus reset): "
                "reset the device through its virtio status register",
                "VFIO_DEVICE_RESET",
            )
        u.ioctl(self.device, u.VFIO_DEVICE_RESET)

    def close(self) -> None:
        """DMA maps, region maps, then the steps of either interface in reverse; idempotent."""
        if self._closed:
            return
        self._closed = True
        for iova, size in list(self._dma.items()):
            with contextlib.suppress(TransportError):
                self.dma_unmap(Iova(iova), size)
        for mm in self._maps:
            with contextlib.suppress(BufferError):
                mm.close()
        self._maps.clear()
        self._stack.close()
