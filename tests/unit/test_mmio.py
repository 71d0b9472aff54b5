"""Width-exact registers over a bytearray and over a real memfd mapping."""

from __future__ import annotations

import mmap
import os

import pytest

from vhostpci_driver.errors import TransportError
from vhostpci_driver.pci.mmio import FdMMIO, MappedRegisters, RegisterBlock, bulk_view


def test_widths_land_little_endian() -> None:
    buf = bytearray(32)
    r = MappedRegisters(buf)
    r.write8(1, 0xAB)
    r.write16(2, 0x1234)
    r.write32(4, 0xDEADBEEF)
    r.write64(8, 0x0102030405060708)
    assert buf[:16] == bytes.fromhex("00ab3412efbeadde0807060504030201")
    assert (r.read8(1), r.read16(2), r.read32(4), r.read64(8)) == (
        0xAB,
        0x1234,
        0xDEADBEEF,
        0x0102030405060708,
    )


def test_out_of_bounds_and_misaligned() -> None:
    r = MappedRegisters(bytearray(16))
    with pytest.raises(TransportError, match="outside"):
        r.read32(16)
    with pytest.raises(TransportError, match="aligned"):
        r.read32(2)
    with pytest.raises(TransportError):
        r.write16(-2, 0)


@pytest.mark.parametrize("offset", [0, 4096, 100])
def test_fd_mmio_maps_an_open_fd(offset: int) -> None:
    fd = os.memfd_create("bar")
    os.ftruncate(fd, 3 * mmap.PAGESIZE)
    try:
        m = FdMMIO(fd, offset, 256)
        m.write32(8, 0xCAFEF00D)
        assert os.pread(fd, 4, offset + 8) == bytes.fromhex("0df0feca")
        os.pwrite(fd, b"\x11\x22", offset + 16)
        assert m.read16(16) == 0x2211
        m.view(32, 4)[:] = b"abcd"
        assert os.pread(fd, 4, offset + 32) == b"abcd"
        with pytest.raises(TransportError):
            m.read32(256)
        m.close()
        m.close()  # idempotent
        os.fstat(fd)  # the fd is still ours and open
    finally:
        os.close(fd)


def test_register_block_is_bounded_to_its_structure() -> None:
    buf = bytearray(64)
    b = RegisterBlock(MappedRegisters(buf), 16, 16)
    b.write64(8, 0x1122334455667788)
    assert buf[24:32] == (0x1122334455667788).to_bytes(8, "little")
    assert b.read64(8) == 0x1122334455667788
    with pytest.raises(TransportError, match="structure"):
        b.read32(14)


def test_bulk_view_bounds() -> None:
    buf = bytearray(10)
    v = bulk_view(buf, 2, 3)
    v[:] = b"xyz"
    assert buf[2:5] == b"xyz"
    with pytest.raises(TransportError):
        bulk_view(buf, 8, 3)


def test_a_posted_write_through_a_mapping_is_the_same_store_and_as_bounded() -> None:
    buf = bytearray(16)
    block = RegisterBlock(MappedRegisters(buf), 8, 8)
    block.post16(2, 0xBEEF)
    block.post32(4, 0x01020304)
    assert buf[8:] == bytes([0, 0, 0xEF, 0xBE, 4, 3, 2, 1])
    with pytest.raises(TransportError):
        block.post32(6, 1)  # past the structure
    with pytest.raises(TransportError):
        MappedRegisters(buf).post16(15, 1)  # misaligned and past the buffer
