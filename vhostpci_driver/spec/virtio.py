"""virtio 1.2 (the core, not a transport): device status, feature bits, device ids, split rings."""

from __future__ import annotations

import enum


class Status(enum.IntFlag):
    """``device_status`` bits (virtio 1.2, 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


class Feature(enum.IntEnum):
    """Device-independent feature bits (virtio 1.2, 6: ``VIRTIO_F_*``, ``VIRTIO_RING_F_*``)."""

    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33


class DeviceId(enum.IntEnum):
    """Virtio device ids (virtio 1.2, 5) that this project serves."""

    NET = 1


# -- split virtqueues (virtio 1.2, 2.7) ------------------------------------------------------

#: virtio 1.2, 2.7: Queue Size is a power of two of at most 32768.
MAX_QUEUE_SIZE = 32768

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# virtio 1.2, 2.7: Descriptor Table 16, Available Ring 2, Used Ring 4.
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4


def queue_size_ok(size: int, maximum: int = MAX_QUEUE_SIZE) -> bool:
    """A queue size is a power of two, at most ``maximum`` (virtio 1.2, 2.7)."""
    return 0 < size <= maximum and size & (size - 1) == 0


def misaligned_ring_part(desc: int, avail: int, used: int) -> tuple[str, int, int] | None:
    """The first ring part not aligned as virtio 1.2, 2.7 requires: ``(part, address, alignment)``.

    ``part`` is ``"desc"``, ``"avail"`` or ``"used"``; None when all three are aligned.
    Callers raise their own error (a FAIL reason on the controlq, a ring rule in a ring).
    """
    for part, addr, align in (
        ("desc", desc, DESC_ALIGN),
        ("avail", avail, AVAIL_ALIGN),
        ("used", used, USED_ALIGN),
    ):
        if addr % align:
            return part, addr, align
    return None
