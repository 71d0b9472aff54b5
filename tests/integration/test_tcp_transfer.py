"""tools/vm/tcp_transfer.py (the driver VMs' bounded TCP transfer) on this host, over IPv6 loopback, no VM.

The VM tier's SIGKILL test kills the sender mid-transfer; the receiver must then say
how much came and why it ended, within its own timeout, not die with a traceback.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools/vm/tcp_transfer.py"


def _free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


def _server(port: int, nbytes: int, timeout: float) -> subprocess.Popen[str]:
    argv = [sys.executable, str(TOOL), "server", "--bytes", str(nbytes), "--port", str(port),
            "--timeout", str(timeout)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _connect(port: int) -> socket.socket:
    deadline = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection(("::1", port), timeout=10)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_sender_that_vanishes_mid_transfer_is_reported_with_what_came() -> None:
    port = _free_port()
    srv = _server(port, 1 << 20, 2.0)
    try:
        data = bytes(range(256)) * 4
        with _connect(port) as s:
            s.sendall(data)
            # Like a killed QEMU's guest: no FIN, no RST, just silence until the receiver gives up.
            out, err = srv.communicate(timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
    assert srv.returncode == 1, err
    assert f"bytes={len(data)} sha256={hashlib.sha256(data).hexdigest()} " in out
    assert "end=TimeoutError" in out and "Traceback" not in err


def test_a_whole_transfer_has_the_same_sha256_at_both_ends() -> None:
    port = _free_port()
    srv = _server(port, 3 << 20, 30.0)
    client = subprocess.run(
        [sys.executable, str(TOOL), "client", "--peer", "::1", "--bytes", str(3 << 20), "--port", str(port),
         "--timeout", "30"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    out, err = srv.communicate(timeout=30)
    assert client.returncode == 0 and srv.returncode == 0, (client.stderr, err)
    sums = [line.split("sha256=")[1].split()[0] for line in (client.stdout, out)]
    assert sums[0] == sums[1] and "end=complete" in out and f"bytes={3 << 20} " in client.stdout
