"""The bench command keeps working (a smoke test: benchmarks never fail a build on their figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_quick_ring_batch_prints_its_row() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vhostpci_driver", "bench", "--quick", "--only", "ring-batch", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    (row,) = result["benchmarks"]
    assert row["name"] == "ring-batch" and row["figure"] > 0 and row["unit"].startswith("us")
    assert set(row) >= {"figure", "unit", "baseline_name", "baseline", "ratio", "target", "met", "limited_by"}
    assert result["machine"]["cpus"] >= 1
