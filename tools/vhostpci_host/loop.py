"""One selector and the callbacks of its fds: the event loop of the host side's servers.

The vhost-pci server (``server.py``) and each vfio-user server
(``vfio_user_server.py``) run one of these; a vfio-user server's loop nests in
the vhost-pci server's through :meth:`SelectorLoop.fileno`. A callback is
called when its fd is readable (and, for an fd registered with a writer, when
it is writable: the writer first, so queued output goes before new input is
read).
"""

from __future__ import annotations

import selectors
from collections.abc import Callable
from typing import Protocol


class _FileLike(Protocol):
    def fileno(self) -> int: ...


Fd = int | _FileLike
Callback = Callable[[], object]  # what it returns is ignored


class SelectorLoop:
    """``add_reader``/``remove_reader`` and :meth:`run_once` over one selector."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()

    def fileno(self) -> int:
        """The selector's fd: readable when this loop has work (nest it in another loop)."""
        return self.sel.fileno()

    def add_reader(self, fd: Fd, callback: Callback) -> None:
        self.sel.register(fd, selectors.EVENT_READ, (callback, None))

    def remove_reader(self, fd: Fd) -> None:
        """Stop watching ``fd``; a no-op for an fd not (or no longer) watched, or already closed."""
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def set_writer(self, fd: Fd, on_read: Callback, on_write: Callback | None) -> None:
        """Watch a registered ``fd`` for writability too (``on_write``), or no longer (None)."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on_write is not None else 0)
        self.sel.modify(fd, events, (on_read, on_write))

    def run_once(self, timeout: float | None = 0) -> None:
        """Wait up to ``timeout`` seconds and call what is ready."""
        for key, mask in self.sel.select(timeout):
            on_read, on_write = key.data
            if mask & selectors.EVENT_WRITE and on_write is not None:
                on_write()
            if mask & selectors.EVENT_READ:
                on_read()

    def close(self) -> None:
        self.sel.close()
