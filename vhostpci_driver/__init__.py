"""vhostpci_driver: a userspace driver toolkit for the vhost-pci device.

Runs inside the device VM: binds the vhost-pci PCI function (VFIO, UIO or
vfio-user), serves its controlq, acks every message by request id on the ackq,
and lets applications run the driver VM's frontend rings through the remote
window. See docs/protocol.md for the wire contract.
"""

from vhostpci_driver.errors import (
    DeviceError,
    FrontendGoneError,
    ProtocolError,
    RemoteMemoryError,
    RingError,
    TransportError,
    VhostPciError,
)

__version__ = "0.1.0"

__all__ = [
    "DeviceError",
    "FrontendGoneError",
    "ProtocolError",
    "RemoteMemoryError",
    "RingError",
    "TransportError",
    "VhostPciError",
    "__version__",
]
