"""docs/protocol.md is normative: its tables and the code's declarations must agree.

Every ``#### `name` `` heading followed by a table is either a wire structure
(columns offset | size | field) or an enum (value | name). Each must match the
code exactly, and every structure the code declares must be documented.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

import pytest

from vhostpci_driver.errors import FailReason
from vhostpci_driver.spec import virtio_pci  # noqa: F401  (declares virtio_pci_common_cfg)
from vhostpci_driver.wire import ctrl, device, sock
from vhostpci_driver.wire.layout import REGISTRY

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
ENUMS: dict[str, type[enum.IntEnum]] = {
    "MsgType": ctrl.MsgType,
    "AckResult": ctrl.AckResult,
    "FailReason": FailReason,
    "SockMsgType": sock.SockMsgType,
}


def doc_tables() -> dict[str, list[list[str]]]:
    tables: dict[str, list[list[str]]] = {}
    name = None
    for line in DOC.read_text().splitlines():
        m = re.match(r"^#### `(\w+)`\s*$", line)
        if m:
            name = m.group(1)
            tables[name] = []
            continue
        if name is None:
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                tables[name].append(cells)
        elif tables[name]:
            name = None  # the table ended
    return tables


TABLES = doc_tables()


def test_every_declared_structure_is_documented_and_vice_versa() -> None:
    documented_structs = {
        n for n, rows in TABLES.items() if rows and rows[0][:3] == ["offset", "size", "field"]
    }
    assert documented_structs == set(REGISTRY)
    assert {n for n in TABLES if n not in documented_structs} == set(ENUMS)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_structure_offsets_match_the_doc(name: str) -> None:
    rows = TABLES[name][1:]
    doc = [(int(r[0]), int(r[1]), r[2]) for r in rows]
    assert doc == REGISTRY[name].offsets()
    assert sum(size for _, size, _ in doc) == REGISTRY[name].size


@pytest.mark.parametrize("name", sorted(ENUMS))
def test_enum_values_match_the_doc(name: str) -> None:
    rows = TABLES[name]
    assert rows[0] == ["value", "name"]
    doc = {r[1]: int(r[0]) for r in rows[1:]}
    assert doc == {m.name: m.value for m in ENUMS[name]}


def test_layout_constants_match_the_capability_table() -> None:
    text = DOC.read_text()
    for cfg, bar, off in [
        ("COMMON_CFG", device.BAR_VIRTIO, device.COMMON_OFFSET),
        ("NOTIFY_CFG", device.BAR_VIRTIO, device.NOTIFY_OFFSET),
        ("ISR_CFG", device.BAR_VIRTIO, device.ISR_OFFSET),
        ("DEVICE_CFG", device.BAR_VIRTIO, device.DEVICE_CFG_OFFSET),
    ]:
        assert re.search(rf"`{cfg}` \(cfg_type \d\)[^|]*\| {bar} \| `{off:#06x}` \|", text), cfg
    assert f"| `{device.MSIX_PBA_OFFSET:#x}` |" in text
    assert f"`notify_off_multiplier` {device.NOTIFY_OFF_MULTIPLIER}" in text
    assert f"default {device.DEFAULT_VIRTIO_ID} (`{device.pci_device_id():#x}`)" in text
    size = device.VHOST_PCI_CONFIG.size
    assert f"| virtio `DEVICE_CFG` (cfg_type 4) | 0 | `0x2000` | {size} |" in text
