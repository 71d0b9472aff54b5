"""The driver against hostile device input, its event interfaces, its memory, and its teardown."""

from __future__ import annotations

import asyncio
import gc
import os
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.integration.conftest import MAC_A, MAC_B, UUIDS, wait_for
from vhostpci_driver.device import VhostPciDevice
from vhostpci_driver.events import Event, FeaturesNegotiated, FrontendAdded, MemoryAdded, RemoteUp
from vhostpci_driver.wire import ctrl
from vhostpci_driver.wire.ctrl import Ack, AckResult, FeatureBits
from vhostpci_host.device_model import VhostPciDeviceModel
from vhostpci_host.harness import DriverVmProcess, HostServer, Rig, stop_served_driver
from vhostpci_host.vfio_user_server import VfioUserServer


def test_malformed_controlq_messages_are_acked_fail_and_the_queue_keeps_going(short_dir: Path) -> None:
    """The device itself injects garbage; the driver (a real `vhostpci run` process) must survive it."""
    model = VhostPciDeviceModel(window_size=1 << 24)
    ram = os.memfd_create("driver-vm")
    os.ftruncate(ram, 1 << 16)
    model.map_region(0, 1 << 16, ram, 0)
    path = str(short_dir / "dev.sock")
    server = VfioUserServer(path, model)
    acks: dict[int, Ack] = {}
    errors: list[str] = []
    model.on_ack = acks.__setitem__
    model.on_ack_error = lambda why, rid: errors.append(why)
    env = {**os.environ, "VHOSTPCI_RUN_DIR": str(short_dir / "run")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhostpci_driver", "run", f"vfio-user:{path}", "--app", "none"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not model.rings[1] and time.monotonic() < deadline:  # until the driver set DRIVER_OK
            server.run_once(0.05)
        def fresh_id() -> int:  # injected messages keep ids growing, as the device must
            model.next_request_id += 1
            return model.next_request_id - 1

        good = model.send_control(FeatureBits(1, 7, 1 << 32))  # unknown frontend: a FAIL with a reason
        raw = bytearray(ctrl.encode_message(fresh_id(), FeatureBits(1, 7, 1)))
        struct.pack_into("<H", raw, 2, 9)  # version 9
        model.send_raw(bytes(raw))
        model.send_raw(struct.pack("<HHIQ", 0x77, 1, 0, fresh_id()))  # unknown type
        model.send_raw(b"\x01\x00")  # shorter than a header: dropped, counted
        model.send_raw(ctrl.encode_message(fresh_id(), FeatureBits(1, 7, 1))[:-3])  # truncated payload
        later = model.send_control(ctrl.MemoryInfo(ctrl.Op.ADD, (ctrl.MemoryRegion(0, 4096, 0),)))  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while later not in acks and time.monotonic() < deadline:
            server.run_once(0.05)
        assert acks[good].result == AckResult.ADD_FAIL and acks[good].reason == 8  # NOT_FOUND
        assert acks[later].result == AckResult.ADD_DONE  # the queue kept going
        # The injected ones were acked too, by their ids (not outstanding: reported as unknown ids).
        assert len(errors) == 3 and all("unknown" in e for e in errors)
        assert proc.poll() is None
    finally:
        stop_served_driver(proc, server)
        os.close(ram)


def test_events_by_iteration_callbacks_and_asyncio(rig: Rig) -> None:
    vm = rig.add_vm(MAC_A, vm_uuid=UUIDS[0])
    path = rig.server.device_socket(vm.uuid)
    seen: list[Event] = []
    with VhostPciDevice(f"vfio-user:{path}") as dev:
        dev.on(FrontendAdded, seen.append)
        kinds = [type(e) for e in dev.events(timeout=2)]
        assert kinds[:4] == [RemoteUp, MemoryAdded, FrontendAdded, FeaturesNegotiated]
        assert len(seen) == 1 and isinstance(seen[0], FrontendAdded)
    vm.read_event("ready", 10)
    with VhostPciDevice(f"vfio-user:{path}") as dev:  # a restarted driver gets the whole state replayed

        async def first_four() -> list[type]:
            out: list[type] = []
            async for ev in dev.aevents():
                out.append(type(ev))
                if len(out) == 4:
                    return out
            return out

        assert asyncio.run(asyncio.wait_for(first_four(), 10)) == [
            RemoteUp,
            MemoryAdded,
            FrontendAdded,
            FeaturesNegotiated,
        ]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_open_close_100_times_leaks_nothing(rig: Rig) -> None:
    vm = rig.add_vm(MAC_A, vm_uuid=UUIDS[0])
    path = rig.server.device_socket(vm.uuid)
    with VhostPciDevice(f"vfio-user:{path}") as dev:  # warm up imports and caches
        list(dev.events(timeout=0.2))
    # Earlier tests' cyclic garbage (an in-process device model keeps its window's mmaps, and
    # with them a memfd) must not be reaped inside the measured loop, whenever a collection runs.
    gc.collect()
    fds, maps = open_fds(), mappings()
    for _ in range(100):
        with VhostPciDevice(f"vfio-user:{path}") as dev:
            dev.process()
        dev.close()  # idempotent
    assert open_fds() == fds
    assert mappings() <= maps + 2  # the allocator may keep an arena; no window or DMA mapping stays


def test_polling_mode_serves_without_interrupts(rig: Rig) -> None:
    vm = rig.add_vm(MAC_A, vm_uuid=UUIDS[0])
    path = rig.server.device_socket(vm.uuid)
    with VhostPciDevice(f"vfio-user:{path}", polling=True) as dev:
        assert dev.irq_fds == []
        got: list[Event] = []
        deadline = time.monotonic() + 10
        while not any(isinstance(e, FeaturesNegotiated) for e in got) and time.monotonic() < deadline:
            got += dev.process()
        assert any(isinstance(e, FeaturesNegotiated) for e in got)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_serving_a_4gib_window_stays_under_80mib_rss(short_dir: Path) -> None:
    server = HostServer(short_dir)
    vm = DriverVmProcess(server.socket, [MAC_A, MAC_B], vm_uuid=uuid.UUID(int=0x4), memory="2G")
    path = server.device_socket(vm.uuid)
    env = {**os.environ, "VHOSTPCI_RUN_DIR": str(short_dir / "run")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhostpci_driver", "run", f"vfio-user:{path}"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        vm.read_event("ready", 30)
        vm.send(f"send {MAC_B} 2000 mixed")  # traffic through the window too, A to B
        wait_for(lambda: vm.stats()["frontends"][1]["received"] >= 2000, 60, "traffic")
        rss = rss_kib(proc.pid)
        assert rss < 80 * 1024, f"RSS {rss} KiB"
    finally:
        proc.terminate()
        proc.wait(10)
        vm.stop()
        server.stop()
