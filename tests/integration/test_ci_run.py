""".ci/run itself: under CI a tier that cannot run fails the run; elsewhere it is a loud skip.

The script runs for real (bash, its own control flow, its exit status) in a
copy of the tree where the heavy commands it calls (python3 -m venv, pip,
pytest, mypy, ruff, the fuzz list, tools/vm/prepare, prepare-kernel, id) are
small stand-ins on PATH or in place, each told by an environment variable
whether to succeed. What is under test is the script, not those tools.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The venv's python: pip installs succeed unless it is the [fuzz] extra and STUB_ATHERIS=fail;
# pytest, mypy and ruff pass; the fuzz target list is empty.
VENV_PYTHON = """#!/bin/sh
case "$*" in
  *"[fuzz]"*) [ "$STUB_ATHERIS" != fail ] ;;
  *) exit 0 ;;
esac
"""
PYTHON3 = """#!/bin/sh
# python3 -m venv DIR: make the stand-in venv there
mkdir -p "$3/bin" && cp "$STUB_DIR/venv-python" "$3/bin/python" && chmod +x "$3/bin/python"
"""


def executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    t = tmp_path / "clone"
    (t / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", t / ".ci" / "run")
    stubs = tmp_path / "stubs"
    executable(stubs / "venv-python", VENV_PYTHON)
    executable(stubs / "bin" / "python3", PYTHON3)
    executable(stubs / "bin" / "id", '#!/bin/sh\necho "$STUB_UID"\n')
    executable(t / "tools" / "vm" / "prepare", '[ "$STUB_PREPARE" != fail ]\n')
    executable(t / "tools" / "vm" / "prepare-kernel", '[ "$STUB_PREPARE_KERNEL" != fail ]\n')
    (t / "tools" / "fuzz").write_text("")
    (t / "tests").mkdir()  # the fallback step copies the tests into its venv's directory
    return t


def ci_run(tree: Path, *, ci: bool, **stub: str) -> subprocess.CompletedProcess[str]:
    stubs = tree.parent / "stubs"
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PATH=f"{stubs / 'bin'}:{env['PATH']}", STUB_DIR=str(stubs), STUB_UID="0")
    env.update({f"STUB_{k.upper()}": v for k, v in stub.items()})
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        ["bash", str(tree / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_every_tier_running_is_green_under_ci(tree: Path) -> None:
    r = ci_run(tree, ci=True)
    assert r.returncode == 0, r.stderr
    assert "SKIPPED" not in r.stderr and "DID NOT RUN" not in r.stderr


@pytest.mark.parametrize(
    ("stub", "tier"),
    [
        ({"prepare": "fail"}, "VM tier"),
        ({"prepare_kernel": "fail"}, "VM tier's iommufd kernel"),
        ({"atheris": "fail"}, "fuzz smoke"),
        ({"uid": "1000"}, "VM tier"),
    ],
)
def test_a_tier_that_cannot_run_fails_under_ci_and_is_a_loud_skip_elsewhere(
    tree: Path, stub: dict[str, str], tier: str
) -> None:
    under_ci = ci_run(tree, ci=True, **stub)
    assert under_ci.returncode != 0
    assert f"ci: {tier} DID NOT RUN under CI" in under_ci.stderr
    elsewhere = ci_run(tree, ci=False, **stub)
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert f"ci: {tier} SKIPPED" in elsewhere.stderr
