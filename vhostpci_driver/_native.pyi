# Types of the compiled ring walker (vhostpci_driver/_native.c); virtqueue/native.py wraps it.
from collections.abc import Sequence
from typing import Any

from vhostpci_driver.virtqueue.device import Chain

def setup(chain: type, remote_memory_error: type[BaseException], /) -> None: ...
def pop(
    desc: memoryview, avail: memoryview, inflight: Any, starts: list[int] | None,
    views: list[memoryview] | None, mem: Any, size: int, last_avail_idx: int,
    max_chain_len: int, max_chains: int, /,
) -> tuple[list[Chain], tuple[str, str, int | None] | BaseException | None]: ...
def push(
    used: memoryview, inflight: Any, entries: Sequence[tuple[int, int]], size: int, last_used_idx: int, /
) -> int | tuple[str, str, int | None]: ...
def pop_direct(
    desc: memoryview, avail: memoryview, inflight: Any, starts: list[int], views: list[memoryview],
    size: int, last_avail_idx: int, max_chains: int, out: Any, /,
) -> tuple[int, tuple[str, str, int | None] | BaseException | None]: ...
def push_direct(
    used: memoryview, inflight: Any, words: Any, n: int, size: int, last_used_idx: int, /
) -> int | tuple[str, str, int | None]: ...
def need_notify(avail: memoryview, size: int, event_idx: bool, old: int, new: int, /) -> bool: ...
def forward_unicast(
    chains: list[Chain], start: int, table: dict[bytes, Any], source: object, touched: set[Any], /
) -> tuple[int, int]: ...
