"""One port or one device breaking stops only itself: never `vhostpci run`, never the other driver VMs.

Real processes: the server and simulated driver VMs; our service serves every
device in one loop, as ``vhostpci run`` does. Each test breaks one thing and
checks that the others still forward, that the service is still running, and
that the broken thing is reported with the rule it broke.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import MAC_A, MAC_B, MAC_C, UUIDS, wait_for
from vhostpci_driver.events import DeviceErrorEvent, FrontendRemoved
from vhostpci_driver.virtio.transport import QUEUE_SELECT, QUEUE_SIZE
from vhostpci_driver.wire.device import Queue
from vhostpci_host.harness import Rig


def received(vm: object) -> int:
    return vm.stats()["frontends"][0]["received"]  # type: ignore[attr-defined, no-any-return]


def a_to_b_forwards(rig: Rig, frames: int = 300) -> None:
    a, b = rig.vms[0], rig.vms[1]
    before = received(b)
    a.send(f"send {MAC_B} {frames} 256")
    wait_for(lambda: received(b) >= before + frames, 30, "A->B traffic")
    assert b.stats()["frontends"][0]["corrupt"] == 0


def three_vms(rig: Rig) -> None:
    for mac, u in zip((MAC_A, MAC_B, MAC_C), UUIDS, strict=True):
        rig.add_vm(mac, vm_uuid=u)
    rig.serve()


@pytest.mark.parametrize(("kind", "rule"), [("rx-short", "net-rx-short"), ("rx-readable", "net-rx-readable")])
def test_a_hostile_rx_ring_breaks_its_port_only(rig: Rig, kind: str, rule: str) -> None:
    """virtio 1.2, 5.1.6.3: receive buffers are device-writable, and (mergeable) hold at least the header."""
    three_vms(rig)
    a, c = rig.vms[0], rig.vms[2]
    port_c = bytes.fromhex(MAC_C.replace(":", ""))
    # C is ready once its FEATURE_BITS is acked; the service thread adds its port just after.
    wait_for(lambda: port_c in rig.backend.ports, 10, "C's port")
    assert rig.backend.ports[port_c].mergeable  # the rule under test applies
    c.send(f"hostile {kind}")
    c.stats()  # answered after the command before it: C's RX ring is broken from here
    a.send(f"send {MAC_C} 50 256")  # into C's broken RX ring
    wait_for(lambda: rig.backend.stats()[MAC_C]["broken"] is not None, 10, "C's port marked broken")
    assert str(rig.backend.stats()[MAC_C]["broken"]).startswith(rule)
    assert rig.thread is not None and rig.thread.is_alive()  # the service kept running
    for _ in range(3):
        a_to_b_forwards(rig)
    assert rig.service is not None and rig.service.error is None and rig.service.app_error is None


def test_one_device_needing_a_reset_stops_only_that_device(rig: Rig) -> None:
    three_vms(rig)
    a_to_b_forwards(rig)
    dev_c = rig.devices[2]
    # Break virtio 1.2, 4.1.4.3.2 on C's device only (a queue's size written while it is live):
    # the device sets DEVICE_NEEDS_RESET and raises its config interrupt. The service is paused so
    # this thread is the only one talking to that device.
    rig.stop_service()
    dev_c.transport.common.write16(QUEUE_SELECT, Queue.CONTROLQ)
    dev_c.transport.common.write16(QUEUE_SIZE, 32)
    rig.start_service()
    wait_for(lambda: dev_c.failed is not None, 10, "C's device marked failed")
    assert "DEVICE_NEEDS_RESET" in dev_c.failed  # type: ignore[operator]
    assert dev_c.dump()["failed"] == dev_c.failed
    assert rig.service is not None
    service = rig.service
    c_id = int(MAC_C.replace(":", ""), 16)
    # The service thread marks the device failed, then delivers what that removed: wait for both.
    wait_for(lambda: any(isinstance(e, FrontendRemoved) and e.key.device_id == c_id for e in service.events),
             10, "C's frontend removed")  # fmt: skip
    wait_for(lambda: any(isinstance(e, DeviceErrorEvent) and "DEVICE_NEEDS_RESET" in e.message
                         for e in service.events), 10, "the reset reported")  # fmt: skip
    wait_for(lambda: MAC_C not in rig.backend.stats(), 10, "C's port removed from the switch")
    for _ in range(3):
        a_to_b_forwards(rig)
    assert rig.thread is not None and rig.thread.is_alive()
    assert rig.service.error is None  # A's and B's devices are still served
    assert [d.failed for d in rig.devices[:2]] == [None, None]
