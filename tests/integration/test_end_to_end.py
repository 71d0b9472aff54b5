"""The whole system with real processes: server, simulated driver VMs, our driver over vfio-user."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.integration.conftest import MAC_A, MAC_B, MAC_C, PING_INTERVAL, PING_MISSES, UUIDS, wait_for
from vhostpci_driver.events import FeaturesNegotiated, FrontendRemoved, MemoryRemoved, RemoteDown, RemoteUp
from vhostpci_host.harness import HostServer, ProcessError, Rig

PACKETS = 50_000  # each way: 100,000 frames in all


def fe_stats(vm: object) -> dict[str, object]:
    return vm.stats()["frontends"][0]  # type: ignore[attr-defined, no-any-return]


def test_switch_moves_100k_mixed_frames_exactly_once(rig: Rig) -> None:
    a = rig.add_vm(MAC_A, vm_uuid=UUIDS[0])
    b = rig.add_vm(MAC_B, vm_uuid=UUIDS[1])
    rig.serve()
    a.send(f"send {MAC_B} {PACKETS} mixed")
    b.send(f"send {MAC_A} {PACKETS} mixed")
    wait_for(lambda: fe_stats(a)["received"] >= PACKETS and fe_stats(b)["received"] >= PACKETS, 180,
             "100,000 frames")
    for vm, peer in ((a, MAC_B), (b, MAC_A)):
        st = fe_stats(vm)
        assert st["sent"] == PACKETS
        assert (st["received"], st["duplicates"], st["corrupt"]) == (PACKETS, 0, 0)
        assert st["from"] == {peer: PACKETS}
    # Every controlq request acked exactly once: the driver answered each id, the devices saw no
    # unknown or duplicate ack, and each driver VM got all its answers (with one renegotiation,
    # since the net backend declines VIRTIO_NET_F_MAC: a strict subset).
    for vm in (a, b):
        full = vm.stats()
        assert full["acks"] == {"ADD_DONE": 3}
    for dev in rig.devices:
        s = dev.dump()["stats"]
        assert s["acked_done"] == s["received"] == 3 and s["acked_fail"] == 0  # type: ignore[index]
    assert not [e for e in rig.server.pending if e.get("event") == "ack-error"]
    # Each driver VM renegotiated once (the switch declines VIRTIO_NET_F_MAC): its ready line says so.
    assert [rig.ready[vm.uuid]["renegotiations"] for vm in (a, b)] == [1, 1]
    negotiated = [e for e in rig.service.events if isinstance(e, FeaturesNegotiated)]  # type: ignore[union-attr]
    assert len(negotiated) == 2 and all(e.accepted != e.offered for e in negotiated)


def test_a_vanished_driver_vm_is_removed_and_the_other_keeps_forwarding(rig: Rig) -> None:
    a = rig.add_vm(MAC_A, vm_uuid=UUIDS[0])
    b = rig.add_vm(MAC_B, vm_uuid=UUIDS[1])
    c = rig.add_vm(MAC_C, vm_uuid=UUIDS[2])
    rig.serve()
    a.send(f"send {MAC_B} 1000 64")
    wait_for(lambda: fe_stats(b)["received"] >= 1000, 30, "first traffic")
    before = rig.devices[1].dump()["stats"]
    b.stop(signal.SIGKILL)
    # The missed heartbeats, plus the teardown's round trip through the controlq.
    gone_within = PING_MISSES * PING_INTERVAL + 2.0
    wait_for(lambda: any(isinstance(e, MemoryRemoved) for e in rig.service.events), gone_within,  # type: ignore[union-attr]
             "MemoryRemoved after the SIGKILL")
    kinds = [type(e) for e in rig.service.events]  # type: ignore[union-attr]
    assert kinds.index(FrontendRemoved) < kinds.index(MemoryRemoved)  # frontends first (rule 7)
    # ... and by the host's own DELs, each acked DEL_DONE: not by our clean-up when REMOTE_UP drops,
    # which would give the same order while the host's DELs fail NOT_FOUND (protocol.md 7.4).
    wait_for(lambda: RemoteDown in [type(e) for e in rig.service.events], 5, "RemoteDown")  # type: ignore[union-attr]
    after = rig.devices[1].dump()["stats"]
    assert after["acked_fail"] == before["acked_fail"]  # type: ignore[index]
    assert after["acked_done"] >= before["acked_done"] + 2  # type: ignore[index, operator]
    kinds = [type(e) for e in rig.service.events]  # type: ignore[union-attr]
    assert kinds.index(MemoryRemoved) < kinds.index(RemoteDown)
    assert rig.server.read_event("remote-down", 5)["uuid"] == str(UUIDS[1])
    # A keeps forwarding (to C through the switch).
    a.send(f"send {MAC_C} 2000 1500")
    wait_for(lambda: fe_stats(c)["from"].get(MAC_A, 0) >= 2000, 30, "A's frames after B died")
    assert fe_stats(c)["corrupt"] == 0


#: One frontend of the hostile driver VM per kind, so each kind reaches the backend (a broken port
#: is not served again), and the rule each one must be caught by.
HOSTILE = {
    "desc-loop": ("52:54:00:00:0c:01", "chain-length"),
    "oob-addr": ("52:54:00:00:0c:02", "desc-addr"),
    "huge-len": ("52:54:00:00:0c:03", "desc-addr"),
    "avail-jump": ("52:54:00:00:0c:04", "avail-idx"),
}


def test_hostile_frontend_is_isolated(rig: Rig) -> None:
    a = rig.add_vm(MAC_A, vm_uuid=UUIDS[0])
    b = rig.add_vm(MAC_B, vm_uuid=UUIDS[1])
    c = rig.add_vm(*(mac for mac, _ in HOSTILE.values()), vm_uuid=UUIDS[2], queue_size=64)
    rig.serve()
    for n, (kind, (mac, rule)) in enumerate(HOSTILE.items(), start=1):
        c.send(f"hostile {kind} {n - 1}")
        a.send(f"send {MAC_B} 500 256")
        wait_for(lambda n=n: fe_stats(b)["received"] >= 500 * n, 30, f"A->B traffic after {kind}")
        wait_for(lambda mac=mac: rig.backend.stats()[mac]["broken"] is not None, 10, f"{kind} caught")
        assert str(rig.backend.stats()[mac]["broken"]).startswith(rule), (kind, rig.backend.stats()[mac])
        # the ports not attacked yet are still served
        later = [m for m, _ in list(HOSTILE.values())[n:]]
        assert all(rig.backend.stats()[m]["broken"] is None for m in later)
    # Rings outside memory in a DEVICE_INFO: acked FAIL with the reason, nothing else disturbed.
    c.send("rings-outside")
    ev = c.read_event("ack-failed", 10)
    assert ev["request"] == "hostile-device" and ev["reason"] == 9  # RING_OUTSIDE_MEMORY
    assert fe_stats(b)["corrupt"] == 0


def test_remote_up_is_reported(rig: Rig) -> None:
    rig.add_vm(MAC_A, vm_uuid=UUIDS[0])
    rig.serve()
    ups = [e for e in rig.service.events if isinstance(e, RemoteUp)]  # type: ignore[union-attr]
    assert [e.uuid for e in ups] == [UUIDS[0]]


def test_ready_means_every_setup_request_succeeded(short_dir: Path) -> None:
    """A driver VM whose setup is refused reports setup-failed, never ready; the others still get ready."""
    rig = Rig(HostServer(short_dir, ping_interval=0.2, extra=("--limit", "max_frontends=1")))
    try:
        refused = rig.add_vm(MAC_A, MAC_B, vm_uuid=UUIDS[0])  # two frontends: the server takes one
        rig.add_vm(MAC_C, vm_uuid=UUIDS[1])
        rig.vms.reverse()  # the good one's ready first, then the refused one's report
        with pytest.raises(ProcessError, match="setup-failed instead of ready"):
            rig.serve()
        assert list(rig.ready) == [UUIDS[1]]
        assert refused.stats()["ready"] is False
    finally:
        rig.close()
