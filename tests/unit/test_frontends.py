"""The app-facing frontend: what :meth:`Frontend.start` does with rings an earlier instance served."""

from __future__ import annotations

import struct

from vhostpci_driver.addr import Xgpa
from vhostpci_driver.frontends import Frontend
from vhostpci_driver.spec.virtio import Feature
from vhostpci_driver.wire.ctrl import FrontendKey, VirtqInfo

SIZE = 8
RINGS = 0x1000  # per queue: desc at +0, avail at +0x200, used at +0x400


class Ram:
    """A bytearray as the driver VM's memory (the ring code only needs ``view``)."""

    def __init__(self) -> None:
        self.raw = bytearray(0x4000)

    def view(self, addr: int, length: int) -> memoryview:
        assert addr >= 0 and addr + length <= len(self.raw)
        return memoryview(self.raw)[addr : addr + length]


def virtq(index: int) -> VirtqInfo:
    base = RINGS * (index + 1)
    return VirtqInfo(index, SIZE, Xgpa(base), Xgpa(base + 0x200), Xgpa(base + 0x400), notify_slot=10 + index)


def start(ram: Ram, *used_idx: int) -> list[int]:
    """Rings whose used (and avail) index stand at ``used_idx``; returns the doorbells rung by start()."""
    qs = tuple(virtq(i) for i in range(len(used_idx)))
    for q, idx in zip(qs, used_idx, strict=True):
        struct.pack_into("<H", ram.raw, q.avail + 2, idx)
        struct.pack_into("<H", ram.raw, q.used + 2, idx)
    rung: list[int] = []
    fe = Frontend(FrontendKey(1, 0xA), qs, ram, rung.append, {})
    fe.start(1 << Feature.VERSION_1)
    return rung


def test_a_resumed_ring_is_signalled_once_a_fresh_one_is_not() -> None:
    # An earlier instance may have died between publishing used entries and the call
    # that signals them: the driver VM would wait forever on a full ring.
    assert start(Ram(), 0, 0) == []
    assert start(Ram(), 540, 0) == [10]
    assert start(Ram(), 540, 7) == [10, 11]
