"""The switch is the same switch whichever primitive places its common frames.

The same traffic (unicast both ways, to a port without mergeable buffers, broadcast,
multicast, unknown and own-MAC unicast, sizes from 64 B to 64 KiB) is run through
three switches: one whose primitive places nothing (every frame through the policy,
the switch as it was before the primitive), one with the pure reference, one with the
compiled twin. Every driver VM's whole memory afterwards (rings, used entries, the
bytes in every receive buffer), what each received, and every counter must be equal.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tests.unit.test_net_backend import Vm, _kicked
from vhostpci_driver.apps.forward import compiled_forward_unicast, forward_unicast, forward_unicast_pure
from vhostpci_driver.apps.net import NetBackend, Place
from vhostpci_driver.events import FeaturesNegotiated
from vhostpci_driver.spec.virtio_net import VIRTIO_NET_F_MRG_RXBUF
from vhostpci_driver.virtqueue import native
from vhostpci_host.frontend import NET_FEATURES, mixed_size


def _policy_only(chains: list[Any], start: int, *_: object) -> tuple[int, int]:
    return start, 0  # places nothing: the switch's own policy takes every frame


def _run(place: Place) -> tuple[object, ...]:
    plain = NET_FEATURES & ~(1 << VIRTIO_NET_F_MRG_RXBUF)
    vms = [Vm("52:54:00:00:00:01", NET_FEATURES), Vm("52:54:00:00:00:02", NET_FEATURES),
           Vm("52:54:00:00:00:03", plain)]  # fmt: skip
    a, b, c = vms
    for vm in vms:
        vm.fe.seq = 0  # the same frames in every run
    be = NetBackend("switch", place=place)
    for vm in vms:
        be.on_event(FeaturesNegotiated(vm.key, vm.fe.offered, vm.accepted), {vm.key: vm.backend_side})
    # (sender, destination, frames): known unicast, flooded and dropped, in bursts
    plan = [(a, b.fe.mac, 300), (b, a.fe.mac, 300), (a, c.fe.mac, 100), (c, a.fe.mac, 100),
            (a, b"\xff" * 6, 20), (b, b"\x33\x33\x00\x00\x00\x01", 20), (c, b"\x52\x54\x00\x00\x00\x99", 20),
            (b, b.fe.mac, 20)]  # fmt: skip
    left = [n for _, _, n in plan]
    moved = 0
    for _ in range(20_000):  # bounded: a stall fails instead of hanging
        for k, (vm, dst, _n) in enumerate(plan):
            if left[k]:
                left[k] -= vm.fe.send(dst, min(left[k], 24), mixed_size)
        if _kicked(vms) or moved:
            moved = be.poll()
        for vm in vms:
            vm.service()
        if not any(left) and not moved and not _kicked(vms):
            break
    out = (
        be.stats(),
        [vm.fe.stats() for vm in vms],
        [[hashlib.sha256(vm.ram.view(r.xgpa, r.size)).hexdigest() for r in vm.ram.regions] for vm in vms],
    )
    for vm in vms:
        vm.close()
    return out


def test_every_primitive_gives_the_same_switch() -> None:
    places: list[Place] = [_policy_only, forward_unicast_pure]
    if compiled_forward_unicast is not None:
        places.append(compiled_forward_unicast)
    runs = [_run(p) for p in places]
    stats, frontends, _memory = runs[0]
    a, b, _c = frontends
    # Each port gets its unicast, plus the broadcast (from A), the multicast (from B) and the unknown
    # unicast (from C) from the others; a flooded copy may be dropped (no RX buffer then), and counted.
    for f, want in zip(frontends, (300 + 20 + 100 + 20, 300 + 20 + 20, 100 + 20 + 20), strict=True):
        port = stats[f["mac"]]  # type: ignore[index]
        assert f["received"] + port["rx_dropped_no_buffer"] == want  # type: ignore[index, operator]
    assert a["from"]["52:54:00:00:00:02"] >= 300 and b["from"]["52:54:00:00:00:01"] >= 300  # type: ignore[index]
    assert all(f["duplicates"] == f["corrupt"] == 0 for f in frontends)  # type: ignore[index]
    assert stats["52:54:00:00:00:02"]["tx_dropped_unknown"] == 20  # its own MAC
    for other in runs[1:]:
        assert other == runs[0]


def test_the_switch_uses_the_compiled_twin_where_the_native_path_runs() -> None:
    want = compiled_forward_unicast if native.PATH == "native" else forward_unicast_pure
    assert forward_unicast is want and NetBackend().place is want
    if native.PATH == "pure":
        assert compiled_forward_unicast is None
    else:
        pytest.importorskip("vhostpci_driver._native")
