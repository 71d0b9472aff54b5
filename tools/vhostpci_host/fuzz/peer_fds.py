"""Fuzz target ``peer-fds``: the server's session fed memory and device messages with fds of every kind.

The input is a script for one driver VM's session on a real device model:
MEMORY_INFO(ADD/DEL) and DEVICE_INFO(ADD/DEL) messages whose regions and
virtqueues carry real fds of a kind the input picks (memfd with sealing
allowed, memfd without, a memfd shorter than its region, a read-only memfd, a
regular file, a pipe, a socket, ``/dev/zero``, an eventfd), the device
driver's acks (any result), teardown, reconnect. Contract:

- nothing escapes the session (the server's loop would die);
- a message whose fds include a wrong kind is answered FAIL with reason
  ``BAD_FD`` (or refused earlier, with its own reason) and maps nothing;
- every region the device maps comes from a sealed read-write file that
  holds the whole range (``F_SEAL_SHRINK``), every slot's kick and call fd is
  a non-blocking eventfd;
- after the session closes, the process holds exactly the fds it held before.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
import uuid

from vhostpci_driver.addr import Xgpa
from vhostpci_driver.errors import FailReason
from vhostpci_driver.wire.ctrl import Ack, AckResult, DeviceInfo, Op, VirtqInfo
from vhostpci_driver.wire.sock import (
    SockAck,
    SockDeviceInfo,
    SocketRegion,
    SockMemoryInfo,
    SockMessage,
    SockMsgType,
)
from vhostpci_host.device_model import VhostPciDeviceModel
from vhostpci_host.fuzz.contract import FuzzInput, Target, check, open_fds
from vhostpci_host.peer_fds import is_eventfd
from vhostpci_host.session import PeerLimits, Session

PAGE = mmap.PAGESIZE
WINDOW = 1 << 24
MAX_STEPS = 24
KINDS = (
    "memfd",
    "memfd-unsealable",
    "memfd-short",
    "memfd-read-only",
    "regular-file",
    "pipe",
    "socket",
    "dev-zero",
    "eventfd",
)


def make_fd(kind: str, size: int) -> int:
    """An fd of ``kind`` holding ``size`` bytes where that means something."""
    if kind in ("memfd", "memfd-unsealable", "memfd-short", "memfd-read-only"):
        flags = os.MFD_CLOEXEC | (0 if kind == "memfd-unsealable" else os.MFD_ALLOW_SEALING)
        fd = os.memfd_create("fuzz-peer", flags)
        os.ftruncate(fd, size // 2 if kind == "memfd-short" else size)
        if kind == "memfd-read-only":
            ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            os.close(fd)
            return ro
        return fd
    if kind == "regular-file":
        fd = os.open("/var/tmp", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC)
        os.ftruncate(fd, size)
        return fd
    if kind == "pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(w)
        return r
    if kind == "socket":
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    if kind == "dev-zero":
        return os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC)
    return os.eventfd(0, os.EFD_CLOEXEC)


class _Run:
    """One input: the session, its device, what was sent and answered."""

    def __init__(self, trusted: bool) -> None:
        self.model = VhostPciDeviceModel(window_size=WINDOW, num_slots=8, max_regions=4)
        self.replies: list[SockMessage] = []
        self.session = Session(
            uuid.UUID(int=7),
            self.model,
            self.replies.append,
            limits=PeerLimits(max_mapped_bytes=WINDOW, max_frontends=4),
            trust_memory=trusted,
        )
        self.model.on_ack = self.session.on_ack
        self.model.on_reset = self.session.on_reset
        self.model.on_driver_ok = self.session.on_driver_ok
        self.trusted = trusted
        self.rid = 0

    def memory(self, inp: FuzzInput, op: Op) -> None:
        n = 1 + inp.u8() % 3
        regions, kinds = [], []
        for _ in range(n):
            kind = KINDS[inp.u8() % len(KINDS)] if op == Op.ADD else ""
            xgpa = inp.u8() * PAGE * 16
            size = (1 + inp.u8() % 16) * PAGE
            offset = inp.u8() * PAGE * 16 if not inp.u8() & 0x80 else inp.uint(8)
            fd = make_fd(kind, offset % (1 << 30) + size) if op == Op.ADD else -1
            regions.append(SocketRegion(Xgpa(xgpa), size, offset, fd))
            kinds.append(kind)
        self._send(SockMsgType.MEMORY_INFO, SockMemoryInfo(op, tuple(regions)), kinds)

    def device(self, inp: FuzzInput, op: Op) -> None:
        device_id = inp.u8() % 4
        if op == Op.DEL:
            self._send(SockMsgType.DEVICE_INFO, SockDeviceInfo(DeviceInfo(Op.DEL, 1, device_id)), [])
            return
        nq = 1 + inp.u8() % 3
        vqs = tuple(VirtqInfo(i, 256, Xgpa(0), Xgpa(4096), Xgpa(8192)) for i in range(nq))
        kinds = [KINDS[inp.u8() % len(KINDS)] for _ in range(2 * nq)]
        fds = [make_fd(k, PAGE) for k in kinds]
        body = SockDeviceInfo(DeviceInfo(Op.ADD, 1, device_id, vqs), tuple(fds[:nq]), tuple(fds[nq:]))
        self._send(SockMsgType.DEVICE_INFO, body, kinds)

    def _send(self, kind: SockMsgType, body: SockMemoryInfo | SockDeviceInfo, fd_kinds: list[str]) -> None:
        self.rid += 1
        mapped_before = len(self.model.window)
        slots_before = len(self.model.slots)
        before = len(self.replies)
        self.session.on_message(SockMessage(kind, self.session.vm_uuid, self.rid, body))
        answered = [m for m in self.replies[before:] if m.request_id == self.rid]
        wrong = [k for k in fd_kinds if k and not self._acceptable(k, kind)]
        if wrong:
            check(len(answered) == 1, f"a message with fds {wrong} got {len(answered)} answers, not one FAIL")
            ack = answered[0].body
            check(isinstance(ack, SockAck) and ack.result.failed, f"fds {wrong} were accepted")
            check(len(self.model.window) == mapped_before, "a refused message left a mapping")
            check(len(self.model.slots) == slots_before, "a refused message left a notification slot")
            if isinstance(ack, SockAck) and ack.reason not in (
                FailReason.BAD_FD,
                FailReason.OUT_OF_WINDOW,
                FailReason.LIMIT,
                FailReason.EXISTS,
            ):
                check(False, f"fds {wrong} refused with reason {ack.reason}")
        self._check_held()

    def _acceptable(self, kind: str, msg: SockMsgType) -> bool:
        if msg == SockMsgType.DEVICE_INFO:
            return kind == "eventfd"
        return kind == "memfd" or (self.trusted and kind in ("memfd-unsealable", "regular-file"))

    def _check_held(self) -> None:
        for r in self.model.window:
            st = os.fstat(r.fd)
            check(
                st.st_size >= r.fd_offset + r.size,
                f"mapped {r.size:#x} at {r.fd_offset:#x} of a shorter file",
            )
            check(fcntl.fcntl(r.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR, "mapped a read-only fd")
            if not self.trusted:
                seals = fcntl.fcntl(r.fd, fcntl.F_GET_SEALS)
                check(bool(seals & fcntl.F_SEAL_SHRINK), "mapped memory that can still shrink")
        for slot in self.model.slots.values():
            for fd in (slot.kick_fd, slot.call_fd):
                check(is_eventfd(fd), f"slot fd {fd} is not an eventfd")
                check(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK), f"slot fd {fd} may block")

    def acks(self, inp: FuzzInput) -> None:
        """The device driver acks some outstanding requests, with results the input picks."""
        for rid in list(self.model.outstanding)[: 1 + inp.u8() % 4]:
            raw = self.model.outstanding.pop(rid)
            (mtype,) = struct.unpack_from("<H", raw, 0)
            result = AckResult(inp.u8() % 4)
            self.session.on_ack(rid, Ack(mtype, result))
        self._check_held()


def fuzz_peer_fds(data: bytes) -> None:
    """``data[0]`` bit 0: ``--trust-driver-memory``; then steps: an opcode byte and its fields."""
    if not data:
        return
    before = open_fds()
    inp = FuzzInput(data)
    run = _Run(trusted=bool(inp.u8() & 1))
    try:
        for _ in range(MAX_STEPS):
            if not inp.remaining():
                break
            op = inp.u8() % 8
            if op in (0, 1):
                run.memory(inp, Op.ADD if op == 0 else Op.DEL)
            elif op in (2, 3):
                run.device(inp, Op.ADD if op == 2 else Op.DEL)
            elif op == 4:
                run.acks(inp)
            elif op == 5:
                run.session.teardown()
            elif op == 6:
                run.session.reconnect()
            else:
                run.model.reset()
            run._check_held()
    finally:
        run.session.close()
    leaked = open_fds() - before
    check(not leaked, f"fds {sorted(leaked)} left open after the session closed")


def seeds() -> dict[str, bytes]:
    """One input per fd kind as memory, and one per kind as a kick fd, plus a teardown and reconnect."""
    out: dict[str, bytes] = {}
    for i, kind in enumerate(KINDS):
        # trust off; ADD one region of kind i at xgpa 0, 1 page, offset 0
        out[f"memory-{kind}"] = bytes([0, 0, 0, i, 0, 0, 0, 0, 4, 0, 0])
        # memory first (a good memfd), then a device whose first kick is of kind i
        out[f"kick-{kind}"] = bytes([0, 0, 0, 0, 0, 15, 0, 0, 2, 0, 0, i, 8, 4, 0, 5, 6, 2, 1, 0, 8, 8])
    out["trusted-file"] = bytes([1, 0, 0, 4, 0, 0, 0, 0, 4, 0, 0, 5, 6])
    return out


TARGET = Target(
    "peer-fds",
    "the server's session with fds of every kind in memory and device messages (session.py, peer_fds.py)",
    fuzz_peer_fds,
    seeds,
    max_len=512,
)
