"""The serving loop: one device, optionally one app, driven by its eventfds.

``vhostpci run`` and the tests run this. Interrupt-driven by default: it sleeps
in ``select`` on the device's vectors and the app's kick eventfds; with
``polling`` it spins on the rings instead (lower latency, one core busy).
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time

from vhostpci_driver.apps.net import NetBackend
from vhostpci_driver.device import VhostPciDevice
from vhostpci_driver.errors import DeviceError
from vhostpci_driver.events import DeviceErrorEvent, Event

log = logging.getLogger(__name__)


class Service:
    """Serves ``device`` and feeds its events to ``app`` until stopped."""

    def __init__(
        self, device: VhostPciDevice, app: NetBackend | None = None, *, polling: bool = False
    ) -> None:
        self.device = device
        self.app = app
        self.polling = polling
        self.stop = threading.Event()
        self.events: list[Event] = []
        self.error: str | None = None
        if app is not None:
            app.attach(device.frontends)

    def run_once(self, timeout: float) -> None:
        """Serve what is pending, then wait (bounded) for the next interrupt or kick."""
        for ev in self.device.process():
            self.events.append(ev)
            if self.app is not None:
                self.app.on_event(ev)
            if isinstance(ev, DeviceErrorEvent):
                log.warning("%s: %s", ev.where, ev.message)
        moved = self.app.poll() if self.app is not None else 0
        if moved or self.polling:
            return
        device_fds = self.device.fileno_list()[:3]  # config, controlq, ackq: process() drains them
        kicks = self.app.kick_fds() if self.app is not None else []
        if not device_fds:
            time.sleep(min(timeout, 0.001))
            return
        ready, _, _ = select.select(device_fds + kicks, [], [], timeout)
        for fd in ready:
            if fd not in device_fds:
                try:
                    os.eventfd_read(fd)  # a frontend kick: the next poll() serves it
                except BlockingIOError:
                    pass

    def run(self, tick: float = 0.1) -> None:
        """Serve until :attr:`stop` is set or the device fails."""
        try:
            while not self.stop.is_set():
                self.run_once(tick)
        except DeviceError as e:
            self.error = str(e)
            log.error("device failed: %s", e)
