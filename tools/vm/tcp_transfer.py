"""A bounded TCP transfer between two driver VMs, checked by sha256 at both ends (run in the guests).

    python3 tcp_transfer.py server --bytes N [--port P] [--timeout S]
    python3 tcp_transfer.py client --peer ADDR%IF --bytes N [--port P] [--timeout S]

The client sends N pseudo-random bytes (a fixed seed) and prints their sha256
and the throughput; the server takes exactly N bytes and prints theirs (or, when
the peer stops short, how many came and why it ended: ``end=TimeoutError``). Every
step has a timeout: nothing waits forever, nothing sends more than N.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import socket
import sys
import time

CHUNK = 64 * 1024


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=("server", "client"))
    ap.add_argument("--peer", default="")
    ap.add_argument("--bytes", type=int, required=True)
    ap.add_argument("--port", type=int, default=5201)
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args()
    h = hashlib.sha256()
    deadline = time.monotonic() + a.timeout
    if a.role == "server":
        ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("::", a.port))
        ls.listen(1)
        ls.settimeout(a.timeout)
        conn, _ = ls.accept()
        conn.settimeout(max(1.0, deadline - time.monotonic()))
        got = 0
        t0 = time.monotonic()
        why = "complete"
        try:
            while got < a.bytes:
                data = conn.recv(min(CHUNK, a.bytes - got))
                if not data:
                    why = "closed"
                    break
                h.update(data)
                got += len(data)
        except OSError as e:  # the timeout, or a reset: say how far it got (a peer killed mid-transfer)
            why = type(e).__name__
        dt = time.monotonic() - t0
        print(f"tcp-server bytes={got} sha256={h.hexdigest()} seconds={dt:.2f} end={why}", flush=True)
        return 0 if got == a.bytes else 1
    rng = random.Random(0x5EED)
    addr, _, ifname = a.peer.partition("%")
    scope = socket.if_nametoindex(ifname) if ifname else 0
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(a.timeout)
    while True:
        try:
            s.connect((addr, a.port, 0, scope))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
            s.close()
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.settimeout(a.timeout)
    sent = 0
    t0 = time.monotonic()
    while sent < a.bytes:
        chunk = rng.randbytes(min(CHUNK, a.bytes - sent))
        s.sendall(chunk)
        h.update(chunk)
        sent += len(chunk)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # the server closes once it has everything
    dt = time.monotonic() - t0
    print(
        f"tcp-client bytes={sent} sha256={h.hexdigest()} seconds={dt:.2f} mbit_s={sent * 8 / dt / 1e6:.2f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
