"""The serving loop: devices, optionally one app, driven by their eventfds.

``vhostpci run`` and the tests run this. One app may span several devices:
the net switch forwards between frontends of different driver VMs, each
behind its own vhost-pci function, which is what vhost-pci is for.
Interrupt-driven by default: it sleeps in ``select`` on the devices' vectors
and the app's kick eventfds; with ``polling`` it spins on the rings instead
(lower latency, one core busy).
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from vhostpci_driver.apps.net import NetBackend
from vhostpci_driver.device import VhostPciDevice
from vhostpci_driver.errors import DeviceError
from vhostpci_driver.events import DeviceErrorEvent, Event

log = logging.getLogger(__name__)


class Service:
    """Serves ``devices`` and feeds their events to ``app`` until stopped."""

    def __init__(
        self, devices: list[VhostPciDevice], app: NetBackend | None = None, *, polling: bool = False
    ) -> None:
        self.devices = devices
        self.app = app
        self.polling = polling
        self.stop = threading.Event()
        self.events: list[Event] = []
        self.error: str | None = None
        #: extra fds to wait on (a status socket, a signal pipe) and what to do when readable
        self.readers: dict[int, Callable[[], None]] = {}

    def run_once(self, timeout: float) -> int:
        """Serve what is pending, then wait (bounded) for the next interrupt or kick; returns frames moved."""
        for dev in self.devices:
            for ev in dev.process():
                self.events.append(ev)
                if self.app is not None:
                    self.app.on_event(ev, dev.frontends)
                if isinstance(ev, DeviceErrorEvent):
                    log.warning("%s: %s", ev.where, ev.message)
        moved = self.app.poll() if self.app is not None else 0
        if moved or self.polling:
            return moved
        device_fds = [fd for dev in self.devices for fd in dev.fileno_list()[:3]]
        kicks = self.app.kick_fds() if self.app is not None else []
        if not device_fds:  # polling devices: keep the loop turning, but let readers in
            timeout = min(timeout, 0.001)
        ready, _, _ = select.select(device_fds + kicks + list(self.readers), [], [], timeout)
        for fd in ready:
            if fd in self.readers:
                self.readers[fd]()
            elif fd not in device_fds:  # a frontend kick: the next poll() serves it
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
        return 0

    def run(self, tick: float = 0.1) -> None:
        """Serve until :attr:`stop` is set or a device fails."""
        try:
            while not self.stop.is_set():
                self.run_once(tick)
        except DeviceError as e:
            self.error = str(e)
            log.error("device failed: %s", e)
