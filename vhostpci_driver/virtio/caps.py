"""Finding the virtio structures: a bounded walk of the PCI capability list (pure).

The device's config space is input like any other: a capability pointer
outside the space, a list that loops, or a virtio capability that points
outside its BAR is a :class:`TransportError` naming the capability, never a
hang or an ``IndexError`` (virtio 1.2, 4.1.4: the driver finds every structure
through the list and must ignore capabilities it does not understand).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vhostpci_driver.errors import TransportError
from vhostpci_driver.spec.pci import (
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    PCI_CAPABILITY_LIST,
    PCI_CONFIG_SIZE,
    PCI_MSIX_FLAGS_QSIZE,
    PCI_MSIX_TABLE_BIR,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STD_HEADER_SIZE,
)
from vhostpci_driver.spec.virtio_pci import CAP_SIZE, COMMON_CFG_MIN_SIZE, NOTIFY_CAP_SIZE, CfgType

#: (256 - 64) / 4: more capabilities than fit the space means the list loops.
MAX_CAPS = 48


@dataclass(frozen=True)
class VirtioCap:
    """Where one virtio structure lives: ``length`` bytes at ``offset`` of ``bar``."""

    cfg_type: CfgType
    bar: int
    offset: int
    length: int
    cap_offset: int  # where the capability itself sits in config space
    notify_off_multiplier: int = 0


@dataclass(frozen=True)
class MsixCap:
    """The MSI-X capability (PCI 3.0, 6.8.2): table and PBA locations, table size."""

    cap_offset: int
    table_size: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int


@dataclass(frozen=True)
class Capabilities:
    """The structures a virtio-pci modern driver needs."""

    common: VirtioCap
    notify: VirtioCap
    isr: VirtioCap
    device: VirtioCap | None
    msix: MsixCap | None


def walk(config: bytes) -> list[tuple[int, int]]:
    """``(offset, cap id)`` of every capability, bounded and loop-free."""
    if len(config) < PCI_CONFIG_SIZE:
        raise TransportError(f"config space is {len(config)} bytes, needs {PCI_CONFIG_SIZE}", "config")
    (status,) = struct.unpack_from("<H", config, PCI_STATUS)
    if not status & PCI_STATUS_CAP_LIST:
        raise TransportError("status has no capability list (bit 4)", "config.status")
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    ptr = config[PCI_CAPABILITY_LIST] & ~3  # PCI 3.0 6.7: the bottom two bits are reserved
    while ptr:
        if ptr < PCI_STD_HEADER_SIZE or ptr + 2 > PCI_CONFIG_SIZE:
            raise TransportError(f"capability pointer {ptr:#x} outside 0x40..0xff", "config.cap_next")
        if ptr in seen or len(out) >= MAX_CAPS:
            raise TransportError(f"capability list loops at {ptr:#x}", "config.cap_next")
        seen.add(ptr)
        out.append((ptr, config[ptr]))
        ptr = config[ptr + 1] & ~3
    return out


def parse(config: bytes, bar_sizes: dict[int, int]) -> Capabilities:
    """Find the virtio and MSI-X capabilities; ``bar_sizes`` bounds every structure."""
    virtio: dict[CfgType, VirtioCap] = {}
    msix: MsixCap | None = None
    for off, cap_id in walk(config):
        if cap_id == PCI_CAP_ID_MSIX:
            if off + 12 > PCI_CONFIG_SIZE:
                raise TransportError(f"MSI-X capability at {off:#x} runs past config space", "config.msix")
            ctrl, table, pba = struct.unpack_from("<HII", config, off + 2)
            bir = PCI_MSIX_TABLE_BIR
            msix = MsixCap(
                off, (ctrl & PCI_MSIX_FLAGS_QSIZE) + 1, table & bir, table & ~bir, pba & bir, pba & ~bir
            )
        elif cap_id == PCI_CAP_ID_VNDR:
            cap = _virtio_cap(config, off, bar_sizes)
            # virtio 1.2, 4.1.4: the driver uses the first capability of each type it can use.
            if cap is not None and cap.cfg_type not in virtio:
                virtio[cap.cfg_type] = cap
    for need in (CfgType.COMMON, CfgType.NOTIFY, CfgType.ISR):
        if need not in virtio:
            raise TransportError(f"no usable {need.name} capability", "config.virtio_caps")
    if virtio[CfgType.COMMON].length < COMMON_CFG_MIN_SIZE:
        raise TransportError(
            f"COMMON capability shorter than the common config ({COMMON_CFG_MIN_SIZE} bytes)", "config.common"
        )
    return Capabilities(
        virtio[CfgType.COMMON], virtio[CfgType.NOTIFY], virtio[CfgType.ISR], virtio.get(CfgType.DEVICE), msix
    )


def _virtio_cap(config: bytes, off: int, bar_sizes: dict[int, int]) -> VirtioCap | None:
    if off + CAP_SIZE > PCI_CONFIG_SIZE:
        raise TransportError(f"virtio capability at {off:#x} runs past config space", "config.virtio_cap")
    cap_len, cfg_type, bar = config[off + 2], config[off + 3], config[off + 4]
    offset, length = struct.unpack_from("<II", config, off + 8)
    if cap_len < CAP_SIZE:
        raise TransportError(f"cap_len {cap_len} < 16 at {off:#x}", "config.virtio_cap.cap_len")
    if cfg_type not in CfgType._value2member_map_ or cfg_type in (
        CfgType.PCI,
        CfgType.SHARED_MEMORY,
        CfgType.VENDOR,
    ):
        return None  # not one we use: ignore it, as the spec says
    kind = CfgType(cfg_type)
    if bar > 5 or bar not in bar_sizes:
        return None  # virtio 1.2, 4.1.4: BAR values 0x6-0xff are reserved; ignore
    if offset + length > bar_sizes[bar]:
        raise TransportError(
            f"{kind.name} structure {offset:#x}+{length:#x} is outside BAR{bar} ({bar_sizes[bar]:#x} bytes)",
            f"config.{kind.name.lower()}_cap",
        )
    mult = 0
    if kind == CfgType.NOTIFY:
        if cap_len < NOTIFY_CAP_SIZE or off + NOTIFY_CAP_SIZE > PCI_CONFIG_SIZE:
            raise TransportError("NOTIFY capability lacks notify_off_multiplier", "config.notify_cap")
        (mult,) = struct.unpack_from("<I", config, off + 16)
    return VirtioCap(kind, bar, offset, length, off, mult)
