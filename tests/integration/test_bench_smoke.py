"""The bench command keeps working (a smoke test: benchmarks never fail a build on their figures).

What is checked is the rows' shape: every path the machine has built gets its rows in
one run, each with a baseline measured in that run and the ratio to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vhostpci_host.harness import HostServer, ProcessError

ROW_FIELDS = {"name", "figure", "unit", "baseline_name", "baseline", "ratio", "target", "met", "limited_by"}


def _bench(only: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "vhostpci_driver", "bench", "--quick", "--only", only, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    assert result["machine"]["cpus"] >= 1
    for row in result["benchmarks"]:
        assert set(row) >= ROW_FIELDS, row
        assert row["figure"] > 0, row
    return result


def _paths(result: dict[str, Any]) -> list[str]:
    return ["native", "pure"] if result["machine"]["datapath"]["built"] else ["pure"]


def test_bench_quick_ring_batch_prints_its_row() -> None:
    result = _bench("ring-batch")
    rows = {r["name"]: r for r in result["benchmarks"]}
    # both paths in one run when the extension is built, each with both batch APIs (arrays, chains),
    # the native rows against their pure twins, the pure ones against the CPython floor
    assert set(rows) == {f"ring-batch {p}{api}" for p in _paths(result) for api in ("", " chains")}
    for row in rows.values():
        assert row["unit"].startswith("us") and row["ratio"] > 0 and row["baseline"] > 0
    for api in ("", " chains"):
        assert rows[f"ring-batch pure{api}"]["baseline_name"] == "cpython-floor x 32"
        if "native" in _paths(result):
            native, pure = rows[f"ring-batch native{api}"], rows[f"ring-batch pure{api}"]
            assert native["baseline_name"] == f"ring-batch pure{api}"
            assert native["baseline"] == pure["figure"]


def test_bench_quick_net_row_runs_every_path() -> None:
    result = _bench("net-switch-64")
    rows = {r["name"]: r for r in result["benchmarks"]}
    expect = set()
    for p in _paths(result):
        expect |= {f"net-switch-64 {p}", f"net-switch-64 {p} simulator", f"net-switch-64 {p} per switch core"}
    assert set(rows) == expect
    for p in _paths(result):
        row, sim = rows[f"net-switch-64 {p}"], rows[f"net-switch-64 {p} simulator"]
        assert row["baseline_name"] == "AF_UNIX socketpair" and row["baseline"] > 0
        assert abs(row["ratio"] - row["figure"] / row["baseline"]) < 0.002
        # the traffic source's own ceiling, against this path's figure from the same run
        assert sim["baseline_name"] == f"net-switch-64 {p}" and sim["baseline"] == row["figure"]
        assert (row["limited_by"] == "simulator") == (sim["figure"] < 3 * row["figure"])


def test_bench_quick_bring_up_prints_its_row() -> None:
    # the row's host server once got a socket directory that did not exist (serve refuses that)
    (row,) = _bench("bring-up")["benchmarks"]
    assert row["name"] == "bring-up" and row["unit"].startswith("ms") and row["met"] in (True, False)


def test_a_host_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    # Its --json error line has no "event": the harness must report the server's own words,
    # not fail on the missing key (KeyError 'event' was all the bench said).
    with pytest.raises(ProcessError, match="does not exist"):
        HostServer(tmp_path / "missing")


def test_a_benchmark_that_cannot_run_is_listed_and_the_others_still_measured() -> None:
    """A run once lost every row to one that failed (the memory row's driver did not ack in time)."""
    import resource  # noqa: PLC0415

    def few_fds() -> None:  # the host side's server cannot open its sockets; ring-batch needs none
        resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))

    argv = [sys.executable, "-m", "vhostpci_driver", "bench", "--quick"]
    argv += ["--only", "ring-batch", "--only", "bring-up"]
    out = subprocess.run(
        [*argv, "--json"], capture_output=True, text=True, timeout=300, check=False, preexec_fn=few_fds
    )
    assert out.returncode == 1, out.stderr
    result = json.loads(out.stdout)
    assert result["schema"] == 1
    assert {r["name"] for r in result["benchmarks"]} >= {"ring-batch pure", "ring-batch pure chains"}
    assert not any(r["name"] == "bring-up" for r in result["benchmarks"])
    (failed,) = result["failed"]
    assert failed["name"] == "bring-up" and "Too many open files" in failed["error"]
    human = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, preexec_fn=few_fds)
    assert human.returncode == 1
    assert "ring-batch pure" in human.stdout and "bring-up: could not run: OSError" in human.stderr
    assert "Traceback" not in human.stderr
