"""Run INSIDE the device VM (tools/vm/run.py): a real kernel, real vfio-pci, real MSI-X, real udev.

The host side (server, device on vfio-user-pci, a simulated driver VM) runs on
the host; these tests see only what a guest sees.
"""

from __future__ import annotations

import gc
import json
import os
import select
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import pyudev

from vhostpci_driver.apps.net import NetBackend, net_policy
from vhostpci_driver.device import VhostPciDevice
from vhostpci_driver.errors import TransportError
from vhostpci_driver.events import FeaturesNegotiated
from vhostpci_driver.pci.dma import DEFAULT_IOVA
from vhostpci_driver.pci.vfio import VfioFunction
from vhostpci_driver.service import Service

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(
        not os.environ.get("VHOSTPCI_IN_GUEST"), reason="runs inside the VM tier's guest only"
    ),
]

SYS = Path("/sys/bus/pci/devices")


def vhost_pci_address() -> str:
    for d in sorted(SYS.iterdir()):
        if (d / "vendor").read_text().strip() == "0x1af4" and (d / "device").read_text().strip() == "0x107f":
            return d.name
    raise AssertionError("no vhost-pci function (1af4:107f) in this guest: did QEMU attach it?")


def driver_of(address: str) -> str | None:
    link = SYS / address / "driver"
    return link.resolve().name if link.exists() else None


def vhostpci(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostpci_driver", *args], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


def test_1_the_guest_kernels_virtio_pci_accepts_the_device() -> None:
    address = vhost_pci_address()
    print(f"vhost-pci function at {address}, driver {driver_of(address)}")
    assert driver_of(address) == "virtio-pci"
    ids = [(p / "device").read_text().strip() for p in Path("/sys/bus/virtio/devices").iterdir()]
    print(f"virtio devices: {ids}")
    assert "0x003f" in ids  # our virtio id 63: the kernel's virtio_pci probed it as a valid modern device


def test_2_list_bind_unbind() -> None:
    address = vhost_pci_address()
    listed = json.loads(vhostpci("list", "--json").stdout)["functions"]
    assert [f["address"] for f in listed] == [address]
    out = vhostpci("bind", address)
    assert out.returncode == 0, out.stderr
    assert driver_of(address) == "vfio-pci"
    out = vhostpci("unbind", address)
    assert out.returncode == 0, out.stderr
    assert driver_of(address) == "virtio-pci"


def _serve_traffic(fn: VfioFunction, frames: int = 1000) -> None:
    """Bring the device up on ``fn``, serve the driver VM's ``frames`` back to it (loopback), check all."""
    t0 = time.monotonic()
    dev = VhostPciDevice(fn, policies={1: net_policy})
    print(
        f"bring-up through kernel VFIO ({fn.interface}{', no-IOMMU' if fn.noiommu else ''}) took "
        f"{time.monotonic() - t0:.1f}s; irq fds {len(dev.irq_fds)}",
        flush=True,
    )
    backend = NetBackend("loopback")
    service = Service([dev], backend)
    thread = threading.Thread(target=service.run, args=(0.05,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(isinstance(e, FeaturesNegotiated) for e in service.events):
        time.sleep(0.1)
    assert any(isinstance(e, FeaturesNegotiated) for e in service.events), service.events
    # The driver VM on the host sends frames once we acked it; serve them back (loopback).
    while time.monotonic() < deadline:
        ports = backend.stats()
        if ports and all(p["tx_frames"] >= frames for p in ports.values()):
            break
        time.sleep(0.2)
    time.sleep(2)  # let the last used entries and doorbells go out
    service.stop.set()
    thread.join(10)
    service.close()  # its selector (an epoll fd) is the service's to give back
    print(f"traffic: {backend.stats()}")
    print(f"device: {json.dumps(dev.dump()['stats'])}")
    assert dev.stats["interrupts"] > 0  # real MSI-X through VFIO
    stats = dev.dump()["stats"]
    assert stats["acked_done"] == stats["received"] and stats["acked_fail"] == 0  # type: ignore[index]
    (port,) = backend.stats().values()
    assert port["tx_frames"] >= frames and port["rx_frames"] == port["tx_frames"] and port["dropped"] == 0
    held = _fds_and_maps()[1]
    print(f"device and DMA mappings while serving: {len(held)}")
    assert any("vfio" in m for m in held) and any("memfd" in m for m in held)  # what the leak check sees
    dev.close()


def _with_vfio(address: str, body: Callable[[], None]) -> None:
    """Bind to vfio-pci, run ``body``, unbind even on failure (after everything let go of the device)."""
    assert vhostpci("bind", address).returncode == 0
    try:
        body()
    except BaseException:
        traceback.print_exc()  # shown before the unbind, which can block while anything holds the device
        raise
    finally:
        gc.collect()  # mappings kept alive by a traceback hold a dup of the device fd
        vhostpci("unbind", address)


def test_3_kernel_vfio_brings_it_up_with_msix_and_serves_traffic() -> None:
    address = vhost_pci_address()

    def body() -> None:
        fn = VfioFunction(address)
        try:
            for i in (0, 1, 2, 3, 4, 5, 7):  # BARs and config (VGA, 8, exists only on VGA devices)
                info = fn.region_info(i)
                if info.size:
                    print(f"VFIO region {i}: {info}")
            for i in (0, 1, 2):  # INTx, MSI, MSI-X (ERR and REQ exist only on PCIe functions)
                print(f"VFIO irq {i}: {fn.irq_info(i)}")
            assert fn.backend == "vfio-group"  # Debian's kernel has no VFIO cdev: "auto" falls back
            _serve_traffic(fn)
        finally:
            fn.close()  # vfio-pci's unbind waits for every user of the device to let go

    _with_vfio(address, body)


# -- the kernel tools/vm/prepare-kernel builds: iommufd and the device cdev, no-IOMMU mode --------


def _fds_and_maps() -> tuple[int, list[str]]:
    """Open fds, and the mappings of device regions and DMA memory (the interpreter's own come and go:
    a thread leaves a malloc arena behind)."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return len(os.listdir("/proc/self/fd")), [m for m in maps if "vfio" in m or "memfd" in m]


def test_5_uapi_matches_this_kernels_headers() -> None:
    """tests/unit/test_vfio_uapi.py against Linux 7.2's own vfio.h and iommufd.h: nothing may skip."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         "tests/unit/test_vfio_uapi.py"], capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    print(out.stdout[-1500:])
    assert out.returncode == 0 and " passed" in out.stdout and "skipped" not in out.stdout, out.stderr


def test_6_vfio_cdev_and_iommufd_reopen_and_serve_traffic() -> None:
    address = vhost_pci_address()
    assert Path("/dev/iommu").exists(), "no /dev/iommu: this test runs on tools/vm/prepare-kernel's kernel"

    def body() -> None:
        from vhostpci_driver.pci import sysfs  # noqa: PLC0415

        cdev = sysfs.vfio_cdev(address)
        print(f"VFIO device cdev of {address}: /dev/vfio/devices/{cdev}", flush=True)
        assert cdev is not None
        # Both interfaces, one after the other, 10 times: each must let go of everything it took
        # (an iommufd still bound blocks the group, a group still open blocks the cdev).
        before = _fds_and_maps()
        for _ in range(10):
            for interface in ("cdev", "group"):
                fn = VfioFunction(address, interface=interface)
                try:
                    assert fn.interface == interface and fn.region_info(2).size > 0
                    if fn.can_reset:
                        fn.reset()
                    else:  # QEMU's vfio-user-pci function offers no FLR: a clear refusal
                        with pytest.raises(TransportError, match="offers no function reset"):
                            fn.reset()
                finally:
                    fn.close()
        assert _fds_and_maps() == before
        fn = VfioFunction(address)  # "auto" takes the cdev where the kernel made one
        try:
            assert fn.interface == "cdev" and fn.ioas > 0
            allowed = fn.allowed_iovas()
            print(f"IOAS {fn.ioas} allows {[f'{a:#x}-{b:#x}' for a, b in allowed]}", flush=True)
            assert any(a <= DEFAULT_IOVA <= b for a, b in allowed)  # where the DMA pool goes
            _serve_traffic(fn)
        finally:
            fn.close()
        assert _fds_and_maps() == before

    _with_vfio(address, body)


def test_7_vfio_noiommu_mode_serves_traffic_by_physical_address() -> None:
    address = vhost_pci_address()
    param = Path("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode")
    assert param.exists() and param.read_text().strip() == "Y", "boot with vfio.enable_unsafe_noiommu_mode=1"
    # The pool is handed to the device by physical address: one huge page keeps it contiguous.
    Path("/proc/sys/vm/nr_hugepages").write_text("8")

    def body() -> None:
        from vhostpci_driver.pci import sysfs  # noqa: PLC0415

        assert sysfs.vfio_cdev(address) is None  # the kernel makes no cdev for a no-IOMMU function
        fn = VfioFunction(address)
        try:
            print(f"no-IOMMU group: {sorted(os.listdir('/dev/vfio'))}", flush=True)
            assert fn.interface == "group" and fn.noiommu and fn.backend == "vfio-noiommu"
            _serve_traffic(fn)
        finally:
            fn.close()

    _with_vfio(address, body)


def _kernel_says(pattern: str) -> list[str]:
    out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30, check=False).stdout
    return [ln for ln in out.splitlines() if pattern in ln][-5:]


def test_4_uio_backend_brings_it_up_with_intx() -> None:
    address = vhost_pci_address()
    out = vhostpci("bind", address, "--driver", "uio_pci_generic")
    try:
        if driver_of(address) != "uio_pci_generic":
            # uio_pci_generic takes only functions with an interrupt pin whose INTx can be masked
            # through the command register (PCI 2.3); the kernel says which check failed.
            why = _kernel_says("uio_pci_generic") or _kernel_says(address)
            pytest.skip(f"uio_pci_generic did not take {address}: {out.stderr.strip()} {why}")
        # No IOMMU mapping under UIO: the device sees physical addresses, so the DMA pool must be
        # physically contiguous (a huge page) and the guest's IOMMU must pass this device through.
        Path("/proc/sys/vm/nr_hugepages").write_text("8")
        from vhostpci_driver.pci.uio import UioFunction  # noqa: PLC0415

        fn = UioFunction(address)
        print(f"UIO: {fn.irq_info(0)}; BAR2 {fn.region_info(2)}", flush=True)
        dev = VhostPciDevice(fn, policies={1: net_policy})
        try:
            print(f"UIO bring-up: interrupts by {dev.interrupts}", flush=True)
            assert dev.interrupts == "intx"
            deadline = time.monotonic() + 60
            got: list[object] = []
            while time.monotonic() < deadline and not any(isinstance(e, FeaturesNegotiated) for e in got):
                dev.wait(1.0)
                got += dev.process()
            print(f"UIO events: {[type(e).__name__ for e in got]}; stats {dev.stats}", flush=True)
            assert any(isinstance(e, FeaturesNegotiated) for e in got)
            assert dev.stats["interrupts"] > 0  # the messages arrived on the INTx line
        finally:
            dev.close()
    finally:
        vhostpci("unbind", address)


# -- autostart: runs in the tier's second boot, with systemd as init (tools/vm/run.py --systemd) --

WRAPPER = """#!/bin/sh
# The VM tier's stand-in for the installed console script: the project is mounted at /project.
PYTHONPATH=/project:/project/tools exec python3 -m vhostpci_driver "$@"
"""


def _systemd_is_init() -> bool:
    return Path("/proc/1/comm").read_text().strip() == "systemd"


class Control:
    """The guest's end of the runner's control port (tools/vm/hotplug.py): one line out, one line back."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/virtio-ports/vhostpci.ctl", os.O_RDWR)
        self.buf = b""

    def ask(self, line: str, timeout: float = 180) -> str:
        os.write(self.fd, line.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.fd], [], [], left)[0], f"no answer to {line!r}"
            self.buf += os.read(self.fd, 65536)
        answer, self.buf = self.buf.split(b"\n", 1)
        print(f"control: {line} -> {answer.decode()[:200]}", flush=True)
        return answer.decode()

    def close(self) -> None:
        os.close(self.fd)


def _sh(cmd: str) -> str:
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, f"{cmd}: {out.stdout}{out.stderr}"
    return out.stdout


def _until(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.25)


def _unit_state(unit: str) -> dict[str, str]:
    out = _sh(f"systemctl show -p ActiveState -p Result -p MainPID -p ExecMainStatus {unit}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.mark.skipif(
    not _systemd_is_init(), reason="needs systemd as init: the tier's second boot (--systemd)"
)
def test_autostart_udev_starts_the_service_on_hotplug_and_unplug_stops_it() -> None:
    # Install as a user does: the console script, then 'vhostpci install-udev' and what it says to run.
    wrapper = Path("/usr/local/bin/vhostpci")
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    print(_sh("vhostpci install-udev"))
    # virtme-ng bind-mounts a file over /etc/shadow, which nothing can then replace: let it go first.
    subprocess.run(["umount", "/etc/shadow"], check=False)
    _sh("systemd-sysusers && udevadm control --reload && systemctl daemon-reload")
    print(_sh("systemd-analyze time"), flush=True)  # how long systemd took to boot this guest
    vhostpci_uid = int(_sh("id -u vhostpci"))
    monitor = pyudev.Monitor.from_netlink(pyudev.Context())
    monitor.filter_by(subsystem="pci")
    monitor.start()
    ctl = Control()
    unit = "vhostpci@*.service"
    try:
        assert ctl.ask("plug").startswith("ok"), "device_add failed"
        address = None
        while address is None:  # the kernel announces the new function (bounded by poll's timeout)
            dev = monitor.poll(timeout=120)
            assert dev is not None, "no PCI add event after device_add"
            if dev.action == "add" and dev.attributes.get("device") == b"0x107f":
                address = dev.sys_name
        print(f"hot-plugged vhost-pci function at {address}", flush=True)
        unit = f"vhostpci@{address}.service"
        _until(lambda: _unit_state(unit)["ActiveState"] == "active" and driver_of(address) == "vfio-pci",
               90, f"udev to start {unit}")  # fmt: skip

        def served() -> bool:
            out = vhostpci("status", address, "--json")
            if out.returncode != 0:
                return False
            (st,) = json.loads(out.stdout)["services"]
            return bool(st["remote_up"]) and len(st["frontends"]) == 2  # tools/vm/hotplug.py: two ports

        _until(served, 120, "the service to serve the driver VM's frontend")
        pid = int(_unit_state(unit)["MainPID"])
        uid = int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[1])
        print(f"{unit}: pid {pid}, uid {uid}", flush=True)
        assert uid == vhostpci_uid  # the unit's --user: the service does not keep root
        assert ctl.ask("send 500") == "ok"

        def looped() -> bool:
            fe = json.loads(ctl.ask("stats").removeprefix("ok "))["frontends"][0]
            return bool(fe["received"] >= 500)

        _until(looped, 120, "500 frames through the autostarted service")
        fe = json.loads(ctl.ask("stats").removeprefix("ok "))["frontends"][0]
        print(f"traffic through the autostarted service: {fe}", flush=True)
        assert (fe["received"], fe["corrupt"], fe["duplicates"]) == (500, 0, 0)
        # Unplug as the guest kernel does on device_del (pciehp/ACPI eject end in the same
        # pci_stop_and_remove_bus_device): vfio-pci's remove waits until every user closes the
        # function, and asks on the device-request interrupt; the service must let go. QMP
        # device_del itself aborts QEMU 11.1.3 for a vfio-user-pci function, whatever driver the
        # guest has on it (docs/host.md), so the tier removes the function from inside the guest.
        t0 = time.monotonic()
        remover = threading.Thread(target=Path(f"/sys/bus/pci/devices/{address}/remove").write_text,
                                   args=("1",), daemon=True)  # fmt: skip
        remover.start()
        remover.join(90)  # the write returns once the function is gone
        assert not remover.is_alive(), "the kernel still waits for the function: the service did not let go"
        print(f"removal took {time.monotonic() - t0:.1f}s", flush=True)
        _until(lambda: _unit_state(unit)["ActiveState"] in ("inactive", "failed"), 60, f"{unit} to stop")
        state = _unit_state(unit)
        log = _sh(f"journalctl -b -u {unit} --no-pager -o cat")
        print(f"{unit} after unplug: {state}\n{log[-3000:]}", flush=True)
        assert state["ActiveState"] == "inactive" and state["Result"] == "success", state
        assert "being removed: releasing it" in log
        assert not (SYS / address).exists()
    except BaseException:
        diag = f"systemctl status '{unit}' --no-pager; journalctl -b -u '{unit}' --no-pager -o cat | tail -40"
        out = subprocess.run(diag, shell=True, capture_output=True, text=True, timeout=60, check=False)
        print(out.stdout)
        raise
    finally:
        ctl.close()
