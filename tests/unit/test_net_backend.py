"""The net backend over real rings in real (memfd) guest memory, without sockets.

Two simulated frontends, each in its own guest RAM, are switched by the backend
exactly as across vhost-pci; notifications are real eventfds. This isolates
the data path from the transport.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pathlib

import pytest

import vhostpci_driver.apps.net as net
from vhostpci_driver.apps.net import NetBackend, net_policy
from vhostpci_driver.errors import FrontendGoneError
from vhostpci_driver.events import FeaturesNegotiated, FrontendRemoved
from vhostpci_driver.frontends import Chain, Frontend
from vhostpci_driver.spec.virtio_net import VIRTIO_NET_F_MRG_RXBUF
from vhostpci_driver.wire.ctrl import FrontendKey
from vhostpci_host import netpacket
from vhostpci_host.frontend import NET_FEATURES, NetFrontend, mixed_size
from vhostpci_host.guestram import GuestRam


class Vm:
    """A driver VM's frontend plus the backend-side Frontend object for it."""

    def __init__(self, mac: str, features: int, queue_size: int = 64) -> None:
        self.ram = GuestRam(64 << 20)
        self.fe = NetFrontend(self.ram, netpacket.mac_bytes(mac), queue_size)
        self.key = FrontendKey(1, self.fe.device_id)
        accepted = net_policy(self.key, features)
        self.fe.negotiated(accepted)
        virtqs = tuple(q.info() for q in self.fe.queues)
        calls = {i: q.call_fd for i, q in enumerate(self.fe.queues)}
        virtqs = tuple(type(v)(v.index, v.size, v.desc, v.avail, v.used, 0, 0, v.index) for v in virtqs)
        ring_doorbell = lambda slot: os.eventfd_write(calls[slot], 1)  # noqa: E731
        self.backend_side = Frontend(self.key, virtqs, self.ram, ring_doorbell, {})
        self.backend_side.start(accepted)
        self.accepted = accepted
        self.fe.start()

    def service(self) -> None:
        """What the simulator's loop does: RX only when its call eventfd fired (notifications are tested)."""
        try:
            os.eventfd_read(self.fe.rx.call_fd)
        except BlockingIOError:
            pass
        else:
            self.fe.receive()
        self.fe.reclaim_tx()

    def close(self) -> None:
        self.fe.close()
        self.ram.close()


def _kicked(vms: list[Vm]) -> bool:
    kicked = False
    for vm in vms:
        for q in vm.fe.queues:
            try:
                os.eventfd_read(q.kick_fd)
                kicked = True
            except BlockingIOError:
                pass
    return kicked


@pytest.mark.parametrize("mergeable", [True, False])
def test_switch_moves_mixed_frames_both_ways(mergeable: bool) -> None:
    feats = NET_FEATURES if mergeable else NET_FEATURES & ~(1 << VIRTIO_NET_F_MRG_RXBUF)
    a, b = Vm("52:54:00:00:00:01", feats), Vm("52:54:00:00:00:02", feats)
    be = NetBackend("switch")
    for vm in (a, b):
        be.on_event(FeaturesNegotiated(vm.key, feats, vm.accepted), {vm.key: vm.backend_side})
    n = 600
    moved = 0
    for _ in range(20_000):  # bounded: a stall fails instead of hanging
        a.fe.send(b.fe.mac, n - a.fe.sent, mixed_size) if a.fe.sent < n else None
        b.fe.send(a.fe.mac, n - b.fe.sent, mixed_size) if b.fe.sent < n else None
        if _kicked([a, b]) or moved:  # the backend runs only when kicked, or when it still has work
            moved = be.poll()
        a.service()
        b.service()
        if a.fe.receiver.received == n and b.fe.receiver.received == n:
            break
    for vm in (a, b):
        r = vm.fe.receiver
        assert (r.received, r.duplicates, r.corrupt) == (n, 0, 0), be.stats()
    a.close()
    b.close()


def test_net_app_uses_only_the_public_api() -> None:
    """apps/net.py is the model app: it imports no ring internals and reaches no queue's private parts."""
    tree = ast.parse(pathlib.Path(net.__file__).read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in modules if m and m.startswith("vhostpci_driver.virtqueue")}, modules
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not attrs & {"ring", "_ring", "_live"}, attrs & {"ring", "_ring", "_live"}


def test_queue_public_api_discard_and_avail_idx() -> None:
    """What an app needs from a Queue, over a real ring: pop, discard (back in order), avail index, re-arm."""
    a = Vm("52:54:00:00:00:01", NET_FEATURES)
    rx = a.backend_side.queue(0)
    posted = rx.pending()
    assert posted > 2 and rx.avail_idx() == posted  # the frontend posted its RX buffers at start
    got = rx.pop_batch(2)
    assert all(isinstance(c, Chain) for c in got) and rx.pending() == posted - 2
    rx.discard(got)
    assert rx.pending() == posted
    again = rx.pop_batch(2)
    assert [c.head for c in again] == [c.head for c in got]
    rx.enable_notifications()
    rx.disable_notifications()
    rx.push_batch([(c.head, 0) for c in again])
    a.backend_side.remove("test")
    with pytest.raises(FrontendGoneError):
        rx.avail_idx()
    a.close()


def test_a_port_with_no_rx_buffer_does_not_stall_a_flood() -> None:
    """B never takes its frames: its copies of A's broadcasts are dropped and counted, C gets every one."""
    a, b, c = (Vm(f"52:54:00:00:00:0{i}", NET_FEATURES, queue_size=64) for i in (1, 2, 3))
    be = NetBackend("switch")
    for vm in (a, b, c):
        be.on_event(FeaturesNegotiated(vm.key, NET_FEATURES, vm.accepted), {vm.key: vm.backend_side})
    n, moved = 300, 0
    for _ in range(20_000):  # bounded
        if a.fe.sent < n:
            a.fe.send(b"\xff" * 6, n - a.fe.sent, lambda _s: 64)
        if _kicked([a, b, c]) or moved:
            moved = be.poll()
        a.service()
        c.service()  # B: never
        if c.fe.receiver.received == n and not moved:
            break
    ports = be.stats()
    pa, pb, pc = (ports[netpacket.mac_str(vm.fe.mac)] for vm in (a, b, c))
    assert c.fe.receiver.received == n and c.fe.receiver.from_sender(a.fe.mac) == n
    assert pa["tx_flooded"] == n and pc["rx_frames"] == n
    assert pb["rx_frames"] == 64  # its ring's buffers, then nothing
    assert pb["rx_dropped_no_buffer"] == n - 64
    b.service()
    assert b.fe.receiver.received == 64 and b.fe.receiver.corrupt == 0
    for vm in (a, b, c):
        vm.close()


@pytest.mark.parametrize(
    ("kind", "rule", "mergeable"),
    [
        ("rx-short", "net-rx-short", True),
        ("rx-readable", "net-rx-readable", True),
        ("rx-readable", "net-rx-readable", False),
    ],
)
def test_a_receive_buffer_breaking_the_rules_breaks_only_its_port(
    kind: str, rule: str, mergeable: bool
) -> None:
    """virtio 1.2, 5.1.6.3: receive buffers are device-writable and, mergeable, hold the 12-byte header."""
    feats = NET_FEATURES if mergeable else NET_FEATURES & ~(1 << VIRTIO_NET_F_MRG_RXBUF)
    a, b, c = (Vm(f"52:54:00:00:00:0{i}", feats) for i in (1, 2, 3))
    be = NetBackend("switch")
    for vm in (a, b, c):
        be.on_event(FeaturesNegotiated(vm.key, feats, vm.accepted), {vm.key: vm.backend_side})
    b.fe.hostile(kind)
    a.fe.send(b.fe.mac, 4, lambda seq: 256)
    a.fe.send(c.fe.mac, 4, lambda seq: 256)  # the sender keeps forwarding to the others
    for _ in range(10):
        be.poll()
        c.service()
    stats = be.stats()
    assert str(stats["52:54:00:00:00:02"]["broken"]).startswith(rule)
    assert stats["52:54:00:00:00:01"]["broken"] is None and stats["52:54:00:00:00:03"]["broken"] is None
    assert c.fe.receiver.received == 4 and c.fe.receiver.corrupt == 0
    for vm in (a, b, c):
        vm.close()


@pytest.mark.parametrize("how", ["removed-event", "gone-while-polled"])
def test_a_port_going_down_logs_its_final_counters(how: str, caplog: pytest.LogCaptureFixture) -> None:
    """The last word on a port is in the log: once its frontend goes, its counters leave stats()."""
    a, b = Vm("52:54:00:00:00:01", NET_FEATURES), Vm("52:54:00:00:00:02", NET_FEATURES)
    be = NetBackend("switch")
    for vm in (a, b):
        be.on_event(FeaturesNegotiated(vm.key, NET_FEATURES, vm.accepted), {vm.key: vm.backend_side})
    a.fe.send(b.fe.mac, 40, lambda _s: 300)
    a.fe.send(b"\xff" * 6, 3, lambda _s: 64)
    for _ in range(50):  # bounded
        be.poll()
        b.service()
    before = be.stats()["52:54:00:00:00:01"]
    assert before["tx_unicast"] == 40 and before["tx_flooded"] == 3
    caplog.set_level(logging.INFO, logger="vhostpci_driver.apps.net")
    a.backend_side.remove("test")
    if how == "removed-event":
        be.on_event(FrontendRemoved(a.key), {})
    else:
        be.poll()  # its queues raise FrontendGoneError
    assert "52:54:00:00:00:01" not in be.stats()
    (line,) = [r.getMessage() for r in caplog.records if " down: " in r.getMessage()]
    assert json.loads(line.split(" down: ", 1)[1]) == {"mac": "52:54:00:00:00:01", **before}
    be.on_event(FrontendRemoved(a.key), {})  # said once only
    assert sum(" down: " in r.getMessage() for r in caplog.records) == 1
    a.close()
    b.close()
