"""Addresses spelled one way, click types, shell completion, the status socket's name, the tables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_sysfs import fake_tree
from vhostpci_driver.errors import TransportError
from vhostpci_driver.pci.open import normalize_address
from vhostpci_driver.report import feature_names, table
from vhostpci_driver.status import socket_name


def test_every_address_has_one_spelling(tmp_path: Path) -> None:
    assert normalize_address("00:07.0") == normalize_address("0000:00:07.0") == "0000:00:07.0"
    assert normalize_address("0000:00:0A.0") == "0000:00:0a.0"
    d = tmp_path / "run"
    d.mkdir()
    (tmp_path / "link").symlink_to(d)
    want = f"vfio-user:{d}/x.sock"
    for spelling in (
        f"vfio-user:{d}/../run/x.sock",
        f"vfio-user:{tmp_path}/link/x.sock",
        f"vfio-user:{d}//x.sock",
    ):
        assert normalize_address(spelling) == want
    for bad in ("vfio-user:", "not-an-address", "0000:00:07"):
        with pytest.raises(TransportError):
            normalize_address(bad)


def test_status_socket_names_are_short_and_readable() -> None:
    assert socket_name("0000:00:05.0") == "0000:00:05.0.sock"
    u = "00000000-0000-0000-0000-00000000000a"
    name = socket_name(f"vfio-user:/run/vhost-pci.sock.devices/{u}.sock")
    assert name.startswith(f"vfio-user-{u}-") and name.endswith(".sock") and name.count(".sock") == 1
    assert name != socket_name(f"vfio-user:/other/{u}.sock")  # same socket name, another path
    assert len(socket_name(f"vfio-user:/{'d' * 200}/{'n' * 200}.sock")) < 70


def test_tables_are_aligned_and_features_named() -> None:
    lines = table(("NAME", "FIGURE", "UNIT"), [("ack-round-trip p50", 61.5, "us"), ("memory", 12, "MiB")])
    assert [ln.index("FIGURE") for ln in lines[:1]] == [ln.index("61.5") for ln in lines[1:2]]
    assert lines[2].index("12") == lines[0].index("FIGURE") and lines[2].index("MiB") == lines[0].index(
        "UNIT"
    )
    assert feature_names((1 << 32) | (1 << 29) | (1 << 15) | (1 << 50), 1) == [
        "MRG_RXBUF",
        "EVENT_IDX",
        "VERSION_1",
        "bit50",
    ]


def _complete(words: str, env: dict[str, str]) -> list[str]:
    parts = words.split(" ")
    out = subprocess.run(
        [sys.executable, "-m", "vhostpci_driver"],
        env={**os.environ, **env, "_VHOSTPCI_COMPLETE": "bash_complete", "COMP_WORDS": words,
             "COMP_CWORD": str(len(parts) - 1)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    # bash_complete prints TYPE,VALUE per item
    return [line.split(",", 1)[1] for line in out.stdout.splitlines() if "," in line]


def test_completion_offers_vhost_pci_functions_and_sockets(tmp_path: Path) -> None:
    root = fake_tree(tmp_path / "sys")
    env = {"VHOSTPCI_SYSFS_ROOT": str(root)}
    assert _complete("vhostpci bind ", env) == ["0000:00:04.0"]  # the vhost-pci function only
    assert _complete("vhostpci bind 00:0", env) == ["0000:00:04.0"]
    assert "vfio-user:" in _complete("vhostpci run ", env)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "dev.sock"))
    try:
        (tmp_path / "notes.txt").write_text("")
        got = _complete(f"vhostpci status vfio-user:{tmp_path}/", env)
        assert f"vfio-user:{tmp_path}/dev.sock" in got and f"vfio-user:{tmp_path}/sys/" in got
        assert not any("notes.txt" in g for g in got)
    finally:
        s.close()
