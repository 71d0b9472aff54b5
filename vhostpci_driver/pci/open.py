"""Choosing a backend from an address: ``vfio-user:/path.sock`` or a PCI address."""

from __future__ import annotations

import os

from vhostpci_driver.errors import TransportError
from vhostpci_driver.pci.function import PciFunction

VFIO_USER = "vfio-user:"
#: what ``prefer`` may say: pick by the bound driver, or insist on one kernel backend
#: (``vfio`` takes the device cdev + iommufd where the kernel offers it, else the group;
#: ``vfio-cdev`` and ``vfio-group`` insist on one of VFIO's two interfaces)
BACKENDS = ("auto", "vfio", "vfio-cdev", "vfio-group", "uio")


def normalize_address(address: str) -> str:
    """The one spelling of a device address: ``0000:00:05.0``, or ``vfio-user:`` and a real path.

    ``00:05.0`` gets its domain; a vfio-user path is made absolute with ``..`` and
    symlinks resolved, so one device has one name (the "already serving" check and
    the status socket's name rely on it).
    """
    if address.startswith(VFIO_USER):
        path = address[len(VFIO_USER) :]
        if not path:
            raise TransportError("vfio-user: needs a socket path", "address")
        return VFIO_USER + os.path.realpath(path)
    from vhostpci_driver.pci.sysfs import parse_address  # noqa: PLC0415

    try:
        return parse_address(address)
    except TransportError:
        raise TransportError(
            f"{address!r} is neither a PCI address (0000:00:05.0) nor vfio-user:/path.sock", "address"
        ) from None


def open_function(address: str, *, prefer: str = "auto", sysfs_root: str | None = None) -> PciFunction:
    """Open ``address`` with the right backend.

    ``vfio-user:PATH`` attaches a device served on a UNIX socket. A PCI address
    (``0000:00:05.0``) uses kernel VFIO, or UIO when the function is bound to
    ``uio_pci_generic``; ``prefer="vfio"`` or ``"uio"`` insists on one (and the
    backend explains how to bind the function if it is bound elsewhere).
    VFIO opens through the device cdev and iommufd where the kernel offers them,
    else through the group; ``"vfio-cdev"`` or ``"vfio-group"`` insists.
    """
    if prefer not in BACKENDS:
        raise TransportError(f"backend {prefer!r} is not one of {', '.join(BACKENDS)}", "backend")
    if address.startswith(VFIO_USER):
        if prefer != "auto":
            raise TransportError(
                f"{address} is served over vfio-user; the {prefer} backend is for PCI addresses", "backend"
            )
        from vhostpci_driver.pci.vfio_user_client import VfioUserFunction  # noqa: PLC0415

        return VfioUserFunction(normalize_address(address)[len(VFIO_USER) :])
    addr = normalize_address(address)
    from vhostpci_driver.pci import sysfs  # noqa: PLC0415  (sysfs and ioctls only when asked for)

    root = sysfs_root or sysfs.default_root()
    info = sysfs.info(addr, root)
    if prefer == "uio" or (prefer == "auto" and info.driver == "uio_pci_generic"):
        from vhostpci_driver.pci.uio import UioFunction  # noqa: PLC0415

        return UioFunction(addr, sysfs_root=root)
    from vhostpci_driver.pci.vfio import VfioFunction  # noqa: PLC0415

    interface = {"vfio-cdev": "cdev", "vfio-group": "group"}.get(prefer, "auto")
    return VfioFunction(addr, sysfs_root=root, interface=interface)
