"""The toolkit's error hierarchy.

Every failure that crosses a public API is one of these, and each carries the
field, register or ring rule it is about, so a log line names the culprit.
Nothing from deep inside (``struct.error``, ``IndexError``, a bare ``OSError``)
is allowed to escape: the layer that sees it wraps it here.
"""

from __future__ import annotations

import enum


class VhostPciError(Exception):
    """Base of every error the toolkit raises on purpose."""


class FailReason(enum.IntEnum):
    """Why a controlq message was refused; carried in ``ACK.reason`` (protocol.md, 4.5)."""

    NONE = 0
    MALFORMED = 1  # the payload does not parse (wrong length, count, reserved bits)
    BAD_VERSION = 2  # header version is not 1
    UNKNOWN_TYPE = 3  # header type is not a controlq type
    DUPLICATE_ID = 4  # request id already seen on this device
    OVERLAP = 5  # a region overlaps another (xgpa or window)
    OUT_OF_WINDOW = 6  # a region does not lie inside the remote window
    IN_USE = 7  # memory still used by a live frontend's rings
    NOT_FOUND = 8  # DEL of a region or frontend that does not exist
    RING_OUTSIDE_MEMORY = 9  # a DEVICE_INFO ring does not lie in mapped memory
    LIMIT = 10  # a count exceeds a device limit (regions, frontends, virtqueues)
    EXISTS = 11  # ADD of a frontend that already exists
    BAD_RING = 12  # a DEVICE_INFO virtqueue is invalid (size, index, alignment)
    REJECTED = 13  # the app serving the frontend refused it
    BAD_FD = 14  # server socket: an fd is not what its slot allows (protocol.md 7.1)


class ProtocolError(VhostPciError):
    """A message (controlq, ackq, server socket, vfio-user) is malformed.

    ``field`` names the offending field (``"MEMORY_INFO.regions[2].size"``),
    ``reason`` is the FAIL reason an ack would carry for it.
    """

    def __init__(self, field: str, message: str, reason: FailReason = FailReason.MALFORMED) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = reason


class RingError(VhostPciError):
    """A virtqueue broke a rule (virtio 1.2, 2.7); the queue is marked broken.

    ``rule`` is a short stable name (``"desc-index"``, ``"chain-length"``, ...),
    ``index`` the descriptor or ring index involved, when there is one.
    """

    def __init__(self, rule: str, message: str, index: int | None = None) -> None:
        where = f" (index {index})" if index is not None else ""
        super().__init__(f"{rule}: {message}{where}")
        self.rule = rule
        self.index = index


class RemoteMemoryError(VhostPciError):
    """An address range is not (or cannot be) mapped in the remote window.

    ``reason`` says which region-table rule refused it, for the FAIL ack.
    """

    def __init__(self, message: str, reason: FailReason = FailReason.OUT_OF_WINDOW) -> None:
        super().__init__(message)
        self.reason = reason


class TransportError(VhostPciError):
    """The PCI function or its transport (VFIO, UIO, vfio-user, virtio-pci) failed.

    ``register`` names the register, ioctl or message involved when there is one.
    """

    def __init__(self, message: str, register: str | None = None) -> None:
        super().__init__(f"{register}: {message}" if register else message)
        self.register = register


class DeviceError(VhostPciError):
    """The vhost-pci device as a whole is unusable (needs reset, gone, closed)."""


class FrontendGoneError(DeviceError):
    """The frontend was removed (DEVICE_INFO DEL or remote down) while in use."""


class FeaturesRefusedError(VhostPciError):
    """An app cannot serve a frontend with the features it offers (a bit it requires is missing).

    Raised by a feature policy; the engine acks the FEATURE_BITS ``ADD_FAIL``
    with reason ``REJECTED`` and the frontend is never started.
    """
