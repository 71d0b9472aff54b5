"""The spec constants and the two rules declared with them (virtio 1.2, 2.7 and 4.1.4.3)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vhostpci_driver.spec import virtio, virtio_pci


@given(st.integers(-1, 1 << 17))
def test_queue_size_is_a_power_of_two_up_to_the_maximum(size: int) -> None:
    expected = size in {1 << n for n in range(16)}  # 1 .. 32768
    assert virtio.queue_size_ok(size) == expected
    assert virtio.queue_size_ok(size, 256) == (expected and size <= 256)


@given(st.integers(0, 1 << 20), st.integers(0, 1 << 20), st.integers(0, 1 << 20))
def test_the_first_misaligned_ring_part_is_named(desc: int, avail: int, used: int) -> None:
    bad = virtio.misaligned_ring_part(desc, avail, used)
    parts = [("desc", desc, 16), ("avail", avail, 2), ("used", used, 4)]
    assert bad == next(((n, a, al) for n, a, al in parts if a % al), None)


def test_the_common_config_offsets_are_the_specs() -> None:
    """virtio 1.2, 4.1.4.3: the offsets every driver and device agree on."""
    assert (virtio_pci.DEVICE_STATUS, virtio_pci.QUEUE_SELECT, virtio_pci.QUEUE_DESC) == (20, 22, 32)
    assert virtio_pci.COMMON_FIELDS["queue_reset"] == (58, 2)
    assert virtio_pci.COMMON_CFG.size == 60 and virtio_pci.COMMON_CFG_MIN_SIZE == 56
