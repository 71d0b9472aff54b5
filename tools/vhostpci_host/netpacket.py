"""Test traffic that proves itself: every frame carries its sender, a sequence number and a CRC.

A simulated driver VM sends frames built here and checks the frames it
receives, so a test can show that nothing was lost, duplicated or corrupted on
the way through the vhost-pci data path. Layout of a frame (after the virtio
net header, virtio 1.2 5.1.6):

    0  dst MAC (6) | 6 src MAC (6) | 12 ethertype 0x88b5 (2, IEEE local experimental)
    14 seq (le64)  | 22 length of the whole frame (le32) | 26 crc32 of bytes 0..25 and 30.. (le32)
    30 payload: a slice of a fixed pseudo-random pattern chosen by seq
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass, field

ETHERTYPE = 0x88B5
MIN_FRAME = 64
MAX_FRAME = 65536
_PATTERN = random.Random(0x76686F7374).randbytes(2 * MAX_FRAME)
_PREFIX = 26
_PAYLOAD_AT = 30

#: struct virtio_net_hdr with num_buffers (12 bytes, virtio 1.2 5.1.6): always this size with VERSION_1.
NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = NET_HDR.size
NO_CSUM_HDR = bytes(NET_HDR_SIZE)


def mac_bytes(mac: str | int) -> bytes:
    """``"52:54:00:00:00:01"`` or an int to 6 bytes."""
    if isinstance(mac, int):
        return mac.to_bytes(6, "big")
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_int(mac: str | bytes) -> int:
    """A MAC as the integer a DEVICE_INFO device_id carries."""
    return int.from_bytes(mac_bytes(mac) if isinstance(mac, str) else mac, "big")


def mac_str(mac: bytes | int) -> str:
    raw = mac.to_bytes(6, "big") if isinstance(mac, int) else mac
    return ":".join(f"{b:02x}" for b in raw)


def build(dst: bytes, src: bytes, seq: int, size: int) -> bytes:
    """One frame of ``size`` bytes (64..65536)."""
    if not MIN_FRAME <= size <= MAX_FRAME:
        raise ValueError(f"frame size {size} not in {MIN_FRAME}..{MAX_FRAME}")
    head = dst + src + ETHERTYPE.to_bytes(2, "big") + struct.pack("<QI", seq, size)
    start = seq % 4096
    payload = _PATTERN[start : start + size - _PAYLOAD_AT]
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + crc.to_bytes(4, "little") + payload


class CorruptFrameError(Exception):
    """A frame failed its check; ``why`` says how."""


def check(frame: bytes | memoryview) -> tuple[bytes, bytes, int]:
    """``(dst, src, seq)`` of a valid frame, else :class:`CorruptFrameError`."""
    if len(frame) < _PAYLOAD_AT:
        raise CorruptFrameError(f"frame of {len(frame)} bytes is too short")
    head = bytes(frame[:_PREFIX])
    if int.from_bytes(head[12:14], "big") != ETHERTYPE:
        raise CorruptFrameError("wrong ethertype")
    seq, size = struct.unpack_from("<QI", head, 14)
    if size != len(frame):
        raise CorruptFrameError(f"length field {size} != frame length {len(frame)}")
    (crc,) = struct.unpack_from("<I", frame, _PREFIX)
    if zlib.crc32(frame[_PAYLOAD_AT:], zlib.crc32(head)) != crc:
        raise CorruptFrameError(f"crc mismatch in seq {seq}")
    return head[:6], head[6:12], seq


@dataclass
class Receiver:
    """Counts what one frontend received, per sender: duplicates and corruption are errors."""

    received: int = 0
    octets: int = 0
    duplicates: int = 0
    corrupt: int = 0
    seen: dict[bytes, set[int]] = field(default_factory=dict)

    def take(self, frame: bytes | memoryview) -> None:
        try:
            _, src, seq = check(frame)
        except CorruptFrameError:
            self.corrupt += 1
            return
        seqs = self.seen.setdefault(src, set())
        if seq in seqs:
            self.duplicates += 1
            return
        seqs.add(seq)
        self.received += 1
        self.octets += len(frame)

    def from_sender(self, src: bytes) -> int:
        return len(self.seen.get(src, ()))
