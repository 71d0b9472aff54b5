"""The vhostpci command as a user runs it: real subprocesses, real devices over vfio-user."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from tests.integration.conftest import MAC_A, MAC_B, UUIDS, wait_for
from vhostpci_driver.cli import main
from vhostpci_host.harness import DriverVmProcess, HostServer


def vhostpci(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhostpci_driver", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_demo_prints_the_summary_object() -> None:
    out = vhostpci("demo", "--frontends", "2", "--packets", "20000", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["frontends"] == 2
    assert summary["packets"] == {"sent": 20000, "received": 20000, "lost": 0, "corrupt": 0, "duplicates": 0}
    assert summary["acks"] == {"done": summary["requests"], "fail": 0}
    assert summary["throughput"]["pps"] > 0 and summary["elapsed_s"] > 0


def test_run_serves_answers_status_and_dump_and_stops_on_sigterm(short_dir: Path) -> None:
    server = HostServer(short_dir)
    vm = DriverVmProcess(server.socket, [MAC_A], vm_uuid=UUIDS[0], memory="64M")
    address = f"vfio-user:{server.device_socket(vm.uuid)}"
    env = {"VHOSTPCI_RUN_DIR": str(short_dir / "run")}
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify"))
    notify.settimeout(30)
    svc = subprocess.Popen(
        [sys.executable, "-m", "vhostpci_driver", "run", address, "--app", "net-loopback"],
        env={**os.environ, **env, "NOTIFY_SOCKET": str(short_dir / "notify")},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Type=notify: readiness once the function is served (its status socket answers from then on)
        assert notify.recv(4096).split(b"\n")[0] == b"READY=1"
        assert vhostpci("status", address, "--json", env=env).returncode == 0
        vm.read_event("ready", timeout=30)
        vm.send(f"send {MAC_A} 500 256")
        wait_for(lambda: vm.stats()["frontends"][0]["received"] >= 500, 30, "loopback traffic")
        st = vhostpci("status", "--json", env=env)
        assert st.returncode == 0, st.stderr
        (service,) = json.loads(st.stdout)["services"]
        assert service["remote_uuid"] == str(UUIDS[0]) and service["remote_up"]
        assert service["backend"] == "vfio-user"
        assert len(service["regions"]) == 2 and len(service["frontends"]) == 1
        assert service["ports"][MAC_A]["rx_frames"] >= 500
        text = vhostpci("status", env=env)
        assert text.returncode == 0 and "{'" not in text.stdout  # a table, not a dict repr
        (row,) = [ln.split() for ln in text.stdout.splitlines() if ln.strip().startswith("net ")]
        device_id = f"{int(MAC_A.replace(':', ''), 16):#x}"
        assert row[:3] == ["net", device_id, "256,256"] and "VERSION_1" in row, text.stdout
        ok = vhostpci("dump", address, "--xgpa", "0x0", "--len", "32", "--json", env=env)
        assert ok.returncode == 0 and len(bytes.fromhex(json.loads(ok.stdout)["hex"])) == 32
        # already served (under another spelling of the same path): refused, device untouched
        alias = address.replace(str(short_dir), f"{short_dir}/../{short_dir.name}")
        twice = vhostpci("run", alias, env=env, timeout=30)
        assert twice.returncode == 1 and "already serving" in twice.stderr
        assert vhostpci("status", "--json", env=env).returncode == 0  # the first service is unharmed
        bad = vhostpci("dump", address, "--xgpa", "0x200000000", "--len", "16", env=env)
        assert (
            bad.returncode == 1
            and bad.stderr.startswith("vhostpci: error:")
            and "Traceback" not in bad.stderr
        )
        svc.send_signal(signal.SIGTERM)
        assert svc.wait(20) == 143  # 128 + SIGTERM, after a clean stop
        assert notify.recv(4096) == b"STOPPING=1"
        assert not list((short_dir / "run").glob("*.sock"))  # the status socket is gone
        gone = vhostpci("status", env=env)
        assert gone.returncode == 1 and "no vhostpci service is running" in gone.stderr
    finally:
        if svc.poll() is None:
            svc.kill()
            svc.wait(5)
        if svc.stderr is not None:
            svc.stderr.close()
        notify.close()
        vm.stop()
        server.stop()


def test_run_serves_two_functions_with_one_switch(short_dir: Path) -> None:
    """'vhostpci run A B', as the VM tier's device VM starts it: one switch between two driver VMs'
    functions, both in each function's status, and a port's final counters logged as it goes."""
    server = HostServer(short_dir)
    vms = [
        DriverVmProcess(server.socket, [mac], vm_uuid=u, memory="64M")
        for mac, u in zip((MAC_A, MAC_B), UUIDS[:2], strict=True)
    ]
    addresses = [f"vfio-user:{server.device_socket(vm.uuid)}" for vm in vms]
    env = {"VHOSTPCI_RUN_DIR": str(short_dir / "run")}
    log = short_dir / "run.log"
    with log.open("wb") as err:
        svc = subprocess.Popen([sys.executable, "-m", "vhostpci_driver", "run", *addresses],
                               env={**os.environ, **env}, stderr=err)  # fmt: skip
    try:
        for vm in vms:
            vm.read_event("ready", timeout=30)
        vms[0].send(f"send {MAC_B} 300 256")
        vms[1].send(f"send {MAC_A} 200 512")
        wait_for(
            lambda: [vm.stats()["frontends"][0]["received"] for vm in vms] == [200, 300], 30, "switching"
        )
        st = vhostpci("status", "--json", env=env)
        assert st.returncode == 0, st.stderr
        services = json.loads(st.stdout)["services"]
        assert sorted(s["address"] for s in services) == sorted(addresses)
        for s in services:  # one switch: each function's status shows both ports
            assert s["ports"][MAC_A]["tx_unicast"] == 300 and s["ports"][MAC_B]["tx_unicast"] == 200
            assert s["ports"][MAC_A]["rx_frames"] == 200 and s["ports"][MAC_B]["rx_frames"] == 300
        for vm in vms:
            assert vm.stats()["frontends"][0]["corrupt"] == 0
        vms[1].stop()  # its frontend goes, and with it its port: the log keeps the last counters
        wait_for(lambda: b" down: " in log.read_bytes(), 30, "the port's last counters in the log")
        line = next(ln for ln in log.read_text().splitlines() if " down: " in ln)
        final = json.loads(line.split(" down: ", 1)[1])
        assert final["mac"] == MAC_B and (final["tx_unicast"], final["rx_frames"]) == (200, 300)
        assert final["dropped"] == 0
        svc.send_signal(signal.SIGTERM)
        assert svc.wait(20) == 143
    finally:
        if svc.poll() is None:
            svc.kill()
            svc.wait(5)
        for vm in vms:
            vm.stop()
        server.stop()


def test_errors_are_one_line_with_exit_codes(short_dir: Path) -> None:
    missing = vhostpci("run", f"vfio-user:{short_dir}/nothing.sock")
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and missing.stderr.startswith("vhostpci: error:")
    assert "cannot connect" in missing.stderr
    bad = vhostpci("run", "not-an-address")
    assert bad.returncode == 2 and "neither a PCI address" in bad.stderr  # a usage error
    usage = vhostpci("demo", "--frontends", "0")
    assert usage.returncode == 2
    debug = vhostpci("--debug", "run", f"vfio-user:{short_dir}/nothing.sock")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_help_through_click() -> None:
    runner = CliRunner()
    for cmd in ([], ["run"], ["status"], ["dump"], ["demo"]):
        res = runner.invoke(main, [*cmd, "--help"])
        assert res.exit_code == 0 and "Usage:" in res.output


def test_run_watch_follows_the_system_and_stops_on_sigterm(tmp_path: Path) -> None:
    from tests.unit.test_sysfs import fake_tree  # noqa: PLC0415

    root = fake_tree(tmp_path / "sys")
    # A vhost-pci function already bound to vfio-pci: --watch tries it (no /dev/vfio here: it says why).
    dev = root / "devices/pci0000:00/0000:00:04.0"
    (dev / "driver").unlink()
    os.symlink(root / "bus/pci/drivers/vfio-pci", dev / "driver")
    env = {**os.environ, "VHOSTPCI_SYSFS_ROOT": str(root), "VHOSTPCI_RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.Popen([sys.executable, "-m", "vhostpci_driver", "run", "--watch"], env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stderr is not None
        lines = []
        while not any("watching for vhost-pci functions" in ln for ln in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert any("cannot serve 0000:00:04.0" in ln and "/dev/vfio" in ln for ln in lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()


def test_run_refuses_a_function_that_is_not_vhost_pci(tmp_path: Path) -> None:
    from tests.unit.test_sysfs import fake_tree  # noqa: PLC0415

    root = fake_tree(tmp_path / "sys")
    env = {"VHOSTPCI_SYSFS_ROOT": str(root), "VHOSTPCI_RUN_DIR": str(tmp_path / "run")}
    out = vhostpci("run", "00:06.0", env=env)  # the short spelling 'bind' takes is taken here too
    assert out.returncode == 1, out.stderr
    assert "0000:00:06.0 is 8086:100e, not a vhost-pci function; not touched" in out.stderr
    gone = vhostpci("run", "0000:00:0a.0", env=env)
    assert gone.returncode == 1 and "no PCI function" in gone.stderr


def test_run_needs_an_address_or_watch() -> None:
    out = vhostpci("run")
    assert out.returncode == 2 and "--watch" in out.stderr
