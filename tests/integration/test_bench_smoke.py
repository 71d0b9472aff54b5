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
    rows = {r["name"]: r for r in result["benchmarks"]}
    path = "native" if result["machine"]["datapath"]["built"] else "pure"
    # both paths in one run when the extension is built, the native one against the pure one
    assert set(rows) == (
        {"ring-batch native", "ring-batch pure"} if path == "native" else {"ring-batch pure"}
    )
    for row in rows.values():
        assert row["figure"] > 0 and row["unit"].startswith("us") and row["ratio"] > 0
        assert set(row) >= {
            "figure",
            "unit",
            "baseline_name",
            "baseline",
            "ratio",
            "target",
            "met",
            "limited_by",
        }
    if path == "native":
        assert rows["ring-batch native"]["baseline_name"] == "ring-batch pure"
    assert result["machine"]["cpus"] >= 1
