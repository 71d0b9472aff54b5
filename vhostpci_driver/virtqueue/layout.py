"""Split-ring layout (virtio 1.2, 2.7): sizes, flags, alignment, and ``vring_need_event``."""

from __future__ import annotations

import struct
import sys
import threading

from vhostpci_driver.errors import RingError
from vhostpci_driver.wire.layout import is_pow2

# The rings are little-endian (virtio 1.x); the views below use native 16/32-bit
# items for speed, which is only right on a little-endian host.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("the virtqueue views assume a little-endian host")

DESC = struct.Struct("<QIHH")  # struct virtq_desc: addr, len, flags, next
DESC_SIZE = DESC.size
USED_ELEM = struct.Struct("<II")  # struct virtq_used_elem: id, len
MAX_SIZE = 32768

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# virtio 1.2, 2.7: Descriptor Table 16, Available Ring 2, Used Ring 4.
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4


def ring_part_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor table, available ring, used ring), event fields included."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


def layout(size: int) -> tuple[int, int, int, int]:
    """Offsets of (desc, avail, used) in one contiguous allocation, and its total size."""
    check_size(size)
    desc, avail, used = ring_part_sizes(size)
    avail_off = desc
    used_off = (avail_off + avail + USED_ALIGN - 1) & ~(USED_ALIGN - 1)
    return 0, avail_off, used_off, used_off + used


def check_size(size: int) -> None:
    if not is_pow2(size) or size > MAX_SIZE:
        raise RingError("queue-size", f"size {size} is not a power of two <= {MAX_SIZE}")


def check_alignment(desc: int, avail: int, used: int) -> None:
    for name, addr, align in (
        ("desc", desc, DESC_ALIGN),
        ("avail", avail, AVAIL_ALIGN),
        ("used", used, USED_ALIGN),
    ):
        if addr % align:
            raise RingError("ring-align", f"{name} ring at {addr:#x} is not {align}-byte aligned")


_FENCE = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier between our store and our next load (virtio_mb / smp_mb).

    Notification suppression is a store-then-load handshake between two CPUs
    (we publish an index, then read the other side's event index; the other
    side does the mirror image). x86 may let the load pass the store, and
    then both sides skip the notification: a lost wakeup. An uncontended
    lock is a locked read-modify-write, which x86 orders as a full fence;
    Python has no cheaper way to say it.
    """
    _FENCE.acquire()
    _FENCE.release()


def need_event(event: int, new: int, old: int) -> bool:
    """virtio 1.2, 2.7.10: notify iff ``event`` lies in (old, new], all modulo 2**16."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
