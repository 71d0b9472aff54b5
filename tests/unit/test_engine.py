"""The controlq engine: every rule of protocol.md section 5, and one ack per message."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from vhostpci_driver.addr import WindowOffset, Xgpa
from vhostpci_driver.engine import TRANSPORT_FEATURES, Engine
from vhostpci_driver.errors import FailReason, ProtocolError
from vhostpci_driver.events import (
    FeaturesNegotiated,
    FrontendAdded,
    FrontendRemoved,
    MemoryAdded,
    MemoryRemoved,
)
from vhostpci_driver.memory import BufferWindow, RegionTable
from vhostpci_driver.wire import ctrl
from vhostpci_driver.wire.ctrl import (
    AckResult,
    DeviceInfo,
    FeatureBits,
    FrontendKey,
    Limits,
    MemoryInfo,
    MemoryRegion,
    MsgType,
    Op,
    VirtqInfo,
)

WINDOW = 1 << 20
MIB = 1 << 20


def engine(**kw: object) -> Engine:
    return Engine(RegionTable(BufferWindow(bytearray(WINDOW))), **kw)  # type: ignore[arg-type]


class Driver:
    """Feeds an engine messages with increasing ids, as the device would."""

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.next_id = 1

    def send(self, body: ctrl.ControlBody) -> ctrl.Ack:
        out = self.eng.handle(ctrl.encode_message(self.next_id, body))
        assert out.request_id == self.next_id and out.ack is not None
        self.next_id += 1
        return out.ack

    def events(self, body: ctrl.ControlBody) -> tuple[object, ...]:
        out = self.eng.handle(ctrl.encode_message(self.next_id, body))
        self.next_id += 1
        return out.events


def region(xgpa: int, size: int, woff: int) -> MemoryRegion:
    return MemoryRegion(Xgpa(xgpa), size, WindowOffset(woff))


def mem(op: Op, *regs: MemoryRegion) -> MemoryInfo:
    return MemoryInfo(op, regs)


def vq(base: int, size: int = 16, index: int = 0) -> VirtqInfo:
    return VirtqInfo(index, size, Xgpa(base), Xgpa(base + 16 * size), Xgpa(base + 0x1000))


NET = FrontendKey(1, 0x525400000001)


def net_add(*vqs: VirtqInfo) -> DeviceInfo:
    return DeviceInfo(Op.ADD, NET.device_type, NET.device_id, vqs)


def net_del() -> DeviceInfo:
    return DeviceInfo(Op.DEL, NET.device_type, NET.device_id)


def test_memory_add_then_del() -> None:
    d = Driver(engine())
    r = region(0x100000000, 64 << 10, 0)
    assert d.events(mem(Op.ADD, r)) == (MemoryAdded((r,)),)
    assert d.eng.table.covers(0x100000000, 64 << 10)
    ack = d.send(mem(Op.DEL, r))
    assert ack.result == AckResult.DEL_DONE
    assert not d.eng.table.covers(0x100000000, 1)


def test_memory_rules_fail_without_changing_state() -> None:
    d = Driver(engine())
    d.send(mem(Op.ADD, region(0, 64 << 10, 0)))
    before = d.eng.dump()["regions"]
    cases = [
        (mem(Op.ADD, region(0x8000, 4096, 0x80000)), FailReason.OVERLAP, AckResult.ADD_FAIL),
        (mem(Op.ADD, region(0x100000, 4096, 0x8000)), FailReason.OVERLAP, AckResult.ADD_FAIL),
        (mem(Op.ADD, region(0x100000, 8192, WINDOW - 4096)), FailReason.OUT_OF_WINDOW, AckResult.ADD_FAIL),
        (mem(Op.DEL, region(0, 4096, 0)), FailReason.NOT_FOUND, AckResult.DEL_FAIL),
        # all or nothing: the first region is fine, the second overlaps it
        (
            mem(Op.ADD, region(0x200000, 4096, 0x20000), region(0x200000, 4096, 0x30000)),
            FailReason.OVERLAP,
            AckResult.ADD_FAIL,
        ),
    ]
    for body, reason, result in cases:
        ack = d.send(body)
        assert (ack.result, ack.reason) == (result, reason), body
        assert d.eng.dump()["regions"] == before


def test_frontend_needs_its_rings_in_memory() -> None:
    d = Driver(engine())
    ack = d.send(net_add(vq(0x1000)))
    assert (ack.result, ack.reason) == (AckResult.ADD_FAIL, FailReason.RING_OUTSIDE_MEMORY)
    d.send(mem(Op.ADD, region(0, 64 << 10, 0)))
    ring = vq(0xF000)  # its used ring runs past the region's end
    assert d.send(net_add(ring)).reason == FailReason.RING_OUTSIDE_MEMORY
    events = d.events(net_add(vq(0x1000)))
    assert events == (FrontendAdded(NET, (vq(0x1000),)),)


def test_frontend_exists_notfound_and_limit() -> None:
    d = Driver(engine(max_frontends=1))
    d.send(mem(Op.ADD, region(0, 64 << 10, 0)))
    assert d.send(net_add(vq(0x1000))).result == AckResult.ADD_DONE
    assert d.send(net_add(vq(0x1000))).reason == FailReason.EXISTS
    other = DeviceInfo(Op.ADD, 4, 1, (vq(0x4000),))
    assert d.send(other).reason == FailReason.LIMIT
    assert d.events(net_del()) == (FrontendRemoved(NET),)
    ack = d.send(net_del())
    assert (ack.result, ack.reason) == (AckResult.DEL_FAIL, FailReason.NOT_FOUND)


def test_memory_in_use_by_rings_cannot_be_deleted_first() -> None:
    d = Driver(engine())
    r = region(0, 64 << 10, 0)
    d.send(mem(Op.ADD, r))
    d.send(net_add(vq(0x1000)))
    ack = d.send(mem(Op.DEL, r))
    assert (ack.result, ack.reason) == (AckResult.DEL_FAIL, FailReason.IN_USE)
    d.send(net_del())
    assert d.send(mem(Op.DEL, r)).result == AckResult.DEL_DONE


def test_features_default_policy_and_app_policy() -> None:
    d = Driver(engine())
    offered = (1 << 32) | (1 << 29) | (1 << 5) | (1 << 15)
    assert d.send(FeatureBits(1, NET.device_id, offered)).reason == FailReason.NOT_FOUND
    d.send(mem(Op.ADD, region(0, 64 << 10, 0)))
    d.send(net_add(vq(0x1000)))
    ack = d.send(FeatureBits(1, NET.device_id, offered))
    assert ack.value == offered & TRANSPORT_FEATURES
    # an app that asks for more than offered still only gets a subset
    eng = engine(policies={1: lambda key, off: off | (1 << 40)})
    d2 = Driver(eng)
    d2.send(mem(Op.ADD, region(0, 64 << 10, 0)))
    d2.send(net_add(vq(0x1000)))
    events = d2.events(FeatureBits(1, NET.device_id, offered))
    assert events == (FeaturesNegotiated(NET, offered, offered),)


def test_ids_duplicates_zero_and_unknown_types() -> None:
    eng = engine()
    msg = ctrl.encode_message(5, mem(Op.ADD, region(0, 4096, 0)))
    assert eng.handle(msg).ack.result == AckResult.ADD_DONE  # type: ignore[union-attr]
    again = eng.handle(msg)
    assert again.request_id == 5 and again.ack.reason == FailReason.DUPLICATE_ID  # type: ignore[union-attr]
    older = eng.handle(ctrl.encode_message(4, mem(Op.ADD, region(0x10000, 4096, 0x10000))))
    assert older.ack.reason == FailReason.DUPLICATE_ID  # type: ignore[union-attr]
    assert len(eng.table) == 1
    zero = eng.handle(ctrl.encode_message(0, mem(Op.ADD, region(0x10000, 4096, 0x10000))))
    assert zero.ack.reason == FailReason.MALFORMED  # type: ignore[union-attr]
    unknown = eng.handle(struct.pack("<HHIQ", 0x42, 1, 0, 9))
    assert unknown.request_id == 9
    assert unknown.ack == ctrl.Ack(0x42, AckResult.ADD_FAIL, FailReason.UNKNOWN_TYPE)
    bad_version = eng.handle(struct.pack("<HHIQ", MsgType.FEATURE_BITS, 7, 0, 10))
    assert bad_version.ack.reason == FailReason.BAD_VERSION  # type: ignore[union-attr]


def test_malformed_del_fails_as_del() -> None:
    eng = engine()
    raw = bytearray(ctrl.encode_message(1, mem(Op.DEL, region(0, 4096, 0))))
    raw[16 + 2] = 1  # reserved
    out = eng.handle(bytes(raw))
    assert out.ack == ctrl.Ack(MsgType.MEMORY_INFO, AckResult.DEL_FAIL, FailReason.MALFORMED)


def test_a_del_whose_header_is_broken_still_fails_as_del() -> None:
    """The FAIL result comes from the ops field as received, whatever else is wrong (decoded once)."""
    eng = engine()
    raw = bytearray(ctrl.encode_message(1, mem(Op.DEL, region(0, 4096, 0))))
    struct.pack_into("<H", raw, 2, 9)  # version 9
    out = eng.handle(bytes(raw))
    assert out.ack == ctrl.Ack(MsgType.MEMORY_INFO, AckResult.DEL_FAIL, FailReason.BAD_VERSION)
    received = ctrl.receive(memoryview(raw), ctrl.Limits())
    assert received.op == Op.DEL and isinstance(received.body, ProtocolError)
    assert received.header == ctrl.unpack_header(raw)


def test_short_buffers_are_dropped_and_counted() -> None:
    eng = engine()
    out = eng.handle(b"\x01\x00\x01")
    assert out.request_id is None and out.ack_bytes() is None
    assert eng.stats.dropped_short == 1


def test_limits_come_from_the_device() -> None:
    eng = engine(limits=Limits(max_regions=1))
    out = eng.handle(ctrl.encode_message(1, mem(Op.ADD, region(0, 4096, 0), region(0x10000, 4096, 0x10000))))
    assert out.ack.reason == FailReason.LIMIT  # type: ignore[union-attr]


def test_remote_gone_removes_frontends_then_memory() -> None:
    d = Driver(engine())
    r = region(0, 64 << 10, 0)
    d.send(mem(Op.ADD, r))
    d.send(net_add(vq(0x1000)))
    assert d.eng.remote_gone() == [FrontendRemoved(NET), MemoryRemoved((r,))]
    assert d.eng.dump()["frontends"] == [] and len(d.eng.table) == 0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.binary(max_size=8), st.integers(0, 200)), max_size=40))
def test_every_message_is_acked_exactly_once_and_failures_change_nothing(
    script: list[tuple[int, bytes, int]],
) -> None:
    eng = engine()
    bodies: list[ctrl.ControlBody] = [
        mem(Op.ADD, region(0, 64 << 10, 0)),
        mem(Op.ADD, region(0x100000, 64 << 10, 0x10000)),
        mem(Op.DEL, region(0, 64 << 10, 0)),
        net_add(vq(0x1000)),
        net_del(),
        FeatureBits(1, NET.device_id, (1 << 32) | 1),
        DeviceInfo(Op.ADD, 4, 7, (vq(0x101000),)),
    ]
    acked: list[int] = []
    for n, (which, noise, cut) in enumerate(script, start=1):
        raw = bytearray(ctrl.encode_message(n, bodies[which]))
        if noise:  # corrupt some payload bytes
            for i, b in enumerate(noise):
                pos = 16 + (b * 7 + i) % max(1, len(raw) - 16)
                if pos < len(raw):
                    raw[pos] = b
        if cut < len(raw) and cut % 3 == 0:
            del raw[max(16, cut) :]
        before = eng.dump()
        out = eng.handle(bytes(raw))
        assert out.request_id == n and out.ack is not None
        acked.append(n)
        if out.ack.result.failed:
            after = eng.dump()
            for k in ("regions", "frontends"):
                assert after[k] == before[k]
    assert acked == list(range(1, len(script) + 1))
    assert eng.stats.acked_done + eng.stats.acked_fail == len(script)
