"""The guest-visible vhost-pci function: IDs, features, BAR layout, ``DeviceConfig`` (protocol.md, 2-3).

Both sides import these: the reference device model builds the function from
them, the driver checks what it finds against them (it still finds every
structure through the capability list; the layout here is what *our* device
offers, not something the driver may assume).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

from vhostpci_driver.errors import TransportError
from vhostpci_driver.spec.virtio import Feature
from vhostpci_driver.spec.virtio_pci import MODERN_DEVICE_ID_BASE
from vhostpci_driver.wire.layout import WireStruct

#: The vhost-pci virtio device id. None was ever assigned upstream (the 2016
#: patches used 21, virtio-vhost-user drafts 43, crosvm 61); 63 collides with none.
DEFAULT_VIRTIO_ID = 63


def pci_device_id(virtio_id: int = DEFAULT_VIRTIO_ID) -> int:
    """PCI device id of a modern virtio device with ``virtio_id``."""
    return MODERN_DEVICE_ID_BASE + virtio_id


#: Feature bits the device offers (virtio 1.2, 6): no device-specific bits.
OFFERED_FEATURES = (1 << Feature.VERSION_1) | (1 << Feature.RING_EVENT_IDX) | (1 << Feature.ACCESS_PLATFORM)


class Queue(enum.IntEnum):
    """Virtqueue indices."""

    CONTROLQ = 0
    ACKQ = 1


class Vector(enum.IntEnum):
    """MSI-X vectors the driver assigns by convention; slots use FIRST_SLOT onwards."""

    CONFIG = 0
    CONTROLQ = 1
    ACKQ = 2
    FIRST_SLOT = 3


STATUS_REMOTE_UP = 1 << 0

VHOST_PCI_CONFIG = WireStruct(
    "vhost_pci_config",
    [
        ("remote_uuid", "16s"),
        ("window_size", "Q"),
        ("max_regions", "I"),
        ("max_frontends", "I"),
        ("max_msg_len", "I"),
        ("status", "I"),
        ("num_slots", "H"),
        ("slot_bar", "B"),
        ("reserved", "B"),
        ("doorbell_offset", "I"),
        ("vector_offset", "I"),
        ("pending_offset", "I"),
    ],
)

@dataclass(frozen=True)
class DeviceConfig:
    """``struct vhost_pci_config`` as read at bring-up (protocol.md 2.4)."""

    remote_uuid: uuid.UUID
    window_size: int
    max_regions: int
    max_frontends: int
    max_msg_len: int
    status: int
    num_slots: int
    slot_bar: int
    doorbell_offset: int
    vector_offset: int
    pending_offset: int

    @classmethod
    def decode(cls, raw: bytes) -> DeviceConfig:
        f = VHOST_PCI_CONFIG.unpack_from(raw, 0, "vhost_pci_config")
        (u, wsize, mreg, mfe, mlen, status, slots, slot_bar, _res, door, vec, pend) = f
        cfg = cls(uuid.UUID(bytes=bytes(u)), wsize, mreg, mfe, mlen, status, slots, slot_bar, door, vec, pend)
        if not 64 <= cfg.max_msg_len <= 1 << 20:
            raise TransportError(
                f"max_msg_len {cfg.max_msg_len} outside 64..1MiB", "vhost_pci_config.max_msg_len"
            )
        if cfg.num_slots > MAX_SLOTS:
            raise TransportError(
                f"{cfg.num_slots} slots, at most {MAX_SLOTS}", "vhost_pci_config.num_slots"
            )
        return cfg


# The reference device's BAR layout (after QEMU's virtio-pci layout).
BAR_VIRTIO = 0  # 32 KiB: common, ISR, device cfg, notify, notification slots
BAR_MSIX = 1  # 4 KiB: MSI-X table at 0, PBA at 0x800
BAR_WINDOW = 2  # 64-bit prefetchable: the remote window
BAR_VIRTIO_SIZE = 0x8000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_CFG_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
NOTIFY_OFF_MULTIPLIER = 4
DOORBELL_OFFSET = 0x4000
VECTOR_OFFSET = 0x5000
PENDING_OFFSET = 0x6000
BAR_MSIX_SIZE = 0x1000
MSIX_TABLE_OFFSET = 0x000
MSIX_PBA_OFFSET = 0x800
DEFAULT_SLOTS = 64
MAX_SLOTS = 125  # 3 + 125 vectors fill the 2 KiB MSI-X table (16 bytes each)
MAX_QUEUE_SIZE = 256
