"""The cached sid chroot as the VM scripts use it: the project bind-mounted in, /proc, /sys, /dev.

tools/vm/run.py (the device VM) and tools/vm/driver_vms.py (stock QEMU driver VMs)
both run QEMU inside the chroot tools/vm/prepare built; this is their one way in
and out of it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("VHOSTPCI_VM_CACHE", "/var/tmp/vhostpci-vm"))
ROOT = CACHE / "sid"


def enter(repo: Path, run_sub: str) -> tuple[Path, list[Path]]:
    """Mount what the guests need; returns a fresh run directory ``ROOT/run/run_sub`` and the mounts made."""
    project = ROOT / "project"
    project.mkdir(exist_ok=True)
    run_dir = ROOT / "run" / run_sub
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    mounts: list[tuple[list[str], Path]] = []
    if not bind_project(repo, project):  # already this checkout: an outer run's, kept for it
        mounts.append((["mount", "--bind", str(repo), str(project)], project))
    for what, opts in (
        ("proc", ["-t", "proc", "proc"]),
        ("sys", ["--rbind", "/sys"]),
        ("dev", ["--rbind", "/dev"]),
    ):
        if not _is_mountpoint(ROOT / what):  # the same whoever mounted them
            mounts.append((["mount", *opts, str(ROOT / what)], ROOT / what))
    mounted: list[Path] = []
    try:
        for argv, target in mounts:
            subprocess.run(argv, check=True)
            mounted.append(target)
    except BaseException:
        leave(mounted)
        raise
    return run_dir, mounted


def bind_project(repo: Path, project: Path) -> bool:
    """Whether ``project`` shows ``repo`` already; else whatever is mounted there is let go.

    A run killed before :func:`leave` (a CI job stopped at its time limit, say) leaves its
    checkout bound at ``project``; once that checkout is deleted, the guests of every later
    run saw an empty /project and failed in their first seconds. So a mount is reused only
    when it is this very directory (the same device and inode), as an outer run of the same
    checkout made it.
    """
    if not _is_mountpoint(project):
        return False
    here, there = project.stat(), repo.stat()
    if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
        return True
    subprocess.run(["umount", "-l", str(project)], check=True)  # lazily: a stale guest may hold it
    return False


def _is_mountpoint(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode == 0


def leave(mounted: list[Path]) -> None:
    """Undo :func:`enter`'s mounts, last first (lazily: a guest's 9p may still hold them)."""
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


def vng(kernel: str, *, cpus: int, memory: str, qemu_opts: str, out: str, command: str,
        extra: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """virtme-ng booting ``kernel`` under TCG on the chroot as its 9p root, running ``command`` as root.

    ``out`` is a directory writable from the guest (the root is read-only); ``extra`` goes
    before ``--qemu-opts`` (``--append``, ``--systemd``).
    """
    return [
        "chroot", str(ROOT), "vng", "--disable-kvm", "--force-9p", "--cpus", str(cpus), "--memory", memory,
        "--run", kernel, "--user", "root", *extra,
        f"--qemu-opts={qemu_opts}",  # "=": the value starts with "-"
        f"--rwdir={out}={out}", "--exec", command,
    ]  # fmt: skip


def stop_vm(vm: subprocess.Popen[bytes]) -> None:
    """Kill a VM a script started that is still running, with its descendants: killing vng alone
    leaves its QEMU running (and holding the guest's sockets and memory)."""
    if vm.poll() is not None:
        return
    for pid in [vm.pid, *_descendants(vm.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    vm.wait(10)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux's /proc/PID/task/TID/children), children first."""
    found: list[int] = []
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:  # gone meanwhile
                continue
            found += kids
            todo += kids
    return found
