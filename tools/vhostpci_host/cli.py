"""The ``vhostpci-host`` command: the reference host side.

Exit codes as ``vhostpci``'s (vhostpci_driver.command, docs/cli.md): 0 success, 1 a
runtime failure (a peer missing, a socket taken), 2 a usage error, 128+N when signal
N stopped it (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import click

from vhostpci_driver import __version__
from vhostpci_driver.command import Failure, Group, emit, exit_for
from vhostpci_driver.params import MacAddress, QueueSize, SocketPath

if TYPE_CHECKING:
    from vhostpci_driver.wire.sock import SockLimits
    from vhostpci_host.session import PeerLimits

SIZE_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``256M`` -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = SIZE_SUFFIXES.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in SIZE_SUFFIXES else t
    try:
        value = int(digits) * mult
    except ValueError:
        raise click.BadParameter(f"not a size: {text!r} (e.g. 256M, 1G)") from None
    if value <= 0:
        raise click.BadParameter(f"size must be positive: {text!r}")
    return value


def _limit_defaults() -> dict[str, tuple[str, int]]:
    """Every peer limit: name -> (the dataclass it lives in, its default)."""
    from vhostpci_driver.wire.sock import SockLimits
    from vhostpci_host.session import PeerLimits

    out: dict[str, tuple[str, int]] = {}
    for cls in (SockLimits, PeerLimits):
        for f in dataclasses.fields(cls):
            out[f.name] = (cls.__name__, f.default)  # type: ignore[assignment]
    return out


def parse_limits(pairs: tuple[str, ...]) -> tuple[SockLimits, PeerLimits]:
    """``("max_pending=16", "max_mapped_bytes=1G")`` -> the two limit sets."""
    from vhostpci_driver.wire.sock import SockLimits
    from vhostpci_host.session import PeerLimits

    known = _limit_defaults()
    chosen: dict[str, dict[str, int]] = {"SockLimits": {}, "PeerLimits": {}}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in known:
            raise click.BadParameter(f"{pair!r}: expected NAME=VALUE with NAME one of {', '.join(known)}")
        chosen[known[name][0]][name] = parse_size(value)
    try:
        return SockLimits(**chosen["SockLimits"]), PeerLimits(**chosen["PeerLimits"])
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


class HostGroup(Group):
    """``vhostpci_driver.command.Group``; a server that cannot start is a runtime failure too."""

    def run(self, argv: list[str], prog: str) -> None:
        from vhostpci_host.harness import ProcessError
        from vhostpci_host.server import ServerError

        try:
            super().run(argv, prog)
        except (ServerError, ProcessError) as e:
            raise Failure(str(e)) from None


@click.group(name="vhostpci-host", cls=HostGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vhostpci-host")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(debug: bool) -> None:
    """Serve vhost-pci devices to device VMs and simulate driver VMs.

    Exit codes: 0 success, 1 failure, 2 usage error, 130/143 stopped by SIGINT/SIGTERM.
    """


@main.command()
@click.option(
    "--socket",
    "socket_path",
    required=True,
    type=SocketPath(),
    help="UNIX socket driver VMs connect to (its directory must exist; a live server's is refused).",
)
@click.option(
    "--devices-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where each device's vfio-user socket is created (default: SOCKET.devices beside --socket; "
    "made if missing and removed on exit).",
)
@click.option(
    "--ping-interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Heartbeat interval, seconds.",
)
@click.option(
    "--ping-misses",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="Missed heartbeats before a driver VM is gone.",
)
@click.option(
    "--virtio-id",
    default=63,
    show_default=True,
    type=click.IntRange(0, 0xFFFF - 0x1040),
    help="vhost-pci virtio device id (PCI id 0x1040+N).",
)
@click.option("--window-size", default=None, help="Remote window size (default: 2x the driver VM's memory).")
@click.option(
    "--allow-uid",
    "allow_uids",
    multiple=True,
    type=int,
    help="Also accept driver VMs of this uid (default: root and the server's own uid).",
)
@click.option(
    "--limit",
    "limits",
    multiple=True,
    metavar="NAME=VALUE",
    help="Set a peer limit (repeatable; sizes take K/M/G). Names and defaults: 'vhostpci-host limits'.",
)
@click.option(
    "--partial-timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a peer may sit on half a message before it is dropped.",
)
@click.option(
    "--gone-grace",
    default=30.0,
    show_default=True,
    help="Seconds a gone driver VM's device waits for it to come back with its UUID before it is freed.",
)
@click.option(
    "--no-takeover",
    "no_takeover",
    is_flag=True,
    help="Free a gone driver VM's device as soon as the device VM acked its teardown, so one coming "
    "back with its UUID gets a new device (a new vfio-user socket) instead of taking the old one over. "
    "Needed when the device VM's vfio-user client maps BAR 2 once, as QEMU's vfio-user-pci does.",
)
@click.option(
    "--trust-driver-memory",
    is_flag=True,
    help="Accept memory fds that cannot be sealed against shrinking (a truncation then SIGBUSes; "
    "docs/security.md).",
)
@click.option(
    "--direct-doorbells",
    is_flag=True,
    help="Hand each doorbell to the device VM's driver as the driver VM's call eventfd itself (no hop "
    "through the server); trusted driver VMs only (docs/security.md).",
)
@click.option("--json", "json_status", is_flag=True, help="Status as JSON lines on stdout.")
@click.option("-v", "--verbose", is_flag=True)
def serve(
    socket_path: Path,
    devices_dir: Path | None,
    ping_interval: float,
    ping_misses: int,
    virtio_id: int,
    window_size: str | None,
    allow_uids: tuple[int, ...],
    limits: tuple[str, ...],
    partial_timeout: float,
    gone_grace: float,
    no_takeover: bool,
    trust_driver_memory: bool,
    direct_doorbells: bool,
    json_status: bool,
    verbose: bool,
) -> None:
    """Run the vhost-pci server until SIGTERM or SIGINT."""
    from vhostpci_host.server import ServerConfig, VhostPciServer

    _logging(verbose)
    sock_limits, peer_limits = parse_limits(limits)
    cfg = ServerConfig(
        socket_path=socket_path,
        devices_dir=devices_dir or socket_path.parent / f"{socket_path.name}.devices",
        ping_interval=ping_interval,
        ping_misses=ping_misses,
        virtio_id=virtio_id,
        window_size=parse_size(window_size) if window_size else None,
        allow_uids=frozenset({0, os.getuid(), *allow_uids}),
        limits=sock_limits,
        peer_limits=peer_limits,
        partial_timeout=partial_timeout,
        gone_grace=gone_grace,
        takeover=not no_takeover,
        trust_driver_memory=trust_driver_memory,
        direct_doorbells=direct_doorbells,
        json_status=json_status,
    )
    server = VhostPciServer(cfg)
    server.listen()
    server.serve_forever()
    exit_for(server.stopped_by)


@main.command("limits")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: name -> default.")
def limits_(as_json: bool) -> None:
    """List the peer limits 'serve --limit' takes, with their defaults."""
    known = _limit_defaults()
    if as_json:
        emit({"limits": {n: v for n, (_, v) in known.items()}})
        return
    for name, (where, default) in known.items():
        scope = "in one message" if where == "SockLimits" else "held at once"
        click.echo(f"{name:<26} {default:>14}  ({scope})")


@main.command()
@click.option("--server", required=True, type=SocketPath(), help="The vhost-pci server socket.")
@click.option(
    "--uuid", "vm_uuid", default=None, type=click.UUID, help="This driver VM's UUID (default: a random one)."
)
@click.option("--net", "macs", multiple=True, required=True, type=MacAddress(),
              help="A virtio-net frontend with this MAC (repeatable).")  # fmt: skip
@click.option("--memory", default="256M", show_default=True, help="Guest memory size (K/M/G).")
@click.option("--queue-size", default=256, show_default=True, type=QueueSize(),
              help="Virtqueue size of every frontend queue (a power of two).")  # fmt: skip
@click.option(
    "--features",
    default=None,
    help="Feature bits every frontend offers, e.g. 0x20008020 "
    "(default: VERSION_1, EVENT_IDX, MRG_RXBUF, MAC).",
)
@click.option("-v", "--verbose", is_flag=True)
def frontend(
    server: Path,
    vm_uuid: uuid.UUID | None,
    macs: tuple[str, ...],
    memory: str,
    queue_size: int,
    features: str | None,
    verbose: bool,
) -> None:
    """Play a driver VM with virtio-net frontends; commands on stdin, JSON lines on stdout.

    Commands: send MAC COUNT SIZE|mixed [FRONTEND], stats, hostile KIND [FRONTEND], quit.
    Exit 1 if the server is missing or goes away.
    """
    from vhostpci_host import simulator

    _logging(verbose)
    size = parse_size(memory)
    offered = int(features, 0) if features is not None else None
    rc = simulator.run(str(server), vm_uuid or uuid.uuid4(), list(macs), size, queue_size, offered)
    sys.exit(rc)


#: ``--device`` presets: (virtio device type, rings, GET_QUEUE_NUM answer, default features).
#: Net's features are what the device VM's net app implements (vhostpci_driver.apps.net).
def _presets() -> dict[str, tuple[int, int, int, int]]:
    from vhostpci_driver.apps.net import SUPPORTED as NET_FEATURES

    return {"net": (1, 2, 1, NET_FEATURES)}


@main.command("vhost-user")
@click.option(
    "--socket",
    "socket_path",
    required=True,
    type=SocketPath(),
    help="UNIX socket the driver VM's QEMU connects to (-chardev socket,path=...).",
)
@click.option("--server", required=True, type=SocketPath(), help="The vhost-pci server socket.")
@click.option(
    "--uuid",
    "vm_uuid",
    required=True,
    type=click.UUID,
    help="The driver VM's UUID (the same on every reconnect).",
)
@click.option(
    "--device",
    default="net",
    show_default=True,
    help="A preset ('net') or a virtio device type number (then give --rings and --features).",
)
@click.option(
    "--mac",
    default=None,
    type=MacAddress(),
    help="net: the NIC's MAC (its device id, as QEMU's -device mac=).",
)
@click.option("--device-id", default=None, help="The frontend's device id (default: the MAC for net).")
@click.option("--features", default=None, help="Device features to offer, hex (default: the preset's).")
@click.option("--rings", type=int, default=None, help="Virtqueues of the device (net: 2).")
@click.option("--queue-num", type=int, default=None, help="GET_QUEUE_NUM's answer (net: 1 queue pair).")
@click.option(
    "--max-memory", default="64G", show_default=True, help="Most guest memory one SET_MEM_TABLE may lend."
)
@click.option("--json", "json_status", is_flag=True, help="Status as JSON lines on stdout.")
@click.option("-v", "--verbose", is_flag=True)
def vhost_user(
    socket_path: Path,
    server: Path,
    vm_uuid: uuid.UUID,
    device: str,
    mac: str | None,
    device_id: str | None,
    features: str | None,
    rings: int | None,
    queue_num: int | None,
    max_memory: str,
    json_status: bool,
    verbose: bool,
) -> None:
    """Serve one stock QEMU driver VM over vhost-user, as a client of the vhost-pci server.

    Runs until SIGTERM, SIGINT or SIGHUP; one QEMU connection at a time (docs/host.md).
    """
    from vhostpci_host.vhost_user import DoorConfig, VhostUserDoor
    from vhostpci_host.vhost_user_session import FrontendConfig

    _logging(verbose)
    presets = _presets()
    if device in presets:
        dtype, nrings, qnum, feats = presets[device]
    elif device.isdigit() and int(device) > 0:
        if rings is None or features is None:
            raise click.BadParameter(
                "a device type number needs --rings and --features", param_hint="--device"
            )
        dtype, nrings, qnum, feats = int(device), rings, rings, 0
    else:
        raise click.BadParameter(f"{device!r}: 'net' or a virtio device type number", param_hint="--device")
    if device_id is not None:
        did = int(device_id, 0)
    elif mac is not None:
        did = int(mac.replace(":", ""), 16)
    else:
        raise click.BadParameter("give --mac (net) or --device-id", param_hint="--device-id")
    try:
        fe = FrontendConfig(
            device_type=dtype,
            device_id=did,
            features=int(features, 16) if features is not None else feats,
            num_rings=rings if rings is not None else nrings,
            queue_num=queue_num if queue_num is not None else qnum,
            max_mapped_bytes=parse_size(max_memory),
        )
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    door = VhostUserDoor(DoorConfig(socket_path, server, vm_uuid, fe, json_status=json_status))
    door.listen()
    exit_for(door.serve_forever())
