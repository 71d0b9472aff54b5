"""list/bind/unbind against a fake sysfs, install-udev into a prefix, the udev rule and the unit file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.unit.test_sysfs import fake_tree
from vhostpci_driver.cli import main

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "udev/90-vhostpci.rules"
UNIT = ROOT / "udev/vhostpci@.service"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    fake_tree(tmp_path / "sys")
    return {"VHOSTPCI_SYSFS_ROOT": str(tmp_path / "sys"), "VHOSTPCI_RUN_DIR": str(tmp_path / "run")}


def test_list_bind_unbind(env: dict[str, str], tmp_path: Path) -> None:
    r = CliRunner()
    out = r.invoke(main, ["list", "--json"], env=env)
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["functions"] == [
        {"address": "0000:00:04.0", "driver": "virtio-pci", "iommu_group": 5, "service": False}
    ]
    res = r.invoke(main, ["bind", "0000:00:04.0"], env=env)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "sys/bus/pci/devices/0000:00:04.0/driver_override").read_text() == "vfio-pci"
    res = r.invoke(main, ["unbind", "0000:00:04.0"], env=env)
    assert res.exit_code == 0 and "returned to virtio-pci" in res.output


def test_unbind_of_an_unplugged_function_succeeds(env: dict[str, str], tmp_path: Path) -> None:
    r = CliRunner()
    assert r.invoke(main, ["bind", "0000:00:04.0"], env=env).exit_code == 0
    (tmp_path / "sys/bus/pci/devices/0000:00:04.0").unlink()  # hot-unplugged while bound
    res = r.invoke(main, ["unbind", "0000:00:04.0"], env=env)
    assert res.exit_code == 0 and "is gone (unplugged): nothing to give back" in res.output, res.output
    assert not list((tmp_path / "run").rglob("0000:00:04.0.driver"))  # its saved driver is forgotten


def test_bind_refuses_other_devices_unless_forced(env: dict[str, str]) -> None:
    r = CliRunner()
    res = r.invoke(main, ["bind", "0000:00:06.0"], env=env)
    assert res.exit_code == 1 and "not a vhost-pci function" in res.output and "--force" in res.output
    res = r.invoke(main, ["bind", "0000:00:06.0", "--force"], env=env)
    assert res.exit_code == 0 and "also holds 0000:00:05.0" in res.output  # a shared group, explained


def test_bind_explains_a_missing_iommu(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "sys/devices/pci0000:00/0000:00:04.0/iommu_group").unlink()
    res = CliRunner().invoke(main, ["bind", "0000:00:04.0"], env=env)
    assert res.exit_code == 1 and "no IOMMU" in res.output and "intel_iommu=on" in res.output


def test_install_udev_into_a_prefix(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["install-udev", "--prefix", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "etc/udev/rules.d/90-vhostpci.rules").read_bytes() == RULES.read_bytes()
    assert (tmp_path / "etc/systemd/system/vhostpci@.service").read_bytes() == UNIT.read_bytes()
    sysusers = (tmp_path / "etc/sysusers.d/vhostpci.conf").read_text()
    assert re.search(r"^u vhostpci ", sysusers, re.M)  # the user the unit's --user names


def rule_matches(props: dict[str, str]) -> list[str]:
    """Evaluate the rules file's match keys (==) against recorded properties; return what it assigns."""
    text = RULES.read_text().replace("\\\n", " ")
    assigned: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in re.split(r",\s*(?=[A-Z])", line)]
        matches = [re.match(r"^([A-Z]+(?:\{[^}]+\})?)(==|!=)\"([^\"]*)\"$", p) for p in parts]
        keys = [m for m in matches if m]
        if all((props.get(m.group(1)) == m.group(3)) == (m.group(2) == "==") for m in keys):
            assignments = [p for p, m in zip(parts, matches, strict=True) if not m]
            assigned += [p.replace("$kernel", props["KERNEL"]) for p in assignments]
    return assigned


def test_the_rule_matches_a_recorded_vhost_pci_function_only() -> None:
    vhost_pci = {"ACTION": "add", "SUBSYSTEM": "pci", "KERNEL": "0000:00:04.0", "ATTR{vendor}": "0x1af4",
                 "ATTR{device}": "0x107f"}  # fmt: skip
    got = rule_matches(vhost_pci)
    assert 'ENV{SYSTEMD_WANTS}+="vhostpci@0000:00:04.0.service"' in got and 'TAG+="systemd"' in got
    assert rule_matches({**vhost_pci, "ATTR{device}": "0x1041"}) == []  # virtio-net: not ours
    assert rule_matches({**vhost_pci, "ACTION": "remove"}) == []
    # 'vhostpci bind' makes unbind and bind events: the device keeps its systemd tag through them
    for action in ("bind", "unbind", "change"):
        assert 'TAG+="systemd"' in rule_matches({**vhost_pci, "ACTION": action})


def test_unit_file_is_valid(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = tmp_path / "vhostpci@0000:00:04.0.service"
    unit.write_text(UNIT.read_text())
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    if out.returncode != 0:
        # Problems with our unit name it; anything else is this machine's systemd not being able to verify.
        assert "vhostpci@" not in out.stderr, out.stderr
        pytest.skip(f"systemd-analyze cannot verify units here: {out.stderr.strip()[:200]}")
    assert "BindsTo=sys-subsystem-pci-devices-%i.device" in UNIT.read_text()
