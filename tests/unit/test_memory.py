"""The region table: every rule, zero-copy views, and a model-based comparison."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vhostpci_driver.addr import WindowOffset, Xgpa
from vhostpci_driver.errors import FailReason, RemoteMemoryError
from vhostpci_driver.memory import BufferWindow, Region, RegionTable, SparseWindow

W = 1 << 16


def R(x: int, s: int, w: int) -> Region:
    return Region(Xgpa(x), s, WindowOffset(w))


def table(size: int = W) -> tuple[RegionTable, bytearray]:
    buf = bytearray(size)
    return RegionTable(BufferWindow(buf)), buf


def reason(fn: object, *args: object) -> FailReason:
    with pytest.raises(RemoteMemoryError) as ei:
        fn(*args)  # type: ignore[operator]
    return ei.value.reason


def test_views_are_the_window_not_copies() -> None:
    t, buf = table()
    t.add([R(0x1000_0000, 0x1000, 0x2000)])
    v = t.view(0x1000_0010, 4)
    v[:] = b"abcd"
    assert buf[0x2010:0x2014] == b"abcd"
    buf[0x2FFF] = 7
    assert t.view(0x1000_0FFF, 1)[0] == 7


def test_overlap_in_either_space_and_bounds() -> None:
    t, _ = table()
    t.add([R(0x10000, 0x1000, 0)])
    assert reason(t.add, [R(0x10800, 0x1000, 0x8000)]) == FailReason.OVERLAP
    assert reason(t.add, [R(0x90000, 0x1000, 0x800)]) == FailReason.OVERLAP
    assert reason(t.add, [R(0x90000, 0x1000, W - 0x800)]) == FailReason.OUT_OF_WINDOW
    assert reason(t.add, [R(0x90000, 0, 0x4000)]) == FailReason.MALFORMED
    assert reason(t.add, [R(2**64 - 0x800, 0x1000, 0x4000)]) == FailReason.MALFORMED
    # all or nothing: the second of a batch overlaps the first
    assert reason(t.add, [R(0x20000, 0x1000, 0x2000), R(0x20800, 0x1000, 0x4000)]) == FailReason.OVERLAP
    assert len(t) == 1


@pytest.mark.parametrize(("gap", "ok"), [(0, True), (-1, False)])
def test_regions_that_touch_in_xgpa_are_taken_and_one_byte_of_overlap_is_not(gap: int, ok: bool) -> None:
    """protocol.md 5.3: regions must not overlap; touching (end == next start) is not overlapping."""
    for batch in (False, True):  # against a region already there, and within one MEMORY_INFO
        t, _ = table()
        first, second = R(0x10000, 0x1000, 0), R(0x11000 + gap, 0x1000, 0x8000)
        if batch:
            add = [first, second]
        else:
            t.add([first])
            add = [second]
        if ok:
            t.add(add)
            assert len(t) == 2
        else:
            assert reason(t.add, add) == FailReason.OVERLAP
            assert len(t) == (0 if batch else 1)


def test_limit() -> None:
    t = RegionTable(BufferWindow(bytearray(W)), max_regions=2)
    t.add([R(0, 0x100, 0), R(0x1000, 0x100, 0x1000)])
    assert reason(t.add, [R(0x2000, 0x100, 0x2000)]) == FailReason.LIMIT


def test_remove_exact_only_and_all_or_nothing() -> None:
    t, _ = table()
    a, b = R(0, 0x1000, 0), R(0x10000, 0x1000, 0x1000)
    t.add([a, b])
    assert reason(t.remove, [R(0, 0x800, 0)]) == FailReason.NOT_FOUND
    assert reason(t.remove, [a, R(0x50000, 0x1000, 0x5000)]) == FailReason.NOT_FOUND
    assert len(t) == 2
    t.remove([a])
    assert t.regions() == [b]
    assert not t.covers(0, 1)


def test_straddling_and_holes_are_refused() -> None:
    t, _ = table()
    t.add([R(0, 0x1000, 0), R(0x1000, 0x1000, 0x1000)])  # adjacent in both spaces
    assert t.covers(0, 0x1000) and t.covers(0x1000, 0x1000)
    assert not t.covers(0xFF0, 0x20)
    assert not t.covers(0x2000, 1)
    assert not t.covers(-1, 2)
    assert t.covers(0x1000, 0)  # an empty range inside a region
    with pytest.raises(RemoteMemoryError, match="not inside one mapped region"):
        t.view(0xFF0, 0x20)


def test_lookup() -> None:
    t, _ = table()
    t.add([R(0x5000, 0x1000, 0)])
    assert t.lookup(0x5FFF) == R(0x5000, 0x1000, 0)
    assert t.lookup(0x6000) is None and t.lookup(0x4FFF) is None


def test_sparse_window() -> None:
    w = SparseWindow(W)
    a, b = bytearray(0x1000), bytearray(0x1000)
    w.add_area(0, a)
    w.add_area(0x4000, b)
    with pytest.raises(RemoteMemoryError):
        w.add_area(0x4800, bytearray(0x1000))
    t = RegionTable(w)
    t.add([R(0x100000, 0x1000, 0x4000)])
    t.view(0x100000, 2)[:] = b"hi"
    assert b[:2] == b"hi"
    with pytest.raises(RemoteMemoryError):
        t.add([R(0x200000, 0x1000, 0x2000)])  # a hole in the window: nothing mapped there
    w.remove_area(0)
    with pytest.raises(RemoteMemoryError):
        w.view(0, 1)


class TableModel(RuleBasedStateMachine):
    """The table against a plain list scan."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = bytearray(W)
        self.t = RegionTable(BufferWindow(self.buf), max_regions=8)
        self.model: list[Region] = []

    regions = st.builds(
        R,
        st.integers(0, 64).map(lambda i: i * 0x400),
        st.integers(1, 8).map(lambda i: i * 0x200),
        st.integers(0, 40).map(lambda i: i * 0x400),
    )

    def _fits(self, new: list[Region]) -> bool:
        all_ = list(self.model)
        for r in new:
            if r.window_offset + r.size > W:
                return False
            for o in all_:
                if r.xgpa < o.xgpa + o.size and o.xgpa < r.xgpa + r.size:
                    return False
                if r.window_offset < o.window_offset + o.size and o.window_offset < r.window_offset + r.size:
                    return False
            all_.append(r)
        return len(all_) <= 8

    @rule(new=st.lists(regions, min_size=1, max_size=3))
    def add(self, new: list[Region]) -> None:
        ok = self._fits(new)
        try:
            self.t.add(new)
        except RemoteMemoryError:
            assert not ok
        else:
            assert ok
            self.model += new

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        if not self.model:
            return
        r = data.draw(st.sampled_from(self.model))
        self.t.remove([r])
        self.model.remove(r)

    @rule(addr=st.integers(0, 0x12000), length=st.integers(0, 0x1200))
    def view(self, addr: int, length: int) -> None:
        owner = [r for r in self.model if r.xgpa <= addr and addr + length <= r.xgpa + r.size]
        try:
            v = self.t.view(addr, length)
        except RemoteMemoryError:
            assert not owner
            return
        assert owner
        r = owner[0]
        off = r.window_offset + addr - r.xgpa
        assert v.tobytes() == bytes(self.buf[off : off + length])
        if length:
            v[0] = (v[0] + 1) % 256
            assert self.buf[off] == v[0]

    @invariant()
    def same_regions(self) -> None:
        assert self.t.regions() == sorted(self.model, key=lambda r: r.xgpa)


TestTableModel = TableModel.TestCase
TestTableModel.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
