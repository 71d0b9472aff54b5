"""tools/vm/prepare takes its Debian archive from apt's configuration (tools/vm/debian-mirror)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

VM = Path(__file__).resolve().parents[2] / "tools/vm"
ARCHIVE = "http://archive.example/debian"  # no real mirror's name in the project


def mirror(apt: Path, override: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VHOSTPCI_VM_MIRROR"}
    if override is not None:
        env["VHOSTPCI_VM_MIRROR"] = override
    return subprocess.run([str(VM / "debian-mirror"), str(apt)], capture_output=True, text=True,
                          timeout=30, check=False, env=env)  # fmt: skip


@pytest.mark.parametrize("script", ["prepare", "debian-mirror", "prepare-kernel"])
def test_the_scripts_parse(script: str) -> None:
    out = subprocess.run(["bash", "-n", str(VM / script)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_prepare_has_no_archive_written_in_and_asks_debian_mirror() -> None:
    text = (VM / "prepare").read_text()
    assert "http://" not in text and "https://" not in text
    assert '"$HERE/debian-mirror"' in text


def test_a_one_line_sources_list(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian sid main\n"
        "deb-src http://src.example/debian sid main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb https://vendor.example/apt cloud-sdk-bookworm main\n"
        f"deb [arch=amd64 signed-by=/usr/share/keyrings/debian.gpg] {ARCHIVE}/ bookworm main\n"
    )
    out = mirror(tmp_path)
    assert out.returncode == 0 and out.stdout == f"{ARCHIVE}\n", out.stderr


def test_deb822_sources_in_sources_list_d(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a-vendor.sources").write_text(
        "Types: deb\nURIs: https://vendor.example/node\nSuites: nodistro\nComponents: main\n"
    )
    (d / "b-off.sources").write_text(
        "Types: deb\nURIs: http://off.example/debian\nSuites: sid\nComponents: main\nEnabled: no\n"
    )
    (d / "debian.sources").write_text(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: sid\nComponents: main\n\n"
        "Types: deb\n# a comment inside a stanza\nURIs: cdrom:/media mirror+file:/etc/x " + ARCHIVE + "\n"
        "Suites: trixie trixie-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: trixie-security\n"
    )
    (d / "stale.list.disabled").write_text("deb http://disabled.example/debian sid main\n")
    out = mirror(tmp_path)
    assert out.returncode == 0 and out.stdout == f"{ARCHIVE}\n", out.stderr


def test_sources_list_comes_first_then_sources_list_d_by_name(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "b.list").write_text("deb http://b.example/debian sid main\n")
    (d / "a.sources").write_text("Types: deb\nURIs: http://a.example/debian\nSuites: unstable\n")
    assert mirror(tmp_path).stdout == "http://a.example/debian\n"
    (tmp_path / "sources.list").write_text("deb http://first.example/debian stable main\n")
    assert mirror(tmp_path).stdout == "http://first.example/debian\n"


def test_the_environment_overrides_and_no_archive_is_an_error(tmp_path: Path) -> None:
    assert (
        mirror(tmp_path, override="http://override.example/debian").stdout
        == "http://override.example/debian\n"
    )
    (tmp_path / "sources.list").write_text("deb https://vendor.example/apt cloud-sdk-bookworm main\n")
    out = mirror(tmp_path)
    assert out.returncode == 1 and out.stdout == "" and "set VHOSTPCI_VM_MIRROR" in out.stderr


@pytest.mark.parametrize("script", ["run.py", "driver_vms.py", "device_vm.py", "driver_faults.py"])
def test_the_vm_scripts_answer_help(script: str) -> None:
    """Each VM script runs as a program (device_vm.py once lost its __main__ and did nothing, exit 0)."""
    import sys  # noqa: PLC0415

    argv = [sys.executable, str(VM / script), "--help"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.startswith("usage: "), (script, out.stdout, out.stderr)
