"""The VM tier's full configuration: two stock QEMU driver VMs linked only by our switch in a device VM.

Issue 18 item 5: the vhost-pci server and one vhost-user front door per driver
VM run on the host; the two driver VMs are tools/vm/driver_vms.py's (Debian's
kernel under TCG, ``virtio-net-pci`` on a ``vhost-user`` netdev, memfd RAM, no
other network device). Each driver VM's vhost-pci device socket appears once
its memory table arrives; then a stock QEMU device VM boots (TCG, a virtual
IOMMU, memfd RAM) with both devices attached by QEMU's own ``vfio-user-pci``,
and inside it our toolkit serves them as a user would start it
(tools/vm/device_guest.py: ``vhostpci bind`` both to vfio-pci, one ``vhostpci
run`` with the net switch serving both, ``vhostpci status --json``). In the
driver VMs: IPv6 link-local only, ping6 both ways, then a bounded TCP transfer
whose sha256 must match at both ends. The switch's counters come back from the
device VM's status samples and from its run's log (each port's counters as it
went down). Every step has a timeout; no tap, bridge or user-mode networking.

    python3 tools/vm/device_vm.py [--bytes N] [--timeout S]   (as root, after tools/vm/prepare)

The last line of output is ``device-vm: {json}``: the guests' exit statuses,
seconds from the first QEMU's start to each driver VM's first ping, whether the
sha256s match, the transfer's throughput, the switch's counters (last status
sample with both ports, and the run log's final ones) and the run's exit status.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(Path(__file__).resolve().parent)]

import chroot  # noqa: E402  (tools/vm, beside this file)
from driver_vms import VMS, guest_results, start_doors, start_driver_vms  # noqa: E402
from hotplug import _connect  # noqa: E402

from vhostpci_host.harness import HostServer, JsonProcess  # noqa: E402

ROOT = chroot.ROOT
OUT_DIR = "/var/tmp/vpout-dev"  # in the chroot and, through --rwdir, in the device VM


def device_vm_argv(guest_sockets: list[str], qemu_dir: str, kernel: str) -> list[str]:
    """The device VM's vng command: a vfio-user-pci function per device socket (paths as QEMU sees them)."""
    devices = " ".join(
        "-device '"
        + json.dumps({"driver": "vfio-user-pci", "socket": {"type": "unix", "path": s}, "id": f"vhostpci{i}"})
        + "'"
        for i, s in enumerate(guest_sockets)
    )
    qemu_opts = (
        # Guest RAM shared by fd, so every DMA_MAP QEMU sends carries an fd (vfio-user-notes.md).
        "-object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem "
        "-device intel-iommu,intremap=on,caching-mode=on "
        f"{devices} "
        f"-chardev socket,id=vpctl,path={qemu_dir}/ctl.sock,server=on,wait=off "
        "-device virtio-serial-pci,id=vpserial -device virtserialport,chardev=vpctl,name=vhostpci.ctl"
    )
    guest = (
        f"cd /project && export PYTHONPATH=/project:/project/tools VHOSTPCI_RUN_DIR=/run/vhostpci "
        f"PYTHONUNBUFFERED=1 && python3 tools/vm/device_guest.py --functions {len(guest_sockets)} "
        f"--out {OUT_DIR} > {OUT_DIR}/guest.log 2>&1"
    )
    return chroot.vng(kernel, cpus=2, memory="1G", qemu_opts=qemu_opts, out=OUT_DIR, command=guest,
                      extra=("--append=intel_iommu=on iommu=pt",))  # fmt: skip


class Control:
    """The host's end of the device VM's control port (tools/vm/device_guest.py's lines)."""

    def __init__(self, path: Path, deadline: float) -> None:
        self.sock = _connect(path, deadline)
        self.buf = b""
        self.lines: list[str] = []

    def read(self, timeout: float) -> list[str]:
        """The whole lines that arrived within ``timeout``; an empty list if none did."""
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(1 << 20)
        except TimeoutError:
            return []
        if not chunk:
            raise ConnectionError("the device VM closed its control port")
        self.buf += chunk
        *got, rest = self.buf.split(b"\n")
        self.buf = rest
        lines = [g.decode(errors="replace") for g in got]
        self.lines += lines
        return lines

    def wait_for(self, prefix: str, deadline: float) -> str:
        while time.monotonic() < deadline:
            for line in self.read(1.0):
                if line.startswith(prefix):
                    return line
                if line.startswith("error"):
                    raise RuntimeError(f"the device VM: {line}")
        raise TimeoutError(f"the device VM never said {prefix!r}")


def both_ports(sample: dict[str, Any]) -> dict[str, Any] | None:
    """The switch's ports in a ``vhostpci status --json`` sample, if both driver VMs' are there."""
    ports: dict[str, Any] = {}
    for service in sample.get("services", []):
        ports.update(service.get("ports") or {})
    return ports if all(mac in ports for _, mac, _ in VMS) else None


def final_counters(run_log: str) -> dict[str, Any]:
    """Each port's counters as the run logged them when its frontend went (apps/net.py)."""
    out: dict[str, Any] = {}
    for m in re.finditer(r"net port \S+ down: (\{.*\})", run_log):
        row = json.loads(m.group(1))
        out[row.pop("mac")] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=8 << 20, help="the TCP transfer's size")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    args = ap.parse_args()
    if not (ROOT / ".vhostpci-ready").exists():
        print(f"device-vm: no prepared VM cache at {ROOT}: run tools/vm/prepare", file=sys.stderr)
        return 3
    deadline = time.monotonic() + args.timeout
    run_dir, mounted = chroot.enter(REPO, "dv")
    qemu_dir = "/" + str(run_dir.relative_to(ROOT))
    server = None
    doors: list[JsonProcess] = []
    guests: list[subprocess.Popen[bytes]] = []
    device_vm = None
    control = None
    try:
        server = HostServer(run_dir, ping_interval=2.0, ping_misses=30)
        doors = start_doors(server, run_dir)
        started = time.time()
        # The driver VMs ping every 2 s until the switch is up: long enough for the device VM's boot.
        guests = start_driver_vms(run_dir, args.bytes, ping_tries=int(args.timeout / 2))
        sockets = [server.device_socket(u, timeout=args.timeout) for _, _, u in VMS]
        sockets_at = time.time() - started
        out_dir = ROOT / OUT_DIR.lstrip("/")
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        (kernel,) = sorted(f"/boot/{k.name}" for k in (ROOT / "boot").glob("vmlinuz-*"))
        argv = device_vm_argv(["/" + str(Path(s).relative_to(ROOT)) for s in sockets], qemu_dir, kernel)
        device_vm = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        control = Control(run_dir / "ctl.sock", deadline)
        serving = control.wait_for("serving", deadline)
        serving_at = time.time() - started
        print(f"device-vm: {serving} ({serving_at:.1f}s after the driver VMs started)", flush=True)
        last: dict[str, Any] | None = None
        while any(g.poll() is None for g in guests) and time.monotonic() < deadline:
            for line in control.read(1.0):
                if line.startswith("status "):
                    last = both_ports(json.loads(line.removeprefix("status "))) or last
        rcs = [g.poll() for g in guests]
        control.sock.sendall(b"stop\n")
        stopped = control.wait_for("stopped", min(deadline, time.monotonic() + 120) + 60)
        device_vm.wait(max(1.0, deadline + 60 - time.monotonic()))
        logs, firsts, sums = guest_results(started)
        for name, text in logs.items():
            sys.stdout.write(f"--- driver VM {name} ---\n{text}")
        run_log = (out_dir / "run.log").read_text(errors="replace")
        sys.stdout.write(f"--- device VM: vhostpci run ---\n{run_log}")
        sys.stdout.write((out_dir / "guest.log").read_text(errors="replace"))
        mbit = [float(m.group(1)) for t in logs.values() for m in re.finditer(r"mbit_s=([0-9.]+)", t)]
        result = {
            "guest_status": rcs,
            "bytes": args.bytes,
            "seconds_to_device_sockets": round(sockets_at, 1),
            "seconds_to_serving": round(serving_at, 1),
            "seconds_to_first_ping": firsts,
            "mbit_s": mbit,
            "sha256_match": len(sums) == 2 and sums[0] == sums[1],
            "run_status": int(stopped.split()[1]),
            "switch": last,
            "switch_final": final_counters(run_log),
            "seconds": round(time.time() - started, 1),
        }
        print("device-vm: " + json.dumps(result, default=str), flush=True)
        return 0 if rcs == [0, 0] and result["sha256_match"] and result["run_status"] == 143 else 1
    except BaseException:
        _show_logs()  # what each guest got to before it failed
        raise
    finally:
        if control is not None:
            control.sock.close()
        for vm in ([device_vm] if device_vm is not None else []) + guests:
            chroot.stop_vm(vm)
        for door in doors:
            door.stop()
        if server is not None:
            server.stop()
        chroot.leave(mounted)


def _show_logs() -> None:
    for name in [*(f"vpout-{n}/guest.log" for n, _, _ in VMS), "vpout-dev/run.log", "vpout-dev/guest.log"]:
        path = ROOT / "var/tmp" / name
        text = path.read_text(errors="replace")[-4000:] if path.exists() else "(none)\n"
        sys.stdout.write(f"--- {name} ---\n{text}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
