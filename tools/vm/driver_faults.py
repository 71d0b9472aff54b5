"""Two stock QEMU driver VMs through our switch, then faults: SIGKILL, restart with the same UUID, reboot.

Issue 18 item 5 in the lighter configuration (the toolkit on the host over
vfio-user, as tools/vm/driver_vms.py): the vhost-pci server and one vhost-user
front door per driver VM on the host, two Debian-kernel driver VMs under TCG
(``virtio-net-pci`` on a ``vhost-user`` netdev, memfd RAM, no other network
device), our driver serving both vhost-pci devices in this process with the net
switch. The host drives each guest through tools/vm/guest_agent.sh (command
files in a 9p directory), so it decides when each step happens and times it:

1. both boot; ping6 both ways over IPv6 link-local addresses (the time from
   QEMU's start to the first answered ping);
2. a bounded TCP transfer a -> b (``--bytes``, 64 MiB by default) whose sha256
   matches at both ends, with its throughput;
3. the switch's per-port counters against the guests' own, at a quiescent
   moment (each guest's counters unchanged across the switch's snapshot):
   port ``tx_frames`` == the guest's ``tx_packets`` and port ``rx_frames`` ==
   its ``rx_packets`` (the port counts from its frontend's start, the guest from
   its NIC's creation in the same boot; QEMU drops nothing, since the guest's
   link comes up after the rings started);
4. a second transfer, and a's QEMU SIGKILLed in the middle of it: the toolkit
   sees a's frontend removed, then its memory, each timed from the kill against
   the heartbeat; b's port, frontend and QEMU stay (its partial receive ends at
   its own timeout);
5. a's QEMU started again on the same front door (same UUID): the same device
   serves it again, ping6 and a transfer (the time from QEMU's start to the first
   answered ping);
6. a reboots from inside (``busybox reboot -f``; QEMU runs through
   tools/vm/qemu-allow-reboot, which drops the ``-no-reboot`` virtme-ng always
   passes): the toolkit sees the stop and the start, then ping6 and a transfer
   (the time from the reboot to the first answered ping);
7. b's front door frozen (SIGSTOP): its connection stays open and silent, so only
   the heartbeat finds b gone (the removal timed from the freeze).

Every step has a timeout; no tap, bridge or user-mode networking anywhere.
The last line is ``driver-faults: {json}`` with every figure.

    python3 tools/vm/driver_faults.py [--bytes N] [--timeout S]   (as root, after tools/vm/prepare)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(Path(__file__).resolve().parent)]

import chroot  # noqa: E402  (tools/vm, beside this file)
from driver_vms import VMS, _debian_kernel, driver_vm_qemu_opts, link_local, start_doors  # noqa: E402

from vhostpci_driver.apps.net import NetBackend, net_policy  # noqa: E402
from vhostpci_driver.device import VhostPciDevice  # noqa: E402
from vhostpci_driver.events import (  # noqa: E402
    FeaturesNegotiated,
    FrontendAdded,
    FrontendRemoved,
    MemoryAdded,
    MemoryRemoved,
    RemoteDown,
    RemoteUp,
)
from vhostpci_driver.service import Service  # noqa: E402
from vhostpci_host.harness import HostServer, JsonProcess  # noqa: E402

ROOT = chroot.ROOT
HEARTBEAT = 1.0  # the server's ping interval (s)
MISSES = 3  # pings a driver VM may leave unanswered: gone within MISSES heartbeats
#: A restarted QEMU claims its UUID with its first memory table, once the guest's driver starts
#: the NIC: under TCG that is a boot away (about a minute), past the default 30 s grace.
GONE_GRACE = 600.0
TRANSFER_TIMEOUT = 240.0


class StepError(Exception):
    """A step did not finish in its time, or finished wrong."""


class Timeline:
    """The toolkit's events per driver VM, stamped (monotonic) as the service thread delivers them."""

    KINDS = (
        RemoteUp, RemoteDown, MemoryAdded, MemoryRemoved, FrontendAdded, FrontendRemoved, FeaturesNegotiated
    )  # fmt: skip

    def __init__(self) -> None:
        self.rows: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()

    def watch(self, name: str, dev: VhostPciDevice) -> None:
        def seen(ev: object) -> None:
            self.add(name, type(ev).__name__)

        for kind in self.KINDS:
            dev.on(kind, seen)

    def add(self, name: str, kind: str, at: float | None = None) -> None:
        """``kind`` seen for ``name`` now, or at ``at`` (monotonic) when it was seen earlier."""
        with self._lock:
            self.rows.append((time.monotonic() if at is None else at, name, kind))

    def since(self, name: str, t: float) -> list[tuple[float, str]]:
        with self._lock:
            return [(at, k) for at, n, k in self.rows if n == name and at >= t]

    def wait(self, name: str, kind: str, after: float, timeout: float) -> float:
        """When the toolkit first saw ``kind`` for ``name`` after ``after``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, k in self.since(name, after):
                if k == kind:
                    return at
            time.sleep(0.05)
        raise StepError(f"driver VM {name}: no {kind} within {timeout:.0f}s; saw {self.since(name, after)}")


class Guest:
    """One driver VM: its QEMU (booted by virtme-ng from the chroot) and the agent inside it."""

    def __init__(self, name: str, mac: str, run_dir: Path, *, reboot: bool) -> None:
        self.name, self.mac, self.reboot = name, mac, reboot
        self.gdir = f"/var/tmp/vpfault-{name}"  # the same path in the chroot and in the guest
        self.dir = ROOT / self.gdir.lstrip("/")
        self.door = run_dir / f"{name}.vu"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.boot_id: str | None = None
        self.n = 0
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def start(self, life: float) -> None:
        (self.dir / "qemu.pid").unlink(missing_ok=True)
        qemu = f"{driver_vm_qemu_opts(self.door, self.mac)} -pidfile {self.gdir}/qemu.pid"
        argv = chroot.vng(
            "/boot/vmlinuz-" + _debian_kernel(), cpus=1, memory="512M", qemu_opts=qemu, out=self.gdir,
            command=f"sh /project/tools/vm/guest_agent.sh {self.gdir} {self.mac} {int(life)}",
            extra=("--qemu=/project/tools/vm/qemu-allow-reboot",) if self.reboot else (),
        )
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def qemu_pid(self, timeout: float = 30.0) -> int:
        path = self.dir / "qemu.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = path.read_text().strip() if path.exists() else ""
            if text:
                return int(text)
            time.sleep(0.1)
        raise StepError(f"driver VM {self.name}: QEMU wrote no pid file in {timeout:.0f}s")

    def wait_ready(self, timeout: float) -> float:
        """Wait for the agent of a new boot; returns when it said so."""
        deadline = time.monotonic() + timeout
        path = self.dir / "ready"
        while time.monotonic() < deadline:
            if path.exists():
                boot = path.read_text().split()[0]
                if boot != self.boot_id:
                    self.boot_id = boot
                    return time.monotonic()
            if self.proc is not None and self.proc.poll() is not None:
                raise StepError(f"driver VM {self.name}: QEMU exited ({self.proc.returncode}), no agent")
            time.sleep(0.2)
        raise StepError(f"driver VM {self.name}: no agent within {timeout:.0f}s")

    def run(self, script: str) -> int:
        """Hand the agent one command (sh; ``$IF`` is the NIC); returns its number."""
        self.n += 1
        tmp = self.dir / f"cmd.{self.n}.tmp"
        tmp.write_text(script + "\n")
        tmp.rename(self.dir / f"cmd.{self.n}")
        return self.n

    def wait(self, n: int, timeout: float) -> tuple[int, str, float]:
        """Command ``n``'s exit status, output and when it ended (as the host saw it)."""
        deadline = time.monotonic() + timeout
        rc = self.dir / f"rc.{n}"
        while time.monotonic() < deadline:
            if rc.exists():
                at = time.monotonic()
                return int(rc.read_text() or "-1"), (self.dir / f"out.{n}").read_text(errors="replace"), at
            time.sleep(0.1)
        raise StepError(f"driver VM {self.name}: command {n} did not end within {timeout:.0f}s")

    def call(self, script: str, timeout: float) -> tuple[int, str, float]:
        return self.wait(self.run(script), timeout)

    def stop(self) -> None:
        if self.proc is not None:
            chroot.stop_vm(self.proc)


def ping_wait(peer: str, tries: int = 200) -> str:
    """Until the first answered ping (each try waits at most 1 s for the answer)."""
    return (
        f"n=0; until busybox ping6 -c 1 -W 1 -I $IF {peer} >/dev/null 2>&1; do "
        f"n=$((n+1)); [ $n -gt {tries} ] && {{ ip -6 addr; exit 1; }}; sleep 0.3; done"
    )


def ping3(peer: str) -> str:
    return f"busybox ping6 -c 3 -I $IF {peer}"


def tcp(role: str, nbytes: int, port: int, peer: str = "", timeout: float = TRANSFER_TIMEOUT) -> str:
    where = f"--peer {peer}%$IF " if role == "client" else ""
    return (
        f"python3 /project/tools/vm/tcp_transfer.py {role} {where}--bytes {nbytes} --port {port} "
        f"--timeout {timeout:g}"
    )


#: The NIC's counters once they stop moving (read each second, at most 10 times).
STATS = (
    "S=/sys/class/net/$IF/statistics; p=; i=0; while [ $i -lt 10 ]; do "
    'c="tx=$(cat $S/tx_packets) rx=$(cat $S/rx_packets)"; [ "$c" = "$p" ] && break; '
    'p=$c; i=$((i+1)); sleep 1; done; echo "stats $c"'
)


def guest_stats(out: str) -> dict[str, int]:
    m = re.search(r"stats tx=(\d+) rx=(\d+)", out)
    if not m:
        raise StepError(f"no counters in {out!r}")
    return {"tx_packets": int(m.group(1)), "rx_packets": int(m.group(2))}


class Run:
    """The whole scenario, step by step, each with its timeout."""

    def __init__(self, args: argparse.Namespace, run_dir: Path) -> None:
        self.args = args
        self.run_dir = run_dir
        self.deadline: float = time.monotonic() + args.timeout
        self.server: HostServer | None = None
        self.doors: list[JsonProcess] = []
        self.guests: dict[str, Guest] = {}
        self.devices: dict[str, VhostPciDevice] = {}
        self.backend = NetBackend("switch")
        self.service: Service | None = None
        self.thread: threading.Thread | None = None
        self.timeline = Timeline()
        self.result: dict[str, Any] = {"bytes": args.bytes, "heartbeat_s": HEARTBEAT, "misses": MISSES}
        self.macs = {name: mac for name, mac, _ in VMS}
        self.peers = {name: link_local(mac) for name, mac, _ in VMS}
        self.t0 = time.monotonic()

    def left(self, cap: float) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise StepError("the run's time is up")
        return min(cap, left)

    def step(self, name: str) -> None:
        print(f"driver-faults: [{time.monotonic() - self.t0:6.1f}s] {name}", flush=True)

    # -- set-up --------------------------------------------------------------------------

    def start_host(self, *extra: str) -> None:
        """The server (with ``extra`` options), the front doors, and both driver VMs booting."""
        self.server = HostServer(self.run_dir, ping_interval=HEARTBEAT, ping_misses=MISSES,
                                 extra=("--gone-grace", str(GONE_GRACE), *extra))  # fmt: skip
        self.doors = start_doors(self.server, self.run_dir)
        self.t0 = time.monotonic()
        for name, mac, _ in VMS:
            g = Guest(name, mac, self.run_dir, reboot=name == "a")
            g.start(self.args.timeout)
            self.guests[name] = g

    def start(self) -> None:
        self.start_host()
        assert self.server is not None
        # The devices appear when each guest's driver starts its NIC (its memory table arrives).
        for name, _, u in VMS:
            dev = VhostPciDevice(
                f"vfio-user:{self.server.device_socket(u, timeout=self.left(300))}", policies={1: net_policy}
            )
            self.timeline.watch(name, dev)
            self.devices[name] = dev
        self.service = Service(list(self.devices.values()), self.backend)
        self.thread = threading.Thread(target=self.service.run, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.service is not None and self.thread is not None:
            self.service.stop.set()
            self.thread.join(10)
        for dev in self.devices.values():
            dev.close()
        self.close_host()

    def close_host(self) -> None:
        """Stop what :meth:`start_host` started: the driver VMs, then the front doors, then the server."""
        for g in self.guests.values():
            g.stop()
        for door in self.doors:
            door.stop()
        if self.server is not None:
            self.server.stop()

    # -- helpers --------------------------------------------------------------------------

    def switch(self) -> dict[str, dict[str, Any]]:
        while True:
            try:
                return self.backend.stats()
            except RuntimeError:  # the service thread changed the ports meanwhile
                continue

    def first_ping(self, name: str, since: float) -> float:
        """Ping the other driver VM until it answers; seconds from ``since``; then 3 pings must all answer."""
        g, peer = self.guests[name], self.peers["b" if name == "a" else "a"]
        rc, out, at = g.call(ping_wait(peer), self.left(400))
        if rc:
            raise StepError(f"driver VM {name}: no ping answered\n{out}")
        rc, out, _ = g.call(ping3(peer), self.left(60))
        if rc or "3 packets transmitted, 3 packets received" not in out:
            raise StepError(f"driver VM {name}: ping6 -c 3 lost some\n{out}")
        return round(at - since, 1)

    def transfer(self, nbytes: int, port: int) -> dict[str, Any]:
        """a -> b, sha256 checked at both ends."""
        a, b = self.guests["a"], self.guests["b"]
        srv = b.run(tcp("server", nbytes, port))
        cli = a.run(tcp("client", nbytes, port, self.peers["b"]))
        rc_c, out_c, _ = a.wait(cli, self.left(TRANSFER_TIMEOUT + 60))
        rc_s, out_s, _ = b.wait(srv, self.left(60))
        sums = re.findall(r"sha256=([0-9a-f]+)", out_c + out_s)
        mbit = re.search(r"mbit_s=([0-9.]+)", out_c)
        if rc_c or rc_s or len(sums) != 2 or sums[0] != sums[1]:
            raise StepError(f"transfer of {nbytes} bytes failed:\nclient: {out_c}\nserver: {out_s}")
        return {"bytes": nbytes, "sha256_match": True, "mbit_s": float(mbit.group(1)) if mbit else None}

    def counters(self) -> dict[str, Any]:
        """The switch's port counters against the guests' own, at a quiescent moment (module doc, 3)."""
        for _ in range(3):
            before = self._guest_counters()
            snap = self.switch()
            after = self._guest_counters()
            if before == after:
                rows = {}
                for name, g in before.items():
                    port = snap[self.macs[name]]
                    agree = port["tx_frames"] == g["tx_packets"] and port["rx_frames"] == g["rx_packets"]
                    rows[name] = {
                        "guest": g,
                        "port": {k: port[k] for k in ("tx_frames", "rx_frames", "rx_dropped_no_buffer",
                                                      "tx_dropped_unknown", "tx_flooded")},
                        "agree": agree,
                    }  # fmt: skip
                return rows
        raise StepError(f"the guests' counters never stood still: {before} then {after}")

    def _guest_counters(self) -> dict[str, dict[str, int]]:
        ns = {name: g.run(STATS) for name, g in self.guests.items()}
        return {name: guest_stats(self.guests[name].wait(n, self.left(30))[1]) for name, n in ns.items()}

    # -- the scenario ---------------------------------------------------------------------

    def first_transfer(self) -> None:
        """Steps 1 to 3: both boot, ping6 both ways, the transfer, the counters."""
        r = self.result
        self.step("booting both driver VMs")
        r["seconds_to_agent"] = {g.name: round(g.wait_ready(self.left(400)) - self.t0, 1)
                                 for g in self.guests.values()}  # fmt: skip
        self.before_ping()
        self.step("ping6 both ways")
        r["seconds_to_first_ping"] = {name: self.first_ping(name, self.t0) for name in ("a", "b")}
        self.step(f"transfer of {self.args.bytes} bytes a -> b")
        r["transfer"] = self.transfer(self.args.bytes, 5201)
        self.step("counters")
        r["counters"] = self.counters()

    def before_ping(self) -> None:
        """What must be up before the first ping is worth timing (here the toolkit serves from the start)."""

    def scenario(self) -> None:
        a, b = self.guests["a"], self.guests["b"]
        r = self.result
        self.first_transfer()

        self.step("SIGKILL of a's QEMU mid-transfer")
        base = self.switch()[self.macs["a"]]["tx_bytes"]
        port_b = self.backend.ports[bytes.fromhex(self.macs["b"].replace(":", ""))]
        # b's receive ends at its own timeout, since its peer vanished without a word (no FIN, no RST).
        srv = b.run(tcp("server", 1 << 30, 5202, timeout=90))
        a.run(tcp("client", 1 << 30, 5202, self.peers["b"], timeout=90))
        deadline = time.monotonic() + self.left(120)
        while self.switch()[self.macs["a"]]["tx_bytes"] < base + (4 << 20):
            if time.monotonic() > deadline:
                raise StepError("the second transfer did not start")
            time.sleep(0.1)
        pid = a.qemu_pid()
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        fe_gone = self.timeline.wait("a", "FrontendRemoved", killed, self.left(MISSES * HEARTBEAT + 10))
        mem_gone = self.timeline.wait("a", "MemoryRemoved", killed, self.left(MISSES * HEARTBEAT + 10))
        assert a.proc is not None
        a.proc.wait(self.left(30))
        time.sleep(2 * HEARTBEAT)  # b must stay through more heartbeats than a needed to go
        b_events = self.timeline.since("b", killed)
        r["kill"] = {
            "seconds_to_frontend_removed": round(fe_gone - killed, 3),
            "seconds_to_memory_removed": round(mem_gone - killed, 3),
            "frontend_before_memory": fe_gone <= mem_gone,
            "within_heartbeats": max(fe_gone, mem_gone) - killed <= MISSES * HEARTBEAT,
            "b_events_after_kill": [k for _, k in b_events],
            "b_port_kept": self.backend.ports.get(port_b.mac) is port_b and not port_b.broken,
            "b_frontends": len(self.devices["b"].frontends),
            "b_qemu_running": b.proc is not None and b.proc.poll() is None,
            "a_port_gone": bytes.fromhex(self.macs["a"].replace(":", "")) not in self.backend.ports,
        }

        self.step("a's QEMU started again (same UUID, same front door)")
        dev_a = self.devices["a"]
        a.start(self.args.timeout)
        restarted = a.started
        agent = a.wait_ready(self.left(400))
        up = self.timeline.wait("a", "FeaturesNegotiated", restarted, self.left(60))
        r["restart"] = {
            "seconds_to_frontend_up": round(up - restarted, 1),
            "seconds_to_agent": round(agent - restarted, 1),
            "seconds_to_first_ping": self.first_ping("a", restarted),
            "same_device": self.devices["a"] is dev_a and dev_a.failed is None,
        }
        r["restart"]["transfer"] = self.transfer(self.args.after_bytes, 5203)

        r["reboot"] = self.reboot()
        r["reboot"]["transfer"] = self.transfer(self.args.after_bytes, 5204)
        _, out, _ = b.wait(srv, self.left(60))  # long over: it was given 90 s
        got = re.search(r"bytes=(\d+) .* end=(\w+)", out)
        r["kill"]["b_received"] = (int(got.group(1)), got.group(2)) if got else out
        alive = b.proc is not None and b.proc.poll() is None
        r["b_same_boot"] = alive and (b.dir / "ready").read_text().split()[0] == b.boot_id
        r["b_events_since_boot"] = sorted({k for _, k in self.timeline.since("b", self.t0)})
        r["silent"] = self.silent_front_door()
        self.step("done")

    def wait_event(self, name: str, kind: str, after: float, timeout: float) -> float:
        """When the toolkit first saw ``kind`` for driver VM ``name`` after ``after``."""
        return self.timeline.wait(name, kind, after, timeout)

    def reboot(self) -> dict[str, Any]:
        """Step 6: ``reboot -f`` inside a: its frontend leaves and comes back, its memory and QEMU stay."""
        a = self.guests["a"]
        self.step("a reboots from inside")
        rebooted = time.monotonic()
        a.run("busybox reboot -f")
        down = self.wait_event("a", "FrontendRemoved", rebooted, self.left(120))
        up = self.wait_event("a", "FeaturesNegotiated", down, self.left(400))
        agent = a.wait_ready(self.left(400))
        return {
            "seconds_to_frontend_removed": round(down - rebooted, 1),
            "seconds_to_frontend_up": round(up - rebooted, 1),
            "seconds_to_agent": round(agent - rebooted, 1),
            "memory_kept": "MemoryRemoved" not in [k for _, k in self.timeline.since("a", rebooted)],
            "qemu_kept": a.proc is not None and a.proc.poll() is None,
            "seconds_to_first_ping": self.first_ping("a", rebooted),
        }

    def silent_front_door(self) -> dict[str, Any]:
        """b's front door frozen (SIGSTOP): its server connection stays open and says nothing.

        Only the heartbeat can find such a driver VM gone: the server sends a PING every
        interval and drops the connection when ``MISSES`` are unanswered, so the removal
        comes (MISSES - 1) to (MISSES + 1) intervals after the freeze (a ping may be just
        due, or just answered). Once thawed, the front door finds its server connection
        closed and drops its QEMU connection too (it would start afresh on the next one).
        """
        self.step("b's front door frozen: the heartbeat finds b gone")
        door = self.doors[1]
        frozen = time.monotonic()
        os.kill(door.pid, signal.SIGSTOP)
        try:
            bound = (MISSES + 1) * HEARTBEAT
            fe_gone = self.timeline.wait("b", "FrontendRemoved", frozen, self.left(bound + 10))
            mem_gone = self.timeline.wait("b", "MemoryRemoved", frozen, self.left(10))
        finally:
            os.kill(door.pid, signal.SIGCONT)
        dropped = door.read_event("dropped", timeout=self.left(20))
        return {
            "seconds_to_frontend_removed": round(fe_gone - frozen, 3),
            "seconds_to_memory_removed": round(mem_gone - frozen, 3),
            "frontend_before_memory": fe_gone <= mem_gone,
            "door_dropped": dropped.get("why"),
            "a_events": [k for _, k in self.timeline.since("a", frozen)],
            "a_port_kept": bytes.fromhex(self.macs["a"].replace(":", "")) in self.backend.ports,
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=64 << 20, help="the first TCP transfer's size")
    ap.add_argument("--after-bytes", type=int, default=16 << 20, help="transfers after restart, reboot")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run")
    args = ap.parse_args()
    if not (ROOT / ".vhostpci-ready").exists():
        print(f"driver-faults: no prepared VM cache at {ROOT}: run tools/vm/prepare", file=sys.stderr)
        return 3
    run_dir, mounted = chroot.enter(REPO, "vf")
    run = Run(args, run_dir)
    ok = False
    try:
        run.start()
        run.scenario()
        ok = True
    except StepError as e:
        print(f"driver-faults: failed: {e}", flush=True)
    finally:
        run.close()
        chroot.leave(mounted)
        for g in run.guests.values():
            agent = g.dir / "agent.err"
            if agent.exists():
                print(f"driver-faults: {g.name}: {agent.read_text()}")
        run.result["seconds"] = round(time.monotonic() - run.t0, 1)
        print("driver-faults: " + json.dumps(run.result, default=str), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
