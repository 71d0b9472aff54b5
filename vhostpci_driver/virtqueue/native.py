"""Which data path runs: the compiled ring walker (``vhostpci_driver._native``) or the pure rings.

The extension is built at install when a compiler is there (setup.py) and is
optional: without it, or with ``VHOSTPCI_PURE=1`` in the environment, every
frontend queue is the pure-Python
:class:`~vhostpci_driver.virtqueue.device.DeviceQueue`, which stays the reference.
:class:`NativeDeviceQueue` is that class with its per-batch calls (``pop_batch``,
``push_batch``, ``pop_direct``, ``push_direct``, and ``need_notify``'s rule) done in C under the
same rules, names and indexes;
everything else (state, errors, ``discard``, notifications) is the reference's own
code, so the two cannot drift apart there.
``VHOSTPCI_NATIVE_LIB=path`` loads the extension from a file instead (the
sanitizer build that tools/fuzz runs).

:data:`PATH` says which runs, :data:`REASON` why; ``vhostpci status`` and
``vhostpci bench`` report both.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
from array import array
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Literal

from vhostpci_driver.addr import GuestMemory
from vhostpci_driver.errors import RemoteMemoryError
from vhostpci_driver.virtqueue.device import Chain, DeviceQueue


def load_extension(name: str, path: str | None) -> ModuleType:
    """Extension module ``name``, from the file ``path`` when given (a sanitizer build), else imported.

    Raises ImportError when it is not there or does not load.
    """
    if not path:
        return importlib.import_module(name)
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None:
        raise ImportError(f"{path}: not an extension module")
    lib = importlib.util.module_from_spec(spec)
    loader.exec_module(lib)
    return lib


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("VHOSTPCI_PURE") == "1":
        return None, "VHOSTPCI_PURE=1"
    path = os.environ.get("VHOSTPCI_NATIVE_LIB")
    try:
        lib = load_extension("vhostpci_driver._native", path)
    except ImportError as e:
        if path:
            return None, f"VHOSTPCI_NATIVE_LIB={path}: {e}"
        return None, f"the extension is not built ({e})"
    lib.setup(Chain, RemoteMemoryError)
    return lib, f"compiled ring walker ({lib.__file__})"


LIB, REASON = _load()
PATH: Literal["native", "pure"] = "native" if LIB is not None else "pure"


def describe() -> dict[str, object]:
    """What ``status`` and ``bench`` print: the path, why, and whether the extension is built."""
    return {"path": PATH, "reason": REASON, "built": LIB is not None}


class NativeDeviceQueue(DeviceQueue):
    """:class:`DeviceQueue` with its batch calls compiled (needs :data:`LIB`)."""

    def __init__(self, mem: GuestMemory, size: int, desc: int, avail: int, used: int, **kw: Any) -> None:
        if LIB is None:
            raise RuntimeError(f"the native data path is not available: {REASON}")
        super().__init__(mem, size, desc, avail, used, **kw)
        self._inflight = array("q", [-1]) * size  # C reads and writes it in place
        native_regions = getattr(mem, "native_regions", None)  # the region table: bisected in C
        self._starts: list[int] | None = None
        self._views: list[memoryview] | None = None
        if native_regions is not None:
            self._starts, self._views = native_regions()
        self._pop, self._push, self._need = LIB.pop, LIB.push, LIB.need_notify
        self._pop_direct, self._push_direct = LIB.pop_direct, LIB.push_direct

    def pop_batch(self, max_chains: int = 32) -> list[Chain]:
        if self.broken:
            raise self.broken
        chains: list[Chain]
        chains, err = self._pop(
            self._desc, self._avail, self._inflight, self._starts, self._views, self.mem,
            self.size, self.last_avail_idx, self.max_chain_len, max_chains,
        )  # fmt: skip
        if chains:
            self.last_avail_idx = (self.last_avail_idx + len(chains)) & 0xFFFF
        if err is not None:
            if isinstance(err, tuple):
                raise self._break(*err)
            raise err
        return chains  # Chain objects, built in C

    def push_batch(self, used: Sequence[tuple[int, int]]) -> None:
        if self.broken:
            raise self.broken
        if not used:
            return
        idx = self._push(self._used, self._inflight, used, self.size, self.last_used_idx)
        if isinstance(idx, tuple):
            raise self._break(*idx)
        self._pushed(idx)

    def pop_direct(self, out: array[int], max_chains: int = 32) -> int:
        if self._starts is None or self._views is None:
            raise TypeError("pop_direct needs the region table as the queue's memory")
        if self.broken:
            raise self.broken
        n: int
        n, err = self._pop_direct(
            self._desc, self._avail, self._inflight, self._starts, self._views, self.size,
            self.last_avail_idx, max_chains, out,
        )  # fmt: skip
        if n:
            self.last_avail_idx = (self.last_avail_idx + n) & 0xFFFF
        if err is not None:
            if isinstance(err, tuple):
                raise self._break(*err)
            raise err
        return n

    def push_direct(self, used: array[int], n: int) -> None:
        if not 0 <= n <= len(used) // 2:
            raise ValueError(f"push_direct: {len(used)} words cannot hold {n} used entries")
        if self.broken:
            raise self.broken
        if not n:
            return
        idx = self._push_direct(self._used, self._inflight, used, n, self.size, self.last_used_idx)
        if isinstance(idx, tuple):
            raise self._break(*idx)
        self._pushed(idx)

    def _wants_signal(self, old: int, new: int) -> bool:
        return bool(self._need(self._avail, self.size, self.event_idx, old, new))


#: The device-side queue class the toolkit builds its frontends' rings with.
RingQueue: type[DeviceQueue] = NativeDeviceQueue if PATH == "native" else DeviceQueue
