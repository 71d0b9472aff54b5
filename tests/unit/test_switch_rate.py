"""The in-process switch rate harness moves real frames through the real switch (no figure is checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vhostpci_driver.apps import switch_rate
from vhostpci_driver.virtqueue import native


@pytest.mark.parametrize("size", [64, 1500, 65536])
def test_measure_switches_the_frames_it_counts(size: int) -> None:
    r = switch_rate.measure(size, 600)
    assert r.path == native.PATH and r.size == size and r.primitive
    assert r.frames >= 600 and r.seconds > 0
    assert r.frames_per_s == pytest.approx(r.frames / r.seconds)
    base = switch_rate.measure(size, 600, switch_rate.policy_only)
    assert not base.primitive and base.frames >= 600


def test_main_reports_each_path_as_json_lines() -> None:
    env = dict(os.environ, SWITCH_RATE_REPS="1")
    out = subprocess.run([sys.executable, "-m", "vhostpci_driver.apps.switch_rate", "64"], env=env,
                         check=True, capture_output=True, text=True, timeout=300).stdout  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines()]
    paths = ["native", "pure"] if native.LIB is not None else ["pure"]
    assert [(r["path"], r["primitive"]) for r in rows] == [(p, b) for p in paths for b in (True, False)]
    assert all(r["size"] == 64 and r["frames"] > 0 for r in rows)
