"""Fixtures that start the host side as real processes and serve its devices in this process."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostpci_host.harness import HostServer, Rig


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: UNIX socket paths are limited to 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="vp-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


PING_INTERVAL, PING_MISSES = 0.2, 10


@pytest.fixture
def rig(short_dir: Path) -> Iterator[Rig]:
    # 2 s of silence before a driver VM counts as gone: on a loaded machine a simulator can be
    # starved for longer than 3 pings of 0.2 s, and a false drop fails a test for the wrong reason.
    server = HostServer(short_dir, ping_interval=PING_INTERVAL, ping_misses=PING_MISSES)
    r = Rig(server)
    try:
        yield r
    finally:
        r.close()


def wait_for(cond: object, timeout: float, what: str, step: float = 0.05) -> None:
    """Poll ``cond()`` (bounded) for state that has no fd to wait on."""
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


MAC_A, MAC_B, MAC_C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"
UUIDS = [uuid.UUID(int=0xA), uuid.UUID(int=0xB), uuid.UUID(int=0xC)]
