"""The ``vhostpci-host`` command: the reference host side."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import click

from vhostpci_driver import __version__

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vhostpci-host")
def main() -> None:
    """Serve vhost-pci devices to device VMs and simulate driver VMs."""


@main.command()
@click.option(
    "--socket",
    "socket_path",
    required=True,
    type=click.Path(path_type=Path),
    help="UNIX socket driver VMs connect to.",
)
@click.option(
    "--devices-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where each device's vfio-user socket is created (default: beside --socket).",
)
@click.option("--ping-interval", default=1.0, show_default=True, help="Heartbeat interval, seconds.")
@click.option(
    "--ping-misses", default=3, show_default=True, help="Missed heartbeats before a driver VM is gone."
)
@click.option(
    "--virtio-id", default=63, show_default=True, help="vhost-pci virtio device id (PCI id 0x1040+N)."
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
    help="Seconds a peer may sit on half a message before it is dropped.",
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
        json_status=json_status,
    )
    server = VhostPciServer(cfg)
    server.listen()
    server.serve_forever()


@main.command("limits")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: name -> default.")
def limits_(as_json: bool) -> None:
    """List the peer limits 'serve --limit' takes, with their defaults."""
    known = _limit_defaults()
    if as_json:
        click.echo(json.dumps({n: v for n, (_, v) in known.items()}))
        return
    for name, (where, default) in known.items():
        scope = "in one message" if where == "SockLimits" else "held at once"
        click.echo(f"{name:<26} {default:>14}  ({scope})")


@main.command()
@click.option("--server", required=True, type=click.Path(path_type=Path), help="The vhost-pci server socket.")
@click.option("--uuid", "vm_uuid", default=None, help="This driver VM's UUID (default: a random one).")
@click.option("--net", "macs", multiple=True, required=True, help="A virtio-net frontend with this MAC.")
@click.option("--memory", default="256M", show_default=True, help="Guest memory size.")
@click.option("--queue-size", default=256, show_default=True, help="Virtqueue size of every frontend queue.")
@click.option("-v", "--verbose", is_flag=True)
def frontend(
    server: Path, vm_uuid: str | None, macs: tuple[str, ...], memory: str, queue_size: int, verbose: bool
) -> None:
    """Play a driver VM with virtio-net frontends; commands on stdin, JSON lines on stdout."""
    from vhostpci_host import simulator

    _logging(verbose)
    u = uuid.UUID(vm_uuid) if vm_uuid else uuid.uuid4()
    sys.exit(simulator.run(str(server), u, list(macs), parse_size(memory), queue_size))
