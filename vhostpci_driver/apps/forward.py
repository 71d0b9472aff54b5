"""The net switch's batch primitive: a run of unicast frames into their ports' RX buffers.

:func:`forward_unicast_pure` is the reference; :data:`compiled_forward_unicast` its
compiled twin (``vhostpci_driver._native``, _forward.c) when the native data path
runs (virtqueue/native.py); :data:`forward_unicast` is what the switch calls. Both do exactly this: from
``chains[start:]``, in order, while each frame is the common case, place it;
stop at the first that is not, and say where, so the app's policy takes that
frame (flooding, holding, several RX buffers, drops) and calls again after it.

The common case: a TX chain of one readable descriptor holding at least the
12-byte virtio-net header (VERSION_1, virtio 1.2, 5.1.6) and a destination MAC;
unicast (the I/G bit clear, IEEE 802, 8.2); the MAC in ``table``; that port
neither the source nor broken; the port's next popped RX buffer one writable
descriptor with room for the whole frame. The frame is copied there, with
num_buffers = 1 when the port negotiated VIRTIO_NET_F_MRG_RXBUF (5.1.6.4); the
buffer moves from the port's ``rx_bufs`` to its ``rx_used`` with the frame's
length; its ``rx_frames`` and ``rx_bytes`` grow; the port joins ``touched``.
Nothing is pushed to any ring: the app publishes ``rx_used`` and completes the
TX chains, once per batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

from vhostpci_driver.frontends import Chain
from vhostpci_driver.spec.virtio_net import NET_HDR_SIZE
from vhostpci_driver.virtqueue import native

_MIN = NET_HDR_SIZE + 6  # a header and a destination MAC
_DST = slice(NET_HDR_SIZE, NET_HDR_SIZE + 6)
_NUM_BUFFERS = slice(10, 12)
_ONE_BUFFER = (1).to_bytes(2, "little")


class RxPort(Protocol):
    """What the primitive reads and updates of a target port (apps/net.py's Port)."""

    broken: str | None
    mergeable: bool
    rx_bufs: deque[Chain]
    rx_used: list[tuple[int, int]]
    rx_frames: int
    rx_bytes: int


PortT = TypeVar("PortT", bound=RxPort)


def forward_unicast_pure(
    chains: list[Chain], start: int, table: Mapping[bytes, PortT], source: object, touched: set[PortT]
) -> tuple[int, int]:
    """Place ``chains[start:]`` while each is the common case; returns (the first not placed,
    the placed frames' bytes, headers included)."""
    i, tx_bytes = max(start, 0), 0
    while i < len(chains):
        chain = chains[i]
        src, size = chain[1], chain[3]
        if len(src) != 1 or size < _MIN or len(src[0]) != size:
            break
        frame = src[0]
        mac = bytes(frame[_DST])  # one read of the guest's bytes
        if mac[0] & 1:
            break  # broadcast or multicast: the app floods it
        target = table.get(mac)
        if target is None or target is source or target.broken is not None:
            break
        bufs = target.rx_bufs
        if not bufs:
            break  # the app pops more RX buffers, or holds the frame
        buf = bufs[0]
        if buf[4] < size or len(buf[2]) != 1 or len(buf[2][0]) < size:
            break
        bufs.popleft()
        view = buf[2][0]
        view[:size] = frame
        if target.mergeable:
            view[_NUM_BUFFERS] = _ONE_BUFFER
        target.rx_used.append((buf[0], size))
        target.rx_frames += 1
        target.rx_bytes += size - NET_HDR_SIZE
        touched.add(target)
        tx_bytes += size
        i += 1
    return i, tx_bytes


#: The compiled twin (None on the pure path); tests/unit/test_forward.py holds it to the reference.
compiled_forward_unicast = native.LIB.forward_unicast if native.LIB is not None else None
#: The primitive an app calls: the reference, for now. Wired into apps/net.py, the compiled
#: twin made the 100k-frame end-to-end test stall (183 s instead of 13 s) although it agrees
#: with the reference on every differential example (docs/performance.md): not used until then.
if TYPE_CHECKING:
    forward_unicast = forward_unicast_pure
else:
    forward_unicast = forward_unicast_pure
