"""``VhostPciDevice``: a vhost-pci function brought up, served, and its frontends handed out.

Bring-up (virtio 1.2, 3.1.1) with an ExitStack, so a failure at any step undoes
the steps before it: open the function, reset, negotiate, map the remote window,
set up the control channel (:mod:`vhostpci_driver.control`: the controlq and
ackq in DMA memory), route MSI-X vectors (config 0, controlq 1, ackq 2, one per
notification slot) or, where the backend has no vectors to route (UIO), take
the INTx line and the ISR status instead, DRIVER_OK. Then each interrupt wakes
the control channel, whose engine events this module turns into app-facing
frontends (:class:`~vhostpci_driver.frontends.Frontend`, one per engine
``FrontendState``) and delivers by iteration, callbacks or asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar, cast

from vhostpci_driver.control import ControlChannel
from vhostpci_driver.engine import Engine, FeaturePolicy
from vhostpci_driver.errors import DeviceError, RingError, VhostPciError
from vhostpci_driver.events import (
    DeviceErrorEvent,
    Event,
    FeaturesNegotiated,
    FrontendAdded,
    FrontendRemoved,
    MemoryAdded,
    RemoteDown,
    RemoteUp,
)
from vhostpci_driver.frontends import Frontend
from vhostpci_driver.memory import RegionTable
from vhostpci_driver.pci.access import registers_for
from vhostpci_driver.pci.function import PciFunction
from vhostpci_driver.pci.mmio import Registers
from vhostpci_driver.spec.vfio import VFIO_PCI_MSIX_IRQ_INDEX
from vhostpci_driver.spec.virtio import Feature, Status
from vhostpci_driver.spec.virtio_pci import ISR_CONFIG, NO_VECTOR
from vhostpci_driver.virtio.transport import IrqSource, VirtioPciTransport
from vhostpci_driver.window import BarWindow
from vhostpci_driver.wire import device as dev_wire
from vhostpci_driver.wire.ctrl import NO_SLOT, FrontendKey, Limits, VirtqState
from vhostpci_driver.wire.device import Queue, Vector

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Event)

ACK_DRAIN_TIMEOUT = 1.0  # seconds close() waits for the device to take the acks posted
POLL_CONFIG_EVERY = 0.01  # seconds between config/status reads when polling (no config vector)


class VhostPciDevice:
    """One vhost-pci function, served. Use as a context manager; ``close()`` is idempotent."""

    def __init__(
        self,
        address: str | PciFunction,
        *,
        policies: dict[int, FeaturePolicy] | None = None,
        polling: bool = False,
        queue_size: int = 64,
    ) -> None:
        self.polling = polling
        self.queue_size = queue_size
        self.frontends: dict[FrontendKey, Frontend] = {}
        self._events: deque[Event] = deque()
        self._callbacks: list[tuple[type[Event], Callable[[Event], None]]] = []
        self._closed = False
        #: why the device stopped being served (:meth:`fail`), or None while it is served
        self.failed: str | None = None
        self.remote_up = False
        self.stats = {"controlq_messages": 0, "acks_posted": 0, "interrupts": 0}
        #: how interrupts arrive: "msix" (eventfds), "intx" (one line and the ISR) or "polling"
        self.interrupts = "polling"
        self.irq_fds: list[int] = []
        self.intx: IrqSource | None = None
        self._stack = contextlib.ExitStack()
        try:
            self._bring_up(address, policies)
        except BaseException:
            self._stack.close()
            self._closed = True
            raise

    # -- bring-up ----------------------------------------------------------------

    def _bring_up(self, address: str | PciFunction, policies: dict[int, FeaturePolicy] | None) -> None:
        if isinstance(address, str):
            from vhostpci_driver.pci.open import open_function  # noqa: PLC0415  (backends load on demand)

            fn = open_function(address)
        else:
            fn = address
        self.function = fn
        self._stack.callback(fn.close)
        t = self.transport = VirtioPciTransport(fn)
        self._stack.callback(t.close)
        t.reset()
        self._stack.callback(self._reset_quietly)
        t.enable_bus_master()
        wanted = (1 << Feature.VERSION_1) | (1 << Feature.RING_EVENT_IDX) | (1 << Feature.ACCESS_PLATFORM)
        self.features = t.negotiate(wanted)
        event_idx = bool(self.features >> Feature.RING_EVENT_IDX & 1)
        self.config = dev_wire.DeviceConfig.decode(t.read_device_config(0, dev_wire.VHOST_PCI_CONFIG.size))
        cfg = self.config
        self.window = BarWindow(fn, dev_wire.BAR_WINDOW)
        self.table = RegionTable(self.window, max_regions=max(cfg.max_regions * 8, 512))
        self.engine = Engine(
            self.table,
            limits=Limits(max_regions=cfg.max_regions, max_virtqs=64, max_msg_len=cfg.max_msg_len),
            max_frontends=cfg.max_frontends,
            policies=policies,
            ring_states=self._ring_states,
        )
        self._slots: Registers = registers_for(fn, cfg.slot_bar)

        qs = self.queue_size
        self.control = ControlChannel(
            fn, self.engine, queue_size=qs, max_msg_len=cfg.max_msg_len, event_idx=event_idx, stats=self.stats
        )
        self._stack.callback(self.control.close)
        # Stop the device before its rings' memory goes away (the callbacks run in reverse).
        self._stack.callback(self._reset_quietly)

        self.interrupts = self._interrupt_mode()
        vectors = self.interrupts == "msix"
        if vectors:
            self.irq_fds = t.enable_msix(Vector.FIRST_SLOT + cfg.num_slots)
            t.set_config_vector(Vector.CONFIG)
        elif self.interrupts == "intx":
            # virtio 1.2, 4.1.5.1.2: vectors only mean something with MSI-X on; queues keep NO_VECTOR.
            self.intx = t.enable_intx()
        for q, vec in ((Queue.CONTROLQ, Vector.CONTROLQ), (Queue.ACKQ, Vector.ACKQ)):
            d, a, u = self.control.ring_addrs[q]
            t.setup_queue(q, qs, d, a, u, vector=vec if vectors else NO_VECTOR)
        self.control.start(t.notifier(Queue.CONTROLQ), t.notifier(Queue.ACKQ))
        t.driver_ok()
        self.control.kick()
        self._check_status()
        self._config_changed()

    def _interrupt_mode(self) -> str:
        """MSI-X when the backend can route vectors; else INTx with the ISR (UIO); else polling."""
        if self.polling:
            return "polling"
        t = self.transport
        if t.caps.msix is not None and self.function.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).count > 0:
            return "msix"
        if t.intx_available():
            return "intx"
        log.info("%s: no MSI-X vectors and no INTx this backend can deliver: polling", self.function.address)
        return "polling"

    def _reset_quietly(self) -> None:
        try:
            self.transport.reset()
        except VhostPciError as e:
            log.warning("reset at close failed: %s", e)

    # -- serving -------------------------------------------------------------------

    def fileno_list(self) -> list[int]:
        """The fds to wait on, then call :meth:`process`.

        With MSI-X: the eventfds of config, controlq, ackq, then one per
        notification slot. With INTx: the one line's fd (process() acknowledges
        it; never read it yourself). Polling: none.
        """
        if self.intx is not None:
            return [self.intx.fileno()]
        return list(self.irq_fds)

    def control_fds(self) -> list[int]:
        """The fds whose readability means work for :meth:`process`: config, controlq, ackq.

        The notification slots' eventfds (the rest of :meth:`fileno_list`) are the
        frontends' kicks, which the app that serves their rings waits on.
        """
        return self.fileno_list()[: Vector.FIRST_SLOT]

    def process(self) -> list[Event]:
        """Serve everything pending: config changes, controlq messages, returned ack buffers."""
        if self._closed:
            raise DeviceError("device is closed")
        if self.failed is not None:
            raise DeviceError(f"device failed: {self.failed}")
        config_fired = False
        if self.intx is not None:
            # One line for everything: the ISR says whether the configuration changed; the
            # queue bit needs nothing more, as every call harvests both queues anyway.
            isr = self.transport.intx_isr()
            if isr:
                self.stats["interrupts"] += 1
            config_fired = bool(isr & ISR_CONFIG)
        for vector, fd in enumerate(self.irq_fds[: Vector.FIRST_SLOT]):
            try:
                os.eventfd_read(fd)
                self.stats["interrupts"] += 1
                config_fired |= vector == Vector.CONFIG
            except BlockingIOError:
                pass
        # Status and config are registers (a trip to the device each): read them when the config
        # vector fired (virtio 1.2, 4.1.5.3: the device signals changes and NEEDS_RESET there),
        # (or ISR bit 1 with INTx), or, with no interrupts at all, every few milliseconds.
        now = time.monotonic()
        polled = self.interrupts == "polling"
        if config_fired or (polled and now - self._config_checked > POLL_CONFIG_EVERY):
            self._config_checked = now
            self._check_status()
            if self._config_gen != self.transport.config_generation():
                self._config_changed()
        self.control.serve(self._apply)
        out = list(self._events)
        self._events.clear()
        for ev in out:
            for kind, fn in self._callbacks:
                if isinstance(ev, kind):
                    fn(ev)
        return out

    def fail(self, why: str) -> list[Event]:
        """Stop serving this device (it needs a reset, or its transport broke); returns what apps must hear.

        Its frontends are removed (their queues raise FrontendGoneError from now on)
        and the device is reset (virtio 1.2, 2.1.2: the driver answers DEVICE_NEEDS_RESET
        with a reset); fds and mappings stay until :meth:`close`. Idempotent.
        """
        if self.failed is not None or self._closed:
            return []
        self.failed = why
        out: list[Event] = [DeviceErrorEvent("device", why)]
        for key, fe in list(self.frontends.items()):
            fe.remove(f"the device failed: {why}")
            out.append(FrontendRemoved(key))
        self.frontends.clear()
        self._reset_quietly()
        return out

    def _emit(self, ev: Event) -> None:
        self._events.append(ev)

    def _check_status(self) -> None:
        st = self.transport.status
        if st & Status.DEVICE_NEEDS_RESET:
            self._emit(DeviceErrorEvent("device", "the device set DEVICE_NEEDS_RESET"))
            raise DeviceError("the device needs a reset (DEVICE_NEEDS_RESET)")

    _config_gen = -1
    _config_checked = 0.0

    def _config_changed(self) -> None:
        self._config_gen = self.transport.config_generation()
        raw = self.transport.read_device_config(0, dev_wire.VHOST_PCI_CONFIG.size)
        cfg = dev_wire.DeviceConfig.decode(raw)
        up = bool(cfg.status & dev_wire.STATUS_REMOTE_UP)
        if up and not self.remote_up:
            self._emit(RemoteUp(cfg.remote_uuid))
        elif not up and self.remote_up:
            # The host removes frontends and memory first (protocol.md 5, rule 7) and then drops
            # REMOTE_UP: its DELs are on the controlq already, so serve them before the drop,
            # or our clean-up below empties the tables first and each DEL fails NOT_FOUND.
            self.control.serve(self._apply)
            # Anything the host did not remove goes now.
            for ev in self.engine.remote_gone():
                self._apply(ev)
            self._emit(RemoteDown(cfg.remote_uuid))
        self.remote_up = up
        self.config = cfg

    def _apply(self, ev: Event) -> None:
        """Keep the app-facing frontend objects in step with the engine."""
        if isinstance(ev, FrontendAdded):
            self.frontends[ev.key] = Frontend(
                ev.key, ev.virtqs, self.table, self._doorbell, self._kick_fds(ev)
            )
            # A doorbell may be the frontend's own call eventfd (protocol.md 6): the slot changed hands.
            self.function.posted_targets_changed(self.config.slot_bar)
        elif isinstance(ev, FrontendRemoved):
            fe = self.frontends.pop(ev.key, None)
            if fe is not None:
                fe.remove("DEVICE_INFO DEL" if self.remote_up else "the driver VM is gone")
                self.function.posted_targets_changed(self.config.slot_bar)
        elif isinstance(ev, FeaturesNegotiated):
            fe = self.frontends.get(ev.key)
            if fe is not None:
                try:
                    fe.start(ev.accepted)
                except RingError as e:
                    fe.remove(f"rings unusable: {e}")
                    ev2 = DeviceErrorEvent(f"frontend {ev.key}", str(e))
                    self._emit(ev2)
        elif isinstance(ev, MemoryAdded):
            pass
        self._emit(ev)

    def _ring_states(self, key: FrontendKey) -> tuple[VirtqState, ...] | None:
        fe = self.frontends.get(key)
        return fe.ring_states() if fe is not None else None

    def _kick_fds(self, ev: FrontendAdded) -> dict[int, int]:
        """Give each of the frontend's slots its MSI-X vector (read back) and return slot -> eventfd."""
        fds: dict[int, int] = {}
        for v in ev.virtqs:
            slot = v.notify_slot
            if slot == NO_SLOT or slot >= self.config.num_slots:
                continue
            vector = Vector.FIRST_SLOT + slot
            if vector >= len(self.irq_fds):
                continue  # no MSI-X (polling, INTx): the app polls the slot (protocol.md 6)
            off = self.config.vector_offset + 2 * slot
            self._slots.write16(off, vector)
            if self._slots.read16(off) == vector:
                fds[slot] = self.irq_fds[vector]
        return fds

    def _doorbell(self, slot: int) -> None:
        # protocol.md 6: a write of any value rings; posted, since a doorbell needs no answer.
        self._slots.post32(self.config.doorbell_offset + 4 * slot, 1)

    # -- events for applications --------------------------------------------------------

    def on(self, kind: type[E], callback: Callable[[E], None]) -> None:
        """Call ``callback`` for every event of ``kind`` (from :meth:`process`)."""
        self._callbacks.append((kind, callback))  # type: ignore[arg-type]

    def wait(self, timeout: float | None) -> bool:
        """Block until an interrupt (or, polling, ``timeout``) ; True if something fired."""
        fds = self.fileno_list()[: Vector.FIRST_SLOT]
        if not fds:
            if timeout:
                select.select([], [], [], min(timeout, 0.001))
            return True
        ready, _, _ = select.select(fds, [], [], timeout)
        return bool(ready)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Serve the device and yield events until closed (or until ``timeout`` passes idle)."""
        while not self._closed:
            evs = self.process()
            yield from evs
            if not evs and not self.wait(timeout) and timeout is not None:
                return

    async def aevents(self) -> AsyncIterator[Event]:
        """The same, for asyncio: the eventfds are registered with the running loop."""
        loop = asyncio.get_running_loop()
        fired = asyncio.Event()
        fds = self.fileno_list()[: Vector.FIRST_SLOT]
        for fd in fds:
            loop.add_reader(fd, fired.set)
        try:
            while not self._closed:
                for ev in self.process():
                    yield ev
                fired.clear()
                if fds:
                    await fired.wait()
                else:
                    await asyncio.sleep(0.001)
        finally:
            for fd in fds:
                loop.remove_reader(fd)

    def table_dump(self, xgpa: int, length: int) -> bytes:
        """A copy of driver-VM memory through the region table (refused outside mapped regions)."""
        return bytes(self.table.view(xgpa, length))

    def dump(self) -> dict[str, object]:
        """Everything ``vhostpci status`` shows."""
        state = self.engine.dump()
        state.update(
            backend=self.function.backend,
            remote_uuid=str(self.config.remote_uuid),
            remote_up=self.remote_up,
            window_size=self.config.window_size,
            window_mapped=self.window.mapped_bytes(),
            features=self.features,
            interrupts=self.interrupts,
            stats={**self.stats, **cast(dict[str, object], state["stats"])},
            failed=self.failed,
        )
        return state

    # -- teardown -------------------------------------------------------------------

    def _drain_acks(self, timeout: float) -> None:
        """Before a reset, let the device take the acks already posted (bounded by ``timeout``).

        A reset drops what the device has not taken (virtio 1.2, 2.4), and the host
        then counts those requests as lost: it fails or replays them although we
        applied them. A doorbell by ioeventfd is not ordered with the reset's message,
        so the reset can overtake the last kick: wait on the ackq's used ring instead.
        """
        deadline = time.monotonic() + timeout
        fds = self.irq_fds[Vector.ACKQ : Vector.ACKQ + 1]
        try:
            while self.control.acks_outstanding():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("%s: the device left acks untaken before the reset", self.function.address)
                    return
                select.select(fds, [], [], min(left, 0.005))  # the vector, if the device raises it
                if fds:
                    try:
                        os.eventfd_read(fds[0])
                    except BlockingIOError:
                        pass
        except VhostPciError as e:  # the transport is gone: nothing to wait for
            log.info("%s: acks not drained: %s", self.function.address, e)

    def close(self) -> None:
        """Reset the device and release every fd, mapping and DMA map; idempotent."""
        if self._closed:
            return
        if self.failed is None:
            self._drain_acks(ACK_DRAIN_TIMEOUT)
        self._closed = True
        for fe in self.frontends.values():
            fe.remove("the device was closed")
        self.frontends.clear()
        self.table.clear()
        self.window.close()
        self.intx = None  # its fd goes with the function
        self._stack.close()

    def __enter__(self) -> VhostPciDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
