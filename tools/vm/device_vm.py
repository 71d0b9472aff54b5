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

    python3 tools/vm/device_vm.py [--bytes N] [--timeout S] [--faults]   (as root, after tools/vm/prepare)

``--faults`` runs tools/vm/driver_faults.py's scenario here, with one device VM
boot: the driver VMs driven by their agents (tools/vm/guest_agent.sh), ping6 and
the transfer, the switch's counters (from ``vhostpci status --json`` in the
device VM) against the guests' at a quiescent moment; then a's QEMU SIGKILLed
mid-transfer (the device VM's run logs a's frontend, then its memory, removed:
each timed by the host's monotonic clock as the run's line arrives over the
control port; b untouched; the server, under ``serve --no-takeover``, frees a's
device, whose dead function stays in QEMU and in the guest); a's
QEMU again with its UUID: the server makes a new device, this sends QMP
``device_add vfio-user-pci`` for it onto a ``pcie-root-port``, the guest binds
it and the run (``--watch``) serves it, ping6 and a transfer; a rebooted from
inside, ping6 and a transfer. The last line is then ``device-vm: {json}`` with
every figure, and the exit status is 0 only if every recovery held.

The last line of output is ``device-vm: {json}``: the guests' exit statuses,
seconds from the first QEMU's start to each driver VM's first ping, whether the
sha256s match, the transfer's throughput, the switch's counters (last status
sample with both ports, and the run log's final ones) and the run's exit status.
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
from driver_faults import HEARTBEAT, MISSES, Run, StepError, Timeline, tcp  # noqa: E402
from driver_vms import VMS, guest_results, start_doors, start_driver_vms  # noqa: E402
from hotplug import Qmp, _connect  # noqa: E402

from vhostpci_host.harness import HostServer, JsonProcess  # noqa: E402
from vhostpci_host.server import window_size_for  # noqa: E402

ROOT = chroot.ROOT
OUT_DIR = "/var/tmp/vpout-dev"  # in the chroot and, through --rwdir, in the device VM
ROOT_PORTS = ("vphp0", "vphp1")  # --faults: where a restarted driver VM's new device is plugged
DRIVER_VM_MEMORY = 512 << 20  # driver_vms.driver_vm_qemu_opts
#: The root ports' 64-bit windows sit above 0xfd00000000, which QEMU's e820 marks reserved for a
#: TCG guest (its default CPU is AMD's: the HyperTransport hole below 1 TiB). Linux keeps what the
#: firmware assigned there at boot but allocates nothing new in e820-reserved space, so a
#: hot-plugged function's BAR 2 found "no space" in a run; pci=no_e820 lifts that for PCI.
HOTPLUG_APPEND = "pci=no_e820"


def hotplug_options(qemu_dir: str, window_size: int) -> str:
    """QMP, and root ports a restarted driver VM's new device is hot-plugged onto (``--faults``).

    The firmware sizes each root port's windows once, at boot: without room reserved for a
    64-bit BAR 2 of ``window_size`` the guest leaves a hot-plugged function's remote window
    unassigned (tools/vm/hotplug.py). Twice the window: the BAR must sit at a multiple of its
    size (PCI 3.0, 6.2.5.1), SeaBIOS need align an empty port's window to 1 MiB only, and any
    range twice the BAR's size holds an aligned one. See also :data:`HOTPLUG_APPEND`.
    """
    reserve = 2 * window_size >> 20
    ports = " ".join(
        f"-device pcie-root-port,id={port},chassis={9 + i},slot={9 + i},pref64-reserve={reserve}M"
        for i, port in enumerate(ROOT_PORTS)
    )
    return f"-qmp unix:{qemu_dir}/qmp.sock,server=on,wait=off {ports}"


def device_vm_argv(guest_sockets: list[str], qemu_dir: str, kernel: str, extra_opts: str = "",
                   append: str = "") -> list[str]:  # fmt: skip
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
        f"{devices} {extra_opts} "
        f"-chardev socket,id=vpctl,path={qemu_dir}/ctl.sock,server=on,wait=off "
        "-device virtio-serial-pci,id=vpserial -device virtserialport,chardev=vpctl,name=vhostpci.ctl"
    )
    guest = (
        f"cd /project && export PYTHONPATH=/project:/project/tools VHOSTPCI_RUN_DIR=/run/vhostpci "
        f"PYTHONUNBUFFERED=1 && python3 tools/vm/device_guest.py --functions {len(guest_sockets)} "
        f"--out {OUT_DIR} > {OUT_DIR}/guest.log 2>&1"
    )
    return chroot.vng(kernel, cpus=2, memory="1G", qemu_opts=qemu_opts, out=OUT_DIR, command=guest,
                      extra=(f"--append=intel_iommu=on iommu=pt {append}".rstrip(),))  # fmt: skip


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


class LiveControl(Control):
    """The control port read all along by a thread: every line stamped (host monotonic) as it arrives.

    The fault steps time the toolkit's lifecycle lines (``log LINE``, relayed as the run writes
    them) by their arrival here, and sample the switch from the ``status`` lines.
    """

    def __init__(self, path: Path, deadline: float) -> None:
        super().__init__(path, deadline)
        self.rows: list[tuple[float, str]] = []
        self.closed: str | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while self.closed is None:
            try:
                lines = self.read(1.0)
            except OSError as e:  # ConnectionError included: the device VM went away
                with self._cond:
                    self.closed = str(e) or type(e).__name__
                    self._cond.notify_all()
                return
            if lines:
                at = time.monotonic()
                with self._cond:
                    self.rows += [(at, ln) for ln in lines]
                    self._cond.notify_all()

    def wait_row(self, prefix: str, after: float, timeout: float) -> tuple[float, str]:
        """The first line starting with ``prefix`` that arrived after ``after`` (monotonic)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, line in self.rows:
                    if at > after and line.startswith(prefix):
                        return at, line
                    if at > after and line.startswith("error"):
                        raise StepError(f"the device VM: {line}")
                left = deadline - time.monotonic()
                if self.closed is not None or left <= 0:
                    raise StepError(f"the device VM never said {prefix!r} ({self.closed or 'timeout'})")
                self._cond.wait(min(left, 1.0))

    def since(self, prefix: str, after: float) -> list[tuple[float, str]]:
        with self._cond:
            return [(at, ln) for at, ln in self.rows if at > after and ln.startswith(prefix)]

    def close(self) -> None:
        self.closed = self.closed or "closed"
        self.sock.close()
        self._thread.join(5)


#: the run's lifecycle lines (vhostpci_driver.service.lifecycle), as relayed: "ADDR: WHAT"
LIFECYCLE = re.compile(r"vhostpci_driver\.service: (\S+): (.*)$")
KINDS = (
    (re.compile(r"driver VM (\S+) up$"), "RemoteUp"),
    (re.compile(r"driver VM (\S+) down$"), "RemoteDown"),
    (re.compile(r"memory added"), "MemoryAdded"),
    (re.compile(r"memory removed"), "MemoryRemoved"),
    (re.compile(r"frontend \S+ added$"), "FrontendAdded"),
    (re.compile(r"frontend \S+ removed$"), "FrontendRemoved"),
    (re.compile(r"frontend \S+ started"), "FeaturesNegotiated"),
)


class LogTimeline(Timeline):
    """driver_faults' timeline, fed from the device VM's run log instead of in-process callbacks.

    A function's lines are named after its driver VM once its ``driver VM UUID up`` line says
    whose it is (those before wait for it, with their arrival times).
    """

    def __init__(self, names: dict[str, str]) -> None:
        super().__init__()
        self.names = names  # UUID -> driver VM name
        self.function: dict[str, str] = {}  # PCI address in the device VM -> driver VM name
        self._waiting: dict[str, list[tuple[float, str]]] = {}

    def feed(self, at: float, line: str) -> None:
        m = LIFECYCLE.search(line)
        if not m:
            return
        address, what = m.groups()
        for pattern, kind in KINDS:
            got = pattern.search(what)
            if got is None:
                continue
            if kind == "RemoteUp" and got.group(1) in self.names:
                self.function[address] = self.names[got.group(1)]
            self._waiting.setdefault(address, []).append((at, kind))
            name = self.function.get(address)
            if name is not None:
                for when, k in self._waiting.pop(address):
                    self.add(name, k, when)
            return

    def address_of(self, name: str) -> list[str]:
        return [a for a, n in self.function.items() if n == name]


class DeviceVmFaults(Run):
    """driver_faults' scenario in the full configuration: the switch runs in a stock QEMU device VM."""

    def __init__(self, args: argparse.Namespace, run_dir: Path) -> None:
        super().__init__(args, run_dir)
        self.log = LogTimeline({str(u): name for name, _, u in VMS})
        self.timeline = self.log
        self.control: LiveControl | None = None
        self.qmp: Qmp | None = None
        self.device_vm: subprocess.Popen[bytes] | None = None
        self.out_dir = ROOT / OUT_DIR.lstrip("/")
        self.plugged = 0
        self._fed = 0
        self._old_functions: list[str] = []
        self._srv_b = 0

    # -- the device VM's view -------------------------------------------------------------

    def _feed(self) -> None:
        assert self.control is not None
        rows = self.control.since("log ", 0.0)
        for at, line in rows[self._fed :]:
            self.log.feed(at, line)
        self._fed = len(rows)

    def wait_event(self, name: str, kind: str, after: float, timeout: float) -> float:
        """When the device VM's run logged ``kind`` for ``name`` after ``after`` (the line's arrival)."""
        deadline = time.monotonic() + timeout
        while True:
            self._feed()
            for at, k in self.timeline.since(name, after):
                if k == kind:
                    return at
            if time.monotonic() > deadline:
                saw = self.timeline.since(name, after)
                raise StepError(f"driver VM {name}: no {kind} within {timeout:.0f}s; saw {saw}")
            time.sleep(0.05)

    def switch(self) -> dict[str, dict[str, Any]]:
        """The switch's ports in the first status sample taken after now (the guest samples every 3 s)."""
        assert self.control is not None
        _, line = self.control.wait_row("status ", time.monotonic(), self.left(60))
        ports: dict[str, dict[str, Any]] = {}
        for service in json.loads(line.removeprefix("status ")).get("services", []):
            ports.update(service.get("ports") or {})
        return ports

    # -- set-up --------------------------------------------------------------------------

    def start(self) -> None:
        self.start_host("--no-takeover")  # a returning driver VM gets a new device (docs/host.md)
        assert self.server is not None
        # The devices appear when each guest's driver starts its NIC (its memory table arrives).
        sockets = [self.server.device_socket(u, timeout=self.left(400)) for _, _, u in VMS]
        self.result["seconds_to_device_sockets"] = round(time.monotonic() - self.t0, 1)
        shutil.rmtree(self.out_dir, ignore_errors=True)
        self.out_dir.mkdir(parents=True)
        (kernel,) = sorted(f"/boot/{k.name}" for k in (ROOT / "boot").glob("vmlinuz-*"))
        qemu_dir = "/" + str(self.run_dir.relative_to(ROOT))
        argv = device_vm_argv([self._guest_path(s) for s in sockets], qemu_dir, kernel,
                              hotplug_options(qemu_dir, window_size_for(DRIVER_VM_MEMORY)),
                              append=HOTPLUG_APPEND)  # fmt: skip
        with open(self.run_dir / "device-vm.out", "wb") as out:  # QEMU's own messages
            self.device_vm = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.left(400)
        self.control = LiveControl(self.run_dir / "ctl.sock", deadline)
        self.qmp = Qmp(self.run_dir / "qmp.sock", deadline)
        at, serving = self.control.wait_row("serving", 0.0, self.left(400))
        self.result["seconds_to_serving"] = round(at - self.t0, 1)
        self.step(serving)

    def _guest_path(self, host_path: str) -> str:
        return "/" + str(Path(host_path).relative_to(ROOT))

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.qmp is not None:
            self.qmp.close()
        if self.device_vm is not None:
            chroot.stop_vm(self.device_vm)
        self.close_host()

    def stop_device_vm(self) -> None:
        """'stop' to the device VM's agent: the run ends (143 is clean), its final counters logged."""
        assert self.control is not None and self.device_vm is not None
        asked = time.monotonic()
        self.control.sock.sendall(b"stop\n")
        _, line = self.control.wait_row("stopped", asked, self.left(180))
        self.result["run_status"] = int(line.split()[1])
        self.device_vm.wait(self.left(120))
        run_log = (self.out_dir / "run.log").read_text(errors="replace")
        self.result["switch_final"] = final_counters(run_log)

    # -- the scenario ---------------------------------------------------------------------

    def before_ping(self) -> None:
        self.step("both frontends up in the device VM")
        ups = {name: self.wait_event(name, "FeaturesNegotiated", 0.0, self.left(400)) for name in ("a", "b")}
        self.result["seconds_to_frontend_up"] = {name: round(at - self.t0, 1) for name, at in ups.items()}

    def scenario(self) -> None:
        b = self.guests["b"]
        r = self.result
        self.first_transfer()
        r["kill"] = self.kill()
        r["restart"] = self.restart()
        r["restart"]["transfer"] = self.transfer(self.args.after_bytes, 5203)
        r["reboot"] = self.reboot()
        r["reboot"]["transfer"] = self.transfer(self.args.after_bytes, 5204)
        alive = b.proc is not None and b.proc.poll() is None
        r["b_same_boot"] = alive and (b.dir / "ready").read_text().split()[0] == b.boot_id
        self._feed()
        r["b_events_since_boot"] = sorted({k for _, k in self.timeline.since("b", self.t0)})
        r["b_functions"] = self.log.address_of("b")
        self.step("stopping the device VM's run")
        self.stop_device_vm()
        self.step("done")

    def kill(self) -> dict[str, Any]:
        """a's QEMU SIGKILLed mid-transfer: a's frontend, then memory, leave the device VM; b stays."""
        assert self.server is not None
        a, b = self.guests["a"], self.guests["b"]
        self.step("SIGKILL of a's QEMU mid-transfer")
        mac_a, mac_b = self.macs["a"], self.macs["b"]
        before = self.switch()
        srv = b.run(tcp("server", 1 << 30, 5202, timeout=90))
        a.run(tcp("client", 1 << 30, 5202, self.peers["b"], timeout=90))
        deadline = time.monotonic() + self.left(120)
        while self.switch()[mac_a]["tx_bytes"] < before[mac_a]["tx_bytes"] + (4 << 20):
            if time.monotonic() > deadline:
                raise StepError("the second transfer did not start")
        old_functions = self.log.address_of("a")
        pid = a.qemu_pid()
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        fe_gone = self.wait_event("a", "FrontendRemoved", killed, self.left(MISSES * HEARTBEAT + 10))
        mem_gone = self.wait_event("a", "MemoryRemoved", killed, self.left(MISSES * HEARTBEAT + 10))
        freed = self.server.read_event("device-freed", self.left(30))
        freed_at = time.monotonic()
        assert a.proc is not None
        a.proc.wait(self.left(30))
        time.sleep(2 * HEARTBEAT)  # b must stay through more heartbeats than a needed to go
        after = self.switch()
        self._feed()
        port_b = after.get(mac_b)
        out = {
            "seconds_to_frontend_removed": round(fe_gone - killed, 3),
            "seconds_to_memory_removed": round(mem_gone - killed, 3),
            "frontend_before_memory": fe_gone <= mem_gone,
            "within_heartbeats": max(fe_gone, mem_gone) - killed <= MISSES * HEARTBEAT,
            "device_freed": {
                "uuid": freed.get("uuid"),
                "why": freed.get("why"),
                "seconds_after_kill": round(freed_at - killed, 3),
            },
            "b_events_after_kill": [k for _, k in self.timeline.since("b", killed)],
            "b_port_kept": port_b is not None and port_b["broken"] is None
            and port_b["rx_frames"] >= before[mac_b]["rx_frames"],
            "b_qemu_running": b.proc is not None and b.proc.poll() is None,
            "a_port_gone": mac_a not in after,
            "old_functions": old_functions,
        }
        self._srv_b = srv
        self._old_functions = old_functions
        return out

    def restart(self) -> dict[str, Any]:
        """a's QEMU again on its front door: a new device (--no-takeover), hot-plugged, bound, served."""
        assert self.server is not None and self.qmp is not None and self.control is not None
        a, b = self.guests["a"], self.guests["b"]
        self.step("a's QEMU started again (same UUID, same front door)")
        a.start(self.args.timeout)
        restarted = a.started
        u = str(next(v for name, _, v in VMS if name == "a"))
        while True:
            ev = self.server.read_event("device", self.left(400))
            if ev["uuid"] == u:
                break
        socket_at = time.monotonic()
        device_id = f"vhostpci-a{self.plugged}"
        port = ROOT_PORTS[self.plugged % len(ROOT_PORTS)]
        self.plugged += 1
        self.step(f"device_add {device_id} on {port}: {ev['socket']}")
        self.qmp.execute("device_add", driver="vfio-user-pci", id=device_id, bus=port,
                         socket={"type": "unix", "path": self._guest_path(ev["socket"])})  # fmt: skip
        added = time.monotonic()
        bound_at, bound = self.control.wait_row("bound ", added, self.left(120))
        up = self.wait_event("a", "FeaturesNegotiated", added, self.left(120))
        agent = a.wait_ready(self.left(400))
        old = set(self._old_functions)
        new_functions = [f for f in self.log.address_of("a") if f not in old]
        out: dict[str, Any] = {
            "seconds_to_device_socket": round(socket_at - restarted, 1),
            "seconds_to_bound": round(bound_at - restarted, 1),
            "bound": bound.split(maxsplit=1)[1],
            "seconds_to_frontend_up": round(up - restarted, 1),
            "seconds_to_agent": round(agent - restarted, 1),
            "seconds_to_first_ping": self.first_ping("a", restarted),
            "functions": new_functions,
        }
        _, got, _ = b.wait(self._srv_b, self.left(120))  # the killed transfer's receiver: long over
        m = re.search(r"bytes=(\d+) .* end=(\w+)", got)
        out["b_killed_transfer_received"] = (int(m.group(1)), m.group(2)) if m else got
        return out


def faults_ok(r: dict[str, Any]) -> bool:
    """Every recovery --faults checks, as the VM tier asserts them."""
    try:
        k, s, b = r["kill"], r["restart"], r["reboot"]
        return bool(
            r["transfer"]["sha256_match"]
            and all(row["agree"] for row in r["counters"].values())
            and k["frontend_before_memory"] and k["within_heartbeats"] and k["a_port_gone"]
            and k["b_port_kept"] and k["b_qemu_running"] and not k["b_events_after_kill"]
            and s["transfer"]["sha256_match"] and set(s["functions"]).isdisjoint(k["old_functions"])
            and b["memory_kept"] and b["qemu_kept"] and b["transfer"]["sha256_match"]
            and r["b_same_boot"] and r["run_status"] == 143
        )  # fmt: skip
    except (KeyError, TypeError):
        return False


def faults_main(args: argparse.Namespace) -> int:
    run_dir, mounted = chroot.enter(REPO, "dv")
    run = DeviceVmFaults(args, run_dir)
    ok = False
    try:
        run.start()
        run.scenario()
        ok = faults_ok(run.result)
    except (StepError, OSError, RuntimeError, TimeoutError) as e:
        print(f"device-vm: failed: {type(e).__name__}: {e}", flush=True)
    finally:
        if not ok:
            _show_logs(faults=True)
            if run.server is not None:
                print(f"--- vhost-pci server (tail) ---\n{run.server.stderr_tail(60)}")
        run_log = run.out_dir / "run.log"
        if run_log.exists():
            print(f"--- device VM: vhostpci run ---\n{run_log.read_text(errors='replace')[-12000:]}")
        qemu_out = run_dir / "device-vm.out"
        if qemu_out.exists():  # QEMU's messages (the stale function's "server closed socket")
            print(f"--- device VM's QEMU ---\n{qemu_out.read_text(errors='replace')[-4000:]}")
        run.close()
        chroot.leave(mounted)
        run.result["seconds"] = round(time.monotonic() - run.t0, 1)
        print("device-vm: " + json.dumps(run.result, default=str), flush=True)
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=8 << 20, help="the TCP transfer's size")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    what = "then SIGKILL a's QEMU, restart it (a new device, hot-plugged), reboot it"
    ap.add_argument("--faults", action="store_true", help=what)
    ap.add_argument("--after-bytes", type=int, default=16 << 20, help="--faults: the later transfers' size")
    args = ap.parse_args()
    if not (ROOT / ".vhostpci-ready").exists():
        print(f"device-vm: no prepared VM cache at {ROOT}: run tools/vm/prepare", file=sys.stderr)
        return 3
    if args.faults:
        return faults_main(args)
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


def _show_logs(faults: bool = False) -> None:
    guests = [f"vpfault-{n}/agent.err" if faults else f"vpout-{n}/guest.log" for n, _, _ in VMS]
    for name in [*guests, "vpout-dev/run.log", "vpout-dev/guest.log", "vpout-dev/dmesg.log"]:
        path = ROOT / "var/tmp" / name
        text = path.read_text(errors="replace")[-4000:] if path.exists() else "(none)\n"
        sys.stdout.write(f"--- {name} ---\n{text}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
