"""The serving loop: devices, optionally one app, driven by their eventfds.

``vhostpci run``, the demo and the tests run this. One app may span several
devices: the net switch forwards between frontends of different driver VMs, each
behind its own vhost-pci function, which is what vhost-pci is for.
One device failing (needs a reset, transport gone) stops only that device, and
an app exception never leaves this loop (docs/security.md).
Interrupt-driven by default: it sleeps in a selector (epoll) on the devices'
vectors, the app's kick eventfds and its readers (status sockets, removal fds, a
signal pipe, a udev monitor); with ``polling`` it spins on the rings instead
(lower latency, one core busy) and still looks at the readers on every turn
without work, so ``vhostpci status`` and hot-unplug work under ``--polling`` too.
"""

from __future__ import annotations

import logging
import os
import select
import selectors
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from vhostpci_driver.device import VhostPciDevice
from vhostpci_driver.errors import VhostPciError
from vhostpci_driver.events import (
    DeviceErrorEvent,
    Event,
    FeaturesNegotiated,
    FrontendAdded,
    FrontendRemoved,
    MemoryAdded,
    MemoryRemoved,
    RemoteDown,
    RemoteUp,
)
from vhostpci_driver.frontends import Frontend
from vhostpci_driver.status import StatusServer
from vhostpci_driver.wire.ctrl import FrontendKey

log = logging.getLogger(__name__)

#: turns of a busy polling loop between two looks at the readers
READERS_EVERY = 64


class App(Protocol):
    """What the service drives: the net switch (:class:`~vhostpci_driver.apps.net.NetBackend`) or yours."""

    def on_event(self, ev: Event, frontends: Mapping[FrontendKey, Frontend]) -> None:
        """Follow one device's event; ``frontends`` is that device's live table."""

    def poll(self) -> int:
        """Move what can be moved now; > 0 means "call again soon"."""

    def kick_fds(self) -> list[int]:
        """The eventfds whose readability means there is work for :meth:`poll`."""


@dataclass
class Served:
    """A device the service serves by address, with its status socket."""

    address: str
    device: VhostPciDevice
    status: StatusServer | None


class Service:
    """Serves ``devices`` and feeds their events to ``app`` until stopped.

    Devices given to the constructor are served anonymously; :meth:`add` serves one
    by address (with its status socket and removal fd) and :meth:`remove` lets it go.
    """

    def __init__(
        self, devices: list[VhostPciDevice], app: App | None = None, *, polling: bool = False
    ) -> None:
        self.devices = devices
        self.app = app
        self.polling = polling
        self.stop = threading.Event()
        self.events: list[Event] = []
        #: set when every device failed (then :meth:`run` returns); one failed device is ``dev.failed``
        self.error: str | None = None
        #: set when the app raised out of ``poll``: it is no longer called
        self.app_error: str | None = None
        #: keep running with no device left (``run --watch``); else the last removal stops the loop
        self.watching = False
        self.served: dict[str, Served] = {}
        self._sel = selectors.DefaultSelector()
        self._readers: dict[int, Callable[[], None]] = {}
        self._device_fds: dict[int, VhostPciDevice] = {}
        self._kicks: list[int] = []  # the kick fds registered
        self._kicks_asked: list[int] = []  # what the app gave for them (compared each turn)
        self._turns = 0
        self._known: list[VhostPciDevice] = []  # the devices as the selector last saw the list
        self._sync_devices()

    # -- what the loop waits on --------------------------------------------------------

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fd`` is readable (a socket, a pipe, a monitor)."""
        self._readers[fd] = callback
        self._sel.register(fd, selectors.EVENT_READ)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._unregister(fd)

    def _unregister(self, fd: int) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _watch_device(self, dev: VhostPciDevice) -> None:
        if self.polling:
            return
        for fd in dev.control_fds():
            if fd not in self._device_fds:
                self._device_fds[fd] = dev
                self._sel.register(fd, selectors.EVENT_READ)

    def _sync_devices(self) -> None:
        """Wait on the devices :attr:`devices` holds now: the list is the caller's too, who may add one."""
        if self._known == self.devices:  # identity: devices define no equality
            return
        for dev in self.devices:
            if not any(dev is k for k in self._known) and dev.failed is None:
                self._watch_device(dev)
        for dev in self._known:
            if not any(dev is d for d in self.devices):
                self._unwatch_device(dev)
        self._known = list(self.devices)

    def _unwatch_device(self, dev: VhostPciDevice) -> None:
        for fd in [fd for fd, d in self._device_fds.items() if d is dev]:
            del self._device_fds[fd]
            self._unregister(fd)
        self._sync_kicks(force=True)

    def _sync_kicks(self, force: bool = False) -> None:
        """Wait on the app's kick eventfds as they are now (ports come and go with frontends)."""
        kicks = [] if self.app is None or self.polling else self.app.kick_fds()
        if kicks == self._kicks_asked and not force:
            return
        self._kicks_asked = kicks
        for fd in self._kicks:
            if fd not in self._readers and fd not in self._device_fds:
                self._unregister(fd)
        self._kicks = []
        for fd in kicks:
            if fd in self._readers or fd in self._device_fds or fd in self._kicks:
                continue
            try:
                self._sel.register(fd, selectors.EVENT_READ)
            except (OSError, ValueError, KeyError):
                continue  # a port of a device already closed: it has nothing to wait for
            self._kicks.append(fd)

    # -- devices by address --------------------------------------------------------------

    def add(self, address: str, dev: VhostPciDevice, status: StatusServer | None = None) -> None:
        """Serve ``dev`` as ``address``: its vectors, its removal fd and its status socket."""
        self.devices.append(dev)
        self.served[address] = Served(address, dev, status)
        self._sync_devices()
        gone = dev.function.removal_fd()
        if gone is not None:
            self.add_reader(gone, lambda: self._released(address))
        if status is not None:
            self.add_reader(status.fileno(), status.serve_ready)

    def remove(self, address: str) -> None:
        """Stop serving ``address``: close its status socket and reset and close the device."""
        s = self.served.pop(address)
        gone = s.device.function.removal_fd()
        if gone is not None:
            self.remove_reader(gone)
        if s.status is not None:
            self.remove_reader(s.status.fileno())
        self.devices.remove(s.device)
        self._sync_devices()
        if s.status is not None:
            s.status.close()
        s.device.close()
        log.info("stopped serving %s", address)

    def _released(self, address: str) -> None:
        dev = self.served[address].device
        if dev.function.backend == "vfio-user":
            # Every request on a vfio-user socket is answered before the next: readable
            # between requests means the server closed it (or broke the protocol).
            log.error("%s: the host went away (its vfio-user socket closed)", address)
            if len(self.served) == 1 and not self.watching:
                self.error = f"the host of {address} went away"
        else:
            # The kernel asks for the function back (hot-unplug waits on us): let go now, cleanly.
            log.info("%s is being removed: releasing it", address)
        self.remove(address)
        if not self.served and not self.watching:
            self.stop.set()

    def close(self) -> None:
        """Let go of every device served by address, then of the selector; idempotent."""
        for address in list(self.served):
            self.remove(address)
        self._sel.close()

    # -- the loop --------------------------------------------------------------------------

    def run_once(self, timeout: float) -> int:
        """Serve what is pending, then wait (bounded) for the next interrupt or kick; returns frames moved."""
        changed = False
        for dev in list(self.devices):  # a failure may remove one as we go
            if dev.failed is not None:
                continue
            try:
                evs = dev.process()
            except Exception as e:  # one device's failure, bug or not, is that device's alone
                self._device_failed(dev, e)
                changed = True
                continue
            for ev in evs:
                changed = True
                self._deliver(dev, ev)
        moved = self._poll_app()
        if self.polling:
            self._turns += 1
            if not moved or self._turns % READERS_EVERY == 0:
                self._wait(0)
            return moved
        if moved:
            return moved
        self._sync_devices()
        self._sync_kicks(force=changed)
        if not self._device_fds:  # devices without vectors poll: keep the loop turning, but let readers in
            timeout = min(timeout, 0.001)
        self._wait(timeout)
        return 0

    def _wait(self, timeout: float) -> None:
        for key, _ in self._sel.select(timeout):
            fd = key.fd
            reader = self._readers.get(fd)
            if reader is not None:
                reader()
            elif fd in self._kicks:  # a frontend kick: the next poll() serves it
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass

    def _deliver(self, dev: VhostPciDevice, ev: Event) -> None:
        self.events.append(ev)
        if isinstance(ev, DeviceErrorEvent):
            log.warning("%s: %s", ev.where, ev.message)
        elif (what := lifecycle(ev)) is not None:
            # A driver VM's comings and goings, one line each: what an operator (and the VM tier,
            # timing a fault's recovery from the run's log) reads to follow it.
            log.info("%s: %s", dev.function.address, what)
        if self.app is None:
            return
        try:
            self.app.on_event(ev, dev.frontends)
        except Exception as e:  # the app's bug must not take the device or the process
            log.exception("%s: the app failed on %s", dev.function.address, type(ev).__name__)
            self.events.append(DeviceErrorEvent("app", f"{type(ev).__name__}: {type(e).__name__}: {e}"))

    def _poll_app(self) -> int:
        if self.app is None:
            return 0
        try:
            return self.app.poll()
        except Exception as e:
            # The app contains its frontends' errors to their ports (apps/net.py); one that escapes
            # is the app's own bug: stop calling it, keep serving the control plane, say so.
            self.app_error = f"{type(e).__name__}: {e}"
            log.exception("the app failed and is stopped; the devices stay served")
            self.events.append(DeviceErrorEvent("app", self.app_error))
            self.app = None
            self._sync_kicks(force=True)
            return 0

    def _device_failed(self, dev: VhostPciDevice, e: Exception) -> None:
        """One device is unusable: stop serving it alone (its frontends leave the app), keep the others."""
        address = next((a for a, s in self.served.items() if s.device is dev), None)
        if address is not None and _readable(dev.function.removal_fd()):
            # The access failed because the function went away (its host, a hot-unplug) before the
            # loop saw its removal fd: say that, as the removal would have.
            self._released(address)
            return
        if isinstance(e, VhostPciError):
            log.error("%s failed: %s", dev.function.address, e)
        else:
            log.exception("%s failed", dev.function.address)
        for ev in dev.fail(str(e) if isinstance(e, VhostPciError) else f"{type(e).__name__}: {e}"):
            self._deliver(dev, ev)
        self._unwatch_device(dev)
        if not self.watching and all(d.failed is not None for d in self.devices):
            self.error = "; ".join(f"{d.function.address}: {d.failed}" for d in self.devices)

    def run(self, tick: float = 0.1) -> None:
        """Serve until :attr:`stop` is set or every device failed (one failed device stops only itself)."""
        while not self.stop.is_set() and self.error is None:
            self.run_once(tick)


def lifecycle(ev: Event) -> str | None:
    """One line for a driver VM's lifecycle event (protocol.md 7.5), None for the others."""
    if isinstance(ev, RemoteUp | RemoteDown):
        return f"driver VM {ev.uuid} {'up' if isinstance(ev, RemoteUp) else 'down'}"
    if isinstance(ev, MemoryAdded | MemoryRemoved):
        size = sum(r.size for r in ev.regions)
        verb = "added" if isinstance(ev, MemoryAdded) else "removed"
        return f"memory {verb}: {len(ev.regions)} region(s), {size >> 20} MiB"
    if isinstance(ev, FrontendAdded | FrontendRemoved):
        return f"frontend {ev.key} {'added' if isinstance(ev, FrontendAdded) else 'removed'}"
    if isinstance(ev, FeaturesNegotiated):
        return f"frontend {ev.key} started: features {ev.accepted:#x} of {ev.offered:#x} accepted"
    return None


def _readable(fd: int | None) -> bool:
    """Whether ``fd`` is readable now (a removal fd that fired)."""
    if fd is None:
        return False
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))
