"""A simulated driver VM: guest RAM, frontends, and the client side of the server socket.

It connects to the vhost-pci server, sends its memory, its frontends (with
kick/call eventfds) and their features, answers PINGs and feature
renegotiations, and then behaves as its frontends' guest drivers: posts RX
buffers, sends self-checking frames, checks what arrives. It is driven by
one-line commands on stdin and reports JSON lines on stdout, so tests and the
demo run it as a real process:

    send DST_MAC COUNT SIZE|mixed [FRONTEND]   queue frames from FRONTEND (default 0)
    pktgen DST_MAC COUNT SIZE [FRONTEND]       the same with recycled pre-built frames (netpacket's
                                               pktgen kind): a source that is not the bottleneck
    stats                                      print a stats line
    hostile KIND [FRONTEND]                    break a TX ring: desc-loop, oob-addr, huge-len,
                                               avail-jump or bad-index; or the RX ring:
                                               rx-short, rx-readable
    rings-outside                              announce a frontend whose rings lie outside memory
    truncate BYTES                             cut guest RAM's memfd to BYTES (sealed: refused)
    fill-call                                  make every call eventfd blocking with a full counter
    poke XGPA HEX                              write bytes into guest memory
    quit                                       leave (also on end of stdin, SIGTERM, SIGINT)
"""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import cast

from vhostpci_driver.addr import Xgpa
from vhostpci_driver.errors import RemoteMemoryError
from vhostpci_driver.wire.ctrl import AckResult, DeviceInfo, FeatureBits, Op, VirtqInfo
from vhostpci_driver.wire.sock import (
    Empty,
    SockAck,
    SockDeviceInfo,
    SockMemoryInfo,
    SockMessage,
    SockMsgType,
)
from vhostpci_host import netpacket
from vhostpci_host.channel import Channel, PeerClosedError
from vhostpci_host.frontend import COALESCE_S, NetFrontend, Queue, mixed_size
from vhostpci_host.guestram import GuestRam

log = logging.getLogger(__name__)


def emit(event: str, **fields: object) -> None:
    """One JSON status line on stdout (the simulator's whole interface to scripts)."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


@dataclass
class _Send:
    frontend: NetFrontend
    dst: bytes
    remaining: int
    size: int  # 0: mixed
    pktgen: bool = False

    def size_of(self, seq: int) -> int:
        return self.size or mixed_size(seq)

    def pump(self, count: int) -> int:
        if self.pktgen:
            return self.frontend.send_pktgen(self.dst, count, self.size)
        return self.frontend.send(self.dst, count, self.size_of)


#: what each stdin command takes (said when one comes with too few words or a frontend that is not there)
USAGE = {
    "send": "send MAC COUNT SIZE|mixed [FRONTEND]",
    "hostile": "hostile KIND [FRONTEND]",
    "poke": "poke XGPA HEX",
}


class DriverVm:
    """The simulator's state and event loop."""

    def __init__(
        self,
        server: str,
        vm_uuid: uuid.UUID,
        macs: list[str],
        memory: int,
        queue_size: int,
        features: int | None = None,
    ) -> None:
        self.uuid = vm_uuid
        self.ram = GuestRam(memory)
        self.frontends = [NetFrontend(self.ram, netpacket.mac_bytes(m), queue_size) for m in macs]
        if features is not None:  # a frontend that offers what a test chooses (VERSION_1 left out, say)
            for fe in self.frontends:
                fe.offered = features
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(server)
        except OSError as e:
            s.close()
            for fe in self.frontends:
                fe.close()
            self.ram.close()
            why = e.strerror or str(e)
            raise ConnectionError(f"cannot connect to the vhost-pci server at {server}: {why}") from None
        self.channel = Channel(s)
        self.sel = selectors.DefaultSelector()
        self.next_id = 0
        self.waiting: dict[int, str] = {}
        self.sends: list[_Send] = []
        self.ready = False
        self.setup_failed: list[str] = []  # setup requests acked *_FAIL before all were answered
        self.setup_answered = False
        self.running = True
        #: the signal that stopped run(), if one did (the command exits 128 + it)
        self.stopped_by: int | None = None
        self.renegotiations = 0
        self.turns = 0  # turns of the guest drivers' loop (turn()): each a wake-up, or a look again
        #: CLOCK_MONOTONIC (system-wide, so another process may compare it) at the end of the last
        #: turn that received a frame: the demo and the bench time a run to its last frame by it
        self.last_rx_s: float | None = None
        self.acks: dict[str, int] = {}
        self._stdin = b""

    def request(self, msg_type: SockMsgType, body: object, what: str) -> None:
        self.next_id += 1
        self.waiting[self.next_id] = what
        self.channel.send(SockMessage(msg_type, self.uuid, self.next_id, body))  # type: ignore[arg-type]

    def connect(self) -> None:
        """Memory, then every frontend, then their features (protocol.md 7.2)."""
        self.request(SockMsgType.MEMORY_INFO, SockMemoryInfo(Op.ADD, self.ram.socket_regions()), "memory")
        for i, fe in enumerate(self.frontends):
            body = SockDeviceInfo(
                fe.device_info(), tuple(q.kick_fd for q in fe.queues), tuple(q.call_fd for q in fe.queues)
            )
            self.request(SockMsgType.DEVICE_INFO, body, f"device:{i}")
            self.request(
                SockMsgType.FEATURE_BITS,
                FeatureBits(fe.device_type, fe.device_id, fe.offered),
                f"features:{i}",
            )

    def on_message(self, msg: SockMessage) -> None:
        if msg.msg_type == SockMsgType.PING:
            self.channel.send(SockMessage(SockMsgType.PONG, self.uuid, msg.request_id, Empty()))
            return
        what = self.waiting.get(msg.request_id)
        if what is None:
            log.warning("unexpected message %s id %d", msg.msg_type.name, msg.request_id)
            return
        if msg.msg_type == SockMsgType.FEATURE_BITS and isinstance(msg.body, FeatureBits):
            # A strict subset was accepted: renegotiate with "our driver", then confirm (protocol.md 7.3).
            fe = self.frontends[int(what.split(":")[1])]
            fe.negotiated(msg.body.features)
            self.renegotiations += 1
            self.channel.send(
                SockMessage(
                    SockMsgType.FEATURE_BITS_ACK, self.uuid, msg.request_id, SockAck(AckResult.ADD_DONE)
                )
            )
            self._done(what, msg.request_id, AckResult.ADD_DONE, 0)
            return
        if isinstance(msg.body, SockAck):
            if what.startswith("features:") and msg.body.result == AckResult.ADD_DONE:
                fe = self.frontends[int(what.split(":")[1])]
                fe.negotiated(fe.offered)
            self._done(what, msg.request_id, msg.body.result, msg.body.reason)

    def _done(self, what: str, request_id: int, result: AckResult, reason: int) -> None:
        del self.waiting[request_id]
        self.acks[result.name] = self.acks.get(result.name, 0) + 1
        setup = ("memory", "device", "features")
        if result.failed:
            emit("ack-failed", request=what, result=result.name, reason=reason)
            if not self.setup_answered and what.split(":", maxsplit=1)[0] in setup:
                self.setup_failed.append(f"{what}: {result.name} (reason {reason})")
        if self.setup_answered or any(w.split(":")[0] in setup for w in self.waiting.values()):
            return
        self.setup_answered = True
        if self.setup_failed:
            # `ready` means every setup request succeeded; this is its distinct failure report.
            emit("setup-failed", uuid=str(self.uuid), failed=self.setup_failed)
        else:
            self.ready = True
            for fe in self.frontends:
                fe.start()
                for q in fe.queues:
                    self.sel.register(q.call_fd, selectors.EVENT_READ, (fe, q))
            emit(
                "ready",
                uuid=str(self.uuid),
                frontends=[netpacket.mac_str(f.mac) for f in self.frontends],
                renegotiations=self.renegotiations,
            )
            # Everything the loop needs exists now (rings, their lists, the frames): the collector's
            # full passes need not walk it again and again. They had been a tenth of a long run's
            # CPU here, for nothing: no cycle is ever made of it (Instagram's gc.freeze, 3.7+).
            gc.freeze()

    def command(self, line: str) -> None:
        words = line.split()
        if not words:
            return
        cmd, args = words[0], words[1:]
        try:
            if cmd in ("send", "pktgen"):
                fe = self.frontends[int(args[3]) if len(args) > 3 else 0]
                size = 0 if args[2] == "mixed" and cmd == "send" else int(args[2])
                if size and not netpacket.MIN_FRAME <= size <= netpacket.MAX_FRAME:
                    raise ValueError(f"frame size {size} not in {netpacket.MIN_FRAME}..{netpacket.MAX_FRAME}")
                dst = netpacket.mac_bytes(args[0])
                self.sends.append(_Send(fe, dst, int(args[1]), size, cmd == "pktgen"))
            elif cmd == "stats":
                self.report()
            elif cmd == "hostile":
                self.frontends[int(args[1]) if len(args) > 1 else 0].hostile(args[0])
            elif cmd == "rings-outside":
                far = Xgpa(1 << 50)
                vq = VirtqInfo(0, 256, far, Xgpa(far + 4096), Xgpa(far + 8192))
                fds = (os.eventfd(0), os.eventfd(0))
                body = SockDeviceInfo(DeviceInfo(Op.ADD, 1, 0x0200DEADBEEF, (vq,)), (fds[0],), (fds[1],))
                self.request(SockMsgType.DEVICE_INFO, body, "hostile-device")
                for fd in fds:
                    os.close(fd)
            elif cmd == "truncate":  # a driver VM that takes its memory back under the device VM
                try:
                    os.ftruncate(self.ram.fd, int(args[0], 0))
                    emit("truncated", size=int(args[0], 0))
                except OSError as e:
                    emit("truncate-refused", errno=e.errno, message=e.strerror)
            elif cmd == "fill-call":  # a driver VM that never reads its calls, so a write would block
                for fe in self.frontends:
                    for q in fe.queues:
                        if q.call_fd in self.sel.get_map():
                            self.sel.unregister(q.call_fd)  # never read again
                        q.drain_call()
                        flags = fcntl.fcntl(q.call_fd, fcntl.F_GETFL)
                        fcntl.fcntl(q.call_fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
                        os.eventfd_write(q.call_fd, 0xFFFF_FFFF_FFFF_FFFE)  # eventfd(2): the most it holds
                emit("call-filled")
            elif cmd == "poke":  # tests read these bytes back through BAR 2
                self.ram.view(int(args[0], 0), len(bytes.fromhex(args[1])))[:] = bytes.fromhex(args[1])
                emit("poked", xgpa=int(args[0], 0))
            elif cmd == "quit":
                self.running = False
            else:
                emit("error", message=f"unknown command {cmd!r}")
        except IndexError:
            emit("error", message=f"bad command {line.strip()!r}: usage: {USAGE.get(cmd, cmd)}")
        except (ValueError, RemoteMemoryError) as e:
            emit("error", message=f"bad command {line.strip()!r}: {e}")

    def report(self) -> None:
        emit(
            "stats",
            uuid=str(self.uuid),
            ready=self.ready,
            acks=self.acks,
            pending_sends=sum(s.remaining for s in self.sends),
            cpu_s=round(time.process_time(), 6),  # the simulator's own CPU time: its ceiling per frame
            turns=self.turns,
            last_rx_s=self.last_rx_s,
            frontends=[fe.stats() for fe in self.frontends],
        )

    def pump_sends(self) -> int:
        """Queue what the TX rings have room for (a ring's worth at most, one kick); returns how many went."""
        queued = 0
        for s in list(self.sends):
            n = s.pump(min(s.remaining, s.frontend.queue_size))
            s.remaining -= n
            queued += n
            if s.remaining == 0:
                self.sends.remove(s)
        return queued

    def turn(self) -> float:
        """The guest drivers' work: fill the TX rings, serve every RX ring, arm interrupts.

        Returns how long the loop may sleep: 0 when work is there already, the
        coalescing time while frames keep coming (NetFrontend.arm asked for an RX
        interrupt only at half a ring), else a safety net's. The driver takes as few
        interrupts, and the device as few kicks, as the rings allow.
        """
        self.turns += 1
        self.pump_sends()
        sending = {id(s.frontend) for s in self.sends}
        busy = coalescing = False
        for fe in self.frontends:
            receiving = fe.receive() > 0
            busy |= fe.arm(id(fe) in sending, receiving)
            coalescing |= receiving
        if coalescing:
            self.last_rx_s = time.monotonic()
        if busy:
            return 0.0
        if coalescing:
            return COALESCE_S
        return 0.05 if self.sends else 0.5

    def run(self) -> int:
        self.sel.register(self.channel.sock, selectors.EVENT_READ, "socket")
        self.sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
        stop_r, stop_w = os.pipe()
        os.set_blocking(stop_w, False)
        signal.set_wakeup_fd(stop_w)

        def stop(signum: int, _frame: object) -> None:
            self.stopped_by = signum
            self.running = False

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, stop)
        self.sel.register(stop_r, selectors.EVENT_READ, "signal")
        self.connect()
        try:
            while self.running:
                # Nothing to do until an interrupt (NetFrontend.arm chose which) or the timeout: sleep,
                # rather than spin: a spinning source would count its own wait as work.
                timeout = self.turn() if self.ready else 0.5
                for key, _ in self.sel.select(timeout):
                    self._dispatch(key.data)
                self.channel.flush()
        except (PeerClosedError, BrokenPipeError, ConnectionResetError):
            emit("server-gone")  # closed, or reset while we wrote (a PONG after the server dropped us)
            return 1
        finally:
            self.report()
            self.close()
        return 0 if self.stopped_by is None else 128 + self.stopped_by

    def _dispatch(self, data: object) -> None:
        if data == "socket":
            for msg in self.channel.receive():
                self.on_message(msg)
        elif data == "stdin":
            # Raw reads: a Python-buffered readline() would leave a second line where select() cannot see it.
            chunk = os.read(sys.stdin.fileno(), 4096)
            if not chunk:
                self.running = False
            self._stdin += chunk
            while b"\n" in self._stdin:
                line, self._stdin = self._stdin.split(b"\n", 1)
                self.command(line.decode(errors="replace"))
        elif data == "signal":
            pass
        else:  # an interrupt: the next turn serves the queue
            _fe, q = cast(tuple[NetFrontend, Queue], data)
            q.drain_call()

    def close(self) -> None:
        self.sel.close()
        self.channel.close()
        for fe in self.frontends:
            fe.close()
        self.ram.close()


def run(
    server: str,
    vm_uuid: uuid.UUID,
    macs: list[str],
    memory: int,
    queue_size: int,
    features: int | None = None,
) -> int:
    """Entry point of ``vhostpci-host frontend``."""
    started = time.monotonic()
    vm = DriverVm(server, vm_uuid, macs, memory, queue_size, features)
    rc = vm.run()
    log.info("driver VM %s ran %.1fs", vm_uuid, time.monotonic() - started)
    return rc
