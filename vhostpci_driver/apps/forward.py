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
    the placed frames' bytes, headers included).

    A run of frames mostly goes to one port: that port's state is looked up once per run
    and its counters are stored once, when the run ends (also when a frame raises).
    """
    i, n, tx_bytes = max(start, 0), len(chains), 0
    get = table.get
    last: PortT | None = None  # the port of the current run, its state in the locals below
    bufs: deque[Chain] = deque()
    used: list[tuple[int, int]] = []
    mergeable = False
    frames = nbytes = 0
    try:
        while i < n:
            chain = chains[i]
            src, size = chain[1], chain[3]
            if len(src) != 1 or size < _MIN:
                break
            frame = src[0]
            if len(frame) != size:
                break
            mac = frame[_DST].tobytes()  # one read of the guest's bytes (tobytes: half the cost of bytes())
            if mac[0] & 1:
                break  # broadcast or multicast: the app floods it
            target = get(mac)
            if target is not last:
                if target is None or target is source or target.broken is not None:
                    break
                if last is not None and frames:
                    last.rx_frames += frames
                    last.rx_bytes += nbytes
                    touched.add(last)
                last, frames, nbytes = target, 0, 0
                bufs, used, mergeable = target.rx_bufs, target.rx_used, target.mergeable
            if not bufs:
                break  # the app pops more RX buffers, or holds the frame
            buf = bufs[0]
            dst = buf[2]
            if buf[4] < size or len(dst) != 1:
                break
            view = dst[0]
            if len(view) < size:
                break
            view[:size] = frame
            if mergeable:
                view[_NUM_BUFFERS] = _ONE_BUFFER
            bufs.popleft()
            used.append((buf[0], size))
            frames += 1
            nbytes += size - NET_HDR_SIZE
            tx_bytes += size
            i += 1
    finally:
        if last is not None and frames:
            last.rx_frames += frames
            last.rx_bytes += nbytes
            touched.add(last)
    return i, tx_bytes


#: The compiled twin (None on the pure path); tests/unit/test_forward.py holds it to the reference.
compiled_forward_unicast = native.LIB.forward_unicast if native.LIB is not None else None
#: The primitive the switch calls: the compiled twin where the native data path runs, the
#: reference on the pure path (VHOSTPCI_PURE=1, or no extension built).
if TYPE_CHECKING:
    forward_unicast = forward_unicast_pure
else:
    forward_unicast = compiled_forward_unicast or forward_unicast_pure
