"""A device-VM driver that dies mid-traffic and starts again resumes the rings where they stopped.

``kill -9`` of ``vhostpci run`` while two simulated driver VMs exchange frames
through it; the host side and the driver VMs stay up; a new ``vhostpci run``
on the same devices takes each ring's used index as its last avail index (as
vhost does after a reconnect, and QEMU's ``virtio_queue_restore_last_avail_idx``)
and traffic goes on: no port broken, no frame corrupted. Frames that were in
flight in the dead process may be lost (or, for a TX chain delivered but not
yet returned, delivered again): they are counted, and bounded by the rings.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.integration.conftest import MAC_A, MAC_B, UUIDS, wait_for
from vhostpci_host.harness import DriverVmProcess, HostServer

QUEUE = 256
FRAMES = 20_000  # each way, sent while the driver is killed and restarted


def fe(vm: DriverVmProcess) -> dict[str, Any]:
    return vm.stats()["frontends"][0]  # type: ignore[no-any-return]


def _run(addresses: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "vhostpci_driver", "run", *addresses, "-v"], env=env, stderr=err
        )


def test_kill_9_of_the_driver_mid_traffic_then_restart_resumes_every_ring(short_dir: Path) -> None:
    server = HostServer(short_dir)
    a = DriverVmProcess(server.socket, [MAC_A], vm_uuid=UUIDS[0], memory="64M", queue_size=QUEUE)
    b = DriverVmProcess(server.socket, [MAC_B], vm_uuid=UUIDS[1], memory="64M", queue_size=QUEUE)
    addresses = [f"vfio-user:{server.device_socket(vm.uuid)}" for vm in (a, b)]
    env = {**os.environ, "VHOSTPCI_RUN_DIR": str(short_dir / "run")}
    log = short_dir / "run.log"
    proc = _run(addresses, env, log)
    try:
        for vm in (a, b):
            vm.read_event("ready", 30)
        a.send(f"send {MAC_B} {FRAMES} 64")
        b.send(f"send {MAC_A} {FRAMES} 64")
        # Mid-traffic: well past a ring's worth of frames each way (indices far from 0), far from done.
        wait_for(lambda: min(fe(a)["received"], fe(b)["received"]) >= 3 * QUEUE, 60, "traffic first")
        before = (fe(a)["received"], fe(b)["received"])
        assert max(before) < FRAMES
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = _run(addresses, env, log)
        # Traffic resumes: every frame not lost in the dead process arrives, none corrupt.
        lost_bound = 2 * QUEUE  # at most a TX ring's and an RX ring's worth in flight per direction
        try:
            least = FRAMES - lost_bound
            wait_for(lambda: fe(a)["received"] >= least and fe(b)["received"] >= least, 60, "traffic after")
        except AssertionError as e:
            tail = log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"{e}: {fe(a)}, {fe(b)}\n{tail}") from None
        wait_for(lambda: fe(a)["sent"] == FRAMES and fe(b)["sent"] == FRAMES, 30, "every frame sent")
        for vm in (a, b):
            st = fe(vm)
            assert st["corrupt"] == 0
            lost = FRAMES - st["received"]
            print(f"{vm.macs[0]}: received {st['received']} of {FRAMES} after a kill -9 at {before}: "
                  f"{lost} lost in flight, {st['duplicates']} delivered twice")  # fmt: skip
            assert 0 <= lost <= lost_bound and st["duplicates"] <= QUEUE
            assert st["received"] > max(before)  # it went on after the restart
        text = log.read_text(errors="replace")
        assert "broken" not in text, text[-2000:]
    finally:
        proc.terminate()
        proc.wait(10)
        for vm in (a, b):
            vm.stop()
        server.stop()
