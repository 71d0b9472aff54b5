"""In the device VM (tools/vm/device_vm.py): one switch serving every vhost-pci function, as a user starts it.

With the ``vhostpci`` command only: ``vhostpci list --json`` until the
functions QEMU attached are all there, ``vhostpci bind`` each to vfio-pci,
one ``vhostpci run --watch ADDR...`` serving them all with the net switch
(and, through udev, every function bound to vfio-pci later), then ``vhostpci
status --json`` every few seconds until the host says stop; then SIGTERM to the
run (no unbind: the VM is discarded, and main() says why). Meanwhile ``vhostpci list --json`` every
couple of seconds: a function the host hot-plugged (a restarted driver VM's new
device, ``serve --no-takeover``) is bound to vfio-pci as a user's udev rule
would, and the run's --watch serves it. The host talks to this through the
runner's virtio-serial control port, one line each way:

    to the host:   serving ADDR...          the run serves them (both ports are not up yet)
                   status {json}            what ``vhostpci status --json`` said
                   log LINE                 a line of the run's log, as it is written
                   bound ADDR S bar2=WHERE  a hot-plugged function bound to vfio-pci in S seconds
                   stopped RC               the run's exit status after SIGTERM (143 is clean)
                   error MESSAGE            and this exits 1
    from the host: stop

The run's log goes to OUT/run.log and, line by line as the run writes it, to
the host (which times the lifecycle lines' arrival: the 9p file may lag).
Every wait is bounded.

    python3 device_guest.py --functions N --out DIR [--port /dev/virtio-ports/vhostpci.ctl]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import BinaryIO

VHOSTPCI = [sys.executable, "-m", "vhostpci_driver"]


def vhostpci(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VHOSTPCI, *args], capture_output=True, text=True, timeout=120, check=False)


class Port:
    """The guest's end of the control port: whole lines out (from any thread), whole lines in."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.buf = b""
        self._lock = threading.Lock()

    def say(self, line: str) -> None:
        data = line.encode() + b"\n"
        with self._lock:  # one line at a time: the log relay says lines too
            while data:
                data = data[os.write(self.fd, data) :]

    def heard(self, timeout: float) -> list[str]:
        if select.select([self.fd], [], [], timeout)[0]:
            self.buf += os.read(self.fd, 4096)
        *lines, self.buf = self.buf.split(b"\n")
        return [ln.decode().strip() for ln in lines]


def listed() -> dict[str, str | None]:
    """Every vhost-pci function ``vhostpci list --json`` shows, with its driver."""
    out = vhostpci("list", "--json")
    if out.returncode != 0:
        return {}
    return {f["address"]: f["driver"] for f in json.loads(out.stdout)["functions"]}


def functions(count: int, timeout: float) -> list[str]:
    """The vhost-pci functions' addresses, once ``count`` of them are listed."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(listed())
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(found)} vhost-pci function(s) listed, {count} expected")
        time.sleep(1)


def bar(address: str, index: int) -> str:
    """BAR ``index`` as sysfs shows it (start-end-flags): where a hot-plugged function's BAR went
    (into its root port's window, as the firmware reserved it) or did not."""
    with open(f"/sys/bus/pci/devices/{address}/resource") as f:
        return "-".join(f.read().splitlines()[index].split())


def translated(address: str) -> None:
    """Give the function's IOMMU group a translated (DMA) default domain instead of ``iommu=pt``'s identity.

    When the run closes a function whose vfio-user host went away (the server freed its device:
    ``serve --no-takeover``), the kernel hands the group back its default domain. An identity
    domain makes QEMU map all guest RAM for the device through the dead socket; the map fails and
    QEMU 11.1.3 stops the whole device VM ("hardware error: vfio: DMA mapping failed, unable to
    continue", seen in a run). An empty DMA domain asks QEMU for nothing. The kernel takes the
    change only while no driver holds the group (Documentation/ABI/testing/sysfs-kernel-iommu_groups).
    """
    dev = f"/sys/bus/pci/devices/{address}"
    group = os.path.join(dev, "iommu_group")
    if not os.path.exists(group):
        return  # no IOMMU (no-IOMMU mode): there is no domain to change
    with open(os.path.join(group, "type")) as f:
        if f.read().strip().startswith("DMA"):
            return
    if os.path.exists(os.path.join(dev, "driver")):
        with open(os.path.join(dev, "driver", "unbind"), "w") as f:  # virtio-pci took it at boot
            f.write(address)
    with open(os.path.join(group, "type"), "w") as f:
        f.write("DMA")


def bind(address: str) -> None:
    translated(address)
    out = vhostpci("bind", address)
    if out.returncode != 0:
        raise RuntimeError(f"vhostpci bind {address}: {out.stderr.strip()}")


def relay(run: subprocess.Popen[bytes], log: BinaryIO, port: Port) -> None:
    """The run's stderr into its log file and to the host, line by line, until the run closes it."""
    assert run.stderr is not None
    for raw in run.stderr:
        log.write(raw)
        log.flush()
        port.say("log " + raw.decode(errors="replace").rstrip("\n"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--functions", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", default="/dev/virtio-ports/vhostpci.ctl")
    ap.add_argument("--every", type=float, default=3.0, help="seconds between two status samples")
    ap.add_argument("--list-every", type=float, default=2.0, help="seconds between two looks for functions")
    ap.add_argument("--timeout", type=float, default=900.0, help="the longest this waits for 'stop'")
    a = ap.parse_args()
    port = Port(a.port)
    run = None
    bound: list[str] = []
    try:
        addresses = functions(a.functions, 120)
        for address in addresses:
            bind(address)
            bound.append(address)
        log = open(os.path.join(a.out, "run.log"), "wb")  # noqa: SIM115  (the relay thread writes it)
        argv = [*VHOSTPCI, "run", "--watch", *addresses, "--app", "net-switch"]
        run = subprocess.Popen(argv, stderr=subprocess.PIPE)
        relayed = threading.Thread(target=relay, args=(run, log, port), daemon=True)
        relayed.start()
        port.say("serving " + " ".join(addresses))
        deadline = time.monotonic() + a.timeout
        next_status = next_list = 0.0
        while time.monotonic() < deadline and run.poll() is None:
            if "stop" in port.heard(min(a.every, a.list_every)):
                break
            now = time.monotonic()
            if now >= next_list:
                next_list = now + a.list_every
                for address, driver in listed().items():
                    if driver == "vfio-pci" or address in bound:
                        continue  # (a stale function, its host gone, stays bound: nothing to do)
                    t0 = time.monotonic()
                    bind(address)
                    bound.append(address)
                    took = time.monotonic() - t0
                    port.say(f"bound {address} {took:.1f} bar2={bar(address, 2)}")
                    with open(os.path.join(a.out, "dmesg.log"), "wb") as f:  # how the kernel placed it
                        subprocess.run(["dmesg"], stdout=f, timeout=30, check=False)
            if now >= next_status:
                next_status = now + a.every
                out = vhostpci("status", "--json")
                if out.returncode == 0:
                    port.say("status " + json.dumps(json.loads(out.stdout), separators=(",", ":")))
        if run.poll() is not None:
            raise RuntimeError(f"vhostpci run exited with {run.returncode} before it was stopped")
        run.send_signal(signal.SIGTERM)
        rc = run.wait(60)
        relayed.join(10)  # the run's last lines (each port's counters as it went down) first
        port.say(f"stopped {rc}")
        return 0
    except Exception as e:
        port.say(f"error {type(e).__name__}: {e}")
        return 1
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait(30)
        # No 'vhostpci unbind' at the end: this VM is discarded, and a dead function (its host gone)
        # given back to virtio-pci has its probe map DMA through the dead socket, which stops QEMU
        # 11.1.3 ("hardware error: vfio: DMA mapping failed", seen in runs): it stays with vfio-pci.


if __name__ == "__main__":
    sys.exit(main())
