"""Split-ring layout (virtio 1.2, 2.7): sizes, flags, alignment, and ``vring_need_event``."""

from __future__ import annotations

import struct
import sys
import threading

from vhostpci_driver.errors import RingError
from vhostpci_driver.spec.virtio import MAX_QUEUE_SIZE, misaligned_ring_part, queue_size_ok

# The rings are little-endian (virtio 1.x); the views below use native 16/32-bit
# items for speed, which is only right on a little-endian host.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("the virtqueue views assume a little-endian host")

DESC = struct.Struct("<QIHH")  # struct virtq_desc: addr, len, flags, next
DESC_SIZE = DESC.size
USED_ELEM = struct.Struct("<II")  # struct virtq_used_elem: id, len
USED_ALIGN = 4  # virtio 1.2, 2.7: the used ring's alignment (spec.virtio has all three)


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
    if not queue_size_ok(size):
        raise RingError("queue-size", f"size {size} is not a power of two <= {MAX_QUEUE_SIZE}")


def check_alignment(desc: int, avail: int, used: int) -> None:
    bad = misaligned_ring_part(desc, avail, used)
    if bad is not None:
        name, addr, align = bad
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
