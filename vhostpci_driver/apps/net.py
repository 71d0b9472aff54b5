"""The vhost-pci-net backend: serves virtio-net frontends from inside the device VM.

Written only against the public API (:class:`~vhostpci_driver.device.VhostPciDevice`,
its events and :class:`~vhostpci_driver.frontends.Frontend`). Two modes:

* ``loopback``: every frame a frontend transmits comes back on its own RX;
* ``switch``: an L2 switch between frontends, the VM-to-VM networking
  vhost-pci was designed for.

The switch (IEEE 802.1D forwarding, without learning):

* its forwarding table is the frontends' MACs, from DEVICE_INFO (the host
  assigns them); it is not learned from source addresses, so a driver VM
  cannot draw another's traffic to itself by spoofing a source MAC;
* a frame to a port's MAC goes to that port only (``unicast``);
* broadcast and multicast frames (the I/G bit, the low bit of the first
  destination byte: ARP, IPv6 neighbour discovery) are flooded to every
  other port, and so is unknown unicast, as a learning switch does for an
  address it has not learned (``flooded``);
* a frame never goes back to the port it came from: one addressed to its own
  sender's MAC, or unknown when no other port exists, is dropped
  (``dropped_unknown``);
* a unicast frame waits (the sender's TX is held) until its target posts RX
  buffers: no loss between two ports; a flooded copy is dropped for a port
  that has no RX buffer now (``rx_dropped_no_buffer``), so one slow port
  never stalls a broadcast for the others.

Frames move in batches: a TX batch is popped at once, RX buffers are popped in
batches and kept until used, frames are copied into them (virtio 1.2, 5.1.6:
a 12-byte header, then the frame; with VIRTIO_NET_F_MRG_RXBUF a frame may span
several buffers and the first header says how many), used entries are pushed
once per batch and queue, and the driver VM is interrupted once per batch and
queue, only if its event index asks for it. Runs of the common frame (known unicast,
one descriptor, one RX buffer that holds it) are placed by apps/forward.py's batch
primitive, compiled where the native data path runs; every other frame takes the
policy above.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from vhostpci_driver.apps.forward import forward_unicast
from vhostpci_driver.errors import FeaturesRefusedError, FrontendGoneError, RingError
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
BATCH = 32
_DST = slice(NET_HDR, NET_HDR + 6)  # the destination MAC, after the virtio-net header
_MIN = NET_HDR + 6  # a frame shorter than this has no destination to switch on
_NUM_BUFFERS = slice(10, 12)  # virtio 1.2, 5.1.6.4: the header's last field, num_buffers (le16)
_ONE_BUFFER = (1).to_bytes(2, "little")
RX_BATCH = 64  # RX buffers popped at once (kept in the port until filled)


def _pop_rx(port: Port) -> list[Chain]:
    """A batch of the receive buffers ``port``'s driver posted, each checked before anything is written."""
    bufs = port.rx.pop_batch(RX_BATCH)
    least = NET_HDR if port.mergeable else 0  # one test per buffer on the way through
    for buf in bufs:
        if buf[1] or buf[4] < least:
            if buf[1]:
                # virtio 1.2, 5.1.6.3: receiveq buffers are device-writable; a readable one is not ours.
                raise RingError("net-rx-readable", "a receive buffer has device-readable descriptors", buf[0])
            # virtio 1.2, 5.1.6.3.1: with VIRTIO_NET_F_MRG_RXBUF each buffer MUST hold at least the header.
            raise RingError(
                "net-rx-short", f"a receive buffer of {buf[4]} bytes < the {NET_HDR}-byte header", buf[0]
            )
    return bufs


def net_policy(key: FrontendKey, offered: int) -> int:
    """Feature policy for net frontends: VERSION_1 is required, the rest as implemented.

    Without VERSION_1 the frontend would be a legacy device (virtio 1.2, 7:
    big-endian rings, a 10-byte header): refused, never served half-right.
    """
    if not offered >> Feature.VERSION_1 & 1:
        raise FeaturesRefusedError(f"net frontend {key} does not offer VIRTIO_F_VERSION_1")
    return offered & SUPPORTED


#: Per-port counters, as :meth:`NetBackend.stats` reports them (each an attribute of :class:`Port`).
COUNTERS = (
    "tx_frames",  # frames this port transmitted; each is counted once more below
    "tx_bytes",
    "tx_unicast",  # ... sent to the one port that has the destination MAC
    "tx_flooded",  # ... broadcast, multicast or unknown unicast: copied to every other port
    "tx_dropped_unknown",  # ... to the sender's own MAC, to a broken port, or flooded with no other port
    "tx_dropped_malformed",  # ... shorter than a header and a destination MAC
    "rx_frames",  # frames delivered into this port's RX buffers
    "rx_bytes",
    "rx_dropped_no_buffer",  # flooded copies for which this port had no RX buffer at the time
    "rx_dropped_too_big",  # frames larger than this port's RX buffer (without MRG_RXBUF)
)


@dataclass(eq=False, slots=True)
class Port:
    """One net frontend plugged into the switch."""

    frontend: Frontend
    mac: bytes
    rx: Queue
    tx: Queue
    mergeable: bool
    held: list[Chain] = field(default_factory=list)  # TX chains popped, waiting for RX room
    rx_bufs: deque[Chain] = field(default_factory=deque)  # RX buffers popped, not filled yet
    rx_used: list[tuple[int, int]] = field(default_factory=list)  # filled RX buffers, to push
    broken: str | None = None
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_unicast: int = 0
    tx_flooded: int = 0
    tx_dropped_unknown: int = 0
    tx_dropped_malformed: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_dropped_no_buffer: int = 0
    rx_dropped_too_big: int = 0


#: apps/forward.py's primitive: (chains, start, ports by MAC, source, touched) -> (next, bytes)
Place = Callable[[list[Chain], int, dict[bytes, Port], Port, set[Port]], tuple[int, int]]


class NetBackend:
    """Moves frames between the frontends of one or more vhost-pci devices."""

    def __init__(self, mode: str = "switch", *, place: Place | None = None) -> None:
        if mode not in ("switch", "loopback"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.ports: dict[bytes, Port] = {}
        #: the batch primitive for runs of known unicast (apps/forward.py): compiled where the
        #: native data path runs, the pure reference otherwise; a test may pass either
        self.place: Place = place if place is not None else forward_unicast

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
                for q in (port.rx, port.tx):
                    q.enable_notifications()
            except (FrontendGoneError, RingError) as e:
                log.warning("net frontend %s unusable: %s", ev.key, e)
                return
            self.ports[mac] = port
            log.info("net port %s up (mergeable=%s)", ev.key, port.mergeable)
        elif isinstance(ev, FrontendRemoved) and ev.key.device_type == VIRTIO_NET:
            mac = ev.key.device_id.to_bytes(6, "big")
            gone = self.ports.get(mac)
            if gone is not None and gone.frontend.removed:
                self._down(gone)

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
        touched: set[Port] = set()
        waiting: dict[Port, int] = {}  # targets whose RX ran out -> the avail index we saw
        for _ in range(4):
            for port in list(self.ports.values()):
                if port.broken:
                    continue
                try:
                    moved += self._forward(port, touched, waiting)
                except FrontendGoneError:
                    self._down(port)
                except RingError as e:
                    self._break(port, e)
                except Exception as e:
                    # A rule this backend does not check yet (a bug): this port stops, not the process.
                    log.exception("net port %s broken by an unchecked error", port.frontend.key)
                    self._break(port, RingError("unchecked", f"{type(e).__name__}: {e}"))
            self._push_rx(touched)
            # virtio 1.2, 2.7.10: re-arm the kick of every RX we wait on, then look once more, so
            # buffers posted between our last look and the re-arm are not slept on.
            if not self._rearm(waiting):
                break
            waiting = {}
        else:
            moved += 1  # the rings keep moving under us: let the caller poll again without sleeping
        for p in touched:
            if p.broken or p.frontend.removed:
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
                self._break(p, e)
        return moved

    def _down(self, port: Port) -> None:
        """``port``'s frontend is gone: unplug it, and log its counters as they end (one JSON object)."""
        if self.ports.get(port.mac) is port:
            del self.ports[port.mac]
            row = {"mac": _mac_text(port.mac), **_counters(port)}
            log.info("net port %s down: %s", port.frontend.key, json.dumps(row))

    @staticmethod
    def _break(port: Port, e: Exception) -> None:
        """A hostile or broken frontend: stop serving it, keep the others going."""
        if not port.broken:
            port.broken = str(e)
            log.warning("net port %s broken: %s", port.frontend.key, e)

    def _push_rx(self, touched: set[Port]) -> None:
        """Publish what was written into each port's RX buffers: one used-index store per port."""
        for p in touched:
            if p.rx_used and not p.broken:
                used, p.rx_used = p.rx_used, []
                try:
                    p.rx.push_batch(used)
                except (FrontendGoneError, RingError) as e:
                    self._break(p, e)

    def _rearm(self, waiting: dict[Port, int]) -> bool:
        """Enable notifications on the RX rings we wait on; True if one moved meanwhile."""
        moved = False
        for p, seen in waiting.items():
            if p.broken:
                continue
            try:
                p.rx.enable_notifications()
                moved |= p.rx.avail_idx() != seen
            except (FrontendGoneError, RingError) as e:
                self._break(p, e)
        return moved

    def _forward(self, port: Port, touched: set[Port], waiting: dict[Port, int]) -> int:
        """Forward a batch of ``port``'s TX frames; the port's counters are summed here, stored once."""
        held = port.held
        if not held:
            held += port.tx.pop_batch(BATCH)
            if not held:
                return 0
        touched.add(port)
        loopback = self.mode == "loopback"
        table = self.ports
        deliver = self._deliver
        others: list[Port] | None = None  # the flood set, built on the first flood of the batch
        moved = unicast = flooded = unknown = malformed = tx_bytes = sent = 0
        target: Port | None
        place = None if loopback else self.place
        n = len(held)
        while sent < n:
            if place is not None:
                # The common frames, a run at a time (apps/forward.py); it stops at the first
                # frame that needs this policy (flood, drop, hold, several RX buffers, no RX
                # buffer popped yet), which the loop's body takes.
                upto, placed_bytes = place(held, sent, table, port, touched)
                if upto > sent:
                    moved += upto - sent
                    unicast += upto - sent
                    tx_bytes += placed_bytes
                    sent = upto
                    if sent == n:
                        break
            chain = held[sent]
            readable = chain[1]
            first = readable[0] if readable else b""
            if len(first) < _MIN:  # the header and the frame in separate descriptors (rare)
                first = chain.read_all()
            flood = False
            if loopback:
                target = port
            elif len(first) < _MIN:
                target = None
                malformed += 1
            elif first[NET_HDR] & 1:  # the I/G bit: broadcast or multicast (IEEE 802, 8.2)
                target = None
                flood = True
            else:
                target = table.get(bytes(first[_DST]))
                if target is None:
                    flood = True  # unknown unicast
                elif target is port or target.broken:
                    target = None
                    unknown += 1
            if target is not None:
                got = deliver(chain, target)
                if got is None:
                    # The target's RX is short: hold the rest; new RX buffers will kick us.
                    waiting[target] = target.rx.avail_idx()
                    break
                touched.add(target)
                moved += got
                unicast += 1
            elif flood:
                if others is None:
                    others = [p for p in table.values() if p is not port and not p.broken]
                if others:
                    flooded += 1
                else:
                    unknown += 1
                for other in others:
                    got = deliver(chain, other)
                    if got is None:
                        other.rx_dropped_no_buffer += 1  # one slow port does not stall a flood
                    else:
                        touched.add(other)
                        moved += got
            sent += 1
            tx_bytes += chain[3]
        if sent:
            port.tx.push_batch([(c[0], 0) for c in held[:sent]])
            del held[:sent]
            port.tx_frames += sent
            port.tx_bytes += tx_bytes - NET_HDR * sent
            port.tx_unicast += unicast
            port.tx_flooded += flooded
            port.tx_dropped_unknown += unknown
            port.tx_dropped_malformed += malformed
        return moved

    def _deliver(self, chain: Chain, target: Port) -> int | None:
        """Copy one frame into ``target``'s RX (1 delivered, 0 dropped); None when it has no room yet.

        RX buffers are popped a batch at a time and kept until filled; a failure of
        the *target's* ring marks the target broken and drops the frame, nothing else.
        The common frame (one descriptor, one RX buffer that holds it) is done here.
        """
        bufs = target.rx_bufs
        if target.broken:
            return 0
        if not bufs:
            try:
                bufs += _pop_rx(target)
            except FrontendGoneError:
                return 0
            except RingError as e:
                self._break(target, e)
                return 0
            if not bufs:
                return None
        buf = bufs[0]
        size, src, dst = chain[3], chain[1], buf[2]
        if buf[4] < size or len(src) != 1 or len(dst) != 1 or size < NET_HDR:
            return self._deliver_slow(chain, target)
        bufs.popleft()
        view = dst[0]
        view[:size] = src[0]
        if target.mergeable:
            view[_NUM_BUFFERS] = _ONE_BUFFER  # virtio 1.2, 5.1.6.4: this frame is in 1 buffer
        target.rx_used.append((buf[0], size))
        target.rx_frames += 1
        target.rx_bytes += size - NET_HDR
        return 1

    def _deliver_slow(self, chain: Chain, target: Port) -> int | None:
        """Any other frame: scattered buffers, several RX buffers (MRG_RXBUF), or one that does not fit."""
        size = chain[3]
        bufs = target.rx_bufs
        if not target.mergeable:
            buf = bufs[0]
            if buf[4] < size:  # virtio 1.2, 5.1.6.3.1: without MRG_RXBUF one buffer holds a frame
                target.rx_dropped_too_big += 1
                return 0
            bufs.popleft()
            _scatter(chain[1], buf[2])
            target.rx_used.append((buf[0], size))
        else:
            taken: list[Chain] = []
            room = 0
            try:
                while room < size:
                    if not bufs:
                        bufs += _pop_rx(target)
                        if not bufs:
                            bufs.extendleft(reversed(taken))  # too few now: wait for the driver VM to post
                            return None
                    b = bufs.popleft()
                    taken.append(b)
                    room += b[4]
            except FrontendGoneError:
                return 0
            except RingError as e:
                self._break(target, e)
                return 0
            head = taken[0][2]
            if not head or len(head[0]) < NET_HDR:  # the header must fit the first buffer (5.1.6.4)
                bufs.extendleft(reversed(taken[1:]))
                target.rx_used.append((taken[0][0], 0))  # give the useless buffer back, empty
                target.rx_dropped_too_big += 1
                return 0
            _scatter(chain[1], [v for b in taken for v in b[2]])
            struct.pack_into("<H", head[0], 10, len(taken))
            left = size
            for b in taken:
                n = min(left, b[4])
                target.rx_used.append((b[0], n))
                left -= n
        target.rx_frames += 1
        target.rx_bytes += max(0, size - NET_HDR)
        return 1

    def stats(self) -> dict[str, dict[str, object]]:
        """Per-port counters (:data:`COUNTERS`), whether the port is broken, and TX chains held."""
        return {_mac_text(mac): _counters(p) for mac, p in self.ports.items()}


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _counters(p: Port) -> dict[str, object]:
    """One port's row of :meth:`NetBackend.stats`."""
    row: dict[str, object] = {name: getattr(p, name) for name in COUNTERS}
    row["dropped"] = (
        p.tx_dropped_unknown + p.tx_dropped_malformed + p.rx_dropped_no_buffer + p.rx_dropped_too_big
    )
    row["broken"] = p.broken
    row["held"] = len(p.held)
    return row


def _scatter(src: list[memoryview], dst_views: list[memoryview]) -> None:
    """Copy the readable views into the writable ones in order (memcpy per piece); dst has the room."""
    di, doff = 0, 0
    for piece in src:
        soff, n = 0, len(piece)
        while soff < n:
            dst = dst_views[di]
            k = min(n - soff, len(dst) - doff)
            dst[doff : doff + k] = piece[soff : soff + k]
            soff += k
            doff += k
            if doff == len(dst):
                di, doff = di + 1, 0
