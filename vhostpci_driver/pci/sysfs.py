"""PCI functions in sysfs: finding them, their IOMMU group, binding them to a driver and back.

Every function takes ``root`` (default ``/sys``) so tests run against a fake tree.
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
from dataclasses import dataclass
from pathlib import Path

from vhostpci_driver.errors import TransportError
from vhostpci_driver.spec.virtio_pci import VIRTIO_PCI_VENDOR

PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$")
DRIVERS = ("vfio-pci", "uio_pci_generic")


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


def _read_hex(path: Path) -> int:
    return int(path.read_text().strip(), 16)


def info(address: str, root: str = "/sys") -> PciInfo:
    """Read one function; TransportError if it does not exist."""
    address = parse_address(address)
    d = _dev(root, address)
    if not d.exists():
        raise TransportError(f"no PCI function {address} (is it plugged in?)", "sysfs")
    driver = (d / "driver").resolve().name if (d / "driver").exists() else None
    group = int((d / "iommu_group").resolve().name) if (d / "iommu_group").exists() else None
    return PciInfo(
        address, _read_hex(d / "vendor"), _read_hex(d / "device"), _read_hex(d / "class"), driver, group
    )


def list_functions(
    vendor: int = VIRTIO_PCI_VENDOR, device: int | None = None, root: str = "/sys"
) -> list[PciInfo]:
    """Every function with ``vendor`` (and ``device``), sorted by address."""
    base = Path(root) / "bus/pci/devices"
    out = []
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        i = info(d.name, root)
        if i.vendor == vendor and (device is None or i.device == device):
            out.append(i)
    return out


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
