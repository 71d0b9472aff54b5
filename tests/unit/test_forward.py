"""The batch forwarding primitive: the compiled one against the pure reference, on the same bytes.

Frames and RX buffers are Chains over one bytearray (the functional core needs no
device); each example is built twice, once per implementation, and both must
return the same (next index, bytes), leave the same bytes in memory, and leave each
port with the same RX buffers, used entries and counters, and the same touched set.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostpci_driver.apps.forward import compiled_forward_unicast, forward_unicast_pure
from vhostpci_driver.frontends import Chain
from vhostpci_driver.virtqueue.native import LIB, REASON

MEM = 1 << 16
IMPLS = [
    pytest.param(forward_unicast_pure, id="pure"),
    pytest.param(
        compiled_forward_unicast,
        id="native",
        marks=pytest.mark.skipif(LIB is None, reason=REASON),
    ),
]


@dataclass(eq=False)
class P:
    name: int
    mergeable: bool = False
    broken: str | None = None
    rx_bufs: deque[Chain] = field(default_factory=deque)
    rx_used: list[tuple[int, int]] = field(default_factory=list)
    rx_frames: int = 0
    rx_bytes: int = 0


def mac(i: int) -> bytes:
    return bytes([0x52, 0x54, 0, 0, 0, i])


class World:
    """Ports with RX buffers and a source's TX frames, all in one bytearray."""

    def __init__(
        self, ports: list[tuple[bool, bool, list[int]]], frames: list[tuple[int, int, bool]]
    ) -> None:
        self.mem = bytearray(MEM)
        self.view = memoryview(self.mem)
        self.at = 0
        self.ports = [P(i, mergeable=m, broken="x" if b else None) for i, (m, b, _) in enumerate(ports)]
        self.table = {mac(i): p for i, p in enumerate(self.ports)}
        self.source = self.ports[0]
        for p, (_, _, sizes) in zip(self.ports, ports, strict=True):
            for k, size in enumerate(sizes):
                p.rx_bufs.append(Chain(k, [], [self.take(size, 0)], 0, size))
        self.chains = []
        for k, (dst, size, split) in enumerate(frames):
            special = {-1: b"\xff" * 6, -2: b"\x33\x33\x00\x00\x00\x01", -3: mac(200)}
            dest = special[dst] if dst < 0 else mac(dst)
            body = bytes((k + j) & 0xFF for j in range(max(0, size - 18)))
            data = (bytes(range(12)) + dest + body)[:size]
            if split and size > 1:
                views = [self.take(size // 2, 0), self.take(size - size // 2, 0)]
                views[0][:] = data[: size // 2]
                views[1][:] = data[size // 2 :]
            else:
                views = [self.take(size, 0)]
                views[0][:] = data
            self.chains.append(Chain(100 + k, views, [], size, 0))

    def take(self, n: int, fill: int) -> memoryview:
        v = self.view[self.at : self.at + n]
        v[:] = bytes([fill]) * n
        self.at += n
        return v

    def state(self) -> Any:
        return (
            bytes(self.mem),
            [(p.rx_used, p.rx_frames, p.rx_bytes, [b[0] for b in p.rx_bufs]) for p in self.ports],
        )


ports_st = st.lists(
    st.tuples(st.booleans(), st.just(False), st.lists(st.integers(0, 300), max_size=5)),
    min_size=1,
    max_size=4,
)
frames_st = st.lists(st.tuples(st.integers(-3, 4), st.integers(0, 300), st.booleans()), max_size=12)


@pytest.mark.skipif(LIB is None, reason=REASON)
@settings(max_examples=400, deadline=None)
@given(ports_st, frames_st, st.integers(-1, 4), st.lists(st.booleans(), min_size=4, max_size=4))
def test_native_and_pure_place_the_same_frames(
    ports: list[tuple[bool, bool, list[int]]], frames: list[tuple[int, int, bool]], start: int,
    broken: list[bool],
) -> None:  # fmt: skip
    out = []
    for impl in (forward_unicast_pure, compiled_forward_unicast):
        w = World(ports, frames)
        for p, b in zip(w.ports, broken, strict=False):
            p.broken = "broken" if b and p is not w.source else None
        touched: set[P] = set()
        r = impl(w.chains, start, w.table, w.source, touched)
        out.append((r, w.state(), sorted(p.name for p in touched)))
    assert out[0] == out[1]


@pytest.mark.parametrize("impl", IMPLS)
def test_places_unicast_and_stops_where_policy_is_needed(impl: Callable[..., tuple[int, int]]) -> None:
    # port 1: mergeable, two buffers; port 2: one buffer of 64
    w = World([(False, False, []), (True, False, [100, 100]), (False, False, [64])],
              [(1, 60, False), (2, 64, False), (1, 80, False), (-1, 60, False), (2, 60, False)])  # fmt: skip
    touched: set[P] = set()
    nxt, nbytes = impl(w.chains, 0, w.table, w.source, touched)
    assert (nxt, nbytes) == (3, 60 + 64 + 80)  # the broadcast stops it
    p1, p2 = w.ports[1], w.ports[2]
    assert p1.rx_used == [(0, 60), (1, 80)] and (p1.rx_frames, p1.rx_bytes) == (2, 48 + 68)
    assert p2.rx_used == [(0, 64)] and not p2.rx_bufs
    assert touched == {p1, p2}
    first = bytes(w.chains[0][1][0])
    # the copy is the frame, with num_buffers = 1 for the mergeable port
    rx0 = w.view[0:100]  # port 1's first RX buffer (the source, port 0, has none)
    assert (
        bytes(rx0[:10]) == first[:10] and bytes(rx0[10:12]) == b"\x01\x00" and bytes(rx0[12:60]) == first[12:]
    )
    # the next frame goes to port 2, which has no buffer left: stop there
    assert impl(w.chains, 4, w.table, w.source, touched) == (4, 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("frame", "why"),
    [((0, 60, False), "to its own source"), ((-3, 60, False), "unknown MAC"), ((-2, 60, False), "multicast"),
     ((1, 17, False), "shorter than header + MAC"), ((1, 60, True), "two descriptors"),
     ((1, 200, False), "bigger than the RX buffer")],
)  # fmt: skip
def test_leaves_each_policy_case_to_the_app(
    impl: Callable[..., tuple[int, int]], frame: tuple[int, int, bool], why: str
) -> None:
    w = World([(False, False, []), (False, False, [100])], [frame])
    before = w.state()
    assert impl(w.chains, 0, w.table, w.source, set()) == (0, 0), why
    assert w.state() == before


@pytest.mark.parametrize("impl", IMPLS)
def test_a_broken_target_is_left_to_the_app(impl: Callable[..., tuple[int, int]]) -> None:
    w = World([(False, False, []), (False, False, [100])], [(1, 60, False)])
    w.ports[1].broken = "desc-index"
    assert impl(w.chains, 0, w.table, w.source, set()) == (0, 0)
