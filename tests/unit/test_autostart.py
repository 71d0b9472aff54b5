"""list/bind/unbind against a fake sysfs, install-udev into a prefix, the udev rule and the unit file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.unit.test_sysfs import fake_tree
from vhostpci_driver.cli import entry_point, main
from vhostpci_driver.command import SCHEMA

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
    doc = json.loads(out.output)
    assert doc["schema"] == SCHEMA
    assert doc["functions"] == [
        {"address": "0000:00:04.0", "vendor": "1af4", "device": "107f", "name": "Virtio vhost-pci",
         "driver": "virtio-pci", "unused": ["vfio-pci", "uio_pci_generic"], "iommu_group": 5,
         "service": False}
    ]  # fmt: skip
    text = r.invoke(main, ["list"], env=env).output
    assert text == (
        "0000:00:04.0 [1af4:107f] 'Virtio vhost-pci' drv=virtio-pci unused=vfio-pci,uio_pci_generic "
        "iommu_group=5 service=none\n"
    )
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
    unit = (tmp_path / "etc/systemd/system/vhostpci@.service").read_text()
    # this installation's vhostpci by absolute path (a venv's too), not whatever 'env' finds on PATH
    exe = entry_point()
    assert Path(exe).is_absolute() and Path(exe).is_file() and Path(sys.executable).parent == Path(exe).parent
    for line in ("ExecStartPre=", "ExecStart=", "ExecStopPost="):
        (cmd,) = [ln for ln in unit.splitlines() if ln.startswith(line)]
        assert cmd.startswith(f"{line}{exe} "), cmd
    assert "/usr/bin/env" not in unit and "@" not in unit.replace("vhostpci@", "").replace("%I", "")
    assert "Type=notify" in unit and "SuccessExitStatus=143" in unit
    (doc,) = [ln.removeprefix("Documentation=file://") for ln in unit.splitlines() if ln.startswith("Doc")]
    assert Path(doc).is_file() and Path(doc).name == "cli.md"
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


def test_the_vfio_group_is_given_only_vhost_pci_functions_nodes() -> None:
    cdev = {"ACTION": "add", "SUBSYSTEM": "vfio-dev", "KERNEL": "vfio0", "ATTRS{vendor}": "0x1af4",
            "ATTRS{device}": "0x107f"}  # fmt: skip
    assert rule_matches(cdev) == ['GROUP="vhostpci"', 'MODE="0660"']
    assert rule_matches({**cdev, "ATTRS{device}": "0x1042"}) == []  # a virtio-blk disk's node: not ours
    assert rule_matches({"ACTION": "add", "SUBSYSTEM": "vfio", "KERNEL": "5"}) == []  # no group node for all


def test_unit_file_is_valid(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    res = CliRunner().invoke(main, ["install-udev", "--prefix", str(tmp_path)])
    assert res.exit_code == 0, res.output
    unit = tmp_path / "vhostpci@0000:00:04.0.service"
    unit.write_text((tmp_path / "etc/systemd/system/vhostpci@.service").read_text())
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    if out.returncode != 0:
        # Problems with our unit name it; anything else is this machine's systemd not being able to verify.
        assert "vhostpci@" not in out.stderr, out.stderr
        pytest.skip(f"systemd-analyze cannot verify units here: {out.stderr.strip()[:200]}")
    assert "BindsTo=sys-subsystem-pci-devices-%i.device" in UNIT.read_text()


def _untouched(tmp_path: Path, addr: str) -> bool:
    return (tmp_path / f"sys/bus/pci/devices/{addr}/driver_override").read_text() == "(null)\n"


def test_unbind_refuses_what_this_tool_did_not_bind(env: dict[str, str], tmp_path: Path) -> None:
    r = CliRunner()
    # the README's example address on a machine where it is another virtio device (issue 17, 1)
    res = r.invoke(main, ["unbind", "0000:00:05.0"], env=env)
    assert res.exit_code == 1 and "1af4:1041, not a vhost-pci function: not touched" in res.output
    assert _untouched(tmp_path, "0000:00:05.0")
    res = r.invoke(main, ["unbind", "0000:00:04.0"], env=env)  # vhost-pci, but never bound by us
    assert res.exit_code == 1 and "was not bound by 'vhostpci bind'" in res.output and "--force" in res.output
    assert _untouched(tmp_path, "0000:00:04.0")
    res = r.invoke(main, ["unbind", "0000:00:09.0"], env=env)  # no such function, none bound
    assert res.exit_code == 1 and "no PCI function 0000:00:09.0" in res.output
    res = r.invoke(main, ["unbind", "0000:00:05.0", "--force"], env=env)
    assert res.exit_code == 0 and "returned to the default driver" in res.output


def test_bind_and_unbind_refuse_a_function_a_service_is_serving(env: dict[str, str], tmp_path: Path) -> None:
    from vhostpci_driver.status import StatusServer, socket_name  # noqa: PLC0415

    r = CliRunner()
    st = StatusServer(tmp_path / "run" / socket_name("0000:00:04.0"), lambda: {}, lambda x, n: b"")
    try:
        res = r.invoke(main, ["bind", "00:04.0"], env=env)
        assert res.exit_code == 1 and "is being served by a running 'vhostpci run'" in res.output
        assert _untouched(tmp_path, "0000:00:04.0")
        listed = json.loads(r.invoke(main, ["list", "--json"], env=env).output)["functions"]
        assert listed[0]["service"] is True
    finally:
        st.close()
    assert r.invoke(main, ["bind", "00:04.0"], env=env).exit_code == 0  # '00:04.0' is 0000:00:04.0
    st = StatusServer(tmp_path / "run" / socket_name("0000:00:04.0"), lambda: {}, lambda x, n: b"")
    try:
        res = r.invoke(main, ["unbind", "0000:00:04.0"], env=env)
        assert res.exit_code == 1 and "is being served" in res.output
    finally:
        st.close()
    # a socket left behind by a killed service is not a service
    (tmp_path / "run" / socket_name("0000:00:04.0")).touch()
    assert r.invoke(main, ["unbind", "0000:00:04.0"], env=env).exit_code == 0


def test_usage_errors_are_exit_2_with_click_types(env: dict[str, str]) -> None:
    r = CliRunner()
    for args, says in [
        (["list", "--virtio-id", "-1"], "--virtio-id"),
        (["dump", "0000:00:04.0", "--xgpa", "zz"], "'zz' is not an integer"),
        (["dump", "0000:00:04.0", "--xgpa", "-5"], "-5 is outside 0.."),
        (["bench", "--only", "nosuch"], "'ring-batch'"),  # the valid names are listed
        (["demo", "--size", "63"], "64..65536"),
        (["run", "not-an-address"], "neither a PCI address"),
        (["bind", "vfio-user:/x.sock"], "not a PCI address"),
    ]:
        res = r.invoke(main, args, env=env)
        assert res.exit_code == 2, (args, res.output)
        assert says in res.output and "invalid literal" not in res.output, (args, res.output)
    assert (
        "XGPA" in r.invoke(main, ["dump", "--help"]).output
        and "LAMBDA" not in r.invoke(main, ["dump", "--help"]).output
    )
    assert "about a minute" not in r.invoke(main, ["bench", "--help"]).output


def test_bench_names_match_the_suite() -> None:
    import inspect  # noqa: PLC0415

    from vhostpci_driver import bench, cli  # noqa: PLC0415

    assert cli.BENCHMARKS == bench.BENCHMARKS
    src = inspect.getsource(bench.run_bench)
    named = set(re.findall(r'want\("([a-z0-9-]+)"\)', src)) | set(
        re.findall(r'"(net-switch-[a-z0-9]+)"\)', src)
    )
    assert named == set(bench.BENCHMARKS)


def test_errors_under_json_are_json(env: dict[str, str]) -> None:
    res = CliRunner().invoke(main, ["status", "--json"], env=env)
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert doc == {"schema": SCHEMA, "error": {"kind": "failure", "exit_code": 1,
                   "message": "no vhostpci service is running (start one with 'vhostpci run')"}}  # fmt: skip
    res = CliRunner().invoke(main, ["list", "--json", "--virtio-id", "x"], env=env)
    assert res.exit_code == 2 and json.loads(res.stdout)["error"]["kind"] == "usage"
