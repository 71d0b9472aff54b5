"""Boot a real device VM with the reference vhost-pci device on vfio-user-pci, run a command in it.

The guest is the prepared Debian sid chroot (tools/vm/prepare) booted by
virtme-ng under TCG with a virtual IOMMU (interrupt remapping on, so the
guest's vfio-pci accepts the function). On the host, the vhost-pci server and
a simulated driver VM run as processes; the device's vfio-user socket lives
inside the chroot, where QEMU finds it. The project is bind-mounted at
/project. The guest command's output and exit status come back; the driver
VM's traffic counters are printed after it. Everything started is stopped,
even on failure, and every step has a timeout.

    python3 tools/vm/run.py [--send N] [--systemd] [--kernel vhostpci] [--no-viommu]
                            [--append ARGS] -- 'guest command'

``--systemd`` boots the guest with systemd as init (so udev rules can start
units); the guest can always ask for a second device to be hot-plugged and
unplugged through its control port (tools/vm/hotplug.py). ``--kernel
vhostpci`` boots the kernel tools/vm/prepare-kernel built (iommufd, the VFIO
device cdev, no-IOMMU mode) instead of Debian's; ``--no-viommu`` leaves out the
virtual IOMMU (for VFIO's no-IOMMU mode).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(Path(__file__).resolve().parent)]

import chroot  # noqa: E402  (tools/vm, beside this file)
from hotplug import HotplugController, qemu_options  # noqa: E402  (tools/vm, beside this file)

from vhostpci_host.harness import DriverVmProcess, HostServer  # noqa: E402

ROOT = chroot.ROOT
MAC = "52:54:00:00:00:aa"
OUT_DIR = "/var/tmp/vpout"  # in the chroot and, through --rwdir, in the guest
VM_UUID = uuid.UUID("7e57ab1e-0000-4000-8000-00000000a001")


def fail(msg: str, code: int = 1) -> None:
    print(f"vm-run: error: {msg}", file=sys.stderr)
    sys.exit(code)


def kernel(which: str) -> str:
    """The guest kernel's path inside the chroot: Debian's packaged one, or ours (prepare-kernel)."""
    if which == "vhostpci":
        if not (ROOT / "boot/vhostpci/.ready").exists():
            fail(f"no kernel built at {ROOT}/boot/vhostpci: run tools/vm/prepare-kernel", 3)
        return "/boot/vhostpci/bzImage"
    kernels = sorted((ROOT / "boot").glob("vmlinuz-*"))
    if not kernels:
        fail(f"no kernel in {ROOT}/boot (re-run tools/vm/prepare)")
    return "/boot/" + kernels[-1].name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds for boot plus command")
    ap.add_argument("--send", type=int, default=0, help="frames the driver VM sends once the guest serves it")
    ap.add_argument("--systemd", action="store_true", help="boot with systemd as init (udev starts units)")
    ap.add_argument("--kernel", choices=("debian", "vhostpci"), default="debian",
                    help="Debian's packaged kernel, or the one tools/vm/prepare-kernel built")
    ap.add_argument("--no-viommu", action="store_true", help="no virtual IOMMU (VFIO no-IOMMU mode)")
    ap.add_argument("--append", default="", help="more kernel command line")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = " ".join(args.command).removeprefix("-- ").strip() or "true"
    if not (ROOT / ".vhostpci-ready").exists():
        fail(f"no prepared VM cache at {ROOT}: run tools/vm/prepare", 3)
    run_dir, mounted = chroot.enter(REPO, "vp")
    server = vm = controller = guest_vm = None
    try:
        server = HostServer(run_dir, ping_interval=2.0, ping_misses=30)
        vm = DriverVmProcess(server.socket, [MAC], vm_uuid=VM_UUID, memory="128M")
        host_sock = Path(server.device_socket(vm.uuid))
        guest_sock = "/" + str(host_sock.relative_to(ROOT))
        device = json.dumps(
            {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": guest_sock}, "id": "vhostpci0"}
        )
        # Guest RAM shared by fd, so every DMA_MAP QEMU sends carries an fd (vfio-user-notes.md).
        qemu_opts = (
            "-object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem "
            + ("" if args.no_viommu else "-device intel-iommu,intremap=on,caching-mode=on ")
            + f"-device '{device}' "
            + qemu_options("/" + str(run_dir.relative_to(ROOT)))
        )
        # The command's output goes to a file the host reads afterwards: a console can lose the end
        # of it when the guest powers off (it does with systemd as init).
        out_dir = ROOT / OUT_DIR.lstrip("/")
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        guest = (
            f"cd /project && export PYTHONPATH=/project:/project/tools VHOSTPCI_RUN_DIR=/run/vhostpci "
            f"VHOSTPCI_IN_GUEST=1 PYTHONUNBUFFERED=1 && {{ {cmd} ; }} > {OUT_DIR}/guest.log 2>&1"
        )
        argv = chroot.vng(
            kernel(args.kernel), cpus=2, memory="1G", qemu_opts=qemu_opts, out=OUT_DIR, command=guest,
            # iommu=pt: devices the kernel's DMA API serves (and UIO's, which bypass it) see guest
            # physical addresses; vfio-pci still puts its functions in IOMMU domains of their own.
            extra=(f"--append=intel_iommu=on iommu=pt {args.append}".strip(),
                   *(["--systemd"] if args.systemd else [])),
        )  # fmt: skip
        print(f"vm-run: booting {kernel(args.kernel)} with {guest_sock}", file=sys.stderr, flush=True)
        sender = threading.Thread(target=_send_when_ready, args=(vm, args.send), daemon=True)
        sender.start()
        controller = HotplugController(server, run_dir, "/" + str(run_dir.relative_to(ROOT)))
        threading.Thread(target=controller.serve, args=(args.timeout,), daemon=True).start()
        started = time.monotonic()
        guest_vm = subprocess.Popen(argv)
        try:
            rc = guest_vm.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            _show_guest_log(out_dir)
            fail(f"the guest did not finish within {args.timeout}s")
        _show_guest_log(out_dir)
        print(
            f"vm-run: guest finished with status {rc} in {time.monotonic() - started:.1f}s",
            file=sys.stderr,
        )
        try:
            stats = vm.stats(timeout=5)["frontends"][0]
            print("vm-run: driver VM traffic " + json.dumps({k: stats[k] for k in
                  ("sent", "received", "duplicates", "corrupt")}), file=sys.stderr)  # fmt: skip
        except Exception as e:
            print(f"vm-run: no traffic report: {e}", file=sys.stderr)
        for line in controller.log:
            print(f"vm-run: hot-plug control: {line}", file=sys.stderr)
        return rc
    finally:
        if controller is not None:
            controller.close()
        if vm is not None:
            vm.stop()
        if server is not None:
            print("vm-run: host server log (tail):\n" + server.stderr_tail(25), file=sys.stderr)
            server.stop()
        if guest_vm is not None:
            chroot.stop_vm(guest_vm)
        chroot.leave(mounted)


def _show_guest_log(out_dir: Path) -> None:
    log = out_dir / "guest.log"
    sys.stdout.write(log.read_text(errors="replace") if log.exists() else "vm-run: the guest wrote no log\n")
    sys.stdout.flush()


def _send_when_ready(vm: DriverVmProcess, count: int) -> None:
    """Once the guest's driver has acked everything, the driver VM sends ``count`` frames to itself."""
    if not count:
        return
    try:
        vm.read_event("ready", timeout=600)
        vm.send(f"send {MAC} {count} 256")
    except Exception as e:
        print(f"vm-run: driver VM never became ready: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
