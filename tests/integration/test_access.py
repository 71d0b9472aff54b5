"""Who may talk to what, checked with a real second user (docs/security.md).

These run commands as ``nobody`` (uid 65534), a real account of every Debian
system, so they need root to start; as anyone else they skip and say why.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import MAC_A, UUIDS, wait_for
from vhostpci_host.harness import DriverVmProcess, HostServer

try:
    NOBODY = pwd.getpwnam("nobody")
except KeyError:  # pragma: no cover - every Debian system has it
    NOBODY = None


REPO = Path(__file__).resolve().parents[2]
# What nobody runs: this interpreter may live where nobody cannot reach (pyenv under /root), so
# fall back to the system's Python of the same version with this checkout and its packages on the path.
PATH_ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tools"), sysconfig.get_paths()["purelib"]])}
PYTHONS = [sys.executable, f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"]


def _as_nobody(
    argv: list[str], env: dict[str, str] | None = None, python: str | None = None
) -> subprocess.CompletedProcess[str]:
    assert NOBODY is not None
    if argv[0] == "python":
        argv = [python or PYTHON or sys.executable, *argv[1:]]
    return subprocess.run(
        argv,
        env={**os.environ, **PATH_ENV, **(env or {})},
        user=NOBODY.pw_uid,
        group=NOBODY.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _find_python() -> tuple[str | None, str]:
    """An interpreter nobody can run this checkout with, or None and why not."""
    if os.geteuid() != 0:
        return None, "needs root to run commands as a second user (nobody)"
    if NOBODY is None:
        return None, "this system has no 'nobody' user"
    why = ""
    for python in PYTHONS:
        try:
            probe = _as_nobody(["python", "-c", "import vhostpci_driver.cli"], python=python)
        except OSError as e:
            why += f"{python}: {e.strerror}; "
            continue
        if probe.returncode == 0:
            return python, ""
        why += f"{python}: {probe.stderr.strip().splitlines()[-1:]}; "
    return None, f"user nobody cannot run this checkout: {why}"


PYTHON, WHY_NOT = _find_python()
pytestmark = pytest.mark.skipif(PYTHON is None, reason=WHY_NOT)


@pytest.fixture
def open_dir(short_dir: Path) -> Iterator[Path]:
    """``short_dir``, traversable by others (mkdtemp makes it 0700), so only the modes under test decide."""
    short_dir.chmod(0o755)
    yield short_dir


def _connect_as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
    """Connect to ``path`` as nobody; print 'refused:ERRNO', or what the server said before closing."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(10)\n"
        "try:\n"
        f"    s.connect({str(path)!r})\n"
        "except OSError as e:\n"
        "    print('refused:' + str(e.errno)); sys.exit(0)\n"
        "print('closed' if s.recv(1) == b'' else 'open')\n"
    )
    return _as_nobody(["python", "-c", code])


def test_another_uid_cannot_reach_the_server_socket(open_dir: Path) -> None:
    server = HostServer(open_dir)
    try:
        assert server.socket.stat().st_mode & 0o777 == 0o600
        out = _connect_as_nobody(server.socket)
        assert out.stdout.strip() == "refused:13", out  # EACCES: the socket's mode stops it
        # Behind a careless mode, the server's own check (SO_PEERCRED against the allow list) still does.
        server.socket.chmod(0o666)
        out = _connect_as_nobody(server.socket)
        assert out.stdout.strip() == "closed", out
        ev = server.read_event("refused", 10)
        assert ev["uid"] == NOBODY.pw_uid and ev["why"] == "uid not allowed"  # type: ignore[union-attr]
        # and the server still serves its own users
        vm = DriverVmProcess(server.socket, [MAC_A], vm_uuid=UUIDS[0], memory="64M")
        assert server.device_socket(vm.uuid)
        vm.stop()
    finally:
        server.stop()


def _service(address: str, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vhostpci_driver", "run", address, "--app", "net-loopback", *extra],
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(svc: subprocess.Popen[str]) -> str:
    if svc.poll() is None:
        svc.terminate()
        try:
            svc.wait(20)
        except subprocess.TimeoutExpired:
            svc.kill()
            svc.wait(5)
    assert svc.stderr is not None
    err = svc.stderr.read()
    svc.stderr.close()
    return err


def _proc_ids(pid: int) -> tuple[int, int, list[int]]:
    fields = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines())
    return (
        int(fields["Uid"].split()[1]),  # effective
        int(fields["Gid"].split()[1]),
        [int(g) for g in fields["Groups"].split()],
    )


def test_status_needs_the_services_group_and_run_user_drops_root(open_dir: Path) -> None:
    server = HostServer(open_dir)
    vm = DriverVmProcess(server.socket, [MAC_A], vm_uuid=UUIDS[0], memory="64M")
    address = f"vfio-user:{server.device_socket(vm.uuid)}"
    run = open_dir / "run"
    run.mkdir(mode=0o755)
    env = {"VHOSTPCI_RUN_DIR": str(run)}
    svc = _service(address, env)
    try:
        vm.read_event("ready", timeout=30)
        (sock,) = run.glob("*.sock")
        assert sock.stat().st_mode & 0o777 == 0o660 and sock.stat().st_gid == 0
        denied = _as_nobody(["python", "-m", "vhostpci_driver", "status"], env)
        assert denied.returncode == 1, denied
        assert "permission denied" in denied.stderr and "--user" in denied.stderr
        dump = _as_nobody(
            ["python", "-m", "vhostpci_driver", "dump", address, "--xgpa", "0", "--len", "16"], env
        )
        assert dump.returncode == 1 and "permission denied" in dump.stderr  # dump: same access as status
    finally:
        _stop(svc)
        vm.stop()
        server.stop()

    # Again with --user: the service gives up root once the device is open and keeps serving.
    server = HostServer(open_dir)
    vm = DriverVmProcess(server.socket, [MAC_A], vm_uuid=UUIDS[1], memory="64M")
    address = f"vfio-user:{server.device_socket(vm.uuid)}"
    svc = _service(address, env, "--user", "nobody", "-v")
    try:
        vm.read_event("ready", timeout=30)
        wait_for(lambda: _proc_ids(svc.pid)[0] == NOBODY.pw_uid, 10, "the service to drop root")  # type: ignore[union-attr]
        uid, gid, groups = _proc_ids(svc.pid)
        assert (uid, gid) == (NOBODY.pw_uid, NOBODY.pw_gid) and 0 not in groups  # type: ignore[union-attr]
        vm.send(f"send {MAC_A} 300 256")
        wait_for(lambda: vm.stats()["frontends"][0]["received"] >= 300, 30, "traffic after the drop")
        (sock,) = run.glob("*.sock")
        assert (sock.stat().st_uid, sock.stat().st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)  # type: ignore[union-attr]
        mine = _as_nobody(["python", "-m", "vhostpci_driver", "status", "--json"], env)
        assert mine.returncode == 0, mine.stderr  # the service's own user may ask
        assert json.loads(mine.stdout)["services"][0]["remote_uuid"] == str(UUIDS[1])
    finally:
        err = _stop(svc)
        vm.stop()
        server.stop()
    assert svc.returncode == 143, err  # stopped by SIGTERM, cleanly
    assert "running as nobody" in err


def test_run_user_refuses_an_unknown_user_before_touching_anything(open_dir: Path) -> None:
    address = f"vfio-user:{open_dir}/x.sock"
    out = subprocess.run(
        [sys.executable, "-m", "vhostpci_driver", "run", address, "--user", "no-such-user"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 1 and "no user named 'no-such-user'" in out.stderr
