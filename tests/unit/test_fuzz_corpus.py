"""The fuzz targets without atheris: the kept corpus replayed, and hypothesis driving each target.

Every file under tests/fuzz_corpus/<target>/ is a test case: the seeds, and each
input that once found a bug (crash-*, timeout-*, regress-*), which must stay fixed.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostpci_driver.virtqueue.native import LIB, REASON
from vhostpci_host.fuzz import TARGETS

CORPUS = Path(__file__).resolve().parents[1] / "fuzz_corpus"
INPUT_TIMEOUT = 10  # as tools/fuzz: an input slower than this is a hang
NATIVE_TARGETS = {"ring-diff"}  # compare the compiled ring walker with the reference: need it built


def _runnable(target: str) -> None:
    if target in NATIVE_TARGETS and LIB is None:
        pytest.skip(f"{target} compares the native path, which is off: {REASON}")


def _kept() -> list[tuple[str, Path]]:
    return sorted((d.name, f) for d in CORPUS.iterdir() if d.is_dir() for f in d.iterdir() if f.is_file())


@contextlib.contextmanager
def _no_hang(what: str) -> Iterator[None]:
    """Fail a hanging input instead of hanging the suite (SIGALRM interrupts a Python loop)."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"{what} ran longer than {INPUT_TIMEOUT} s: a hang")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(INPUT_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_every_corpus_directory_is_a_target() -> None:
    assert {d.name for d in CORPUS.iterdir() if d.is_dir()} == set(TARGETS)


@pytest.mark.parametrize(("target", "path"), _kept(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_kept_input(target: str, path: Path) -> None:
    _runnable(target)
    with _no_hang(f"{target}/{path.name}"):
        TARGETS[target].run(path.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds_match_the_encoders(target: str) -> None:
    """The kept seeds are what the encoders make today (``tools/fuzz TARGET --write-seeds``)."""
    kept = {p.name.removeprefix("seed-"): p.read_bytes() for p in (CORPUS / target).glob("seed-*")}
    assert kept == TARGETS[target].seeds()


@pytest.mark.parametrize("target", sorted(TARGETS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048))
def test_target_under_hypothesis(target: str, data: bytes) -> None:
    _runnable(target)
    TARGETS[target].run(data)


@pytest.mark.parametrize("target", sorted(TARGETS))
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_seeds_under_hypothesis(target: str, data: st.DataObject) -> None:
    """Random bytes rarely get past a header; a seed with a few bytes changed gets deep."""
    _runnable(target)
    seeds = TARGETS[target].seeds()
    raw = bytearray(seeds[data.draw(st.sampled_from(sorted(seeds)))])
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    TARGETS[target].run(bytes(raw))
