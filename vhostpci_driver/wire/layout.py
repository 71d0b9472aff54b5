"""Wire structures, declared once.

A :class:`WireStruct` is a named, little-endian, packed field list. It is the
single source of the structure's layout: packing, unpacking, its size, and the
offset table that docs/protocol.md documents (``tests/unit/test_protocol_doc.py``
compares the two). Higher layers never write a ``struct`` format by hand.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from vhostpci_driver.errors import ProtocolError

#: every declared structure by its C name, for the documentation test
REGISTRY: dict[str, WireStruct] = {}


class WireStruct:
    """One packed little-endian structure: ``fields`` are ``(name, struct code)`` pairs."""

    __slots__ = ("_struct", "fields", "name", "size")

    def __init__(
        self,
        name: str,
        fields: Sequence[tuple[str, str]],
        registry: dict[str, WireStruct] | None = REGISTRY,
    ) -> None:
        """``registry``: where the structure is listed (None: nowhere; another protocol's own table)."""
        self.name = name
        self.fields = tuple(fields)
        # "<" gives standard sizes and no padding: the layout is exactly the doc's table.
        self._struct = struct.Struct("<" + "".join(code for _, code in self.fields))
        self.size = self._struct.size
        if registry is not None:
            registry[name] = self

    def offsets(self) -> list[tuple[int, int, str]]:
        """``(offset, size, field name)`` for every field, in order."""
        out = []
        off = 0
        for fname, code in self.fields:
            size = struct.calcsize("<" + code)
            out.append((off, size, fname))
            off += size
        return out

    def pack(self, *values: int | bytes) -> bytes:
        """Pack field values in declaration order."""
        return self._struct.pack(*values)

    def unpack_from(self, buf: bytes | bytearray | memoryview, offset: int, what: str) -> tuple[int, ...]:
        """Unpack at ``offset``; a short buffer is a :class:`ProtocolError` about ``what``."""
        if offset < 0 or offset + self.size > len(buf):
            raise ProtocolError(what, f"needs {self.size} bytes at offset {offset}, buffer has {len(buf)}")
        return self._struct.unpack_from(buf, offset)


def check_reserved(value: int, what: str) -> None:
    """Reserved fields must be zero, so they can be given a meaning later."""
    if value != 0:
        raise ProtocolError(what, f"reserved field must be 0, is {value:#x}")


def check_exact(payload_len: int, expected: int, what: str) -> None:
    """A payload's length must be exactly what its counts imply: no slack, no truncation."""
    if payload_len != expected:
        raise ProtocolError(what, f"payload is {payload_len} bytes, its counts imply {expected}")


def is_pow2(n: int) -> bool:
    """True for 1, 2, 4, ...: virtqueue sizes (virtio 1.2, 2.7) and window sizes."""
    return n > 0 and n & (n - 1) == 0
