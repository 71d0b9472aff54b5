"""The net switch as an L2 switch, with real traffic: three simulated driver VMs, our driver over vfio-user.

Broadcast and multicast (what ARP and IPv6 neighbour discovery send) and unknown
unicast reach every other port exactly once and never their source; a frame
to the sender's own MAC goes nowhere; the per-port counters say which case
each frame was.
"""

from __future__ import annotations

from typing import Any

from tests.integration.conftest import MAC_A, MAC_B, MAC_C, UUIDS, wait_for
from vhostpci_host.harness import Rig

BURST = 200  # below the 256 RX buffers each port posts: a flood that outran a receiver would drop
BURSTS = 3
BROADCAST = "ff:ff:ff:ff:ff:ff"
IPV6_ALL_NODES = "33:33:00:00:00:01"  # the multicast MAC of ff02::1 (RFC 2464, 7)
UNKNOWN = "52:54:00:00:00:99"  # a unicast MAC no port has


def fe(vm: Any) -> dict[str, Any]:
    return vm.stats()["frontends"][0]  # type: ignore[no-any-return]


def three(rig: Rig) -> tuple[Any, Any, Any]:
    vms = (rig.add_vm(MAC_A, vm_uuid=UUIDS[0]), rig.add_vm(MAC_B, vm_uuid=UUIDS[1]),
           rig.add_vm(MAC_C, vm_uuid=UUIDS[2]))  # fmt: skip
    rig.serve()
    return vms


def test_broadcast_multicast_and_unknown_unicast_reach_every_other_port_once(rig: Rig) -> None:
    a, b, c = three(rig)
    expect = 0
    for dst, size in ((BROADCAST, 64), (IPV6_ALL_NODES, 1500), (UNKNOWN, 64)):
        for _ in range(BURSTS):
            a.send(f"send {dst} {BURST} {size}")
            expect += BURST
            wait_for(lambda: fe(b)["received"] >= expect and fe(c)["received"] >= expect, 30,  # noqa: B023
                     f"flood to {dst}")  # fmt: skip
    for vm in (b, c):
        st = fe(vm)
        assert (st["received"], st["duplicates"], st["corrupt"]) == (expect, 0, 0)
        assert st["from"] == {MAC_A: expect}  # each frame of A's exactly once, nothing else
    assert fe(a)["received"] == 0  # never back to the source
    ports = rig.backend.stats()
    assert ports[MAC_A]["tx_frames"] == expect
    assert ports[MAC_A]["tx_flooded"] == expect and ports[MAC_A]["tx_unicast"] == 0
    for mac in (MAC_B, MAC_C):
        assert ports[mac]["rx_frames"] == expect
        assert ports[mac]["rx_dropped_no_buffer"] == 0
    assert ports[MAC_A]["rx_frames"] == 0


def test_unicast_goes_to_one_port_and_never_back_to_its_source(rig: Rig) -> None:
    a, b, c = three(rig)
    a.send(f"send {MAC_B} 500 64")
    a.send(f"send {MAC_A} 300 64")  # to its own MAC: no other port may see it, nor may A
    b.send(f"send {MAC_C} 400 1500")
    wait_for(lambda: fe(b)["received"] >= 500 and fe(c)["received"] >= 400, 30, "unicast")
    wait_for(lambda: rig.backend.stats()[MAC_A]["tx_frames"] == 800, 10, "A's frames all switched")
    assert fe(b)["from"] == {MAC_A: 500}
    assert fe(c)["from"] == {MAC_B: 400}
    assert fe(a)["received"] == 0
    ports = rig.backend.stats()
    assert (ports[MAC_A]["tx_unicast"], ports[MAC_A]["tx_dropped_unknown"], ports[MAC_A]["tx_flooded"]) == (
        500, 300, 0)  # fmt: skip
    assert ports[MAC_B]["tx_unicast"] == 400 and ports[MAC_B]["rx_frames"] == 500
    assert ports[MAC_C]["rx_frames"] == 400 and ports[MAC_C]["rx_bytes"] == 400 * 1500


def test_pktgen_traffic_through_the_switch_arrives_checked(rig: Rig) -> None:
    """The simulator's pktgen (recycled frames, only the stamp rewritten) at the bench's three sizes."""
    a = rig.add_vm(MAC_A, vm_uuid=UUIDS[0])
    b = rig.add_vm(MAC_B, vm_uuid=UUIDS[1])
    rig.serve()
    expect = 0
    for size, n in ((64, 3000), (1500, 3000), (65536, 300)):
        a.send(f"pktgen {MAC_B} {n} {size}")
        b.send(f"pktgen {MAC_A} {n} {size}")
        expect += n
        wait_for(lambda: fe(a)["received"] >= expect and fe(b)["received"] >= expect, 60,  # noqa: B023
                 f"pktgen {size} B")  # fmt: skip
    for vm, peer in ((a, MAC_B), (b, MAC_A)):
        st = fe(vm)
        assert (st["received"], st["duplicates"], st["corrupt"]) == (expect, 0, 0)
        assert st["from"] == {peer: expect} and st["sent"] == expect
        assert st["received_bytes"] == 3000 * 64 + 3000 * 1500 + 300 * 65536
