"""What every fuzz target promises, and the reader that turns fuzz bytes into fields.

A target is ``def target(data: bytes) -> None``. For any input it returns, or
it raises: an :class:`InvariantError` when one of its invariants broke, or whatever
escaped the code under test that the code's contract does not allow
(``struct.error``, ``IndexError``, ``OSError``, ...). The typed errors a parser
is documented to raise are caught inside the target and are not findings.
atheris reports any exception as a crash; pytest reports it as a failure.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable


class InvariantError(Exception):
    """A finding: an invariant of a target broke (the code accepted or produced something wrong).

    Raised instead of ``assert`` so the checks stay under ``python -O``.
    """


def check(ok: bool, what: str) -> None:
    """Raise an :class:`InvariantError` saying ``what`` is wrong unless ``ok``."""
    if not ok:
        raise InvariantError(what)


@dataclasses.dataclass(frozen=True)
class Target:
    """One fuzz target: its entry point, seeds built by the codecs' own encoders, and a size bound."""

    name: str
    about: str
    run: Callable[[bytes], None]
    seeds: Callable[[], dict[str, bytes]]
    max_len: int


class FuzzInput:
    """Fields read in order from the fuzz bytes, little-endian; past the end every read is 0 or empty.

    Reading zeros past the end (instead of stopping) keeps every input meaningful,
    so libFuzzer's mutations that shorten an input still reach the code.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer at the end of the input)."""
        chunk = self._data[self._pos : self._pos + max(n, 0)]
        self._pos += len(chunk)
        return chunk

    def rest(self) -> bytes:
        return self.take(self.remaining())

    def uint(self, width: int) -> int:
        return int.from_bytes(self.take(width), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)


def open_fds() -> set[int]:
    """The fds this process holds now (a leak check around one input: what is new afterwards).

    A set rather than a count: under pytest an earlier test's objects may be
    collected, closing their fds, while an input runs; that must not hide a leak.
    """
    return {int(name) for name in os.listdir("/proc/self/fd")}


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
