"""What every long-running host-side process shares: a private listening socket, status lines, its loop.

The vhost-pci server and the vhost-user front door both listen on a UNIX
socket that only their own user may connect to, report status as JSON lines
when asked, and run their :class:`~vhostpci_host.loop.SelectorLoop` until
SIGTERM, SIGINT or SIGHUP.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from vhostpci_host.loop import SelectorLoop

log = logging.getLogger(__name__)


class StartError(Exception):
    """The process cannot start as configured (the command says so in one line, exit 1)."""


def answers(path: Path) -> bool:
    """Whether something accepts connections on the UNIX socket ``path`` (a live process)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def listen_unix(path: Path, backlog: int, what: str) -> socket.socket:
    """A non-blocking listening socket at ``path``, born mode 0600.

    A stale socket there is replaced; a live one (``what`` answers on it) or a
    path that is not a socket is refused, and so is a directory that does not
    exist (nothing is created above the socket).
    """
    if not path.parent.is_dir():
        raise StartError(f"{path.parent} does not exist: create it first")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise StartError(f"{path} exists and is not a socket: refusing to replace it")
        if answers(path):
            raise StartError(f"{path}: {what} is already listening there; not taken over")
        path.unlink()  # a stale socket of a previous run
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: no window in which others could connect
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    s.listen(backlog)
    s.setblocking(False)
    return s


class StatusLog:
    """Status to the log, and as one JSON line on stdout per event when ``json_status``."""

    def __init__(self, logger: logging.Logger, json_status: bool) -> None:
        self.logger = logger
        self.json_status = json_status

    def __call__(self, event: str, **fields: object) -> None:
        self.logger.info("%s %s", event, fields)
        if self.json_status:
            sys.stdout.write(json.dumps({"event": event, **fields}, default=str) + "\n")
            sys.stdout.flush()


def run_until_signalled(
    loop: SelectorLoop, tick: float, on_tick: Callable[[], None], ready: Callable[[], None]
) -> int:
    """Run ``loop`` and call ``on_tick`` every ``tick`` s until SIGTERM, SIGINT or SIGHUP.

    ``ready`` runs once the signal pipe is open, so whoever waits for it (a test
    counting our fds) sees the process as it stays while idle. Returns the
    signal that stopped the loop (the command exits 128 + it).
    """
    stopped_by: list[int] = []
    stop_r, stop_w = os.pipe()
    os.set_blocking(stop_w, False)
    signal.set_wakeup_fd(stop_w)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stopped_by.append(signum))
    loop.add_reader(stop_r, lambda: os.read(stop_r, 64))
    ready()
    try:
        while not stopped_by:
            loop.run_once(tick)
            on_tick()
    finally:
        signal.set_wakeup_fd(-1)
        loop.remove_reader(stop_r)
        os.close(stop_r)
        os.close(stop_w)
    return stopped_by[0]
