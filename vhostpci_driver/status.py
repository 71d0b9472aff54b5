"""The status socket of a running service: ``vhostpci status`` and ``vhostpci dump`` ask it.

One UNIX stream socket per service (mode 0660: the service's group may ask), one
JSON request line in, one JSON answer line out. ``dump`` reads remote memory
through the service's own region table, so it is bounds-checked exactly like
the data path and works only on mapped regions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vhostpci_driver.errors import RemoteMemoryError, VhostPciError

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
MAX_DUMP = 1 << 20


def run_dir() -> Path:
    """Where services put their status sockets (``$VHOSTPCI_RUN_DIR``, default /run/vhostpci)."""
    return Path(os.environ.get("VHOSTPCI_RUN_DIR", "/run/vhostpci"))


def socket_name(address: str) -> str:
    """A file name for a normalised device address.

    ``0000:00:05.0`` -> ``0000:00:05.0.sock``; ``vfio-user:/run/x/dev.sock`` ->
    ``vfio-user-dev-<8 hex>.sock``: the socket's own name (readable) and a hash of
    its whole path (unique), short enough for ``sun_path`` under any run directory
    that fits one.
    """
    if not address.startswith("vfio-user:"):
        return f"{address}.sock"
    path = address.removeprefix("vfio-user:")
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(path).removesuffix(".sock"))[:40]
    return f"vfio-user-{stem}-{hashlib.sha256(path.encode()).hexdigest()[:8]}.sock"


def alive(path: Path) -> bool:
    """Whether a service answers on ``path`` (a socket left by a killed service refuses)."""
    return _alive(path)


class StatusServer:
    """Answers status requests; the service calls :meth:`serve_ready` when the socket is readable."""

    def __init__(
        self, path: Path, status: Callable[[], dict[str, Any]], dump: Callable[[int, int], bytes]
    ) -> None:
        self.path = path
        self.status = status
        self.dump = dump
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if _alive(path):
                raise VhostPciError(f"{path}: another service is already serving this device")
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117)  # born 0660
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        self.sock.listen(8)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve_ready(self) -> None:
        """Answer every waiting client (each gets one request, one answer, a 1 s budget)."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            with conn:
                conn.settimeout(1.0)
                try:
                    conn.sendall(json.dumps(self._answer(conn), default=str).encode() + b"\n")
                except OSError as e:
                    log.info("status client went away: %s", e)

    def _answer(self, conn: socket.socket) -> dict[str, Any]:
        try:
            raw = b""
            while not raw.endswith(b"\n") and len(raw) < MAX_REQUEST:
                chunk = conn.recv(MAX_REQUEST)
                if not chunk:
                    break
                raw += chunk
            req = json.loads(raw or b"{}")
            if not isinstance(req, dict):
                return {"error": "the request must be a JSON object"}
        except (OSError, ValueError) as e:
            return {"error": f"bad request: {e}"}
        cmd = req.get("cmd", "status")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "dump":
            xgpa, length = req.get("xgpa"), req.get("len")
            if not isinstance(xgpa, int) or not isinstance(length, int) or not 0 < length <= MAX_DUMP:
                return {"error": f"dump needs integer xgpa and len (1..{MAX_DUMP})"}
            try:
                return {"ok": True, "xgpa": xgpa, "hex": self.dump(xgpa, length).hex()}
            except RemoteMemoryError as e:
                return {"error": str(e)}
        return {"error": f"unknown command {cmd!r}"}

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:  # a service that dropped root may not own the directory any more
            log.warning("cannot remove %s: %s", self.path, e.strerror)


def _alive(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def ask(path: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request to a service's status socket. Raises PermissionError/OSError for the caller to explain."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        raw = b""
        while not raw.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            raw += chunk
    answer = json.loads(raw)
    if not isinstance(answer, dict):
        raise VhostPciError(f"{path}: answered with something that is not an object")
    return answer
