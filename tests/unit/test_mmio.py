"""Width-exact registers over a bytearray and over a real memfd mapping."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from vhostpci_driver.errors import TransportError
from vhostpci_driver.pci import mmio
from vhostpci_driver.pci.mmio import FileMMIO, MappedRegisters, RegisterBlock, bulk_view


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
def test_file_mmio_maps_a_file_through_periphery(offset: int, tmp_path: Path) -> None:
    path = tmp_path / "resource0"  # what a sysfs resourceN is to UIO: a file that maps the BAR
    path.write_bytes(bytes(3 * mmap.PAGESIZE))
    fd = os.open(path, os.O_RDWR)
    fds = len(os.listdir("/proc/self/fd"))
    try:
        m = FileMMIO(str(path), offset, 256)
        m.write32(8, 0xCAFEF00D)
        assert os.pread(fd, 4, offset + 8) == bytes.fromhex("0df0feca")
        os.pwrite(fd, b"\x11\x22", offset + 16)
        assert m.read16(16) == 0x2211
        m.write64(24, 0x0102030405060708)
        assert os.pread(fd, 8, offset + 24) == bytes(range(8, 0, -1)) and m.read64(24) == 0x0102030405060708
        m.write(32, b"abcd")
        assert os.pread(fd, 4, offset + 32) == b"abcd" and m.read(32, 4) == b"abcd"
        for bad in (lambda: m.read32(256), lambda: m.read32(2), lambda: m.read(250, 8)):
            with pytest.raises(TransportError):
                bad()
        m.close()
        m.close()  # idempotent
        assert len(os.listdir("/proc/self/fd")) == fds  # the mapping and every fd it took are gone
        with pytest.raises(TransportError, match="closed"):
            m.read64(24)  # never through a stale address
    finally:
        os.close(fd)
    with pytest.raises(TransportError, match="mmap of"):
        FileMMIO(str(tmp_path / "missing"), 0, 16)


def test_only_periphery_s_public_interface_is_used() -> None:
    import re  # noqa: PLC0415

    src = (Path(mmio.__file__)).read_text()
    assert not re.search(r"_mmio\._|MMIO\.__init__|class \w+\([^)]*MMIO", src)
    assert not re.search(r"\.mapping\b", src)


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
