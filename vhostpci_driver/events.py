"""What applications are told: one frozen value per thing that happened.

The engine emits the memory, frontend and feature events; the device adds
remote up/down and device errors. Applications receive them by iteration,
callbacks or asyncio (see :class:`vhostpci_driver.device.VhostPciDevice`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from vhostpci_driver.wire.ctrl import FrontendKey, MemoryRegion, VirtqInfo


@dataclass(frozen=True)
class MemoryAdded:
    """Regions of the driver VM's memory are now translatable."""

    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True)
class MemoryRemoved:
    """Regions are gone: nothing may touch them any more."""

    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True)
class FrontendAdded:
    """A frontend's rings are set up (DEVICE_INFO ADD); it starts once its features are known."""

    key: FrontendKey
    virtqs: tuple[VirtqInfo, ...]


@dataclass(frozen=True)
class FrontendRemoved:
    """A frontend is gone (DEVICE_INFO DEL, or the remote went down)."""

    key: FrontendKey


@dataclass(frozen=True)
class FeaturesNegotiated:
    """FEATURE_BITS answered: ``accepted`` is the subset the backend will use."""

    key: FrontendKey
    offered: int
    accepted: int


@dataclass(frozen=True)
class RemoteUp:
    """The driver VM is connected (device config status REMOTE_UP set)."""

    uuid: uuid.UUID


@dataclass(frozen=True)
class RemoteDown:
    """The driver VM is gone (REMOTE_UP cleared)."""

    uuid: uuid.UUID


@dataclass(frozen=True)
class DeviceErrorEvent:
    """Something broke: a frontend ring, a controlq message, the device itself."""

    where: str
    message: str


Event = (
    MemoryAdded
    | MemoryRemoved
    | FrontendAdded
    | FrontendRemoved
    | FeaturesNegotiated
    | RemoteUp
    | RemoteDown
    | DeviceErrorEvent
)
