"""Run INSIDE the device VM (tools/vm/run.py): a real kernel, real vfio-pci, real MSI-X, real udev.

The host side (server, device on vfio-user-pci, a simulated driver VM) runs on
the host; these tests see only what a guest sees.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest

from vhostpci_driver.apps.net import NetBackend, net_policy
from vhostpci_driver.device import VhostPciDevice
from vhostpci_driver.events import FeaturesNegotiated
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


def test_3_kernel_vfio_brings_it_up_with_msix_and_serves_traffic() -> None:
    address = vhost_pci_address()
    assert vhostpci("bind", address).returncode == 0
    fn: VfioFunction | None = None
    try:
        fn = VfioFunction(address)
        for i in (0, 1, 2, 3, 4, 5, 7):  # BARs and config (VGA, 8, exists only on VGA devices)
            info = fn.region_info(i)
            if info.size:
                print(f"VFIO region {i}: {info}")
        for i in (0, 1, 2):  # INTx, MSI, MSI-X (ERR and REQ exist only on PCIe functions)
            print(f"VFIO irq {i}: {fn.irq_info(i)}")
        t0 = time.monotonic()
        dev = VhostPciDevice(fn, policies={1: net_policy})
        print(f"bring-up through kernel VFIO took {time.monotonic() - t0:.1f}s; irq fds {len(dev.irq_fds)}",
              flush=True)
        backend = NetBackend("loopback")
        service = Service([dev], backend)
        thread = threading.Thread(target=service.run, args=(0.05,), daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
            isinstance(e, FeaturesNegotiated) for e in service.events
        ):
            time.sleep(0.1)
        assert any(isinstance(e, FeaturesNegotiated) for e in service.events), service.events
        # The driver VM on the host sends frames once we acked it; serve them back (loopback).
        while time.monotonic() < deadline:
            ports = backend.stats()
            if ports and all(p["tx_frames"] >= 1000 for p in ports.values()):
                break
            time.sleep(0.2)
        time.sleep(2)  # let the last used entries and doorbells go out
        service.stop.set()
        thread.join(10)
        print(f"traffic: {backend.stats()}")
        print(f"device: {json.dumps(dev.dump()['stats'])}")
        assert dev.stats["interrupts"] > 0  # real MSI-X through VFIO
        stats = dev.dump()["stats"]
        assert stats["acked_done"] == stats["received"] and stats["acked_fail"] == 0  # type: ignore[index]
        (port,) = backend.stats().values()
        assert port["tx_frames"] >= 1000 and port["rx_frames"] == port["tx_frames"] and port["dropped"] == 0
        dev.close()
    except BaseException:
        traceback.print_exc()  # shown before the unbind, which can block while anything holds the device
        raise
    finally:
        if fn is not None:
            fn.close()  # vfio-pci's unbind waits for every user of the device to let go
        fn = None
        gc.collect()  # mappings kept alive by the traceback hold a dup of the device fd
        vhostpci("unbind", address)
