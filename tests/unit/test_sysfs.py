"""Finding and binding PCI functions, against a fake sysfs tree (the real one is the VM tier's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vhostpci_driver.errors import TransportError
from vhostpci_driver.pci import sysfs
from vhostpci_driver.pci.open import open_function
from vhostpci_driver.pci.vfio import PAGEMAP_PRESENT, VfioFunction, physical_address


def add_function(root: Path, addr: str, vendor: int, device: int, driver: str | None, group: int) -> Path:
    """One PCI function in a fake sysfs tree, laid out as the kernel lays it out."""
    d = root / "devices/pci0000:00" / addr
    d.mkdir(parents=True)
    (d / "vendor").write_text(f"{vendor:#06x}\n")
    (d / "device").write_text(f"{device:#06x}\n")
    (d / "class").write_text("0xff0000\n")
    (d / "driver_override").write_text("(null)\n")
    link = root / "bus/pci/devices" / addr
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(d)
    g = root / "kernel/iommu_groups" / str(group)
    (g / "devices").mkdir(parents=True, exist_ok=True)
    (g / "devices" / addr).symlink_to(d)
    (d / "iommu_group").symlink_to(g)
    if driver:
        drv = root / "bus/pci/drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        for f in ("bind", "unbind"):
            (drv / f).touch()
        (d / "driver").symlink_to(drv)
    return d


def fake_tree(root: Path) -> Path:
    add_function(root, "0000:00:04.0", 0x1AF4, 0x107F, "virtio-pci", 5)
    add_function(root, "0000:00:05.0", 0x1AF4, 0x1041, "virtio-pci", 6)
    add_function(root, "0000:00:06.0", 0x8086, 0x100E, "e1000", 6)
    (root / "bus/pci/drivers_probe").touch()
    (root / "bus/pci/drivers/vfio-pci").mkdir(parents=True)
    return root


def test_finds_vhost_pci_functions(tmp_path: Path) -> None:
    root = str(fake_tree(tmp_path))
    found = sysfs.list_functions(device=0x107F, root=root)
    assert [(f.address, f.driver, f.iommu_group) for f in found] == [("0000:00:04.0", "virtio-pci", 5)]
    assert len(sysfs.list_functions(root=root)) == 2
    assert sysfs.iommu_present(root) and not sysfs.noiommu_enabled(root)
    assert sysfs.group_members(6, root) == ["0000:00:05.0", "0000:00:06.0"]


def test_addresses_are_checked() -> None:
    assert sysfs.parse_address("00:04.0") == "0000:00:04.0"
    for bad in ("0000:00:04", "zz:00:04.0", "0000:00:04.8", "../../etc"):
        with pytest.raises(TransportError, match="not a PCI address"):
            sysfs.parse_address(bad)


def test_bind_then_unbind_restores_the_previous_driver(tmp_path: Path) -> None:
    root = fake_tree(tmp_path / "sys")
    state = tmp_path / "state"
    dev = root / "bus/pci/devices/0000:00:04.0"
    log = sysfs.bind("0000:00:04.0", "vfio-pci", state, str(root))
    assert [(Path(p).name, v) for p, v in log] == [
        ("driver_override", "vfio-pci"),
        ("unbind", "0000:00:04.0"),
        ("drivers_probe", "0000:00:04.0"),
    ]
    assert (dev / "driver_override").read_text() == "vfio-pci"
    assert (state / "0000:00:04.0.driver").read_text() == "virtio-pci"
    # what the kernel would do on drivers_probe: the function moves to vfio-pci
    (dev / "driver").unlink()
    os.symlink(root / "bus/pci/drivers/vfio-pci", dev / "driver")
    (root / "bus/pci/drivers/vfio-pci/unbind").touch()
    assert sysfs.bind("0000:00:04.0", "vfio-pci", state, str(root)) == []  # already there: nothing to do
    previous, log = sysfs.unbind("0000:00:04.0", state, str(root))
    assert previous == "virtio-pci"
    assert [(Path(p).parent.name, Path(p).name, v) for p, v in log] == [
        ("0000:00:04.0", "driver_override", "\n"),
        ("driver", "unbind", "0000:00:04.0"),  # through the function's driver link: vfio-pci now
        ("virtio-pci", "bind", "0000:00:04.0"),
    ]
    assert not (state / "0000:00:04.0.driver").exists()


def test_bind_refuses_unknown_drivers_and_missing_functions(tmp_path: Path) -> None:
    root = str(fake_tree(tmp_path / "sys"))
    with pytest.raises(TransportError, match="driver must be one of"):
        sysfs.bind("0000:00:04.0", "nvme", tmp_path, root)
    with pytest.raises(TransportError, match="no PCI function"):
        sysfs.bind("0000:00:09.0", "vfio-pci", tmp_path, root)


def test_pagemap_parsing(tmp_path: Path) -> None:
    page = 4096
    pagemap = tmp_path / "pagemap"
    entries = [0, PAGEMAP_PRESENT | 0x1234, PAGEMAP_PRESENT]  # absent, present, present with a hidden PFN
    pagemap.write_bytes(b"".join(e.to_bytes(8, "little") for e in entries))
    assert physical_address(page + 0x10, str(pagemap)) == 0x1234 * page + 0x10
    with pytest.raises(TransportError, match="not present"):
        physical_address(0, str(pagemap))
    with pytest.raises(TransportError, match="CAP_SYS_ADMIN"):
        physical_address(2 * page, str(pagemap))


def test_opening_a_function_not_bound_to_vfio_explains_the_fix(tmp_path: Path) -> None:
    root = str(fake_tree(tmp_path / "sys"))
    with pytest.raises(TransportError, match="vhostpci bind 0000:00:04.0"):
        open_function("0000:00:04.0", sysfs_root=root)
    with pytest.raises(TransportError, match="no PCI function"):
        open_function("0000:00:09.0", sysfs_root=root)


def test_the_vfio_device_cdev_is_found_under_vfio_dev(tmp_path: Path) -> None:
    root = fake_tree(tmp_path / "sys")
    assert sysfs.vfio_cdev("0000:00:04.0", str(root)) is None
    cdev = root / "bus/pci/devices/0000:00:04.0/vfio-dev"
    cdev.mkdir()
    (cdev / "power").mkdir()  # a non-device entry is ignored
    assert sysfs.vfio_cdev("0000:00:04.0", str(root)) is None
    (cdev / "vfio3").mkdir()  # a no-IOMMU function's entry: no char device behind it
    assert sysfs.vfio_cdev("00:04.0", str(root)) is None
    (cdev / "vfio3/dev").write_text("511:0\n")
    assert sysfs.vfio_cdev("00:04.0", str(root)) == "vfio3"


def test_insisting_on_the_cdev_interface_says_what_the_kernel_lacks(tmp_path: Path) -> None:
    root = fake_tree(tmp_path / "sys")
    d = root / "bus/pci/devices/0000:00:04.0"
    (d / "driver").unlink()
    (d / "driver").symlink_to(root / "bus/pci/drivers/vfio-pci")
    dev = tmp_path / "dev"
    dev.mkdir()
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(TransportError, match="no vfio-dev/ entry in sysfs.*CONFIG_VFIO_DEVICE_CDEV") as ei:
        VfioFunction("0000:00:04.0", sysfs_root=str(root), dev_root=str(dev), interface="cdev")
    assert ei.value.register == "interface"
    (d / "vfio-dev/vfio0").mkdir(parents=True)
    (d / "vfio-dev/vfio0/dev").write_text("511:0\n")
    with pytest.raises(TransportError, match=f"no {dev}/iommu"):
        VfioFunction("0000:00:04.0", sysfs_root=str(root), dev_root=str(dev), interface="cdev")
    # open_function's vfio-cdev insists on the same (this machine's /dev decides which complaint)
    with pytest.raises(TransportError, match="/dev/iommu|cannot open /dev/vfio/devices/vfio0"):
        open_function("0000:00:04.0", prefer="vfio-cdev", sysfs_root=str(root))
    with pytest.raises(TransportError, match="not one of auto, cdev, group"):
        VfioFunction("0000:00:04.0", sysfs_root=str(root), interface="legacy")
    assert len(os.listdir("/proc/self/fd")) == fds


def test_pyudev_and_the_tree_read_the_same() -> None:
    """The real /sys through pyudev and through TreeDevice agree on every function (one code path)."""
    real = sysfs.list_functions(vendor=0x1AF4, root="/sys") + sysfs.list_functions(vendor=0x8086, root="/sys")
    if not Path("/sys/bus/pci/devices").is_dir():
        pytest.skip("no PCI bus in this machine's sysfs")
    for f in real:
        tree = sysfs.TreeDevice(Path("/sys/bus/pci/devices") / f.address)
        assert sysfs.info_of(tree) == f
    with pytest.raises(TransportError, match="no PCI function 0000:7f:1f.7"):
        sysfs.info("7f:1f.7", "/sys")


def test_in_use_names_an_interface_that_is_up_and_a_held_or_mounted_disk(tmp_path: Path) -> None:
    root = fake_tree(tmp_path / "sys")
    nic = root / "bus/pci/devices/0000:00:06.0"
    (nic / "net/eth0").mkdir(parents=True)
    (nic / "net/eth0/flags").write_text("0x1002\n")  # IFF_BROADCAST|IFF_MULTICAST: down
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\n")
    assert sysfs.in_use("0000:00:06.0", str(root), str(mounts)) == []
    (nic / "net/eth0/flags").write_text("0x1003\n")  # IFF_UP
    assert sysfs.in_use("0000:00:06.0", str(root), str(mounts)) == ["network interface eth0 is up"]
    disk = add_function(root, "0000:00:07.0", 0x1AF4, 0x1042, "virtio-pci", 7)
    vda = disk / "virtio3/block/vda"
    (vda / "holders").mkdir(parents=True)
    (vda / "vda1").mkdir()
    (vda / "vda1/partition").write_text("1\n")
    assert sysfs.in_use("0000:00:07.0", str(root), str(mounts)) == []
    mounts.write_text("/dev/vda1 / ext4 rw 0 0\n")
    (vda / "holders/dm-0").mkdir()
    assert sysfs.in_use("0000:00:07.0", str(root), str(mounts)) == [
        "block device vda is held by dm-0",
        "block device vda1 is mounted",
    ]
