"""PCI functions in sysfs: finding them, their IOMMU group, binding them to a driver and back.

Every function takes ``root`` (default ``/sys``) so tests run against a fake tree.
Reads go through one interface, pyudev's ``Device`` (``sys_name``, ``sys_path``,
``driver``, ``attributes.get``): on the real ``/sys`` that is pyudev itself; under
another root it is :class:`TreeDevice`, the same surface over plain files, because
libudev (sd-device) refuses a syspath outside ``/sys``. Everything above
:func:`device` is one code path for both.

Binding uses ``driver_override`` (not ``new_id``, which would grab every device
with that id): write the driver's name to ``driver_override``, unbind from the
current driver, ask ``drivers_probe``. The previous driver is remembered in a
state file so :func:`unbind` puts the function back where it was. Each returns the
writes it made, in order, so callers can show them (and tests can check them).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vhostpci_driver.errors import TransportError
from vhostpci_driver.spec.virtio_pci import VIRTIO_PCI_VENDOR

PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$")
DRIVERS = ("vfio-pci", "uio_pci_generic")
#: the kernel's own driver of a virtio function (what 'unbind' gives a function back to by default)
VIRTIO_DRIVER = "virtio-pci"
IFF_UP = 0x1  # include/uapi/linux/if.h


def default_root() -> str:
    """``$VHOSTPCI_SYSFS_ROOT`` (tests point it at a fake tree), else ``/sys``."""
    return os.environ.get("VHOSTPCI_SYSFS_ROOT", "/sys")


def parse_address(address: str) -> str:
    """A full PCI address (``0000:00:05.0``), lower case; ``00:05.0`` gets domain 0000."""
    a = address.strip().lower()
    if re.match(r"^[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$", a):
        a = "0000:" + a
    if not PCI_ADDRESS.match(a):
        raise TransportError(f"{address!r} is not a PCI address like 0000:00:05.0", "address")
    return a


class Attributes(Protocol):
    """pyudev's ``Device.attributes``: a sysfs attribute's value, without its newline."""

    def get(self, name: str) -> bytes | None: ...


class SysfsDevice(Protocol):
    """The part of ``pyudev.Device`` this module reads."""

    @property
    def sys_name(self) -> str: ...
    @property
    def sys_path(self) -> str: ...
    @property
    def driver(self) -> str | None: ...
    @property
    def attributes(self) -> Attributes: ...


class _TreeAttributes:
    def __init__(self, path: Path) -> None:
        self._path = path

    def get(self, name: str) -> bytes | None:
        try:
            return (self._path / name).read_bytes().rstrip(b"\n")
        except OSError:
            return None


class TreeDevice:
    """pyudev's ``Device`` surface over a directory (a fake sysfs tree)."""

    def __init__(self, path: Path) -> None:
        self._path = path.resolve()

    @property
    def sys_name(self) -> str:
        return self._path.name

    @property
    def sys_path(self) -> str:
        return str(self._path)

    @property
    def driver(self) -> str | None:
        link = self._path / "driver"
        return link.resolve().name if link.exists() else None

    @property
    def attributes(self) -> Attributes:
        return _TreeAttributes(self._path)


def _udev() -> object:
    import pyudev  # noqa: PLC0415  (libudev is loaded only where the real sysfs is read)

    return pyudev.Context()


def device(address: str, root: str = "/sys") -> SysfsDevice:
    """The function at ``address``; TransportError if it does not exist."""
    address = parse_address(address)
    missing = TransportError(f"no PCI function {address} (is it plugged in?)", "sysfs")
    if root == "/sys":
        import pyudev  # noqa: PLC0415

        try:
            dev: SysfsDevice = pyudev.Devices.from_name(_udev(), "pci", address)
        except pyudev.DeviceNotFoundError:
            raise missing from None
        return dev
    d = _dev(root, address)
    if not d.exists():
        raise missing
    return TreeDevice(d)


def devices(root: str = "/sys") -> Iterator[SysfsDevice]:
    """Every PCI function, by address."""
    if root == "/sys":
        found: list[SysfsDevice] = list(_udev().list_devices(subsystem="pci"))  # type: ignore[attr-defined]
        yield from sorted(found, key=lambda d: d.sys_name)
        return
    base = Path(root) / "bus/pci/devices"
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        yield TreeDevice(d)


@dataclass(frozen=True)
class PciInfo:
    """One PCI function as sysfs shows it."""

    address: str
    vendor: int
    device: int
    pci_class: int
    driver: str | None
    iommu_group: int | None


def _dev(root: str, address: str) -> Path:
    return Path(root) / "bus/pci/devices" / address


def _hex(dev: SysfsDevice, name: str) -> int:
    raw = dev.attributes.get(name)
    try:
        return int(raw or b"", 16)
    except ValueError:
        raise TransportError(f"{dev.sys_path}/{name}: not a hex number: {raw!r}", "sysfs") from None


def info_of(dev: SysfsDevice) -> PciInfo:
    """What :func:`info` reads, from a device already found."""
    group = Path(dev.sys_path) / "iommu_group"
    return PciInfo(
        dev.sys_name,
        _hex(dev, "vendor"),
        _hex(dev, "device"),
        _hex(dev, "class"),
        dev.driver,
        int(os.path.basename(os.readlink(group))) if group.is_symlink() else None,
    )


def info(address: str, root: str = "/sys") -> PciInfo:
    """Read one function; TransportError if it does not exist."""
    return info_of(device(address, root))


def list_functions(
    vendor: int = VIRTIO_PCI_VENDOR, device: int | None = None, root: str = "/sys"
) -> list[PciInfo]:
    """Every function with ``vendor`` (and ``device``), sorted by address."""
    out = []
    for d in devices(root):
        i = info_of(d)
        if i.vendor == vendor and (device is None or i.device == device):
            out.append(i)
    return out


def in_use(address: str, root: str = "/sys", mounts: str = "/proc/self/mounts") -> list[str]:
    """What uses the function through its current driver (dpdk-devbind's "Active" check, widened).

    A network interface that is up, or a block device that is mounted or held
    (a RAID, LVM or dm device on top): taking the driver away would cut them off.
    """
    d = Path(device(address, root).sys_path)
    why = []
    # virtio puts them one level down (virtioN/net/eth0); other drivers directly (net/eth0)
    for iface in sorted([*d.glob("net/*"), *d.glob("*/net/*")]):
        try:
            flags = int((iface / "flags").read_text(), 16)
        except (OSError, ValueError):
            continue
        if flags & IFF_UP:
            why.append(f"network interface {iface.name} is up")
    try:
        mounted = {line.split()[0] for line in Path(mounts).read_text().splitlines() if line}
    except OSError:
        mounted = set()
    for blk in sorted([*d.glob("block/*"), *d.glob("*/block/*")]):
        parts = [blk, *(p for p in blk.iterdir() if (p / "partition").exists())]
        for part in parts:
            if f"/dev/{part.name}" in mounted:
                why.append(f"block device {part.name} is mounted")
            holders = part / "holders"
            held = sorted(h.name for h in holders.iterdir()) if holders.is_dir() else []
            if held:
                why.append(f"block device {part.name} is held by {', '.join(held)}")
    return why


def iommu_present(root: str = "/sys") -> bool:
    groups = Path(root) / "kernel/iommu_groups"
    return groups.is_dir() and any(groups.iterdir())


def noiommu_enabled(root: str = "/sys") -> bool:
    p = Path(root) / "module/vfio/parameters/enable_unsafe_noiommu_mode"
    return p.exists() and p.read_text().strip() in ("Y", "1")


def group_members(group: int, root: str = "/sys") -> list[str]:
    d = Path(root) / "kernel/iommu_groups" / str(group) / "devices"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def vfio_cdev(address: str, root: str = "/sys") -> str | None:
    """The function's VFIO device cdev (``vfio3`` for /dev/vfio/devices/vfio3), if the kernel made one.

    vfio-pci makes it when the kernel has CONFIG_VFIO_DEVICE_CDEV, as the
    ``vfio-dev/vfioN`` child of the PCI device (drivers/vfio/vfio_main.c). A
    no-IOMMU function gets that child too, but as a plain device with no char
    device behind it (drivers/vfio/vfio.h: "cdev does not support noiommu"), so
    it has no ``dev`` (major:minor) attribute: that is what tells them apart.
    """
    d = _dev(root, parse_address(address)) / "vfio-dev"
    entries = sorted(d.iterdir()) if d.is_dir() else []
    return next((p.name for p in entries if re.fullmatch(r"vfio\d+", p.name) and (p / "dev").exists()), None)


def _write(path: Path, value: str, log: list[tuple[str, str]]) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise TransportError(f"writing {value.strip()!r} to {path}: {e.strerror}", "sysfs") from None
    log.append((str(path), value))


def bind(address: str, driver: str, state_dir: Path, root: str = "/sys") -> list[tuple[str, str]]:
    """Bind ``address`` to ``driver`` through driver_override, remembering the previous driver."""
    address = parse_address(address)
    if driver not in DRIVERS:
        raise TransportError(f"driver must be one of {', '.join(DRIVERS)}", "driver")
    current = info(address, root)
    log: list[tuple[str, str]] = []
    if current.driver == driver:
        return log
    _ensure_driver(driver, root)
    state_dir.mkdir(parents=True, exist_ok=True)
    state = state_dir / f"{address}.driver"
    if not state.exists():
        state.write_text(current.driver or "")
    d = _dev(root, address)
    _write(d / "driver_override", driver, log)
    if current.driver is not None:
        _write(d / "driver" / "unbind", address, log)
    _write(Path(root) / "bus/pci/drivers_probe", address, log)
    return log


def _ensure_driver(driver: str, root: str) -> None:
    """Load the driver's module if it is not registered yet (drivers_probe would find no driver)."""
    if (Path(root) / "bus/pci/drivers" / driver).exists() or root != "/sys":
        return
    module = driver.replace("-", "_")
    out = subprocess.run(["modprobe", module], capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0 or not (Path(root) / "bus/pci/drivers" / driver).exists():
        why = out.stderr.strip() or "not registered after loading"
        raise TransportError(f"cannot load the {driver} driver (modprobe {module}: {why})", "driver")


def unbind(address: str, state_dir: Path, root: str = "/sys") -> tuple[str | None, list[tuple[str, str]]]:
    """Undo :func:`bind`: clear the override and give the function back to its previous driver."""
    address = parse_address(address)
    current = info(address, root)
    state = state_dir / f"{address}.driver"
    previous = state.read_text().strip() or None if state.exists() else None
    log: list[tuple[str, str]] = []
    d = _dev(root, address)
    _write(d / "driver_override", "\n", log)  # a newline clears the override
    if current.driver is not None:
        _write(d / "driver" / "unbind", address, log)
    if previous is not None:
        _write(Path(root) / "bus/pci/drivers" / previous / "bind", address, log)
    else:
        _write(Path(root) / "bus/pci/drivers_probe", address, log)
    if state.exists():
        state.unlink()
    return previous, log
