"""tools/vm/device_vm.py --faults times the device VM's run-log lines: each is named after its driver VM."""

from __future__ import annotations

import sys
from pathlib import Path

VM = Path(__file__).resolve().parents[2] / "tools/vm"
sys.path.insert(0, str(VM))

from device_vm import LogTimeline  # noqa: E402  (tools/vm is not a package)

A = "7e57ab1e-0000-4000-8000-0000000000a1"
SERVICE = "2026-12-01 17:12:06,493 INFO vhostpci_driver.service: "


def line(address: str, what: str) -> str:
    return f"log {SERVICE}{address}: {what}"


def test_lines_before_the_remote_up_line_wait_for_it_with_their_arrival_times() -> None:
    t = LogTimeline({A: "a"})
    t.feed(1.0, line("0000:00:0d.0", "memory added: 1 region(s), 512 MiB"))
    assert t.since("a", 0.0) == []  # whose function it is is not known yet
    t.feed(2.0, line("0000:00:0d.0", f"driver VM {A} up"))
    t.feed(3.0, line("0000:00:0d.0", "frontend 1:0x5254000000a1 started: features 0x1 of 0x1 accepted"))
    t.feed(4.0, "log 2026-12-01 17:12:06,510 INFO vhostpci_driver.apps.net: net port 1:0x5254000000a1 up")
    assert sorted(t.since("a", 0.0)) == [(1.0, "MemoryAdded"), (2.0, "RemoteUp"), (3.0, "FeaturesNegotiated")]
    assert t.address_of("a") == ["0000:00:0d.0"]


def test_a_new_function_of_the_same_driver_vm_is_its_too() -> None:
    t = LogTimeline({A: "a"})
    t.feed(1.0, line("0000:00:0d.0", f"driver VM {A} up"))
    t.feed(2.0, line("0000:00:0d.0", "frontend 1:0x5254000000a1 removed"))
    t.feed(3.0, line("0000:00:0d.0", "memory removed: 1 region(s), 512 MiB"))
    t.feed(4.0, line("0000:01:00.0", f"driver VM {A} up"))
    t.feed(5.0, line("0000:01:00.0", "frontend 1:0x5254000000a1 added"))
    assert t.since("a", 1.5) == [(2.0, "FrontendRemoved"), (3.0, "MemoryRemoved"), (4.0, "RemoteUp"),
                                 (5.0, "FrontendAdded")]  # fmt: skip
    assert sorted(t.address_of("a")) == ["0000:00:0d.0", "0000:01:00.0"]
