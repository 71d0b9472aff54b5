"""Fuzz target ``ring-diff``: the compiled ring walker against the pure reference, on every input.

The input is the ``ring`` target's (the driver VM's memory plus a script of
device operations and concurrent driver writes; see :mod:`.ring`), and its
seeds are that target's. Two copies of the same memory are built; the pure
:class:`DeviceQueue` runs the script on one, :class:`NativeDeviceQueue` on the
other, in lockstep. After every operation the two must agree exactly: the chains
(heads, lengths, every view's place and length in memory), the used entries and
indexes written, the error (type, rule, index, message), the in-flight table,
and every byte of memory. An operation byte with its top bit set pops or pushes
through the array batch (``pop_direct`` / ``push_direct``) instead of the chain
API. Bit 5 of the header's cfg byte translates through a
``GuestMemory`` that is not the region table, so the C path's call-back into
Python is covered as well as its own bisection of the table.
"""

from __future__ import annotations

import ctypes
from array import array
from collections.abc import Callable
from functools import partial
from operator import methodcaller
from typing import Any

from vhostpci_driver.addr import GuestMemory
from vhostpci_driver.errors import RingError
from vhostpci_driver.virtqueue.device import Chain, DeviceQueue
from vhostpci_driver.virtqueue.layout import layout
from vhostpci_driver.virtqueue.native import LIB, NativeDeviceQueue
from vhostpci_host.fuzz.contract import FuzzInput, InvariantError, Target, check
from vhostpci_host.fuzz.ring import (
    HOLE,
    MAX_OPS,
    OP_NOTIFY,
    OP_POKE,
    OP_POP,
    OP_PUSH,
    RING,
    WINDOW,
    _Memory,
    _pick_used,
    ring_seeds,
)

GENERIC = 0x20  # cfg bit: translate through a plain GuestMemory, not the region table


class _Generic:
    """A GuestMemory that is not the region table: the C walker must call back into Python."""

    def __init__(self, mem: _Memory) -> None:
        self._mem = mem

    def view(self, addr: int, length: int) -> memoryview:
        return self._mem.view(addr, length)


def _where(mem: _Memory, v: memoryview) -> tuple[int, int]:
    """A view as (offset in the window, length): comparable across the two copies of memory."""
    if len(v) == 0:
        return (-1, 0)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mem.window))
    return (ctypes.addressof(ctypes.c_char.from_buffer(v)) - base, len(v))


def chain_summary(mem: _Memory, c: Chain) -> tuple[Any, ...]:
    """Everything a chain says, in terms both copies of memory share."""
    return (
        type(c).__name__,
        c.head,
        c.readable_len,
        c.writable_len,
        tuple(_where(mem, v) for v in c.readable),
        tuple(_where(mem, v) for v in c.writable),
    )


def outcome(mem: _Memory, op: Callable[[], object]) -> tuple[tuple[Any, ...], object]:
    """What one operation did, comparable across the copies (its result, or the error it raised:
    type, rule, index, message), and the result itself."""
    try:
        r = op()
    except RingError as e:
        return ("RingError", e.rule, e.index, str(e)), None
    except (TypeError, ValueError) as e:
        return (type(e).__name__,), None
    if isinstance(r, list):
        return ("chains", tuple(chain_summary(mem, c) for c in r)), r
    return ("value", r), r


def state(q: DeviceQueue) -> tuple[Any, ...]:
    broken = q.broken
    return (
        q.last_avail_idx,
        q.last_used_idx,
        list(q._inflight),
        None if broken is None else (broken.rule, broken.index, str(broken)),
        q._signalled,
        q._pushed_since_signal,
    )


class Twin:
    """The pure reference and the compiled queue over two copies of the same memory, in lockstep."""

    def __init__(
        self, image: bytes, size: int, rings: tuple[int, int, int], generic: bool, **kw: Any
    ) -> None:
        if LIB is None:
            raise InvariantError("the native data path is not built: nothing to compare")
        self.mems = (_Memory(image), _Memory(image))
        mems: list[GuestMemory] = [_Generic(m) if generic else m.table for m in self.mems]
        errors = []
        self.queues: list[DeviceQueue] = []
        for cls, mem in zip((DeviceQueue, NativeDeviceQueue), mems, strict=True):
            try:
                self.queues.append(cls(mem, size, *rings, **kw))
            except RingError as e:
                errors.append((e.rule, e.index, str(e)))
        check(len(errors) in (0, 2), f"only one implementation refused the ring: {errors}")
        check(errors[:1] == errors[1:], f"the two refused the ring differently: {errors}")

    @property
    def up(self) -> bool:
        return bool(self.queues)

    def do(self, name: str, what: Callable[[DeviceQueue], object]) -> object:
        """Run one operation on both; they must agree on what it did and on everything after.
        Returns what the pure queue's call returned."""
        (pure, result), (native, _) = (
            outcome(self.mems[0], partial(what, self.queues[0])),
            outcome(self.mems[1], partial(what, self.queues[1])),
        )
        check(pure == native, f"{name}: pure {pure} != native {native}")
        self.agree(name)
        return result

    def agree(self, name: str) -> None:
        p, n = (state(q) for q in self.queues)
        check(p == n, f"after {name}: pure state {p} != native {n}")
        check(self.mems[0].raw == self.mems[1].raw, f"after {name}: the two memories differ")

    def poke(self, off: int, data: bytes) -> None:
        for m in self.mems:
            m.window[off : off + len(data)] = data


def fuzz_ring_diff(data: bytes) -> None:
    """The ``ring`` target's input, run on both implementations (see the module's docstring)."""
    inp = FuzzInput(data)
    cfg = inp.u8()
    size = 1 << (cfg & 7)
    last_avail, last_used, max_chain = inp.u16(), inp.u16(), inp.u8()
    if cfg & 0x10:
        rings = (RING + inp.u16(), RING + inp.u16(), RING + inp.u16())
    else:
        d, a, u, _ = layout(size)
        rings = (RING + d, RING + a, RING + u)
    image = inp.take(inp.u16() % (WINDOW + 1))
    twin = Twin(
        image, size, rings, bool(cfg & GENERIC), event_idx=bool(cfg & 8), last_avail_idx=last_avail,
        last_used_idx=last_used, max_chain_len=max_chain or None,
    )  # fmt: skip
    if not twin.up:
        return
    flight: list[Chain] = []  # the pure queue's chains popped and not pushed
    last_batch: list[Chain] = []  # its last pop, while none of it was pushed (what discard may return)
    for _ in range(MAX_OPS):
        if not inp.remaining():
            return
        op = inp.u8()
        direct = bool(op & 0x80)  # the batch described in arrays (pop_direct / push_direct)
        op %= 5
        if op == OP_POP and direct:
            n = inp.u8() % 65
            got = twin.do("pop_direct", partial(_pop_direct, n=n))
            if isinstance(got, tuple):
                last_batch = _as_chains(got[1])
                flight += last_batch
        elif op == OP_POP:
            n = inp.u8()
            chains = twin.do("pop_batch", methodcaller("pop_batch", n))
            if isinstance(chains, list):
                flight += chains
                last_batch = chains
        elif op == OP_PUSH:
            used = _pick_used(inp, flight)
            if direct:
                words = array("I", [x & 0xFFFFFFFF for entry in used for x in entry])
                twin.do("push_direct", methodcaller("push_direct", words, len(used)))
            else:
                twin.do("push_batch", methodcaller("push_batch", used))
            pushed = {head for head, _ in used}
            flight = [c for c in flight if c.head not in pushed]
            last_batch = [] if pushed & {c.head for c in last_batch} else last_batch
        elif op == OP_POKE:
            off = inp.u16() % (WINDOW - 1)
            chunk = inp.take(2).ljust(2, b"\0")
            if not HOLE[0] - 2 < off < HOLE[1]:
                twin.poke(off, chunk)
        elif op == OP_NOTIFY:
            which = inp.u8() % 5
            twin.do(f"notify op {which}", _NOTIFY_OPS[which])
        else:
            k = inp.u8() % (len(last_batch) + 1)
            if k:
                gone = last_batch[-k:]  # discard reads only heads: the pure queue's chains serve both
                twin.do("discard", methodcaller("discard", gone))
                flight = [c for c in flight if c not in gone]
                last_batch = last_batch[:-k]


def _pop_direct(q: DeviceQueue, n: int) -> tuple[int, list[int]]:
    """pop_direct into a fresh array: the count and the words (the two copies' region tables are
    alike, so region indexes and offsets compare as they are)."""
    out = array("Q", bytes(24 * n))
    got = q.pop_direct(out, n)
    return got, list(out[: 3 * got])


def _as_chains(words: list[int]) -> list[Chain]:
    """The pure queue's direct batch as chains for the bookkeeping (heads and writable bytes only)."""
    out = []
    for k in range(0, len(words), 3):
        w = words[k]
        out.append(Chain(w & 0xFFFF, [], [], 0, w >> 32 if w >> 16 & 1 else 0))
    return out


_NOTIFY_OPS: tuple[Callable[[DeviceQueue], object], ...] = (
    lambda q: q.need_notify(),
    lambda q: q.enable_notifications(),
    lambda q: q.disable_notifications(),
    lambda q: q.avail_idx(),
    lambda q: q.pending(),
)


TARGET = Target(
    "ring-diff",
    "the compiled ring walker against the pure reference, lockstep (virtqueue/native.py)",
    fuzz_ring_diff,
    ring_seeds,
    max_len=4096,
)
