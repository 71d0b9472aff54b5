"""Issue 17's defects, each as a user meets it: real processes, sockets and signals."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import MAC_A, MAC_B, UUIDS, wait_for
from tests.integration.test_access import _service
from tests.integration.test_cli import vhostpci
from vhostpci_host.harness import DriverVmProcess, HostServer, host_command


def host(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(host_command(*args), capture_output=True, text=True, timeout=timeout, check=False)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_stops_the_demo_in_order_and_leaves_nothing(short_dir: Path, sig: int, code: int) -> None:
    tmp = short_dir / "t"
    tmp.mkdir()
    demo = subprocess.Popen(
        [sys.executable, "-m", "vhostpci_driver", "demo", "--packets", "10000000", "--size", "64"],
        env={**os.environ, "TMPDIR": str(tmp)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own terminal session: a Ctrl-C is a SIGINT to its foreground group
    )
    children: list[int] = []
    try:
        assert demo.stderr is not None
        ready, _, _ = select.select([demo.stderr], [], [], 60)  # bounded: the demo says when frames flow
        line = demo.stderr.readline() if ready else ""
        assert "switching 10000000 frames between 2 driver VMs" in line, line
        children = _children(demo.pid)
        assert len(children) == 3  # the server and two driver VMs
        assert list(tmp.iterdir())  # the demo's directory and the host side's logs
        os.killpg(demo.pid, sig)  # what the terminal does: the whole foreground group
        assert demo.wait(60) == code
        err = demo.stderr.read()
        assert "failed" not in err and "Broken pipe" not in err and "Traceback" not in err, err
        assert list(tmp.iterdir()) == []
        assert all(_gone(c) for c in children)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(5)
        for c in children:  # in process groups of their own: a failed run must not leave them
            if not _gone(c):
                os.kill(c, signal.SIGKILL)
        for f in (demo.stdout, demo.stderr):
            if f is not None:
                f.close()


def test_the_demo_takes_every_frontend_count_it_allows_and_sends_every_frame() -> None:
    out = vhostpci("demo", "--frontends", "9", "--packets", "100", "--size", "64", "--json", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["schema"] == 1 and summary["frontends"] == 9
    assert summary["packets"]["sent"] == 100 and summary["packets"]["received"] == 100  # 100 = 9 * 11 + 1
    one = vhostpci("demo", "--frontends", "2", "--packets", "1", "--json")
    assert one.returncode == 0 and json.loads(one.stdout)["packets"]["sent"] == 1


def test_a_second_server_does_not_take_over_a_live_socket(short_dir: Path) -> None:
    server = HostServer(short_dir)
    try:
        second = host("serve", "--socket", str(server.socket))
        assert second.returncode == 1 and "already listening there; not taken over" in second.stderr
        assert "Traceback" not in second.stderr
        assert server.socket.is_socket()
        vm = DriverVmProcess(server.socket, [MAC_A], vm_uuid=UUIDS[0], memory="64M")
        try:
            assert Path(server.device_socket(vm.uuid)).is_socket()  # new driver VMs still get a device
        finally:
            vm.stop()
    finally:
        server.stop()
    nowhere = host("serve", "--socket", "/nonexistent/dir/vhost-pci.sock")
    assert nowhere.returncode == 2 and "'/nonexistent/dir' does not exist" in nowhere.stderr
    assert not Path("/nonexistent").exists()
    # the default devices directory (beside the socket) is made, and removed again on exit
    alone = subprocess.Popen(host_command("serve", "--socket", str(short_dir / "s.sock"), "--json"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert alone.stdout is not None and json.loads(alone.stdout.readline())["event"] == "listening"
        assert (short_dir / "s.sock.devices").is_dir()
        alone.send_signal(signal.SIGTERM)
        assert alone.wait(20) == 143
    finally:
        if alone.poll() is None:
            alone.kill()
            alone.wait(5)
        for f in (alone.stdout, alone.stderr):
            if f is not None:
                f.close()
    assert not (short_dir / "s.sock.devices").exists() and not (short_dir / "s.sock").exists()


def test_the_host_tool_says_what_is_wrong_in_one_line(short_dir: Path) -> None:
    too_long = f"/tmp/{'x' * 120}.sock"
    for args, code, says in [
        (["serve", "--socket", too_long], 2, "at most 107"),
        (["frontend", "--server", str(short_dir / "none.sock"), "--net", MAC_A], 1, "cannot connect"),
        (["frontend", "--server", str(short_dir / "s"), "--net", "zz"], 2, "'zz' is not a MAC address"),
        (["frontend", "--server", str(short_dir / "s"), "--net", MAC_A, "--uuid", "notauuid"], 2, "UUID"),
        (
            ["frontend", "--server", str(short_dir / "s"), "--net", MAC_A, "--queue-size", "3"],
            2,
            "power of two",
        ),
        (["serve", "--socket", str(short_dir / "s"), "--ping-interval", "0"], 2, "--ping-interval"),
    ]:
        out = host(*args)
        assert out.returncode == code, (args, out.stderr)
        assert says in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_the_simulator_explains_a_short_send(rig_server: HostServer) -> None:
    vm = DriverVmProcess(rig_server.socket, [MAC_A], memory="64M")
    try:
        vm.send("send zz")
        err = vm.read_event("error", timeout=20)
        assert "usage: send MAC COUNT SIZE|mixed [FRONTEND]" in err["message"], err
        assert "index out of range" not in err["message"]
    finally:
        vm.stop()


@pytest.fixture
def rig_server(short_dir: Path) -> Iterator[HostServer]:
    server = HostServer(short_dir)
    yield server
    server.stop()


def _reap(*procs: subprocess.Popen[str]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        if p.stderr is not None:
            p.stderr.close()


def test_run_polling_serves_its_status_socket(short_dir: Path) -> None:
    server = HostServer(short_dir)
    vm: DriverVmProcess | None = None
    svc: subprocess.Popen[str] | None = None
    try:  # everything after the server in here: a slow start must not leave a process behind
        vm = DriverVmProcess(server.socket, [MAC_A], vm_uuid=UUIDS[0], memory="64M")
        env = {"VHOSTPCI_RUN_DIR": str(short_dir / "run")}
        address = f"vfio-user:{server.device_socket(vm.uuid, 30)}"
        svc = _service(address, env, "--polling")
        vm.read_event("ready", timeout=30)
        vm.send(f"send {MAC_A} 200 128")
        wait_for(
            lambda: vm.stats()["frontends"][0]["received"] >= 200, 30, "loopback traffic under --polling"
        )
        t0 = time.monotonic()
        st = vhostpci("status", address, "--json", env=env, timeout=30)
        assert st.returncode == 0, st.stderr
        assert time.monotonic() - t0 < 4.5  # answered, not the client's 5 s timeout
        assert json.loads(st.stdout)["services"][0]["remote_up"]
        svc.send_signal(signal.SIGINT)
        assert svc.wait(20) == 130
    finally:
        if svc is not None:
            _reap(svc)
        if vm is not None:
            vm.stop()
        server.stop()


def test_run_notices_its_host_going_away_and_a_killed_service_does_not_break_status(short_dir: Path) -> None:
    server = HostServer(short_dir)
    vms: list[DriverVmProcess] = []
    svcs: list[subprocess.Popen[str]] = []
    try:  # everything after the server in here: a slow start must not leave a process behind
        a = DriverVmProcess(server.socket, [MAC_A], vm_uuid=UUIDS[0], memory="64M")
        vms.append(a)
        b = DriverVmProcess(server.socket, [MAC_B], vm_uuid=UUIDS[1], memory="64M")
        vms.append(b)
        env = {"VHOSTPCI_RUN_DIR": str(short_dir / "run")}
        addr_a = f"vfio-user:{server.device_socket(a.uuid, 30)}"
        addr_b = f"vfio-user:{server.device_socket(b.uuid, 30)}"
        # b polls: its removal fd (the vfio-user socket) is watched under --polling too
        svc_a = _service(addr_a, env)
        svcs.append(svc_a)
        svc_b = _service(addr_b, env, "--polling")
        svcs.append(svc_b)
        a.read_event("ready", timeout=30)
        b.read_event("ready", timeout=30)
        svc_a.kill()  # kill -9: its status socket stays behind
        svc_a.wait(10)
        assert len(list((short_dir / "run").glob("*.sock"))) == 2
        st = vhostpci("status", "--json", env=env, timeout=30)
        assert st.returncode == 0, st.stderr
        doc = json.loads(st.stdout)
        assert [s["address"] for s in doc["services"]] == [addr_b] and len(doc["stale"]) == 1
        assert "stale status socket" in st.stderr
        assert vhostpci("status", env=env, timeout=30).returncode == 0
        server.stop()  # the host goes away
        assert svc_b.wait(30) == 1
        assert svc_b.stderr is not None
        err = svc_b.stderr.read()
        assert f"{addr_b}: the host went away" in err and "Traceback" not in err, err
    finally:
        _reap(*svcs)
        for vm in vms:
            vm.stop()
        server.stop()
