"""tools/vm/chroot.py binds this checkout into the VM tier's chroot, never a stale one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

VM = Path(__file__).resolve().parents[2] / "tools/vm"
sys.path.insert(0, str(VM))
from chroot import bind_project  # noqa: E402  (tools/vm is not a package)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")


def _mounted(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode == 0


def test_a_stale_checkout_is_let_go_and_this_one_kept(tmp_path: Path) -> None:
    old, new, project = tmp_path / "old", tmp_path / "new", tmp_path / "project"
    for d, name in ((old, "OLD"), (new, "NEW")):
        d.mkdir()
        (d / name).write_text(name)
    project.mkdir()
    if subprocess.run(["mount", "--bind", str(old), str(project)], check=False).returncode != 0:
        pytest.skip("this machine does not allow bind mounts")
    try:
        assert bind_project(old, project)  # the same checkout: reused, nothing unmounted
        assert (project / "OLD").exists()
        # A run killed before leave(), then its checkout deleted (a CI clone made anew): the
        # mount shows an empty, deleted directory.
        shutil.rmtree(old)
        assert _mounted(project) and not any(project.iterdir())
        assert not bind_project(new, project)  # not this checkout: let go, for the caller to bind
        assert not _mounted(project)
        subprocess.run(["mount", "--bind", str(new), str(project)], check=True)
        assert (project / "NEW").read_text() == "NEW" and bind_project(new, project)
    finally:
        while _mounted(project):
            subprocess.run(["umount", "-l", str(project)], check=False)
