"""The vhost-pci-net backend: serves virtio-net frontends from inside the device VM.

Written only against the public API (:class:`~vhostpci_driver.device.VhostPciDevice`,
its events and :class:`~vhostpci_driver.frontends.Frontend`). Two modes:

* ``loopback``: every frame a frontend transmits comes back on its own RX;
* ``switch``: L2 forwarding between frontends by destination MAC (broadcast
  floods), the VM-to-VM networking vhost-pci was designed for.

Frames move in batches: a TX batch is popped at once, frames are copied into
the target's RX buffers (virtio 1.2, 5.1.6: a 12-byte header, then the frame;
with VIRTIO_NET_F_MRG_RXBUF a frame may span several buffers and the first
header says how many), used entries are pushed per batch, and the driver VM is
interrupted once per batch and queue, only if its event index asks for it.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from vhostpci_driver.errors import FrontendGoneError, RingError
from vhostpci_driver.events import Event, FeaturesNegotiated, FrontendRemoved
from vhostpci_driver.frontends import Chain, Frontend, Queue
from vhostpci_driver.spec.virtio import DeviceId, Feature
from vhostpci_driver.spec.virtio_net import NET_HDR_SIZE, VIRTIO_NET_F_MRG_RXBUF
from vhostpci_driver.wire.ctrl import FrontendKey

log = logging.getLogger(__name__)

VIRTIO_NET = DeviceId.NET
RX, TX = 0, 1
NET_HDR = NET_HDR_SIZE
#: What this backend implements; anything else offered (MAC, checksum, GSO...) is declined.
SUPPORTED = (
    (1 << Feature.VERSION_1)
    | (1 << Feature.RING_EVENT_IDX)
    | (1 << Feature.RING_INDIRECT_DESC)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
)
BROADCAST = b"\xff" * 6
BATCH = 32


def net_policy(key: FrontendKey, offered: int) -> int:
    """Feature policy for net frontends: VERSION_1 is required, the rest as implemented."""
    return offered & SUPPORTED


@dataclass
class PortStats:
    tx_frames: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    dropped: int = 0


@dataclass
class Port:
    """One net frontend plugged into the switch."""

    frontend: Frontend
    mac: bytes
    rx: Queue
    tx: Queue
    mergeable: bool
    held: deque[Chain] = field(default_factory=deque)  # TX chains waiting for RX room
    stats: PortStats = field(default_factory=PortStats)
    broken: str | None = None


class NetBackend:
    """Moves frames between the frontends of one vhost-pci device."""

    def __init__(self, mode: str = "switch") -> None:
        if mode not in ("switch", "loopback"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.ports: dict[bytes, Port] = {}

    # -- the device's events -----------------------------------------------------------

    def on_event(self, ev: Event, frontends: Mapping[FrontendKey, Frontend]) -> None:
        """Follow one device's events; ``frontends`` is that device's live table."""
        if isinstance(ev, FeaturesNegotiated) and ev.key.device_type == VIRTIO_NET:
            fe = frontends.get(ev.key)
            if fe is None or fe.removed:
                return
            mac = ev.key.device_id.to_bytes(6, "big")
            old = self.ports.get(mac)
            if old is not None and old.frontend is not fe and not old.frontend.removed:
                log.warning("net frontend %s: MAC already served by another frontend; ignored", ev.key)
                return
            try:
                port = Port(
                    fe, mac, fe.queue(RX), fe.queue(TX), bool(ev.accepted >> VIRTIO_NET_F_MRG_RXBUF & 1)
                )
            except FrontendGoneError as e:
                log.warning("net frontend %s unusable: %s", ev.key, e)
                return
            self.ports[mac] = port
            for q in (port.rx, port.tx):
                q.enable_notifications()
            log.info("net port %s up (mergeable=%s)", ev.key, port.mergeable)
        elif isinstance(ev, FrontendRemoved) and ev.key.device_type == VIRTIO_NET:
            mac = ev.key.device_id.to_bytes(6, "big")
            gone = self.ports.get(mac)
            if gone is not None and gone.frontend.removed:
                del self.ports[mac]

    def kick_fds(self) -> list[int]:
        """The eventfds worth waiting on (the ports' queues that have a vector)."""
        fds = []
        for p in self.ports.values():
            for q in (p.rx, p.tx):
                if q.kick_fd is not None:
                    fds.append(q.kick_fd)
        return fds

    # -- the data path -------------------------------------------------------------

    def poll(self) -> int:
        """Move what can be moved now; returns frames forwarded (> 0 also means "call again soon")."""
        moved = 0
        touched: set[bytes] = set()
        waiting: dict[bytes, int] = {}  # targets whose RX ran out -> the avail index we saw
        for _ in range(4):
            for mac, port in list(self.ports.items()):
                if port.broken:
                    continue
                try:
                    moved += self._forward(port, touched, waiting)
                except FrontendGoneError:
                    self.ports.pop(mac, None)
                except RingError as e:
                    # A hostile or broken frontend: stop serving it, keep the others going.
                    port.broken = str(e)
                    log.warning("net port %s broken: %s", port.frontend.key, e)
            # virtio 1.2, 2.7.10: re-arm the kick of every RX we wait on, then look once more, so
            # buffers posted between our last look and the re-arm are not slept on.
            if not self._rearm(waiting):
                break
            waiting = {}
        else:
            moved += 1  # the rings keep moving under us: let the caller poll again without sleeping
        for mac in touched:
            p = self.ports.get(mac)
            if p is None or p.broken:
                continue
            try:
                p.rx.notify()
                p.tx.notify()
                p.rx.enable_notifications()
                p.tx.enable_notifications()
                # Frames queued between our last pop and the re-arm raised no kick: look again.
                if p.tx.pending() and not p.held:
                    moved += 1
            except (FrontendGoneError, RingError) as e:
                p.broken = str(e)
        return moved

    def _rearm(self, waiting: dict[bytes, int]) -> bool:
        """Enable notifications on the RX rings we wait on; True if one moved meanwhile."""
        moved = False
        for mac, seen in waiting.items():
            p = self.ports.get(mac)
            if p is None or p.broken:
                continue
            try:
                p.rx.enable_notifications()
                moved |= p.rx.avail_idx() != seen
            except (FrontendGoneError, RingError) as e:
                p.broken = str(e)
        return moved

    def _forward(self, port: Port, touched: set[bytes], waiting: dict[bytes, int]) -> int:
        if not port.held:
            port.held.extend(port.tx.pop_batch(BATCH))
        if not port.held:
            return 0
        touched.add(port.mac)
        done: list[tuple[int, int]] = []
        moved = 0
        while port.held:
            chain = port.held[0]
            target = self._target(port, chain)
            if target is not None:
                try:
                    delivered = self._deliver(chain, target)
                except RingError as e:
                    # The *target's* RX ring is broken: isolate it, drop the frame, keep going.
                    target.broken = str(e)
                    log.warning("net port %s broken: %s", target.frontend.key, e)
                    delivered = 0
                if delivered is None:
                    # The target's RX is short: hold the rest; new RX buffers will kick us.
                    waiting[target.mac] = target.rx.avail_idx()
                    break
                touched.add(target.mac)
                moved += delivered
            else:
                port.stats.dropped += 1
            port.held.popleft()
            done.append((chain.head, 0))
            port.stats.tx_frames += 1
        if done:
            port.tx.push_batch(done)
        return moved

    def _target(self, port: Port, chain: Chain) -> Port | None:
        if self.mode == "loopback":
            return port
        first = chain.readable[0] if chain.readable else b""
        if len(first) >= NET_HDR + 6:
            dst = bytes(first[NET_HDR : NET_HDR + 6])
        else:
            head = chain.read_all()
            dst = head[NET_HDR : NET_HDR + 6]
        if dst == BROADCAST:
            return None  # flooding is not needed by the tests; counted as a drop
        found = self.ports.get(dst)
        return found if found is not None and not found.broken else None

    def _deliver(self, chain: Chain, target: Port) -> int | None:
        """Copy one frame into ``target``'s RX; None when it has no room yet."""
        size = chain.readable_len
        rx = target.rx
        bufs: list[Chain] = []
        room = 0
        while room < size:
            got = rx.pop_batch(1)
            if not got:
                rx.discard(bufs)  # too few RX buffers now: wait for the driver VM to post more
                return None
            bufs.append(got[0])
            room += got[0].writable_len
            if not target.mergeable:
                break
        if room < size:
            rx.push_batch([(b.head, 0) for b in bufs])  # one buffer must hold the frame, and cannot
            target.stats.dropped += 1
            return 0
        self._copy(chain, bufs, size)
        if target.mergeable:
            struct.pack_into("<H", bufs[0].writable[0], 10, len(bufs))  # virtio 1.2, 5.1.6.4: num_buffers
        used = []
        left = size
        for b in bufs:
            n = min(left, b.writable_len)
            used.append((b.head, n))
            left -= n
        rx.push_batch(used)
        target.stats.rx_frames += 1
        target.stats.rx_bytes += size - NET_HDR
        return 1

    @staticmethod
    def _copy(chain: Chain, bufs: list[Chain], size: int) -> None:
        """Scatter the chain's readable bytes into the writable views (memcpy per piece)."""
        dst_views = [v for b in bufs for v in b.writable]
        if len(chain.readable) == 1 and len(dst_views) == 1:
            dst_views[0][:size] = chain.readable[0]
            return
        di, doff = 0, 0
        for src in chain.readable:
            soff, n = 0, len(src)
            while soff < n:
                dst = dst_views[di]
                k = min(n - soff, len(dst) - doff)
                dst[doff : doff + k] = src[soff : soff + k]
                soff += k
                doff += k
                if doff == len(dst):
                    di, doff = di + 1, 0

    def stats(self) -> dict[str, dict[str, object]]:
        return {
            ":".join(f"{b:02x}" for b in mac): {
                "tx_frames": p.stats.tx_frames,
                "rx_frames": p.stats.rx_frames,
                "rx_bytes": p.stats.rx_bytes,
                "dropped": p.stats.dropped,
                "broken": p.broken,
                "held": len(p.held),
            }
            for mac, p in self.ports.items()
        }
