"""Choosing a backend from an address: ``vfio-user:/path.sock`` or a PCI address."""

from __future__ import annotations

import re

from vhostpci_driver.errors import TransportError
from vhostpci_driver.pci.function import PciFunction

PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$")
VFIO_USER = "vfio-user:"


def open_function(address: str, *, prefer: str = "auto", sysfs_root: str | None = None) -> PciFunction:
    """Open ``address`` with the right backend.

    ``vfio-user:PATH`` attaches a device served on a UNIX socket. A PCI address
    (``0000:00:05.0``) uses kernel VFIO, or UIO when ``prefer="uio"`` or the
    function is bound to ``uio_pci_generic``.
    """
    if address.startswith(VFIO_USER):
        from vhostpci_driver.pci.vfio_user_client import VfioUserFunction  # noqa: PLC0415

        path = address[len(VFIO_USER) :]
        if not path:
            raise TransportError("vfio-user: needs a socket path", "address")
        return VfioUserFunction(path)
    addr = address.lower()
    if not PCI_ADDRESS.match(addr):
        raise TransportError(
            f"{address!r} is neither a PCI address (0000:00:05.0) nor vfio-user:/path.sock", "address"
        )
    from vhostpci_driver.pci import sysfs  # noqa: PLC0415  (sysfs and ioctls only when asked for)

    root = sysfs_root or sysfs.default_root()
    info = sysfs.info(addr, root)
    if prefer == "uio" or info.driver == "uio_pci_generic":
        raise TransportError(
            f"{addr}: the UIO backend is not part of this build yet; bind it to vfio-pci", "driver"
        )
    from vhostpci_driver.pci.vfio import VfioFunction  # noqa: PLC0415

    return VfioFunction(addr, sysfs_root=root)
