"""The VM tier, from the host: boot a real guest with our device on vfio-user-pci and run tests/vm in it.

Runs only when asked (``VHOSTPCI_VM=1``, as .ci/run does after tools/vm/prepare),
since it needs root, the prepared chroot and about a minute; otherwise it says so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("VHOSTPCI_VM_CACHE", "/var/tmp/vhostpci-vm"))

pytestmark = pytest.mark.vm


def _boot(*run_args: str, guest_tests: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    if not os.environ.get("VHOSTPCI_VM"):
        pytest.skip("the VM tier runs with VHOSTPCI_VM=1 (after tools/vm/prepare); .ci/run does that")
    if not (CACHE / "sid/.vhostpci-ready").exists():
        pytest.fail(f"VHOSTPCI_VM=1 but no prepared cache at {CACHE}: run tools/vm/prepare")
    out = subprocess.run(
        [sys.executable, str(REPO / "tools/vm/run.py"), *run_args, "--",
         f"python3 -m pytest -q -s -p no:cacheprovider -m vm tests/vm/test_in_guest.py {guest_tests}"],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    print(out.stdout[-8000:])
    print(out.stderr[-4000:])
    return out


on_the_host = pytest.mark.skipif(os.environ.get("VHOSTPCI_IN_GUEST") is not None, reason="runs on the host")


@on_the_host
def test_guest_tier_passes_in_a_real_vm() -> None:
    out = _boot("--send", "1000", guest_tests='-k "test_1 or test_2 or test_3 or test_4"')
    assert out.returncode == 0, "the guest tier failed (output above)"
    assert "4 passed" in out.stdout
    traffic = re.search(
        r'"sent": (\d+), "received": (\d+), "duplicates": (\d+), "corrupt": (\d+)', out.stderr
    )
    assert traffic and traffic.group(1) == traffic.group(2) == "1000" and traffic.group(4) == "0"


@on_the_host
def test_udev_autostart_in_a_real_vm_with_systemd() -> None:
    out = _boot("--systemd", guest_tests="-k autostart")
    assert out.returncode == 0, "the autostart test failed in the guest (output above)"
    assert "1 passed" in out.stdout
    assert "hot-plug control: plug -> ok" in out.stderr  # QEMU's device_add of a second function


def _needs_our_kernel() -> None:
    if os.environ.get("VHOSTPCI_VM") and not (CACHE / "sid/boot/vhostpci/.ready").exists():
        pytest.fail(f"VHOSTPCI_VM=1 but no kernel at {CACHE}/sid/boot/vhostpci: run tools/vm/prepare-kernel")


def _traffic_ok(stderr: str) -> bool:
    m = re.search(r'"sent": (\d+), "received": (\d+), "duplicates": (\d+), "corrupt": (\d+)', stderr)
    return bool(m) and m.group(1) == m.group(2) == "1000" and m.group(4) == "0"  # type: ignore[union-attr]


@on_the_host
def test_vfio_cdev_and_iommufd_in_a_real_vm() -> None:
    """Our kernel (IOMMUFD, VFIO_DEVICE_CDEV) behind the virtual IOMMU: the uAPI against its headers,
    both interfaces re-opened in turn without leaks, traffic through the cdev + iommufd path."""
    _needs_our_kernel()
    out = _boot("--kernel", "vhostpci", "--send", "1000", guest_tests='-k "test_5 or test_6"')
    assert out.returncode == 0, "the cdev + iommufd tests failed in the guest (output above)"
    assert "2 passed" in out.stdout
    assert _traffic_ok(out.stderr)


@on_the_host
def test_vfio_noiommu_mode_in_a_real_vm() -> None:
    """Our kernel with no IOMMU at all and VFIO's unsafe no-IOMMU mode: DMA by physical address."""
    _needs_our_kernel()
    out = _boot("--kernel", "vhostpci", "--no-viommu", "--append", "vfio.enable_unsafe_noiommu_mode=1",
                "--send", "1000", guest_tests="-k test_7")  # fmt: skip
    assert out.returncode == 0, "the no-IOMMU test failed in the guest (output above)"
    assert "1 passed" in out.stdout
    assert _traffic_ok(out.stderr)


def _host_script(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run one of tools/vm's host-side scenarios (stock QEMU driver VMs, the toolkit on the host)."""
    if not os.environ.get("VHOSTPCI_VM"):
        pytest.skip("the VM tier runs with VHOSTPCI_VM=1 (after tools/vm/prepare); .ci/run does that")
    out = subprocess.run(
        [sys.executable, str(REPO / "tools/vm" / script), *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    print(out.stdout[-8000:])
    print(out.stderr[-4000:])
    return out


@on_the_host
def test_two_stock_qemu_driver_vms_ping6_and_tcp_through_our_switch() -> None:
    """Issue 18 item 5, the lighter configuration: the toolkit on the host over vfio-user."""
    out = _host_script("driver_vms.py", "--bytes", str(4 << 20), "--timeout", "600", timeout=900)
    assert out.returncode == 0, "the driver VMs did not ping or transfer (output above)"
    result = json.loads(out.stdout.split("driver-vms: ", 1)[1].splitlines()[0])
    assert result["sha256_match"] and result["guest_status"] == [0, 0]
    assert len(re.findall(r"3 packets transmitted, 3 packets received", out.stdout)) == 2  # both ways
    # The switch's counters agree with the guests' own (sampled twice a second, so within a few).
    switch = result["switch"]
    guests = dict(re.findall(r"--- driver VM (\w) ---.*?stats rx=(\d+ tx=\d+)", out.stdout, re.S))
    for name, mac in (("a", "52:54:00:00:00:a1"), ("b", "52:54:00:00:00:b2")):
        rx, tx = (int(v) for v in re.findall(r"\d+", guests[name]))
        port = switch[mac]
        assert abs(port["tx_frames"] - tx) <= 5 and abs(port["rx_frames"] - rx) <= 5, (name, port)


@on_the_host
def test_two_stock_qemu_driver_vms_through_our_switch_in_a_device_vm_and_its_faults() -> None:
    """Issue 18 item 5, the full configuration: the driver VMs' only link is ``vhostpci run --watch`` in a
    device VM, serving both vhost-pci functions over kernel VFIO with one switch (tools/vm/device_vm.py
    --faults), and the fault recoveries there with one device VM boot.

    ping6 both ways, 64 MiB a -> b with matching sha256, the switch's port counters (from the device
    VM's ``vhostpci status --json``) equal to the guests' own at a quiescent moment; a's QEMU SIGKILLed
    mid-transfer: the device VM's run logs a's frontend, then its memory, removed within 3 heartbeats,
    the server frees a's device (``serve --no-takeover``), b untouched; a's QEMU again with the same
    UUID: a new device, hot-plugged by QMP ``device_add`` onto a root port, bound by the guest, served
    by the same run, ping6 and 16 MiB; a rebooted from inside: stop, start, ping6 and 16 MiB.
    About 14 minutes under TCG on 2 loaded cores (three driver-VM boots and the device VM's: 827 s in a run).
    """
    nbytes = 64 << 20
    out = _host_script("device_vm.py", "--faults", "--bytes", str(nbytes), "--timeout", "1200", timeout=1320)
    assert out.returncode == 0, "a step failed (output above)"
    result = json.loads(out.stdout.rsplit("device-vm: ", 1)[1].splitlines()[0])
    assert re.search(r"vhostpci.run: serving \S+ \(status", out.stdout)  # the CLI served the functions
    assert result["transfer"]["bytes"] == nbytes and result["transfer"]["sha256_match"]
    for name, row in result["counters"].items():
        assert row["agree"], (name, row)
    a = "52:54:00:00:00:a1"
    kill = result["kill"]
    assert kill["frontend_before_memory"] and kill["within_heartbeats"], kill
    assert kill["seconds_to_memory_removed"] <= 3 * result["heartbeat_s"], kill
    assert kill["a_port_gone"] and kill["b_port_kept"] and kill["b_qemu_running"], kill
    assert kill["b_events_after_kill"] == [], "b's device saw something of a's fault"
    assert "teardown acked" in kill["device_freed"]["why"], kill  # --no-takeover freed a's device
    restart = result["restart"]
    received, end = restart["b_killed_transfer_received"]
    # The kill came once a's port had moved 4 MiB of frames (headers included) of the 1 GiB.
    assert 1 << 20 <= received < 1 << 30 and end == "TimeoutError", "the kill was not mid-transfer"
    # A new function for the restarted driver VM (hot-plugged), served by the same run.
    assert restart["functions"] and set(restart["functions"]).isdisjoint(kill["old_functions"]), restart
    assert restart["transfer"]["sha256_match"], restart
    reboot = result["reboot"]
    assert reboot["memory_kept"] and reboot["qemu_kept"] and reboot["transfer"]["sha256_match"], reboot
    assert result["b_same_boot"], "b rebooted or its QEMU went"
    assert "FrontendRemoved" not in result["b_events_since_boot"]
    assert result["run_status"] == 143  # the device VM's run served to the end and stopped cleanly
    # a's port as the run logged it when the reboot took it down last: nothing broken
    assert result["switch_final"][a]["broken"] is None, result["switch_final"]


@on_the_host
def test_stock_qemu_driver_vms_through_sigkill_restart_and_reboot() -> None:
    """Issue 18 item 5's transfer and faults, the lighter configuration (tools/vm/driver_faults.py).

    64 MiB a -> b with matching sha256; the switch's port counters equal to the guests' own
    (port tx_frames == guest tx_packets, port rx_frames == guest rx_packets, at a quiescent
    moment); a's QEMU SIGKILLed mid-transfer: the toolkit sees its frontend, then its memory,
    removed within 3 heartbeats, b untouched; a's QEMU again with the same UUID: the same
    device serves it, ping6 and a transfer; a rebooted from inside: stop, start, ping6 and a
    transfer; b's front door frozen: the heartbeat removes b (3 pings unanswered), a untouched.
    The whole run is bounded (about 7 minutes under TCG on 2 loaded cores).
    """
    out = _host_script("driver_faults.py", "--bytes", str(64 << 20), "--timeout", "840", timeout=960)
    assert out.returncode == 0, "a step failed (output above)"
    result = json.loads(out.stdout.rsplit("driver-faults: ", 1)[1].splitlines()[0])
    assert result["transfer"]["bytes"] == 64 << 20 and result["transfer"]["sha256_match"]
    for name, row in result["counters"].items():
        assert row["agree"], (name, row)
    kill = result["kill"]
    assert kill["frontend_before_memory"] and kill["within_heartbeats"], kill
    assert kill["seconds_to_memory_removed"] <= 3 * result["heartbeat_s"], kill
    assert kill["a_port_gone"] and kill["b_port_kept"] and kill["b_frontends"] == 1 and kill["b_qemu_running"]
    assert kill["b_events_after_kill"] == [], "b's device saw something of a's fault"
    received, end = kill["b_received"]
    # The kill came once a's port had moved 4 MiB of frames (headers included) of the 1 GiB.
    assert 1 << 20 <= received < 1 << 30 and end == "TimeoutError", "the kill was not mid-transfer"
    assert result["restart"]["same_device"] and result["restart"]["transfer"]["sha256_match"]
    reboot = result["reboot"]
    assert reboot["memory_kept"] and reboot["qemu_kept"] and reboot["transfer"]["sha256_match"]
    assert result["b_same_boot"], "b rebooted or its QEMU went"
    assert "FrontendRemoved" not in result["b_events_since_boot"]
    # A driver VM that goes silent without closing (its front door frozen): the heartbeat removes it.
    silent, beat, misses = result["silent"], result["heartbeat_s"], result["misses"]
    assert silent["frontend_before_memory"] and silent["a_events"] == [] and silent["a_port_kept"], silent
    # (misses - 1) to (misses + 1) intervals, and a second for the server's tick and our service loop.
    assert (misses - 1) * beat <= silent["seconds_to_memory_removed"] <= (misses + 1) * beat + 1.0, silent
