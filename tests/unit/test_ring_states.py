"""Ring states handed back by DEVICE_INFO(DEL) (protocol.md 4.4 and 7.1): wire, engine, frontend."""

from __future__ import annotations

import uuid

import pytest

from vhostpci_driver.addr import WindowOffset, Xgpa
from vhostpci_driver.engine import Engine
from vhostpci_driver.errors import ProtocolError
from vhostpci_driver.frontends import Frontend
from vhostpci_driver.memory import BufferWindow, RegionTable
from vhostpci_driver.virtqueue.driver import DriverQueue
from vhostpci_driver.wire import ctrl, sock
from vhostpci_driver.wire.ctrl import (
    Ack,
    AckResult,
    DeviceInfo,
    FrontendKey,
    MemoryInfo,
    MemoryRegion,
    MsgType,
    Op,
    VirtqInfo,
    VirtqState,
)

STATES = (VirtqState(0, 300, 299), VirtqState(1, 0xFFFF, 7))


def test_ack_with_states_round_trips_and_counts_them() -> None:
    ack = Ack(MsgType.DEVICE_INFO, AckResult.DEL_DONE, 0, 2, STATES)
    raw = ctrl.encode_ack(9, ack)
    assert len(raw) == 16 + 16 + 2 * 8
    assert ctrl.decode_ack(raw) == (9, ack)


@pytest.mark.parametrize(
    ("acked_type", "result", "value", "extra", "field"),
    [
        (MsgType.DEVICE_INFO, AckResult.DEL_DONE, 2, 8, "ACK.value"),  # count and length disagree
        (MsgType.DEVICE_INFO, AckResult.DEL_DONE, 65, 65 * 8, "ACK.value"),  # over the limit
        (MsgType.DEVICE_INFO, AckResult.ADD_DONE, 0, 8, "ACK.value"),  # states after an ADD
        (MsgType.MEMORY_INFO, AckResult.DEL_DONE, 1, 8, "ACK.value"),  # states after a memory DEL
    ],
)
def test_states_only_where_the_contract_puts_them(
    acked_type: int, result: AckResult, value: int, extra: int, field: str
) -> None:
    payload = ctrl.ACK.pack(acked_type, result, 0, value) + bytes(extra)
    raw = ctrl.HEADER.pack(MsgType.ACK, 1, len(payload), 3) + payload
    with pytest.raises(ProtocolError) as e:
        ctrl.decode_ack(raw)
    assert e.value.field == field


def test_duplicate_or_reserved_state_fields_are_refused() -> None:
    twice = ctrl.encode_ack(1, Ack(MsgType.DEVICE_INFO, AckResult.DEL_DONE, 0, 2, (STATES[0], STATES[0])))
    with pytest.raises(ProtocolError, match="twice"):
        ctrl.decode_ack(twice)
    raw = bytearray(ctrl.encode_ack(1, Ack(MsgType.DEVICE_INFO, AckResult.DEL_DONE, 0, 1, STATES[:1])))
    raw[-1] = 1
    with pytest.raises(ProtocolError, match="reserved"):
        ctrl.decode_ack(bytes(raw))


def test_socket_ack_carries_the_states_of_a_device_del() -> None:
    u = uuid.UUID(int=5)
    msg = sock.SockMessage(
        sock.SockMsgType.DEVICE_INFO_ACK, u, 4, sock.SockAck(AckResult.DEL_DONE, 0, STATES)
    )
    data, fds = sock.encode(msg)
    assert fds == [] and sock.decode(data, []) == msg
    wrong = sock.SockMessage(
        sock.SockMsgType.MEMORY_INFO_ACK, u, 4, sock.SockAck(AckResult.DEL_DONE, 0, STATES)
    )
    with pytest.raises(ProtocolError, match="MEMORY_INFO_ACK"):
        sock.decode(sock.encode(wrong)[0], [])


def _engine_with_frontend(ring_states: object = None) -> tuple[Engine, VirtqInfo]:
    eng = Engine(RegionTable(BufferWindow(bytearray(1 << 20))), ring_states=ring_states)  # type: ignore[arg-type]
    vq = VirtqInfo(0, 8, Xgpa(0x1000), Xgpa(0x2000), Xgpa(0x3000), 5, 4)
    assert eng.handle(
        ctrl.encode_message(1, MemoryInfo(Op.ADD, (MemoryRegion(Xgpa(0), 1 << 20, WindowOffset(0)),)))
    ).ack
    assert eng.handle(ctrl.encode_message(2, DeviceInfo(Op.ADD, 1, 7, (vq,)))).ack
    return eng, vq


def test_engine_hands_back_the_added_indices_when_no_ring_ran() -> None:
    eng, _ = _engine_with_frontend()
    out = eng.handle(ctrl.encode_message(3, DeviceInfo(Op.DEL, 1, 7)))
    assert out.ack == Ack(MsgType.DEVICE_INFO, AckResult.DEL_DONE, 0, 1, (VirtqState(0, 5, 4),))


def test_engine_asks_the_device_layer_for_live_states() -> None:
    asked: list[FrontendKey] = []

    def live(key: FrontendKey) -> tuple[VirtqState, ...]:
        asked.append(key)
        return (VirtqState(0, 77, 76),)

    eng, _ = _engine_with_frontend(live)
    out = eng.handle(ctrl.encode_message(3, DeviceInfo(Op.DEL, 1, 7)))
    assert asked == [FrontendKey(1, 7)] and out.ack is not None and out.ack.states == (VirtqState(0, 77, 76),)


def test_frontend_rewinds_over_chains_it_never_completed() -> None:
    mem = RegionTable(BufferWindow(bytearray(1 << 16)))
    mem.add((MemoryRegion(Xgpa(0), 1 << 16, WindowOffset(0)),))
    drv = DriverQueue(mem, 8, 0x0, 0x1000, 0x2000)
    for i in range(5):
        drv.add(((0x4000 + 64 * i, 64),), (), i)
    drv.publish()
    vq = VirtqInfo(0, 8, Xgpa(0x0), Xgpa(0x1000), Xgpa(0x2000))
    fe = Frontend(FrontendKey(1, 7), (vq,), mem, lambda _slot: None, {})
    fe.start(0)
    chains = fe.queue(0).pop_batch(5)
    fe.queue(0).push_batch([(c.head, 0) for c in chains[:3]])  # two still in flight
    assert fe.ring_states() == (VirtqState(0, 3, 3),)
