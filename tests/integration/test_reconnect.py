"""The lifecycle of a driver VM on the server (protocol.md 7.5): gone, back with its UUID, freed.

Real processes: the server, simulated driver VMs and our driver serving their
devices with the net switch in this process. Each test runs three rounds of
the same disruption and checks, after every round, that the restarted driver
VM forwards again, that the well-behaved one never stopped, and that the
server's fd count (and the toolkit's) is back to what it was after the first.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import MAC_A, MAC_B, PING_INTERVAL, PING_MISSES, UUIDS, wait_for
from tests.integration.test_host_side import settled_fds
from tests.integration.test_peer_limits import RawPeer
from vhostpci_driver.apps.net import net_policy
from vhostpci_driver.device import VhostPciDevice
from vhostpci_driver.errors import FailReason
from vhostpci_driver.service import Service
from vhostpci_driver.wire.ctrl import AckResult
from vhostpci_driver.wire.sock import SockAck
from vhostpci_host.harness import DriverVmProcess, HostServer, Rig

M = 1 << 20
ROUNDS = 3


def forwards(src: DriverVmProcess, dst: DriverVmProcess, dst_mac: str, frames: int = 50) -> None:
    """``frames`` frames from ``src`` reach ``dst``, none corrupt (bounded wait)."""
    before = dst.stats()["frontends"][0]["received"]
    src.send(f"send {dst_mac} {frames} 256")
    got = f"{frames} frames to {dst_mac}"
    wait_for(lambda: dst.stats()["frontends"][0]["received"] >= before + frames, 20, got)
    assert dst.stats()["frontends"][0]["corrupt"] == 0


def restart(rig: Rig, old: DriverVmProcess, sig: int = signal.SIGKILL) -> DriverVmProcess:
    """Stop ``old`` (killed by default: no goodbye) and start it again with its UUID and MAC."""
    old.stop(sig)
    rig.vms.remove(old)
    new = rig.add_vm(*old.macs, vm_uuid=old.uuid, memory="64M")
    ev = new.read_event("ready", 20)
    assert ev["uuid"] == str(old.uuid)
    assert not [e for e in new.pending if e.get("event") == "ack-failed"], new.pending
    return new


def test_a_killed_driver_vm_comes_back_with_its_uuid_and_forwards(rig: Rig) -> None:
    """Item 8: the toolkit acks the teardown DELs before it clears, the server releases on any ack."""
    a = rig.add_vm(MAC_A, vm_uuid=UUIDS[0], memory="64M")
    b = rig.add_vm(MAC_B, vm_uuid=UUIDS[1], memory="64M")
    rig.serve()
    forwards(a, b, MAC_B)
    server_base = toolkit_base = -1
    for round_ in range(ROUNDS):
        a = restart(rig, a)
        rig.server.read_event("remote-down", 10)
        forwards(a, b, MAC_B)
        forwards(b, a, MAC_A)
        server_now, toolkit_now = settled_fds(rig.server.pid), settled_fds(os.getpid())
        if round_ == 0:
            server_base, toolkit_base = server_now, toolkit_now
        assert (server_now, toolkit_now) == (server_base, toolkit_base), f"round {round_}"
    dev = rig.devices[0]
    assert dev.engine.stats.fail_reasons.get("NOT_FOUND", 0) == 0  # every teardown DEL found its target


def test_a_second_connection_with_the_same_uuid_replaces_the_first(rig: Rig) -> None:
    """Item 9: the old connection is removed first (protocol.md 7.2.1), the new one's ADD succeeds."""
    a = rig.add_vm(MAC_A, vm_uuid=UUIDS[0], memory="64M")
    b = rig.add_vm(MAC_B, vm_uuid=UUIDS[1], memory="64M")
    rig.serve()
    server_base = -1
    for round_ in range(ROUNDS):
        # The new process connects while the old one is still alive and connected.
        rig.vms.remove(a)
        new = rig.add_vm(MAC_A, vm_uuid=UUIDS[0], memory="64M")
        ev = new.read_event("ready", 20)
        assert not [e for e in new.pending if e.get("event") == "ack-failed"], new.pending
        assert ev["uuid"] == str(UUIDS[0])
        assert a.read_event("server-gone", 10)  # the old connection was dropped by the server
        a.stop()
        a = new
        forwards(a, b, MAC_B)
        forwards(b, a, MAC_A)
        now = settled_fds(rig.server.pid)
        if round_ == 0:
            server_base = now
        assert now == server_base, f"round {round_}"


def test_heartbeats_count_afresh_after_a_drop_for_missed_ones(short_dir: Path) -> None:
    """Item 15: a driver VM dropped for missed heartbeats is not dropped at once when it comes back."""
    interval = 0.5  # three misses take 1.5 s: a loaded machine does not drop the good driver VMs
    rig = Rig(HostServer(short_dir, ping_interval=interval))
    try:
        a = rig.add_vm(MAC_A, vm_uuid=UUIDS[0], memory="64M")
        b = rig.add_vm(MAC_B, vm_uuid=UUIDS[1], memory="64M")
        rig.serve()
        u = uuid.uuid4()
        for _ in range(ROUNDS):
            peer = RawPeer(rig.server.socket, memory=8 * M)
            peer.uuid = u
            peer.memory(4 * M)
            # Not answering: the PINGs pile up until the server says we missed three.
            ev = rig.server.read_event("client-dropped", 10)
            assert ev["uuid"] == str(u) and "heartbeats" in ev["why"], ev
            peer.close()
            back = RawPeer(rig.server.socket, memory=8 * M)
            back.uuid = u
            back.memory(4 * M)
            # Answering every PING for 6 intervals: kept, although the old count said 3.
            assert back.quiet_for(6 * interval), "dropped on reconnect"
            back.close()
            ev = rig.server.read_event("client-dropped", 10)
            assert ev["uuid"] == str(u) and "heartbeats" not in ev["why"], ev
            forwards(a, b, MAC_B)
    finally:
        rig.close()


def test_devices_of_gone_uuids_are_freed(short_dir: Path) -> None:
    """Item 12: after the grace period a gone UUID's device, socket file and fds are released."""
    server = HostServer(short_dir, ping_interval=0.2, extra=("--gone-grace", "0.5"))
    try:
        base = settled_fds(server.pid)
        for _ in range(ROUNDS):
            peers = [RawPeer(server.socket, memory=8 * M) for _ in range(4)]
            for p in peers:
                p.memory(4 * M)
                server.device_socket(p.uuid)
            for p in peers:
                p.close()
            freed = {server.read_event("device-freed", 10)["uuid"] for _ in peers}
            assert freed == {str(q.uuid) for q in peers}
            assert not list((short_dir / "devices").iterdir())
            assert settled_fds(server.pid) == base
    finally:
        server.stop()


def test_a_uid_may_hold_only_so_many_devices(short_dir: Path) -> None:
    """Item 12: within the grace period the uid's oldest gone device makes room, a live one never."""
    server = HostServer(short_dir, ping_interval=0.2, extra=("--limit", "max_devices_per_uid=2"))
    try:
        first = RawPeer(server.socket, memory=8 * M)
        first.memory(4 * M)
        server.device_socket(first.uuid)
        second = RawPeer(server.socket, memory=8 * M)
        second.memory(4 * M)
        server.device_socket(second.uuid)
        third = RawPeer(server.socket, memory=8 * M)
        rid = third.memory(4 * M)
        msg = third.reply()
        assert msg is not None and msg.request_id == rid and isinstance(msg.body, SockAck)
        assert (msg.body.result, msg.body.reason) == (AckResult.ADD_FAIL, FailReason.LIMIT)
        first.close()
        server.read_event("remote-down", 10)
        third.memory(4 * M)
        ev = server.read_event("device-freed", 10)
        assert ev["uuid"] == str(first.uuid)
        server.device_socket(third.uuid)
        for p in (second, third):
            p.close()
    finally:
        server.stop()


def test_a_uuid_belongs_to_the_uid_that_claimed_it(short_dir: Path) -> None:
    """Item 13: another allowed uid naming a live driver VM's UUID is refused; the owner is not evicted."""
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    other = 65534
    os.chmod(short_dir, 0o755)
    server = HostServer(short_dir, ping_interval=0.2, extra=("--allow-uid", str(other)))
    rig = Rig(server)
    try:
        os.chmod(server.socket, 0o666)
        a = rig.add_vm(MAC_A, vm_uuid=UUIDS[0], memory="64M")
        b = rig.add_vm(MAC_B, vm_uuid=UUIDS[1], memory="64M")
        rig.serve()
        for _ in range(ROUNDS):
            pid = os.fork()
            if pid == 0:  # the child: uid nobody, claiming A's UUID
                code = 1
                try:
                    os.setgid(other)
                    os.setuid(other)
                    peer = RawPeer(server.socket, memory=8 * M)
                    peer.uuid = UUIDS[0]
                    rid = peer.memory(4 * M)
                    msg = peer.reply()
                    ok = (
                        msg is not None
                        and msg.request_id == rid
                        and isinstance(msg.body, SockAck)
                        and msg.body.reason == FailReason.REJECTED
                        and peer.reply() is None  # and dropped
                    )
                    code = 0 if ok else 2
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            ev = server.read_event("refused", 10)
            assert ev["uuid"] == str(UUIDS[0]) and ev["uid"] == other
            forwards(a, b, MAC_B)
            forwards(b, a, MAC_A)
        assert not [e for e in server.pending if e.get("event") == "remote-down"]
    finally:
        rig.close()


def test_without_takeover_a_returning_driver_vm_gets_a_new_device(short_dir: Path) -> None:
    """``serve --no-takeover`` (docs/host.md "Lifecycle"): a killed driver VM's device is freed once our
    driver acked its teardown, so its old vfio-user client sees the socket close and is let go; the
    same UUID coming back gets a new device on a fresh socket that a new client serves; the other
    driver VM never notices, and no fd is left behind in the server or in the toolkit."""
    server = HostServer(short_dir, ping_interval=PING_INTERVAL, ping_misses=PING_MISSES,
                        extra=("--no-takeover",))  # fmt: skip
    rig = Rig(server)
    service = rig.service = Service([], rig.backend)
    service.watching = True  # as ``vhostpci run --watch``: a function that goes is let go alone

    def serve(vm: DriverVmProcess, path: str) -> VhostPciDevice:
        dev = VhostPciDevice(f"vfio-user:{path}", policies={1: net_policy})
        rig.stop_service()  # the service is single-threaded: add while its thread is stopped
        service.add(f"vfio-user:{path}", dev)
        rig.start_service()
        vm.read_event("ready", 20)
        return dev

    try:
        a = rig.add_vm(MAC_A, vm_uuid=UUIDS[0], memory="64M")
        b = rig.add_vm(MAC_B, vm_uuid=UUIDS[1], memory="64M")
        dev_a = serve(a, server.device_socket(a.uuid))
        dev_b = serve(b, server.device_socket(b.uuid))
        forwards(a, b, MAC_B)
        server_base = toolkit_base = -1
        for round_ in range(ROUNDS):
            thread = rig.thread
            a.stop(signal.SIGKILL)
            rig.vms.remove(a)
            assert server.read_event("remote-down", 10)["uuid"] == str(UUIDS[0])
            freed = server.read_event("device-freed", 10)
            assert freed["uuid"] == str(UUIDS[0]) and "teardown acked" in freed["why"], freed
            # The old client saw its socket close: the service let that device go, and b's stays.
            wait_for(lambda old=dev_a: old not in service.devices, 10, "the old device let go")
            assert not (short_dir / "devices" / f"{UUIDS[0]}.sock").exists()
            assert dev_b in service.devices and dev_b.failed is None
            assert rig.thread is thread and thread is not None
            thread.join(1.0)  # returns early if letting the old device go raised in the service
            assert thread.is_alive(), "the service died letting the old device go"
            a = rig.add_vm(MAC_A, vm_uuid=UUIDS[0], memory="64M")
            ev = server.read_event("device", 20)  # a new device: the ABSENT -> UP path
            assert ev["uuid"] == str(UUIDS[0]), ev
            dev_a = serve(a, ev["socket"])
            forwards(a, b, MAC_B)
            forwards(b, a, MAC_A)
            server_now, toolkit_now = settled_fds(server.pid), settled_fds(os.getpid())
            if round_ == 0:
                server_base, toolkit_base = server_now, toolkit_now
            assert (server_now, toolkit_now) == (server_base, toolkit_base), f"round {round_}"
        assert not [e for e in b.pending if e.get("event") in ("server-gone", "ack-failed")], b.pending
    finally:
        rig.stop_service()
        service.close()
        rig.close()


def test_without_takeover_a_device_whose_teardown_is_not_acked_is_freed_on_comeback(short_dir: Path) -> None:
    """``--no-takeover`` with nobody serving the device (its teardown DELs unacked): the same UUID
    coming back frees the old device first and gets a new one, on a fresh socket."""
    server = HostServer(short_dir, ping_interval=0.2, extra=("--no-takeover", "--gone-grace", "2"))
    try:
        base = settled_fds(server.pid)
        for _ in range(ROUNDS):
            peer = RawPeer(server.socket, memory=8 * M)
            peer.memory(4 * M)
            first = server.read_event("device", 10)
            u = peer.uuid
            peer.close()
            server.read_event("remote-down", 10)
            back = RawPeer(server.socket, memory=8 * M)
            back.uuid = u
            back.memory(4 * M)
            freed = server.read_event("device-freed", 10)
            assert freed["uuid"] == str(u) and "came back" in freed["why"], freed
            again = server.read_event("device", 10)
            assert again["uuid"] == str(u) and again["socket"] == first["socket"], again
            back.close()
            assert server.read_event("device-freed", 10)["uuid"] == str(u)  # at the grace
            assert settled_fds(server.pid) == base
    finally:
        server.stop()
