"""In the device VM (tools/vm/device_vm.py): one switch serving every vhost-pci function, as a user starts it.

With the ``vhostpci`` command only: ``vhostpci list --json`` until the
functions QEMU attached are all there, ``vhostpci bind`` each to vfio-pci,
one ``vhostpci run ADDR...`` serving them all with the net switch, then
``vhostpci status --json`` every few seconds until the host says stop; then
SIGTERM to the run, and ``vhostpci unbind`` each. The host talks to this
through the runner's virtio-serial control port, one line each way:

    to the host:   serving ADDR...          the run serves them (both ports are not up yet)
                   status {json}            what ``vhostpci status --json`` said
                   stopped RC               the run's exit status after SIGTERM (143 is clean)
                   error MESSAGE            and this exits 1
    from the host: stop

The run's log goes to OUT/run.log. Every wait is bounded.

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
import time

VHOSTPCI = [sys.executable, "-m", "vhostpci_driver"]


def vhostpci(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VHOSTPCI, *args], capture_output=True, text=True, timeout=120, check=False)


class Port:
    """The guest's end of the control port: whole lines out, whole lines in."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.buf = b""

    def say(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def heard(self, timeout: float) -> list[str]:
        if select.select([self.fd], [], [], timeout)[0]:
            self.buf += os.read(self.fd, 4096)
        *lines, self.buf = self.buf.split(b"\n")
        return [ln.decode().strip() for ln in lines]


def functions(count: int, timeout: float) -> list[str]:
    """The vhost-pci functions' addresses, once ``count`` of them are listed."""
    deadline = time.monotonic() + timeout
    while True:
        out = vhostpci("list", "--json")
        found = [f["address"] for f in json.loads(out.stdout)["functions"]] if out.returncode == 0 else []
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(found)} vhost-pci function(s) listed, {count} expected: {out.stderr}")
        time.sleep(1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--functions", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", default="/dev/virtio-ports/vhostpci.ctl")
    ap.add_argument("--every", type=float, default=3.0, help="seconds between two status samples")
    ap.add_argument("--timeout", type=float, default=900.0, help="the longest this waits for 'stop'")
    a = ap.parse_args()
    port = Port(a.port)
    run = None
    bound: list[str] = []
    try:
        addresses = functions(a.functions, 120)
        for address in addresses:
            out = vhostpci("bind", address)
            if out.returncode != 0:
                raise RuntimeError(f"vhostpci bind {address}: {out.stderr.strip()}")
            bound.append(address)
        with open(os.path.join(a.out, "run.log"), "wb") as log:
            run = subprocess.Popen([*VHOSTPCI, "run", *addresses, "--app", "net-switch"], stderr=log)
        port.say("serving " + " ".join(addresses))
        deadline = time.monotonic() + a.timeout
        while time.monotonic() < deadline and run.poll() is None:
            if "stop" in port.heard(a.every):
                break
            out = vhostpci("status", "--json")
            if out.returncode == 0:
                port.say("status " + json.dumps(json.loads(out.stdout), separators=(",", ":")))
        if run.poll() is not None:
            raise RuntimeError(f"vhostpci run exited with {run.returncode} before it was stopped")
        run.send_signal(signal.SIGTERM)
        port.say(f"stopped {run.wait(60)}")
        return 0
    except Exception as e:
        port.say(f"error {type(e).__name__}: {e}")
        return 1
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait(30)
        for address in bound:
            vhostpci("unbind", address)


if __name__ == "__main__":
    sys.exit(main())
