"""What ``vhostpci list`` and ``vhostpci status`` print for a human: tables, names, not reprs.

Scripts read ``--json`` (docs/cli.md); these functions turn the same documents
into text. Pure: documents in, lines out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: virtio 1.2, 5 (Device Types): the ids a frontend may name
DEVICE_TYPES = {
    1: "net", 2: "block", 3: "console", 4: "entropy", 5: "balloon", 8: "scsi", 9: "9p", 16: "gpu",
    18: "input", 19: "vsock", 20: "crypto", 26: "fs", 27: "pmem", 35: "sound", 63: "vhost-pci",
}  # fmt: skip
#: virtio 1.2, 6 (Reserved Feature Bits): the transport's bits, the same for every device type
COMMON_FEATURES = {
    28: "INDIRECT_DESC", 29: "EVENT_IDX", 32: "VERSION_1", 33: "ACCESS_PLATFORM", 34: "RING_PACKED",
    35: "IN_ORDER", 36: "ORDER_PLATFORM", 37: "SR_IOV", 38: "NOTIFICATION_DATA", 39: "NOTIF_CONFIG_DATA",
    40: "RING_RESET",
}  # fmt: skip
#: virtio 1.2, 5.1.3 (Network Device, Feature bits)
NET_FEATURES = {
    0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC", 7: "GUEST_TSO4",
    8: "GUEST_TSO6", 9: "GUEST_ECN", 10: "GUEST_UFO", 11: "HOST_TSO4", 12: "HOST_TSO6", 13: "HOST_ECN",
    14: "HOST_UFO", 15: "MRG_RXBUF", 16: "STATUS", 17: "CTRL_VQ", 18: "CTRL_RX", 19: "CTRL_VLAN",
    21: "GUEST_ANNOUNCE", 22: "MQ", 23: "CTRL_MAC_ADDR", 63: "SPEED_DUPLEX",
}  # fmt: skip
DEVICE_FEATURES = {1: NET_FEATURES}


def device_type_name(device_type: int) -> str:
    return DEVICE_TYPES.get(device_type, f"type {device_type}")


def feature_names(bits: int, device_type: int | None = None) -> list[str]:
    """Every set bit by its spec name (device-specific bits by ``device_type``), unknown ones as ``bitN``."""
    specific = DEVICE_FEATURES.get(device_type or 0, {})
    return [COMMON_FEATURES.get(b) or specific.get(b) or f"bit{b}" for b in range(64) if bits >> b & 1]


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned columns, two spaces apart, each as wide as its widest cell."""
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def function_line(f: Mapping[str, Any]) -> str:
    """One ``vhostpci list`` row, in dpdk-devbind's shape (``ADDR [vvvv:dddd] 'name' drv=... unused=...``)."""
    unused = ",".join(f["unused"]) or "-"
    group = "none" if f["iommu_group"] is None else f["iommu_group"]
    return (
        f"{f['address']} [{f['vendor']}:{f['device']}] '{f['name']}' drv={f['driver'] or '-'} "
        f"unused={unused} iommu_group={group} service={'running' if f['service'] else 'none'}"
    )


def status_lines(st: Mapping[str, Any]) -> list[str]:
    """One service's state as a block of tables."""
    up = "up" if st.get("remote_up") else "down"
    out = [
        f"{st.get('address')}  backend {st.get('backend', '-')}  interrupts {st.get('interrupts', '-')}  "
        f"pid {st.get('pid', '-')}  data path {st.get('datapath', '-')}",
        f"  remote {st.get('remote_uuid')} {up}, window {int(st.get('window_size') or 0) >> 20} MiB "
        f"({int(st.get('window_mapped') or 0) >> 20} MiB mapped)",
        f"  features {' '.join(feature_names(int(st.get('features') or 0))) or '-'}",
    ]
    regions = st.get("regions") or []
    rows: list[tuple[object, ...]]
    if regions:
        rows = [(f"{r['xgpa']:#x}", f"{r['size']:#x}", f"{r['window_offset']:#x}") for r in regions]
        out += ["", *("  " + ln for ln in table(("REGION XGPA", "SIZE", "WINDOW OFFSET"), rows))]
    frontends = st.get("frontends") or []
    if frontends:
        rows = []
        for fe in frontends:
            t = int(fe["device_type"])
            queues = ",".join(str(v["size"]) for v in fe.get("virtqs", []))
            names = " ".join(feature_names(int(fe["accepted"] or 0), t)) or "(not negotiated)"
            rows.append((device_type_name(t), f"{fe['device_id']:#x}", queues or "-", names))
        out += ["", *("  " + ln for ln in table(("FRONTEND", "ID", "QUEUES", "FEATURES"), rows))]
    ports = st.get("ports") or {}
    if ports:
        head = ("PORT", "RX", "TX", "RX BYTES", "DROPPED", "BROKEN")
        rows = [
            (mac, p["rx_frames"], p["tx_frames"], p["rx_bytes"], p["dropped"], "yes" if p["broken"] else "no")
            for mac, p in ports.items()
        ]
        out += ["", *("  " + ln for ln in table(head, rows))]
    stats = dict(st.get("stats") or {})
    reasons = stats.pop("fail_reasons", {}) or {}
    counters = [(k.replace("_", " "), v) for k, v in stats.items()]
    counters += [(f"failed: {k}", v) for k, v in reasons.items()]
    if counters:
        out += ["", *("  " + ln for ln in table(("COUNTER", "VALUE"), counters))]
    if st.get("last_error"):
        out.append(f"  last error: {st['last_error']}")
    return out
