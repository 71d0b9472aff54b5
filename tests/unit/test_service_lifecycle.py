"""The run's log line for each driver-VM lifecycle event (service.lifecycle)."""

from __future__ import annotations

import uuid

from vhostpci_driver.addr import WindowOffset, Xgpa
from vhostpci_driver.events import (
    DeviceErrorEvent,
    FeaturesNegotiated,
    FrontendAdded,
    FrontendRemoved,
    MemoryAdded,
    MemoryRemoved,
    RemoteDown,
    RemoteUp,
)
from vhostpci_driver.service import lifecycle
from vhostpci_driver.wire.ctrl import FrontendKey, MemoryRegion

U = uuid.UUID("7e57ab1e-0000-4000-8000-0000000000a1")
REGIONS = (
    MemoryRegion(Xgpa(0), 1 << 30, WindowOffset(0)),
    MemoryRegion(Xgpa(1 << 32), 1 << 29, WindowOffset(1 << 30)),
)


def test_each_lifecycle_event_has_its_line() -> None:
    key = FrontendKey(1, 7)
    assert lifecycle(RemoteUp(U)) == f"driver VM {U} up"
    assert lifecycle(RemoteDown(U)) == f"driver VM {U} down"
    assert lifecycle(MemoryAdded(REGIONS)) == "memory added: 2 region(s), 1536 MiB"
    assert lifecycle(MemoryRemoved(REGIONS)) == "memory removed: 2 region(s), 1536 MiB"
    assert lifecycle(FrontendAdded(key, ())) == f"frontend {key} added"
    assert lifecycle(FrontendRemoved(key)) == f"frontend {key} removed"
    line = f"frontend {key} started: features 0x30 of 0x31 accepted"
    assert lifecycle(FeaturesNegotiated(key, 0x31, 0x30)) == line


def test_other_events_have_none() -> None:
    assert lifecycle(DeviceErrorEvent("controlq", "bad")) is None
