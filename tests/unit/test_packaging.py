"""Packaging: every package directory is installed, and the commands answer --help."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _declared() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}


def _on_disk() -> set[str]:
    found = set()
    for top, base in (
        ("vhostpci_driver", ROOT / "vhostpci_driver"),
        ("vhostpci_host", ROOT / "tools/vhostpci_host"),
    ):
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([top, *rel.parts]))
    return found


def test_every_package_directory_is_declared() -> None:
    assert _declared() == _on_disk()


def test_commands_answer_help() -> None:
    for args in (["-m", "vhostpci_driver", "--help"], ["-m", "vhostpci_host", "--help"]):
        out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60, check=True)
        assert "Usage:" in out.stdout
