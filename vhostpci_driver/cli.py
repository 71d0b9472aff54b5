"""The ``vhostpci`` command (guest side).

Every command that reads has ``--json``; every JSON document carries ``schema``
and an error under ``--json`` is JSON too (docs/cli.md). Exit codes: 0 success,
1 a runtime failure, 2 a usage error, 128+N when signal N stopped the command
(130 SIGINT, 143 SIGTERM). An error is one line saying what was wrong and what to
do; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vhostpci_driver import __version__
from vhostpci_driver.command import EXIT_FAILURE, Failure, Group, emit, exit_for, stop_on_signals
from vhostpci_driver.errors import VhostPciError
from vhostpci_driver.params import DeviceAddress, FrameSize, Integer

if TYPE_CHECKING:
    from vhostpci_driver.service import App, Service

APPS = ("net-switch", "net-loopback", "none")
# vhostpci_driver.pci.open.BACKENDS (not imported: --help stays fast; a test checks they agree)
PCI_BACKENDS = ("auto", "vfio", "vfio-cdev", "vfio-group", "uio")
# vhostpci_driver.bench.BENCHMARKS (not imported, for the same reason; a test checks they agree)
BENCHMARKS = (
    "ring-batch", "cpython-floor", "ack-round-trip", "controlq-storm", "net-switch-64", "net-switch-1500",
    "net-switch-64k", "notify-interrupt", "bring-up", "memory",
)  # fmt: skip
#: the kernel drivers each --backend serves under --watch
WATCH_DRIVERS = {
    "auto": ("vfio-pci", "uio_pci_generic"),
    "vfio": ("vfio-pci",),
    "vfio-cdev": ("vfio-pci",),
    "vfio-group": ("vfio-pci",),
    "uio": ("uio_pci_generic",),
}
#: drivers a vhost-pci function can be given to (the kernel's own, and the two this toolkit serves through)
CANDIDATE_DRIVERS = ("virtio-pci", "vfio-pci", "uio_pci_generic")
#: the highest virtio id whose modern PCI device id (0x1040 + id) fits 16 bits
MAX_VIRTIO_ID = 0xFFFF - 0x1040


def setup_logging(verbose: bool) -> None:
    """Plain lines on a terminal, one JSON object per line under journald (JOURNAL_STREAM is set)."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") and not sys.stderr.isatty():
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": record.levelname, "logger": record.name, "message": record.getMessage()})


@click.group(name="vhostpci", cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vhostpci")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(debug: bool) -> None:
    """Drive vhost-pci functions from inside the device VM.

    Exit codes: 0 success, 1 failure, 2 usage error, 130/143 stopped by SIGINT/SIGTERM.
    Shell completion and the --json schemas: docs/cli.md.
    """


# -- run ----------------------------------------------------------------------------------------


def sd_notify(state: str) -> bool:
    """Tell systemd (``Type=notify``) about ``state`` (``READY=1``); False outside a notify unit."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return False
    addr = "\0" + where[1:] if where.startswith("@") else where  # '@' names an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(state.encode(), addr)
        except OSError as e:
            logging.getLogger("vhostpci.run").warning("cannot notify systemd at %s: %s", where, e)
            return False
    return True


@main.command()
@click.argument("addresses", nargs=-1, type=DeviceAddress())
@click.option(
    "--watch",
    is_flag=True,
    help="Also serve every vhost-pci function bound to vfio-pci (or uio_pci_generic, see --backend) now, "
    "and those hot-plugged later (pyudev).",
)
@click.option(
    "--app",
    type=click.Choice(APPS),
    default="net-switch",
    show_default=True,
    help="What serves the frontends: the net switch, net loopback, or nothing (control plane only).",
)
@click.option(
    "--polling",
    is_flag=True,
    help="Spin on the rings instead of sleeping on interrupts (status, hot-unplug and signals still work).",
)
@click.option(
    "--backend",
    "pci_backend",
    type=click.Choice(PCI_BACKENDS),
    default="auto",
    show_default=True,
    help="How to open a PCI address: by the driver it is bound to (vfio-pci: VFIO, uio_pci_generic: "
    "UIO, no IOMMU protection), or only with VFIO or only with UIO. VFIO uses the device cdev and "
    "iommufd where the kernel offers them, else the group; vfio-cdev and vfio-group insist on one.",
)
@click.option(
    "--user",
    default=None,
    metavar="USER[:GROUP]",
    help="Drop root to this user once the functions are open; status sockets go to its group.",
)
@click.option("-v", "--verbose", is_flag=True)
def run(
    addresses: tuple[str, ...],
    watch: bool,
    app: str,
    polling: bool,
    pci_backend: str,
    user: str | None,
    verbose: bool,
) -> None:
    """Serve vhost-pci functions (PCI addresses or vfio-user:PATH) until SIGTERM.

    Acks in flight are finished and every device is reset on the way out. A
    function that is hot-unplugged is let go; a vfio-user host that goes away is
    logged and its device dropped. Under systemd (Type=notify) readiness is sent
    once every named function is served. A device that fails (needs a reset) stops
    only itself. Exit 143 on SIGTERM, 130 on SIGINT, 1 if every device failed or
    its host went away, 0 when every function was unplugged.
    """
    if not addresses and not watch:
        raise click.UsageError("name at least one ADDRESS, or use --watch")
    from vhostpci_driver import privilege

    identity = privilege.resolve(user) if user else None  # a typo fails before anything is touched
    from vhostpci_driver.apps.net import NetBackend
    from vhostpci_driver.service import Service
    from vhostpci_driver.status import run_dir

    setup_logging(verbose)
    log = logging.getLogger("vhostpci.run")
    backend = NetBackend("switch" if app == "net-switch" else "loopback") if app != "none" else None
    service = Service([], backend, polling=polling)
    service.watching = watch
    stopped_by: list[int] = []

    def stop(signum: int) -> None:
        stopped_by.append(signum)
        service.stop.set()

    # Signals first: a SIGTERM must stop us cleanly from the moment '--watch' says it watches.
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    old_wakeup = signal.set_wakeup_fd(stop_w)
    old = {s: signal.signal(s, lambda signum, _f: stop(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for address in dict.fromkeys(addresses):  # the same function named twice is served once
            _serve(service, address, backend, pci_backend, polling, log)
        if watch:
            _watch(service, pci_backend, polling, log)

        def drain_wakeups() -> None:
            os.read(stop_r, 64)  # the signal already set service.stop; the pipe only woke the selector

        service.add_reader(stop_r, drain_wakeups)
        if identity is not None:
            statuses = [s.status.path for s in service.served.values() if s.status is not None]
            privilege.drop(identity, [run_dir(), *statuses])
            log.info("running as %s (uid %d, gid %d)", identity.name, identity.uid, identity.gid)
        sd_notify(f"READY=1\nSTATUS=serving {len(service.served)} function(s)")
        service.run()
        sd_notify("STOPPING=1")
        if service.error:
            raise Failure(service.error)
        # Finish what is in flight (acks of messages already taken) before resetting.
        for dev in service.devices:
            if dev.failed is None:  # a failed one was reset when it failed
                dev.process()
        log.info("stopping: %d device(s) reset", len(service.devices))
    finally:
        service.close()
        signal.set_wakeup_fd(old_wakeup)
        for s, h in old.items():
            signal.signal(s, h)
        os.close(stop_r)
        os.close(stop_w)
    exit_for(stopped_by[0] if stopped_by else None)


def _serve(
    service: Service, address: str, backend: App | None, pci_backend: str, polling: bool, log: logging.Logger
) -> None:
    """Open ``address`` and hand it to ``service`` with its status socket."""
    from vhostpci_driver.apps.net import net_policy
    from vhostpci_driver.device import VhostPciDevice
    from vhostpci_driver.pci.open import open_function
    from vhostpci_driver.status import StatusServer, run_dir, socket_name

    # Refuse before touching the function (opening it resets it): one already served, or not ours.
    path = run_dir() / socket_name(address)
    st = StatusServer(path, lambda: {}, lambda x, n: b"")  # raises if another service answers there
    try:
        if not address.startswith("vfio-user:"):
            _require_vhost_pci(address)
        fn = open_function(address, prefer=pci_backend, sysfs_root=_sysfs_root())
        # The device owns fn from here: it closes it, on failure too.
        dev = VhostPciDevice(fn, policies={1: net_policy} if backend else None, polling=polling)
    except BaseException:
        st.close()
        raise
    st.status, st.dump = _status_of(address, dev, backend), dev.table_dump
    service.add(address, dev, st)
    log.info("serving %s (status socket %s)", address, path)


def _require_vhost_pci(address: str) -> None:
    from vhostpci_driver.pci import sysfs
    from vhostpci_driver.spec.virtio_pci import VIRTIO_PCI_VENDOR
    from vhostpci_driver.wire.device import pci_device_id

    info = sysfs.info(address, _sysfs_root())
    if (info.vendor, info.device) != (VIRTIO_PCI_VENDOR, pci_device_id()):
        raise Failure(
            f"{info.address} is {info.vendor:04x}:{info.device:04x}, not a vhost-pci function; not touched"
        )


def _watch(service: Service, pci_backend: str, polling: bool, log: logging.Logger) -> None:
    """Serve present vhost-pci functions bound to the backend's drivers, and follow hot-plug (pyudev)."""
    import pyudev

    from vhostpci_driver.pci import sysfs
    from vhostpci_driver.wire.device import pci_device_id

    drivers = WATCH_DRIVERS[pci_backend]

    def try_serve(address: str) -> None:
        try:
            _serve(service, address, service.app, pci_backend, polling, log)
        except VhostPciError as e:  # one function's failure does not stop the others
            log.warning("cannot serve %s: %s", address, e)

    for f in sysfs.list_functions(device=pci_device_id(), root=_sysfs_root()):
        if f.driver in drivers and f.address not in service.served:
            try_serve(f.address)
    monitor = pyudev.Monitor.from_netlink(pyudev.Context())
    monitor.filter_by(subsystem="pci")
    monitor.start()

    def on_event() -> None:
        for dev in iter(lambda: monitor.poll(timeout=0), None):
            addr = dev.sys_name
            if dev.action == "remove" and addr in service.served:
                service.remove(addr)
            elif (
                dev.action in ("add", "bind")
                and addr not in service.served
                and dev.attributes.get("device") == f"0x{pci_device_id():04x}".encode()
                and dev.driver in drivers
            ):
                try_serve(addr)

    service.add_reader(monitor.fileno(), on_event)
    log.info("watching for vhost-pci functions (serving %d)", len(service.served))


def _status_of(address: str, dev: Any, backend: Any) -> Callable[[], dict[str, Any]]:
    from vhostpci_driver.virtqueue import native  # which rings this service runs

    def status() -> dict[str, Any]:
        out = {"address": address, "pid": os.getpid(), "datapath": native.PATH, **dev.dump()}
        if backend is not None:
            out["ports"] = backend.stats()
        return out

    return status


# -- status and dump ------------------------------------------------------------------------------


def _sockets(address: str | None) -> list[Path]:
    from vhostpci_driver.status import run_dir, socket_name

    d = run_dir()
    if address is not None:
        return [d / socket_name(address)]
    return sorted(d.glob("*.sock")) if d.is_dir() else []


class _NoService(Failure):
    """Nothing answers on a status socket: none there, or one a killed service left behind."""


def _ask(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    from vhostpci_driver.status import ask

    try:
        return ask(path, request)
    except PermissionError:
        raise Failure(
            f"{path}: permission denied; run as root or as a member of the service's group "
            "(see 'vhostpci run --user' in README)"
        ) from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise _NoService(
            f"{path}: no service is running for this device (start one with 'vhostpci run')"
        ) from None
    except TimeoutError:
        raise Failure(f"{path}: the service did not answer within 5 s (is it stopped?)") from None


@main.command()
@click.argument("address", required=False, type=DeviceAddress())
@click.option("--json", "as_json", is_flag=True, help="One JSON object (schema: docs/cli.md).")
def status(address: str | None, as_json: bool) -> None:
    """Show what running services serve: remote, regions, frontends, features, counters.

    Without ADDRESS, every service in $VHOSTPCI_RUN_DIR; a socket left by a killed
    service is reported as stale and skipped.
    """
    from vhostpci_driver.report import status_lines

    states: list[dict[str, Any]] = []
    stale: list[str] = []
    for p in _sockets(address):
        try:
            answer = _ask(p, {"cmd": "status"})
        except _NoService:
            if address is not None:
                raise
            stale.append(str(p))  # a service killed with SIGKILL leaves its socket: not the others' problem
            continue
        states.append(answer.get("status", answer))
    for gone in stale:
        click.echo(f"vhostpci: note: {gone}: stale status socket (its service is gone); skipped", err=True)
    if not states:
        raise Failure("no vhostpci service is running (start one with 'vhostpci run')")
    if as_json:
        emit({"services": states, "stale": stale})
        return
    for i, st in enumerate(states):
        if i:
            click.echo("")
        for line in status_lines(st):
            click.echo(line)


@main.command()
@click.argument("address", type=DeviceAddress())
@click.option(
    "--xgpa", required=True, type=Integer(metavar="XGPA"), help="Driver-VM physical address (0x hex)."
)
@click.option("--len", "length", default=256, show_default=True, type=click.IntRange(1, 1 << 20))
@click.option("--json", "as_json", is_flag=True, help="One JSON object (schema: docs/cli.md).")
def dump(address: str, xgpa: int, length: int, as_json: bool) -> None:
    """Hexdump driver-VM memory through the running service's window (mapped regions only)."""
    (path,) = _sockets(address)
    ans = _ask(path, {"cmd": "dump", "xgpa": xgpa, "len": length})
    if "error" in ans:
        raise Failure(ans["error"])
    data = bytes.fromhex(ans["hex"])
    if as_json:
        emit({"address": address, "xgpa": xgpa, "hex": ans["hex"]})
        return
    for off in range(0, len(data), 16):
        row = data[off : off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        click.echo(f"{xgpa + off:016x}  {row.hex(' '):<47}  {text}")


# -- demo -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _host_side_failures(kind: type[Exception]) -> Iterator[None]:
    """A host-side process that failed or went quiet is a runtime failure: its log's tail, then one line."""
    try:
        yield
    except kind as e:
        first, _, tail = str(e).partition("\n")
        if tail:
            click.echo(tail, err=True)
        raise Failure(first) from None


@main.command()
@click.option("--frontends", default=2, show_default=True, type=click.IntRange(1, 16))
@click.option("--packets", default=20000, show_default=True, type=click.IntRange(1, 10_000_000),
              help="Frames in all, shared between the frontends.")  # fmt: skip
@click.option("--size", default="mixed", show_default=True, type=FrameSize(), help="Frame size in bytes.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object with the summary (docs/cli.md).")
def demo(frontends: int, packets: int, size: str, as_json: bool) -> None:
    """Run the whole system here: host side, simulated driver VMs, this driver, the net switch.

    Ctrl-C, SIGTERM or SIGHUP stop it cleanly (exit 130, 143, 129): the driver
    lets go first, then the driver VMs and the server, and its files in $TMPDIR go.
    """
    from vhostpci_driver.demo import run_demo
    from vhostpci_host.harness import ProcessError

    with stop_on_signals(), _host_side_failures(ProcessError):
        show = sys.stderr.isatty() and not as_json
        if show:
            with click.progressbar(length=packets, label="frames", file=sys.stderr) as bar:
                done = [0]

                def progress(received: int, total: int) -> None:
                    bar.update(received - done[0])
                    done[0] = received

                result = run_demo(frontends, packets, size, progress=progress)
        else:
            started: list[bool] = []

            def say_started(_received: int, total: int) -> None:
                if not started:
                    started.append(True)
                    click.echo(
                        f"vhostpci demo: switching {total} frames between {frontends} driver VMs", err=True
                    )

            result = run_demo(frontends, packets, size, progress=say_started)
    summary = result.as_dict()
    if as_json:
        emit(summary)
    else:
        p, t = summary["packets"], summary["throughput"]
        click.echo(
            f"{summary['frontends']} frontends, {summary['requests']} controlq requests, "
            f"acks {summary['acks']['done']} done / {summary['acks']['fail']} failed"
        )
        click.echo(
            f"frames: sent {p['sent']}, received {p['received']}, lost {p['lost']}, corrupt {p['corrupt']}"
        )
        click.echo(f"throughput: {t['pps']:.0f} frames/s, {t['gbps']:.3f} Gbit/s in {summary['elapsed_s']} s")
    bad = summary["packets"]["lost"] or summary["packets"]["corrupt"] or summary["acks"]["fail"]
    if bad:
        raise Failure("frames were lost or corrupted, or requests failed (see the summary)")


# -- list, bind, unbind, install-udev ---------------------------------------------------------------


def _sysfs_root() -> str:
    from vhostpci_driver.pci.sysfs import default_root

    return default_root()


def _state_dir() -> Path:
    from vhostpci_driver.status import run_dir

    return run_dir() / "bound"


def _served(address: str) -> bool:
    from vhostpci_driver.status import alive, run_dir, socket_name

    return alive(run_dir() / socket_name(address))


@main.command("list")
@click.option("--virtio-id", default=63, show_default=True, type=click.IntRange(0, MAX_VIRTIO_ID),
              help="The vhost-pci virtio device id.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object (schema: docs/cli.md).")
def list_(virtio_id: int, as_json: bool) -> None:
    """Every vhost-pci function, the way dpdk-devbind shows devices.

    Address, [vendor:device], name, the driver in use (drv=), the drivers it could
    be given to (unused=), its IOMMU group, and whether a service is serving it.
    """
    from vhostpci_driver.pci import sysfs
    from vhostpci_driver.report import device_type_name, function_line
    from vhostpci_driver.wire.device import pci_device_id

    found = sysfs.list_functions(device=pci_device_id(virtio_id), root=_sysfs_root())
    rows = [
        {
            "address": f.address,
            "vendor": f"{f.vendor:04x}",
            "device": f"{f.device:04x}",
            "name": f"Virtio {device_type_name(virtio_id)}",
            "driver": f.driver,
            "unused": [d for d in CANDIDATE_DRIVERS if d != f.driver],
            "iommu_group": f.iommu_group,
            "service": _served(f.address),
        }
        for f in found
    ]
    if as_json:
        emit({"functions": rows})
        return
    if not rows:
        click.echo("no vhost-pci function found")
    for r in rows:
        click.echo(function_line(r))


def _refuse(address: str, why: str, force_hint: bool = True) -> None:
    hint = "; use --force if you mean it" if force_hint else ""
    raise Failure(f"{address} {why}: not touched{hint}")


def _check_in_use(address: str, root: str) -> None:
    from vhostpci_driver.pci import sysfs

    if _served(address):
        _refuse(address, "is being served by a running 'vhostpci run' (stop it first)")
    users = sysfs.in_use(address, root)
    if users:
        _refuse(address, f"is in use ({'; '.join(users)})")


@main.command()
@click.argument("address", type=DeviceAddress(pci_only=True))
@click.option(
    "--driver", type=click.Choice(["vfio-pci", "uio_pci_generic"]), default="vfio-pci", show_default=True
)
@click.option(
    "--force",
    is_flag=True,
    help="Bind even a function that is not vhost-pci, or one in use (an interface up, a disk mounted).",
)
def bind(address: str, driver: str, force: bool) -> None:
    """Give a vhost-pci function to vfio-pci (or uio_pci_generic); 'vhostpci unbind' gives it back.

    Refuses anything that is not a vhost-pci function, or is in use, unless --force.
    """
    from vhostpci_driver.pci import sysfs
    from vhostpci_driver.spec.virtio_pci import VIRTIO_PCI_VENDOR
    from vhostpci_driver.wire.device import pci_device_id

    root = _sysfs_root()
    info = sysfs.info(address, root)
    if not force and (info.vendor, info.device) != (VIRTIO_PCI_VENDOR, pci_device_id()):
        _refuse(
            info.address,
            f"is {info.vendor:04x}:{info.device:04x}, not a vhost-pci function "
            f"({VIRTIO_PCI_VENDOR:04x}:{pci_device_id():04x})",
        )
    if not force and info.driver != driver:
        _check_in_use(info.address, root)
    if driver == "vfio-pci":
        if info.iommu_group is None and not sysfs.noiommu_enabled(root):
            raise Failure(
                "no IOMMU: boot the device VM with intel_iommu=on (QEMU: -device intel-iommu,intremap=on) "
                "or load vfio with enable_unsafe_noiommu_mode=1, or use --driver uio_pci_generic"
            )
        if info.iommu_group is not None:
            others = [a for a in sysfs.group_members(info.iommu_group, root) if a != info.address]
            if others:
                click.echo(
                    f"note: IOMMU group {info.iommu_group} also holds {', '.join(others)}; "
                    "VFIO needs every device in it unbound from host drivers",
                    err=True,
                )
    for path, value in sysfs.bind(info.address, driver, _state_dir(), root):
        click.echo(f"wrote {value.strip()!r} to {path}")


@main.command()
@click.argument("address", type=DeviceAddress(pci_only=True))
@click.option(
    "--force",
    is_flag=True,
    help="Unbind even a function 'vhostpci bind' did not bind, one that is not vhost-pci, or one in use.",
)
def unbind(address: str, force: bool) -> None:
    """Give a function back to the driver it had before 'vhostpci bind'.

    Only a function this tool bound (it keeps a record in $VHOSTPCI_RUN_DIR/bound)
    and nothing serves, unless --force. A function that was unplugged meanwhile
    has nothing to give back: that is success (the unit's ExecStopPost runs this
    after a hot-unplug); an address that never existed is an error.
    """
    from vhostpci_driver.pci import sysfs
    from vhostpci_driver.spec.virtio_pci import VIRTIO_PCI_VENDOR
    from vhostpci_driver.wire.device import pci_device_id

    root = _sysfs_root()
    record = _state_dir() / f"{address}.driver"
    try:
        info = sysfs.info(address, root)
    except VhostPciError:
        if not record.exists():
            raise
        record.unlink()
        click.echo(f"{address} is gone (unplugged): nothing to give back")
        return
    if not force:
        if (info.vendor, info.device) != (VIRTIO_PCI_VENDOR, pci_device_id()):
            _refuse(address, f"is {info.vendor:04x}:{info.device:04x}, not a vhost-pci function")
        if not record.exists():
            _refuse(address, f"was not bound by 'vhostpci bind' (no record {record})")
        _check_in_use(address, root)
    previous, log = sysfs.unbind(address, _state_dir(), root)
    for path, value in log:
        click.echo(f"wrote {value.strip()!r} to {path}")
    click.echo(f"{address} returned to {previous or 'the default driver'}")


def _udev_sources() -> Path:
    for candidate in (Path(__file__).resolve().parents[1] / "udev", Path(sys.prefix) / "share/vhostpci/udev"):
        if (candidate / "90-vhostpci.rules").exists():
            return candidate
    raise Failure("the udev files are not installed (reinstall the package)")


def entry_point() -> str:
    """The running installation's ``vhostpci``, as an absolute command line (for the unit's Exec lines).

    The console script beside the interpreter (a venv's bin/), else the one on
    PATH, else this interpreter running the package.
    """
    beside = Path(sys.executable).parent / "vhostpci"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("vhostpci")
    if found:
        return str(Path(found).absolute())
    return f"{Path(sys.executable).absolute()} -m vhostpci_driver"


def documentation() -> Path:
    """The installed docs/cli.md (data_files), else the source tree's."""
    for candidate in (
        Path(sys.prefix) / "share/doc/vhostpci/cli.md",
        Path(__file__).resolve().parents[1] / "docs/cli.md",
    ):
        if candidate.exists():
            return candidate
    raise Failure("docs/cli.md is not installed (reinstall the package)")


@main.command("install-udev")
@click.option(
    "--prefix", type=click.Path(path_type=Path, file_okay=False), default=Path("/"), show_default=True
)
def install_udev(prefix: Path) -> None:
    """Install the udev rule, the vhostpci@.service unit and the vhostpci user's sysusers.d entry.

    The unit runs this installation's vhostpci (its absolute path is written in).
    """
    src = _udev_sources()
    text = (src / "vhostpci@.service").read_text()
    unit = text.replace("@VHOSTPCI@", entry_point()).replace("@DOCUMENTATION@", documentation().as_uri())
    targets = {
        prefix / "etc/udev/rules.d/90-vhostpci.rules": (src / "90-vhostpci.rules").read_bytes(),
        prefix / "etc/systemd/system/vhostpci@.service": unit.encode(),
        prefix / "etc/sysusers.d/vhostpci.conf": (src / "vhostpci.sysusers").read_bytes(),
    }
    for t, data in targets.items():
        t.parent.mkdir(parents=True, exist_ok=True)
        t.write_bytes(data)
        click.echo(f"installed {t}")
    click.echo("now: systemd-sysusers && udevadm control --reload && systemctl daemon-reload")


@main.command()
@click.option("--quick", is_flag=True, help="Fewer repetitions (about 5 s).")
@click.option("--only", type=click.Choice(BENCHMARKS), multiple=True,
              help="Only this benchmark (repeatable).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object: machine and rows (docs/cli.md).")
def bench(quick: bool, only: tuple[str, ...], as_json: bool) -> None:
    """Measure the control and data plane against baselines taken in the same run (never fails a build).

    A benchmark that cannot run is listed with its error and the others still run; the
    exit status is then 1.
    """
    from vhostpci_driver.bench import run_bench
    from vhostpci_driver.report import table
    from vhostpci_host.harness import ProcessError

    with stop_on_signals(), _host_side_failures(ProcessError):
        result = run_bench(
            quick, only or None, progress=None if as_json else lambda m: click.echo(f"... {m}", err=True)
        )
    failed = ", ".join(f["name"] for f in result["failed"])
    if as_json:
        emit(result)
        if failed:
            sys.exit(EXIT_FAILURE)
        return
    rows = []
    for r in result["benchmarks"]:
        extra = f"; limited by {r['limited_by']}" if r["limited_by"] else ""
        rows.append((
            r["name"], r["figure"], "-" if r["baseline"] is None else r["baseline"],
            "-" if r["ratio"] is None else r["ratio"], r["target"] if r["met"] is not None else "(reference)",
            {True: "met", False: "MISSED", None: ""}[r["met"]],
            f"{r['unit']}{' vs ' + r['baseline_name'] if r['baseline_name'] else ''}{extra}",
        ))  # fmt: skip
    for line in table(("BENCHMARK", "FIGURE", "BASELINE", "RATIO", "TARGET", "", "UNIT"), rows):
        click.echo(line)
    for f in result["failed"]:
        click.echo(f"{f['name']}: could not run: {f['error']}", err=True)
    if failed:
        raise Failure(f"benchmarks that could not run: {failed} (the rows above were measured)")
