"""Test traffic that proves itself: every frame carries its sender, a sequence number and a CRC.

A simulated driver VM sends frames built here and checks the frames it
receives, so a test can show that nothing was lost, duplicated or corrupted on
the way through the vhost-pci data path. Layout of a frame (after the virtio
net header, virtio 1.2 5.1.6):

    0  dst MAC (6) | 6 src MAC (6) | 12 ethertype 0x88b5 (2, IEEE local experimental)
    14 seq (le64)  | 22 length of the whole frame (le32) | 26 crc32 of bytes 0..25 and 30.. (le32)
    30 payload: a slice of a fixed pseudo-random pattern chosen by seq

A second kind, for a traffic source that must not be the bottleneck (the
simulator's ``pktgen``, like Linux's pktgen): ethertype 0x88b6 (IEEE local
experimental 2), the same fields, but the payload is the pattern from its
start whatever the seq, so a TX buffer is built once and recycled with only
seq, length and check rewritten; the check is ``(seq ^ seq >> 32) * 0x9e3779b1 ^
length ^ crc32(dst, src)`` (32 bits) and the receiver compares the whole payload with
the pattern (one memcmp), so every byte is still checked.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

ETHERTYPE = 0x88B5
PKTGEN_ETHERTYPE = 0x88B6
#: seq, length and check of a pktgen frame at offset 14: what is rewritten when its buffer is recycled.
PKTGEN_STAMP = struct.Struct("<QII")
MIN_FRAME = 64
MAX_FRAME = 65536
_PATTERN = random.Random(0x76686F7374).randbytes(2 * MAX_FRAME)
#: the payload pattern (the compiled receiver, vhostpci_host._pktgen, checks pktgen frames against it)
PATTERN = _PATTERN
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


def pktgen_check(seq: int, size: int, macs: int) -> int:
    """The cheap check of a pktgen frame: Knuth's multiplicative hash of seq, xor the length and
    ``macs``, the crc32 of its 12 address bytes (computed once per sender and destination)."""
    return ((seq ^ seq >> 32) * 0x9E3779B1 ^ size ^ macs) & 0xFFFFFFFF  # the fold: all 64 bits of seq count


def pktgen_frame(dst: bytes, src: bytes, size: int, seq: int = 0) -> bytes:
    """A pktgen frame of ``size`` bytes; its buffer is reused by stamping :data:`PKTGEN_STAMP` only."""
    if not MIN_FRAME <= size <= MAX_FRAME:
        raise ValueError(f"frame size {size} not in {MIN_FRAME}..{MAX_FRAME}")
    stamp = PKTGEN_STAMP.pack(seq, size, pktgen_check(seq, size, zlib.crc32(dst + src)))
    return dst + src + PKTGEN_ETHERTYPE.to_bytes(2, "big") + stamp + _PATTERN[: size - _PAYLOAD_AT]


_pktgen_payloads: dict[int, bytes] = {}


def _pktgen_payload(size: int) -> bytes:
    got = _pktgen_payloads.get(size)
    if got is None:
        if len(_pktgen_payloads) > 64:  # bounded: mixed sizes must not grow it without end
            _pktgen_payloads.clear()
        got = _pktgen_payloads[size] = _PATTERN[: size - _PAYLOAD_AT]
    return got


def check_pktgen(frame: bytes) -> tuple[bytes, int]:
    """``(src, seq)`` of a valid pktgen frame (``frame`` as bytes), else :class:`CorruptFrameError`."""
    seq, size, chk = PKTGEN_STAMP.unpack_from(frame, 14)
    if size != len(frame):
        raise CorruptFrameError(f"length field {size} != frame length {len(frame)}")
    if chk != pktgen_check(seq, size, zlib.crc32(frame[:12])):
        raise CorruptFrameError(f"check mismatch in seq {seq}")
    if not frame.endswith(_pktgen_payload(size)):
        raise CorruptFrameError(f"payload differs from the pattern in seq {seq}")
    return frame[6:12], seq


_PKTGEN_TYPE = PKTGEN_ETHERTYPE.to_bytes(2, "big")


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


class SeqSet:
    """The sequence numbers seen from one sender: a set of ints, held as one run and the rest.

    A sender numbers its frames up from its base and the switch keeps each port's order,
    so nearly every frame extends the run ``[lo, hi)`` by one: no set entry and no object
    per frame (a set of a million ints is 32 MiB, resized as it grows, which had been most
    of a long run's receive cost). Anything else, out of order or from a second
    incarnation of the sender, goes to ``rest``, and joins the run once the run reaches
    it. The compiled receive (``_pktgen.c``) extends the run itself while ``rest`` is
    empty and calls :meth:`add` for everything else, so this method is the rule.

    After a gap that never fills (a frame lost or corrupted, a sender restarted with a new
    base) every later number goes to ``rest``, a call of :meth:`add` each: still exact, at
    about a set's cost per frame again. The bench's traffic has no gap (the switch holds a
    unicast frame until its port has room); a source that must stay cheap across gaps would
    keep several runs.
    """

    __slots__ = ("hi", "lo", "rest")

    def __init__(self) -> None:
        self.lo = self.hi = 0  # the run [lo, hi); empty until the first add
        self.rest: set[int] = set()  # never holds lo - 1, a number of the run, or hi

    def add(self, seq: int) -> bool:
        """Count ``seq``; False if it was seen already (a duplicate)."""
        lo, hi = self.lo, self.hi
        if lo == hi:  # empty: the run starts here
            self.lo, self.hi = seq, seq + 1
        elif lo <= seq < hi or seq in self.rest:
            return False
        elif seq == hi:
            hi += 1
            while hi in self.rest:  # bounded by len(rest): each number leaves it once
                self.rest.remove(hi)
                hi += 1
            self.hi = hi
        elif seq == lo - 1:
            lo -= 1
            while lo - 1 in self.rest:
                lo -= 1
                self.rest.remove(lo)
            self.lo = lo
        else:
            self.rest.add(seq)
        return True

    def __contains__(self, seq: object) -> bool:
        return isinstance(seq, int) and (self.lo <= seq < self.hi or seq in self.rest)

    def __len__(self) -> int:
        return self.hi - self.lo + len(self.rest)

    def __iter__(self) -> Iterator[int]:
        yield from range(self.lo, self.hi)
        yield from self.rest

    def __eq__(self, other: object) -> bool:  # the same numbers, however each holds them
        if not isinstance(other, SeqSet):
            return NotImplemented
        return len(self) == len(other) and all(s in other for s in self)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"SeqSet(run={self.lo}..{self.hi}, rest={len(self.rest)})"


@dataclass
class Receiver:
    """Counts what one frontend received, per sender: duplicates and corruption are errors."""

    received: int = 0
    octets: int = 0
    duplicates: int = 0
    corrupt: int = 0
    seen: dict[bytes, SeqSet] = field(default_factory=dict)

    def take(self, frame: bytes | memoryview) -> None:
        try:
            if frame[12:14] == _PKTGEN_TYPE and len(frame) >= _PAYLOAD_AT:
                src, seq = check_pktgen(bytes(frame))
            else:
                _, src, seq = check(frame)
        except CorruptFrameError:
            self.corrupt += 1
            return
        seqs = self.seen.get(src)
        if seqs is None:
            seqs = self.seen[src] = SeqSet()
        if not seqs.add(seq):
            self.duplicates += 1
            return
        self.received += 1
        self.octets += len(frame)

    def from_sender(self, src: bytes) -> int:
        return len(self.seen.get(src, ()))
