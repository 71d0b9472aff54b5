"""Two stock QEMU driver VMs whose only link is our net switch, with the toolkit on the host over vfio-user.

The lighter configuration of the VM tier's real-driver-VM tests (issue 18 item 5):
the vhost-pci server and one vhost-user front door per driver VM run on the host;
each driver VM is Debian's kernel booted by virtme-ng under TCG from the prepared
chroot, with ``virtio-net-pci`` on a ``vhost-user`` netdev, memfd-shared RAM and
no other network device; our driver serves both vhost-pci devices over vfio-user
in this process with the net switch. In the guests: IPv6 link-local only, ping6
both ways, then a bounded TCP transfer (tools/vm/tcp_transfer.py) whose sha256
must match at both ends. Every step has a timeout; no tap, bridge or user-mode
networking anywhere.

    python3 tools/vm/driver_vms.py [--bytes N] [--timeout S]   (as root, after tools/vm/prepare)
"""

from __future__ import annotations

import argparse
import json
import re
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

from vhostpci_driver.apps.net import NetBackend, net_policy  # noqa: E402
from vhostpci_driver.device import VhostPciDevice  # noqa: E402
from vhostpci_driver.service import Service  # noqa: E402
from vhostpci_host.harness import HostServer, JsonProcess, host_command  # noqa: E402

ROOT = chroot.ROOT
VMS = (
    ("a", "52:54:00:00:00:a1", uuid.UUID("7e57ab1e-0000-4000-8000-0000000000a1")),
    ("b", "52:54:00:00:00:b2", uuid.UUID("7e57ab1e-0000-4000-8000-0000000000b2")),
)


def link_local(mac: str) -> str:
    """The EUI-64 link-local address Linux gives a NIC with ``mac`` (RFC 4291, appendix A)."""
    b = [int(x, 16) for x in mac.split(":")]
    b[0] ^= 2
    words = [b[0] << 8 | b[1], b[2] << 8 | 0xFF, 0xFE << 8 | b[3], b[4] << 8 | b[5]]
    return "fe80::" + ":".join(f"{w:x}" for w in words)


def guest_script(mac: str, peer_mac: str, role: str, nbytes: int, out: str, ping_tries: int = 90) -> str:
    """The driver VM's command: its NIC up, its link-local address past duplicate address detection
    (at most 120 s), ping6 the peer until it answers (at most ``ping_tries`` tries, 1 s apart), then
    the TCP transfer in ``role``; its log goes to ``out``/guest.log."""
    peer = link_local(peer_mac)
    transfer = (
        f"python3 /project/tools/vm/tcp_transfer.py server --bytes {nbytes} --timeout 300"
        if role == "server"
        else f"python3 /project/tools/vm/tcp_transfer.py client --peer {peer}%$IF --bytes {nbytes} "
        "--timeout 300"
    )
    return (
        "exec > " + out + "/guest.log 2>&1; "
        f'IF=; for d in /sys/class/net/*; do [ "$(cat $d/address)" = {mac} ] && IF=$(basename $d); done; '
        'echo "nic=$IF"; ip link set lo up; ip link set $IF up; '
        # Duplicate address detection first (RFC 4862, 5.4): while the link-local address is
        # tentative, ping6 fails at once, and a CI run spent all its tries in 21 s that way.
        "n=0; until ip -6 addr show dev $IF scope link -tentative | grep -q inet6; do "
        "n=$((n+1)); [ $n -gt 120 ] && { echo still-tentative; ip -6 addr; exit 1; }; sleep 1; done; "
        'echo "address-ready after ${n}s"; '
        "n=0; until busybox ping6 -c 1 -W 2 -I $IF " + peer + " >/dev/null 2>&1; do "
        f"n=$((n+1)); [ $n -gt {ping_tries} ] && {{ echo no-ping; ip -6 addr; exit 1; }}; sleep 1; done; "
        'echo "first-ping epoch=$(date +%s.%N)"; '
        f"busybox ping6 -c 3 -I $IF {peer} || exit 1; "
        f"{transfer}; rc=$?; "
        "S=/sys/class/net/$IF/statistics; "
        'echo "stats rx=$(cat $S/rx_packets) tx=$(cat $S/tx_packets)"; '
        "exit $rc"
    )


def start_doors(server: HostServer, run_dir: Path) -> list[JsonProcess]:
    """One ``vhostpci-host vhost-user`` front door per driver VM, listening in ``run_dir``."""
    doors: list[JsonProcess] = []
    try:
        for name, mac, u in VMS:
            door = JsonProcess(
                host_command(
                    "vhost-user",
                    "--socket",
                    str(run_dir / f"{name}.vu"),
                    "--server",
                    str(server.socket),
                    "--uuid",
                    str(u),
                    "--mac",
                    mac,
                    "--json",
                ),
                f"vhost-user-{name}",
            )
            doors.append(door)
            door.read_event("listening")
    except BaseException:
        for door in doors:
            door.stop()
        raise
    return doors


def driver_vm_qemu_opts(door: Path, mac: str) -> str:
    """QEMU's options for a driver VM on the front door listening at ``door`` (a path in the chroot):
    512 MiB of memfd-shared RAM and ``virtio-net-pci`` on a ``vhost-user`` netdev (docs/host.md)."""
    sock = "/" + str(door.relative_to(ROOT))
    return (
        "-object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem "
        f"-chardev socket,id=vu0,path={sock} -netdev vhost-user,id=net0,chardev=vu0 "
        f"-device virtio-net-pci,netdev=net0,mac={mac},disable-legacy=on"
    )


def start_driver_vms(run_dir: Path, nbytes: int, ping_tries: int = 90) -> list[subprocess.Popen[bytes]]:
    """Boot both driver VMs (b serves the TCP transfer, a sends it), each on its front door's socket."""
    guests: list[subprocess.Popen[bytes]] = []
    for (name, mac, _), (_, peer, _) in zip(VMS, reversed(VMS), strict=True):
        out = f"/var/tmp/vpout-{name}"
        shutil.rmtree(ROOT / out.lstrip("/"), ignore_errors=True)
        (ROOT / out.lstrip("/")).mkdir(parents=True)
        qemu = driver_vm_qemu_opts(run_dir / f"{name}.vu", mac)
        role = "server" if name == "b" else "client"
        script = guest_script(mac, peer, role, nbytes, out, ping_tries)
        argv = chroot.vng("/boot/vmlinuz-" + _debian_kernel(), cpus=1, memory="512M", qemu_opts=qemu,
                          out=out, command=script)  # fmt: skip
        guests.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return guests


def guest_results(started: float) -> tuple[dict[str, str], list[float], list[str]]:
    """Each driver VM's log, the seconds from ``started`` (epoch) to its first ping, and the sha256s seen."""
    logs = {n: (ROOT / f"var/tmp/vpout-{n}/guest.log").read_text(errors="replace") for n, _, _ in VMS}
    firsts = [
        round(float(m.group(1)) - started, 1)
        for t in logs.values()
        if (m := re.search(r"first-ping epoch=([0-9.]+)", t))
    ]
    sums = [m.group(1) for t in logs.values() for m in re.finditer(r"sha256=([0-9a-f]+)", t)]
    return logs, firsts, sums


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=8 << 20, help="the TCP transfer's size")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()
    if not (ROOT / ".vhostpci-ready").exists():
        print(f"driver-vms: no prepared VM cache at {ROOT}: run tools/vm/prepare", file=sys.stderr)
        return 3
    run_dir, mounted = chroot.enter(REPO, "vu")
    server = None
    doors: list[JsonProcess] = []
    guests: list[subprocess.Popen[bytes]] = []
    devices: list[VhostPciDevice] = []
    service = None
    thread = None
    try:
        server = HostServer(run_dir, ping_interval=2.0, ping_misses=30)
        doors = start_doors(server, run_dir)
        started = time.time()
        guests = start_driver_vms(run_dir, args.bytes)
        # The devices appear when each guest's driver starts its NIC (its memory table arrives).
        for _, _, u in VMS:
            devices.append(
                VhostPciDevice(
                    f"vfio-user:{server.device_socket(u, timeout=args.timeout)}", policies={1: net_policy}
                )
            )
        backend = NetBackend("switch")
        service = Service(devices, backend)
        thread = threading.Thread(target=service.run, args=(0.05,), daemon=True)
        thread.start()
        deadline = time.monotonic() + args.timeout
        # The switch's counters while both ports are up (a port goes with its driver VM's QEMU).
        switch: dict[str, dict[str, object]] = {}
        while any(g.poll() is None for g in guests) and time.monotonic() < deadline:
            try:
                now = backend.stats()
            except RuntimeError:  # the service thread changed the ports meanwhile
                continue
            if len(now) == len(VMS):
                switch = now
            time.sleep(0.5)
        rcs = [g.wait(timeout=max(1.0, deadline - time.monotonic())) for g in guests]
        logs, firsts, sums = guest_results(started)
        for name, text in logs.items():
            sys.stdout.write(f"--- driver VM {name} ---\n{text}")
        result = {
            "guest_status": rcs,
            "seconds_to_first_ping": firsts,
            "sha256_match": len(sums) == 2 and sums[0] == sums[1],
            "switch": switch,
        }
        print("driver-vms: " + json.dumps(result, default=str))
        ok = rcs == [0, 0] and result["sha256_match"]
        if not ok:  # what the host side and the toolkit saw, for the guests' story above
            events = [type(ev).__name__ + (f" {ev.message}" if hasattr(ev, "message") else "")
                      for ev in service.events]  # fmt: skip
            print(f"driver-vms: toolkit events: {events}")
            for door in doors:
                print(f"--- {door.name} (tail) ---\n{door.stderr_tail(30)}")
            print(f"--- vhost-pci server (tail) ---\n{server.stderr_tail(60)}")
        return 0 if ok else 1
    finally:
        if service is not None and thread is not None:
            service.stop.set()
            thread.join(10)
        for dev in devices:
            dev.close()
        for g in guests:
            chroot.stop_vm(g)
        for door in doors:
            door.stop()
        if server is not None:
            server.stop()
        chroot.leave(mounted)


def _debian_kernel() -> str:
    (v,) = [p.name.removeprefix("vmlinuz-") for p in (ROOT / "boot").glob("vmlinuz-*")]
    return v


if __name__ == "__main__":
    sys.exit(main())
