"""A vhost-pci device alone behind a vfio-user socket, for tests/integration/test_region_io_fds.py.

``python -m tests.integration.loopback_device PATH MODE`` serves one device
whose notification slot 0 has one eventfd as both kick and call (as
``vhostpci bench`` does), so a doorbell the client rings comes straight back as
the slot's interrupt. MODE says how the server answers GET_REGION_IO_FDS:
``ioeventfd`` (as the reference server does), ``none`` (offers no register) or
``refuse`` (ENOSYS, as a server that predates the command). JSON lines on
stdout: ``listening`` then ``stats`` (server messages, device counters, open
fds) for every ``stats`` line on stdin.
"""

from __future__ import annotations

import errno
import json
import os
import sys

from vhostpci_host.device_model import VhostPciDeviceModel
from vhostpci_host.vfio_device import IoEventFdSpec, VfioDeviceError
from vhostpci_host.vfio_user_server import VfioUserServer


class _OldServer(VfioUserServer):
    """A server without GET_REGION_IO_FDS: the command is unknown to it."""

    def _region_io_fds(self, body: bytes, num_regions: int) -> tuple[bytes, list[int]]:
        raise VfioDeviceError(errno.ENOSYS, "command 6 not supported")


def _emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main(path: str, mode: str) -> None:
    model = VhostPciDeviceModel(window_size=1 << 24, num_slots=8)
    server = (_OldServer if mode == "refuse" else VfioUserServer)(path, model)
    model.attach_loop(server.add_reader, server.remove_reader)
    if mode == "none":

        def no_registers(index: int) -> list[IoEventFdSpec]:
            return []

        model.io_fds = no_registers  # type: ignore[method-assign]
    loop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    model.assign_slot(loop, loop)
    running = True

    def command() -> None:
        nonlocal running
        # Raw reads: a buffered readline() would keep a second line where select() cannot see it.
        chunk = os.read(sys.stdin.fileno(), 4096)
        running = bool(chunk)
        for _ in range(chunk.count(b"stats\n")):
            fds = len(os.listdir("/proc/self/fd"))
            _emit("stats", messages=server.stats["messages"], fds=fds, **model.counters)

    server.add_reader(sys.stdin.fileno(), command)
    _emit("listening", socket=path)
    try:
        while running:
            server.run_once(0.5)
    finally:
        server.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
