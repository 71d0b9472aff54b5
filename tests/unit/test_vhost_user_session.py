"""The front door's state machine, fed QEMU's requests and the server's answers (real fds, no sockets)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from vhostpci_driver.errors import ProtocolError
from vhostpci_driver.wire.ctrl import AckResult, DeviceInfo, FeatureBits, Op, VirtqState
from vhostpci_driver.wire.sock import SockAck, SockDeviceInfo, SockMemoryInfo, SockMessage, SockMsgType
from vhostpci_host import vhost_user_wire as vu
from vhostpci_host.vhost_user_session import FrontendConfig, Live, VhostUserSession
from vhostpci_host.vhost_user_wire import Request

UVA = 0x7F00_0000_0000
MAC = 0x525400000001
NET = FrontendConfig(device_type=1, device_id=MAC, features=(1 << 32) | (1 << 15) | (1 << 34), num_rings=2)
#: Ring parts of a 256-entry ring at 0x10000 (desc), 0x11000 (avail), 0x12000 (used), per ring.
RINGS = [(0x10000 + i * 0x4000, 0x11000 + i * 0x4000, 0x12000 + i * 0x4000) for i in range(2)]


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Qemu:
    """Builds requests as QEMU would and feeds them to a session."""

    def __init__(self, session: VhostUserSession) -> None:
        self.s = session
        self.mem = os.memfd_create("guest", os.MFD_CLOEXEC)
        os.ftruncate(self.mem, 1 << 20)

    def send(
        self, req: Request, payload: bytes = b"", fds: list[int] | None = None, need_reply: bool = False
    ) -> list[bytes]:
        data = vu.encode_request(req, payload, need_reply=need_reply)
        hdr = vu.decode_header(data)
        self.s.handle(vu.decode_body(hdr, data[vu.HEADER.size :], fds or []))
        out, self.s.replies[:] = list(self.s.replies), []
        return out

    def init(self) -> None:
        self.send(Request.GET_FEATURES)
        self.send(Request.GET_PROTOCOL_FEATURES)
        self.send(Request.SET_PROTOCOL_FEATURES, vu.U64.pack(0b1001))
        self.send(Request.GET_QUEUE_NUM)
        self.send(Request.SET_OWNER)
        for i in range(2):
            self.send(Request.SET_VRING_CALL, vu.U64.pack(i), [os.eventfd(0)], need_reply=True)
            self.send(Request.SET_VRING_ERR, vu.U64.pack(i), [os.eventfd(0)], need_reply=True)
            self.send(Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(i, 1), need_reply=True)

    def table(self, gpa: int = 0) -> None:
        regions = [vu.Region(gpa, 1 << 20, UVA, 0)]
        self.send(Request.SET_MEM_TABLE, vu.mem_table_payload(regions), [os.dup(self.mem)], need_reply=True)

    def start(self, bases: tuple[int, int] = (0, 0)) -> None:
        self.send(Request.SET_FEATURES, vu.U64.pack((1 << 32) | (1 << 30)))
        self.table()
        for i, (d, a, u) in enumerate(RINGS):
            self.ring(i, bases[i], d, a, u)

    def ring(self, i: int, base: int, d: int, a: int, u: int) -> None:
        self.send(Request.SET_VRING_NUM, vu.VRING_STATE.pack(i, 256))
        self.send(Request.SET_VRING_BASE, vu.VRING_STATE.pack(i, base))
        self.send(Request.SET_VRING_ADDR, vu.VRING_ADDR.pack(i, 0, UVA + d, UVA + u, UVA + a, u))
        self.send(Request.SET_VRING_KICK, vu.U64.pack(i), [os.eventfd(0)])
        self.send(Request.SET_VRING_CALL, vu.U64.pack(i), [os.eventfd(0)], need_reply=True)

    def close(self) -> None:
        self.s.close()
        os.close(self.mem)


@pytest.fixture
def qemu() -> Iterator[Qemu]:
    before = fd_count()
    q = Qemu(VhostUserSession(NET, uuid.UUID(int=1)))
    yield q
    q.close()
    assert fd_count() == before, "the session left fds behind"


def take(s: VhostUserSession) -> list[SockMessage]:
    out, s.requests[:] = list(s.requests), []
    return out


def ack(
    s: VhostUserSession,
    m: SockMessage,
    result: AckResult = AckResult.ADD_DONE,
    states: tuple[VirtqState, ...] = (),
) -> None:
    kind = {
        SockMsgType.MEMORY_INFO: SockMsgType.MEMORY_INFO_ACK,
        SockMsgType.DEVICE_INFO: SockMsgType.DEVICE_INFO_ACK,
    }
    s.on_server(
        SockMessage(
            kind.get(m.msg_type, SockMsgType.FEATURE_BITS_ACK),
            m.vm_uuid,
            m.request_id,
            SockAck(result, 0, states),
        )
    )


def test_offer_never_has_packed_rings_and_always_protocol_features(qemu: Qemu) -> None:
    (reply,) = qemu.send(Request.GET_FEATURES)
    offered = int.from_bytes(vu.decode_reply(reply, Request.GET_FEATURES), "little")
    assert not offered >> 34 & 1 and offered >> 30 & 1 and offered >> 15 & 1
    (reply,) = qemu.send(Request.GET_QUEUE_NUM)
    assert vu.decode_reply(reply, Request.GET_QUEUE_NUM) == vu.U64.pack(1)


def test_only_feature_queries_before_set_owner(qemu: Qemu) -> None:
    qemu.send(Request.GET_PROTOCOL_FEATURES)
    with pytest.raises(ProtocolError, match="before SET_OWNER"):
        qemu.send(Request.SET_VRING_NUM, vu.VRING_STATE.pack(0, 256))


def test_every_request_that_asks_is_answered(qemu: Qemu) -> None:
    qemu.init()
    replies = qemu.send(Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(0, 1), need_reply=True)
    assert [vu.decode_reply(r, Request.SET_VRING_ENABLE) for r in replies] == [bytes(8)]
    assert qemu.send(Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(0, 1)) == []


def test_frontend_goes_live_only_when_every_ring_is_ready(qemu: Qemu) -> None:
    s = qemu.s
    qemu.init()
    qemu.send(Request.SET_FEATURES, vu.U64.pack((1 << 32) | (1 << 30)))
    qemu.table()
    (mem,) = take(s)
    assert isinstance(mem.body, SockMemoryInfo) and mem.body.op == Op.ADD and len(mem.fds()) == 1
    qemu.ring(0, 0, *RINGS[0])
    assert take(s) == [] and s.live == Live.DOWN  # ring 1 has no size, addresses or kick yet
    qemu.send(Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(1, 0), need_reply=True)
    qemu.ring(1, 7, *RINGS[1])
    assert take(s) == []  # ring 1 disabled
    qemu.send(Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(1, 1), need_reply=True)
    dev, feats = take(s)
    assert isinstance(dev.body, SockDeviceInfo) and len(dev.fds()) == 4
    info = dev.body.info
    assert (info.device_type, info.device_id) == (1, MAC)
    # user virtual addresses became guest-physical ones
    assert [(v.desc, v.avail, v.used) for v in info.virtqs] == RINGS
    assert [(v.last_avail_idx, v.last_used_idx) for v in info.virtqs] == [(0, 0), (7, 7)]
    assert feats.body == FeatureBits(1, MAC, 1 << 32)  # PROTOCOL_FEATURES is vhost-user's, not the device's


def started(qemu: Qemu) -> SockMessage:
    qemu.init()
    qemu.start()
    _, dev, feats = take(qemu.s)
    ack(qemu.s, dev)
    ack(qemu.s, feats)
    assert qemu.s.live == Live.UP
    return dev


def test_stop_answers_with_the_device_vms_ring_state(qemu: Qemu) -> None:
    s = started(qemu)
    assert qemu.send(Request.GET_VRING_BASE, vu.VRING_STATE.pack(0, 0)) == []  # waits for the device VM
    (delete,) = take(qemu.s)
    assert isinstance(delete.body, SockDeviceInfo) and delete.body.info == DeviceInfo(Op.DEL, 1, MAC)
    ack(qemu.s, delete, AckResult.DEL_DONE, (VirtqState(0, 300, 300), VirtqState(1, 41, 40)))
    (reply,) = qemu.s.replies
    assert vu.decode_reply(reply, Request.GET_VRING_BASE) == vu.VRING_STATE.pack(0, 300)
    qemu.s.replies.clear()
    (reply,) = qemu.send(Request.GET_VRING_BASE, vu.VRING_STATE.pack(1, 0))  # known now: at once
    assert vu.decode_reply(reply, Request.GET_VRING_BASE) == vu.VRING_STATE.pack(1, 41)
    del s


def test_restart_resends_the_same_table_and_nothing_goes_to_the_server(qemu: Qemu) -> None:
    started(qemu)
    qemu.send(Request.GET_VRING_BASE, vu.VRING_STATE.pack(0, 0))
    (delete,) = take(qemu.s)
    ack(qemu.s, delete, AckResult.DEL_DONE, (VirtqState(0, 5, 5), VirtqState(1, 6, 6)))
    qemu.s.replies.clear()
    qemu.send(Request.GET_VRING_BASE, vu.VRING_STATE.pack(1, 0))
    qemu.start((5, 6))
    dev, _ = take(qemu.s)  # no MEMORY_INFO: the same memory is mapped already
    assert isinstance(dev.body, SockDeviceInfo)
    assert [v.last_avail_idx for v in dev.body.info.virtqs] == [5, 6]


def test_a_new_table_replaces_the_old_after_the_rings(qemu: Qemu) -> None:
    started(qemu)
    qemu.table(gpa=1 << 32)  # memory moved under live rings (hot-plug): rings first, then memory
    kinds = [
        (
            m.msg_type,
            getattr(m.body, "op", None) if not isinstance(m.body, SockDeviceInfo) else m.body.info.op,
        )
        for m in take(qemu.s)
    ]
    assert kinds == [
        (SockMsgType.DEVICE_INFO, Op.DEL),
        (SockMsgType.MEMORY_INFO, Op.DEL),
        (SockMsgType.MEMORY_INFO, Op.ADD),
    ]


def test_no_state_from_the_device_vm_in_time_answers_the_base(qemu: Qemu) -> None:
    started(qemu)
    qemu.s.handle(
        vu.decode_body(
            vu.decode_header(vu.encode_request(Request.GET_VRING_BASE, vu.VRING_STATE.pack(0, 0))),
            vu.VRING_STATE.pack(0, 0),
            [],
        ),
        now=100.0,
    )
    qemu.s.tick(now=104.0)
    assert qemu.s.replies == []
    qemu.s.tick(now=105.0)
    assert vu.decode_reply(qemu.s.replies[0], Request.GET_VRING_BASE) == vu.VRING_STATE.pack(0, 0)


def test_a_strict_feature_subset_refuses_the_frontend(qemu: Qemu) -> None:
    qemu.init()
    qemu.start()
    _, dev, feats = take(qemu.s)
    ack(qemu.s, dev)
    qemu.s.on_server(
        SockMessage(SockMsgType.FEATURE_BITS, feats.vm_uuid, feats.request_id, FeatureBits(1, MAC, 0))
    )
    answer, delete = take(qemu.s)
    assert answer.msg_type == SockMsgType.FEATURE_BITS_ACK and answer.body == SockAck(AckResult.ADD_FAIL)
    assert isinstance(delete.body, SockDeviceInfo) and delete.body.info.op == Op.DEL
    assert qemu.s.refused is not None


@pytest.mark.parametrize(
    ("regions", "match"),
    [
        ([vu.Region(0, 1 << 20, UVA, 0), vu.Region(1 << 19, 1 << 20, UVA + (4 << 20), 0)], "overlaps"),
        ([vu.Region(0, 1 << 20, UVA, 0), vu.Region(8 << 20, 1 << 20, UVA + 4096, 0)], "overlaps"),
        ([vu.Region(0, 65 << 30, UVA, 0)], "over the limit"),
    ],
)
def test_bad_tables_are_refused_and_their_fds_closed(
    qemu: Qemu, regions: list[vu.Region], match: str
) -> None:
    qemu.init()
    before = fd_count()
    fds = [os.dup(qemu.mem) for _ in regions]
    with pytest.raises(ProtocolError, match=match):
        qemu.send(Request.SET_MEM_TABLE, vu.mem_table_payload(regions), fds)
    assert fd_count() == before


def test_rings_outside_every_region_are_refused(qemu: Qemu) -> None:
    qemu.init()
    qemu.table()
    qemu.send(Request.SET_VRING_NUM, vu.VRING_STATE.pack(0, 256))
    with pytest.raises(ProtocolError, match="no region") as e:
        qemu.send(Request.SET_VRING_ADDR, vu.VRING_ADDR.pack(0, 0, UVA + (1 << 20) - 2048, UVA, UVA, 0))
    assert e.value.field == "SET_VRING_ADDR.desc_user_addr"


@pytest.mark.parametrize(
    ("req", "payload", "match"),
    [
        (Request.SET_VRING_NUM, vu.VRING_STATE.pack(0, 100), "power of two"),
        (Request.SET_VRING_NUM, vu.VRING_STATE.pack(2, 256), "ring 2 is not one of"),
        (Request.SET_VRING_BASE, vu.VRING_STATE.pack(0, 1 << 16), "16-bit"),
        (Request.SET_VRING_ENABLE, vu.VRING_STATE.pack(0, 2), "neither"),
        (Request.SET_VRING_ADDR, vu.VRING_ADDR.pack(0, 1, UVA, UVA, UVA, 0), "no logging"),
        (Request.SET_VRING_ADDR, vu.VRING_ADDR.pack(0, 0, UVA + 8, UVA, UVA, 0), "aligned"),
        (Request.SET_FEATURES, vu.U64.pack(1 << 34), "not offered"),
        (Request.SET_FEATURES, vu.U64.pack(1 << 15), "VERSION_1"),
        (Request.SET_PROTOCOL_FEATURES, vu.U64.pack(1 << 16), "never offered"),
        (Request.SET_OWNER, b"", "already has an owner"),
    ],
)
def test_bad_fields_close_the_connection(qemu: Qemu, req: Request, payload: bytes, match: str) -> None:
    qemu.init()
    with pytest.raises(ProtocolError, match=match):
        qemu.send(req, payload)
