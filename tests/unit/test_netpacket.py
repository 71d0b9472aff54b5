"""Self-checking test frames: a frame round-trips, any corruption is caught, duplicates counted."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostpci_host import netpacket
from vhostpci_host.netpacket import CorruptFrameError, Receiver

A = netpacket.mac_bytes("52:54:00:00:00:01")
B = netpacket.mac_bytes("52:54:00:00:00:02")


@given(st.integers(0, 2**64 - 1), st.integers(64, 65536))
def test_frames_round_trip(seq: int, size: int) -> None:
    frame = netpacket.build(B, A, seq, size)
    assert len(frame) == size
    assert netpacket.check(frame) == (B, A, seq)


@given(st.integers(0, 10_000), st.integers(64, 3000), st.data())
def test_any_flipped_byte_is_caught(seq: int, size: int, data: st.DataObject) -> None:
    frame = bytearray(netpacket.build(B, A, seq, size))
    i = data.draw(st.integers(0, size - 1))
    frame[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptFrameError):
        netpacket.check(bytes(frame))


def test_truncation_is_caught() -> None:
    frame = netpacket.build(B, A, 7, 200)
    with pytest.raises(CorruptFrameError, match="length"):
        netpacket.check(frame[:-1])


def test_receiver_counts() -> None:
    r = Receiver()
    f1, f2 = netpacket.build(B, A, 1, 64), netpacket.build(B, A, 2, 100)
    r.take(f1)
    r.take(f2)
    r.take(f1)
    r.take(f2[:-3] + b"xyz")
    assert (r.received, r.duplicates, r.corrupt, r.octets) == (2, 1, 1, 164)
    assert r.from_sender(A) == 2 and r.from_sender(B) == 0


def test_mac_helpers() -> None:
    assert netpacket.mac_int("52:54:00:00:00:01") == 0x525400000001
    assert netpacket.mac_str(0x525400000001) == "52:54:00:00:00:01"
    with pytest.raises(ValueError):
        netpacket.mac_bytes("52:54")


@given(st.integers(0, 2**64 - 1), st.integers(64, 65536))
def test_pktgen_frames_round_trip(seq: int, size: int) -> None:
    frame = netpacket.pktgen_frame(B, A, size, seq)
    assert len(frame) == size
    assert netpacket.check_pktgen(frame) == (A, seq)


@given(st.integers(0, 10_000), st.integers(64, 3000), st.data())
def test_pktgen_any_flipped_byte_is_caught(seq: int, size: int, data: st.DataObject) -> None:
    """The cheap check still covers every byte: addresses and stamp by the check, payload by compare."""
    r = Receiver()
    frame = bytearray(netpacket.pktgen_frame(B, A, size, seq))
    i = data.draw(st.integers(0, size - 1))
    frame[i] ^= data.draw(st.integers(1, 255))
    r.take(memoryview(frame))
    assert (r.corrupt, r.received) == (1, 0)


def test_a_recycled_pktgen_buffer_needs_only_its_stamp() -> None:
    """What the simulator's pktgen does with a buffer coming back: stamp 16 bytes, the frame is valid."""
    buf = bytearray(netpacket.pktgen_frame(B, A, 1500, 0))
    for seq in (1, 2, 2**40):
        macs = zlib.crc32(B + A)
        netpacket.PKTGEN_STAMP.pack_into(buf, 14, seq, 1500, netpacket.pktgen_check(seq, 1500, macs))
        assert netpacket.check_pktgen(bytes(buf)) == (A, seq)
