"""The capability walk over hostile config spaces: bounded, typed errors, never a hang."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostpci_driver.errors import TransportError
from vhostpci_driver.spec import pci
from vhostpci_driver.spec.virtio_pci import CfgType
from vhostpci_driver.virtio import caps

BARS = {0: 0x8000, 1: 0x1000, 2: 1 << 30}


def config_with(*entries: tuple[int, bytes]) -> bytearray:
    """Config space whose capability list is ``entries`` (offset, body sans id/next), in order."""
    cfg = bytearray(256)
    struct.pack_into("<HH", cfg, 0, 0x1AF4, 0x107F)
    struct.pack_into("<H", cfg, pci.PCI_STATUS, pci.PCI_STATUS_CAP_LIST)
    cfg[pci.PCI_CAPABILITY_LIST] = entries[0][0] if entries else 0
    for i, (off, body) in enumerate(entries):
        nxt = entries[i + 1][0] if i + 1 < len(entries) else 0
        cfg[off + 1] = nxt
        cfg[off] = body[0]
        cfg[off + 2 : off + 1 + len(body)] = body[1:]
    return cfg


def vcap(cfg_type: int, bar: int, offset: int, length: int, mult: int | None = None) -> bytes:
    cap_len = 20 if mult is not None else 16
    body = bytes([pci.PCI_CAP_ID_VNDR, cap_len, cfg_type, bar, 0, 0, 0]) + struct.pack("<II", offset, length)
    return body + (struct.pack("<I", mult) if mult is not None else b"")


def msix(table_size: int) -> bytes:
    return bytes([pci.PCI_CAP_ID_MSIX]) + struct.pack("<HII", table_size - 1, 1, 0x800 | 1)


GOOD = [
    (0x40, msix(67)),
    (0x50, vcap(CfgType.COMMON, 0, 0x0000, 64)),
    (0x60, vcap(CfgType.NOTIFY, 0, 0x3000, 8, mult=4)),
    (0x78, vcap(CfgType.ISR, 0, 0x1000, 1)),
    (0x88, vcap(CfgType.DEVICE, 0, 0x2000, 56)),
]


def test_finds_every_structure() -> None:
    c = caps.parse(bytes(config_with(*GOOD)), BARS)
    assert (c.common.bar, c.common.offset, c.common.length) == (0, 0, 64)
    assert (c.notify.offset, c.notify.notify_off_multiplier) == (0x3000, 4)
    assert c.isr.offset == 0x1000 and c.device is not None and c.device.offset == 0x2000
    assert c.msix == caps.MsixCap(0x40, 67, 1, 0, 1, 0x800)


def test_unknown_caps_and_reserved_bars_are_ignored() -> None:
    entries = [(0x98, vcap(CfgType.COMMON, 6, 0, 64)), *GOOD]  # BAR 6 is reserved: skip it
    entries.append((0xA8, bytes([0x05, 0, 0, 0])))  # an MSI capability we do not use
    c = caps.parse(bytes(config_with(*entries)), BARS)
    assert c.common.cap_offset == 0x50


def test_a_looping_list_is_an_error() -> None:
    cfg = config_with(*GOOD)
    cfg[0x88 + 1] = 0x50  # DEVICE points back to COMMON
    with pytest.raises(TransportError, match="loops"):
        caps.parse(bytes(cfg), BARS)


def test_pointer_outside_config_space() -> None:
    cfg = config_with(*GOOD)
    cfg[0x88 + 1] = 0x20  # into the standard header
    with pytest.raises(TransportError, match="outside") as ei:
        caps.parse(bytes(cfg), BARS)
    assert ei.value.register == "config.cap_next"


def test_structure_outside_its_bar() -> None:
    entries = list(GOOD)
    entries[1] = (0x50, vcap(CfgType.COMMON, 0, 0x7FF0, 64))
    with pytest.raises(TransportError, match="outside BAR0") as ei:
        caps.parse(bytes(config_with(*entries)), BARS)
    assert ei.value.register == "config.common_cap"


def test_missing_common_or_short_common() -> None:
    with pytest.raises(TransportError, match="no usable COMMON"):
        caps.parse(bytes(config_with(*GOOD[2:])), BARS)
    entries = list(GOOD)
    entries[1] = (0x50, vcap(CfgType.COMMON, 0, 0, 16))
    with pytest.raises(TransportError, match="shorter"):
        caps.parse(bytes(config_with(*entries)), BARS)


def test_no_capability_list_bit() -> None:
    cfg = config_with(*GOOD)
    cfg[pci.PCI_STATUS] = 0
    with pytest.raises(TransportError, match="no capability list"):
        caps.parse(bytes(cfg), BARS)


def test_notify_without_multiplier() -> None:
    entries = list(GOOD)
    entries[2] = (0x60, vcap(CfgType.NOTIFY, 0, 0x3000, 8))
    with pytest.raises(TransportError, match="notify_off_multiplier"):
        caps.parse(bytes(config_with(*entries)), BARS)


@settings(max_examples=400)
@given(st.binary(min_size=256, max_size=256))
def test_random_config_spaces_only_raise_transport_error(raw: bytes) -> None:
    cfg = bytearray(raw)
    cfg[pci.PCI_STATUS] |= pci.PCI_STATUS_CAP_LIST
    try:
        caps.parse(bytes(cfg), BARS)
    except TransportError:
        pass
