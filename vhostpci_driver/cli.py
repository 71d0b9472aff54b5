"""The ``vhostpci`` command (guest side).

Every command that reads has ``--json``. Exit codes: 0 success, 1 failure, 2
usage. An error is one line saying what was wrong and what to do; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from vhostpci_driver import __version__
from vhostpci_driver.errors import VhostPciError

F = TypeVar("F", bound=Callable[..., Any])
APPS = ("net-switch", "net-loopback", "none")
# vhostpci_driver.pci.open.BACKENDS (not imported: --help stays fast; a test checks they agree)
PCI_BACKENDS = ("auto", "vfio", "vfio-cdev", "vfio-group", "uio")
#: the kernel drivers each --backend serves under --watch
WATCH_DRIVERS = {
    "auto": ("vfio-pci", "uio_pci_generic"),
    "vfio": ("vfio-pci",),
    "vfio-cdev": ("vfio-pci",),
    "vfio-group": ("vfio-pci",),
    "uio": ("uio_pci_generic",),
}


class Failure(click.ClickException):
    """A one-line failure: exit status 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"vhostpci: error: {self.message}", err=True)


def friendly(fn: F) -> F:
    """Turn the toolkit's errors into one line and exit 1 (the traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (VhostPciError, OSError) as e:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            raise Failure(str(e)) from None

    return wrapper  # type: ignore[return-value]


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vhostpci")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(debug: bool) -> None:
    """Drive vhost-pci functions from inside the device VM."""


# -- run ----------------------------------------------------------------------------------------


@main.command()
@click.argument("addresses", nargs=-1)
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
@click.option("--polling", is_flag=True, help="Spin on the rings instead of sleeping on interrupts.")
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
@friendly
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

    Acks in flight are finished and every device is reset on the way out.
    """
    if not addresses and not watch:
        raise click.UsageError("name at least one ADDRESS, or use --watch")
    from vhostpci_driver import privilege

    identity = privilege.resolve(user) if user else None  # a typo fails before anything is touched
    from vhostpci_driver.apps.net import NetBackend, net_policy
    from vhostpci_driver.device import VhostPciDevice
    from vhostpci_driver.pci.open import open_function
    from vhostpci_driver.service import Service
    from vhostpci_driver.status import StatusServer, run_dir, socket_name

    setup_logging(verbose)
    log = logging.getLogger("vhostpci.run")
    devices: list[VhostPciDevice] = []
    statuses: list[StatusServer] = []
    backend = NetBackend("switch" if app == "net-switch" else "loopback") if app != "none" else None
    by_address: dict[str, tuple[VhostPciDevice, StatusServer]] = {}
    readers: dict[int, Callable[[], None]] = {}  # status sockets and removal requests, by fd

    def serve(address: str) -> None:
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
        devices.append(dev)
        statuses.append(st)
        by_address[address] = (dev, st)
        gone = dev.function.removal_fd()
        if gone is not None:
            readers[gone] = lambda: released(address)
        readers[st.fileno()] = st.serve_ready
        if service is not None:
            service.readers.update(readers)
        log.info("serving %s (status socket %s)", address, path)

    def released(address: str) -> None:
        # The kernel asks for the function back (hot-unplug waits on us): let go now, cleanly.
        log.info("%s is being removed: releasing it", address)
        unserve(address)
        if not watch and not by_address and service is not None:
            service.stop.set()

    def unserve(address: str) -> None:
        dev, st = by_address.pop(address)
        gone = dev.function.removal_fd()
        for fd in [st.fileno()] + ([] if gone is None else [gone]):
            readers.pop(fd, None)
            if service is not None:
                service.readers.pop(fd, None)
        devices.remove(dev)
        statuses.remove(st)
        st.close()
        dev.close()
        log.info("%s is gone: stopped serving it", address)

    service: Service | None = None
    try:
        for address in addresses:
            serve(address)
        service = Service(devices, backend, polling=polling)
        # Signals first: a SIGTERM must stop us cleanly from the moment '--watch' says it watches.
        stop_r, stop_w = os.pipe()
        os.set_blocking(stop_w, False)
        signal.set_wakeup_fd(stop_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: service.stop.set())
        if watch:
            _watch(service, serve, unserve, by_address, log, WATCH_DRIVERS[pci_backend])

        def drain_wakeups() -> None:
            os.read(stop_r, 64)  # the signal already set service.stop; this only woke select()

        service.readers[stop_r] = drain_wakeups
        service.readers.update(readers)
        if identity is not None:
            privilege.drop(identity, [run_dir(), *(st.path for st in statuses)])
            log.info("running as %s (uid %d, gid %d)", identity.name, identity.uid, identity.gid)
        service.run()
        if service.error:
            raise Failure(f"a device failed: {service.error}")
        # Finish what is in flight (acks of messages already taken) before resetting.
        for dev in devices:
            dev.process()
        log.info("stopping: %d device(s) reset", len(devices))
    finally:
        for st in statuses:
            st.close()
        for dev in devices:
            dev.close()


def _require_vhost_pci(address: str) -> None:
    from vhostpci_driver.pci import sysfs
    from vhostpci_driver.spec.virtio_pci import VIRTIO_PCI_VENDOR
    from vhostpci_driver.wire.device import pci_device_id

    info = sysfs.info(address, _sysfs_root())
    if (info.vendor, info.device) != (VIRTIO_PCI_VENDOR, pci_device_id()):
        raise Failure(
            f"{info.address} is {info.vendor:04x}:{info.device:04x}, not a vhost-pci function; not touched"
        )


def _watch(
    service: Any,
    serve: Callable[[str], None],
    unserve: Callable[[str], None],
    served: dict[str, Any],
    log: logging.Logger,
    drivers: tuple[str, ...] = ("vfio-pci",),
) -> None:
    """Serve present vhost-pci functions bound to one of ``drivers``, and follow hot-plug (pyudev)."""
    import pyudev

    from vhostpci_driver.pci import sysfs
    from vhostpci_driver.wire.device import pci_device_id

    def try_serve(address: str) -> None:
        try:
            serve(address)
        except VhostPciError as e:  # one function's failure does not stop the others
            log.warning("cannot serve %s: %s", address, e)

    for f in sysfs.list_functions(device=pci_device_id(), root=_sysfs_root()):
        if f.driver in drivers and f.address not in served:
            try_serve(f.address)
    monitor = pyudev.Monitor.from_netlink(pyudev.Context())
    monitor.filter_by(subsystem="pci")
    monitor.start()

    def on_event() -> None:
        for dev in iter(lambda: monitor.poll(timeout=0), None):
            addr = dev.sys_name
            if dev.action == "remove" and addr in served:
                unserve(addr)
            elif (
                dev.action in ("add", "bind")
                and addr not in served
                and (
                    dev.attributes.get("device") == f"0x{pci_device_id():04x}".encode()
                    and dev.driver in drivers
                )
            ):
                try_serve(addr)

    service.readers[monitor.fileno()] = on_event
    log.info("watching for vhost-pci functions (serving %d)", len(served))


def _status_of(address: str, dev: Any, backend: Any) -> Callable[[], dict[str, Any]]:
    def status() -> dict[str, Any]:
        out = {"address": address, "pid": os.getpid(), **dev.dump()}
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
        raise Failure(
            f"{path}: no service is running for this device (start one with 'vhostpci run')"
        ) from None


@main.command()
@click.argument("address", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@friendly
def status(address: str | None, as_json: bool) -> None:
    """Show what running services serve: remote UUID, regions, frontends, counters."""
    answers = [(_ask(p, {"cmd": "status"}), p) for p in _sockets(address)]
    if not answers:
        raise Failure("no vhostpci service is running (start one with 'vhostpci run')")
    states = [a.get("status", a) for a, _ in answers]
    if as_json:
        click.echo(json.dumps({"services": states}, default=str))
        return
    for st in states:
        click.echo(
            f"{st.get('address')}  remote {st.get('remote_uuid')} {'up' if st.get('remote_up') else 'down'}"
            f"  window {st.get('window_size', 0) >> 20} MiB"
        )
        for r in st.get("regions", []):
            click.echo(f"  region xgpa {r['xgpa']:#x} size {r['size']:#x} window {r['window_offset']:#x}")
        for fe in st.get("frontends", []):
            click.echo(
                f"  frontend type {fe['device_type']} id {fe['device_id']:#x} features {fe['accepted']}"
            )
        click.echo(f"  stats {st.get('stats')}")
        for mac, port in (st.get("ports") or {}).items():
            click.echo(f"  port {mac} {port}")


@main.command()
@click.argument("address")
@click.option("--xgpa", required=True, type=lambda v: int(v, 0), help="Driver-VM physical address.")
@click.option("--len", "length", default=256, show_default=True, type=click.IntRange(1, 1 << 20))
@click.option("--json", "as_json", is_flag=True)
@friendly
def dump(address: str, xgpa: int, length: int, as_json: bool) -> None:
    """Hexdump driver-VM memory through the running service's window (mapped regions only)."""
    (path,) = _sockets(address)
    ans = _ask(path, {"cmd": "dump", "xgpa": xgpa, "len": length})
    if "error" in ans:
        raise Failure(ans["error"])
    data = bytes.fromhex(ans["hex"])
    if as_json:
        click.echo(json.dumps({"xgpa": xgpa, "hex": ans["hex"]}))
        return
    for off in range(0, len(data), 16):
        row = data[off : off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        click.echo(f"{xgpa + off:016x}  {row.hex(' '):<47}  {text}")


# -- demo -------------------------------------------------------------------------------------------


@main.command()
@click.option("--frontends", default=2, show_default=True, type=click.IntRange(1, 16))
@click.option("--packets", default=20000, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option(
    "--size", default="mixed", show_default=True, help="Frame size in bytes (64..65536) or 'mixed'."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object with the summary.")
@friendly
def demo(frontends: int, packets: int, size: str, as_json: bool) -> None:
    """Run the whole system here: host side, simulated driver VMs, this driver, the net switch."""
    from vhostpci_driver.demo import run_demo

    if size != "mixed" and not (size.isdigit() and 64 <= int(size) <= 65536):
        raise click.BadParameter("a size in 64..65536 or 'mixed'", param_hint="--size")
    show = sys.stderr.isatty() and not as_json
    if show:
        with click.progressbar(length=packets, label="frames", file=sys.stderr) as bar:
            done = [0]

            def progress(received: int, total: int) -> None:
                bar.update(received - done[0])
                done[0] = received

            result = run_demo(frontends, packets, size, progress=progress)
    else:
        result = run_demo(frontends, packets, size)
    summary = result.as_dict()
    if as_json:
        click.echo(json.dumps(summary))
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


@main.command("list")
@click.option("--virtio-id", default=63, show_default=True, help="The vhost-pci virtio device id.")
@click.option("--json", "as_json", is_flag=True)
@friendly
def list_(virtio_id: int, as_json: bool) -> None:
    """Every vhost-pci function: its driver, IOMMU group, and whether a service runs for it."""
    from vhostpci_driver.pci import sysfs
    from vhostpci_driver.status import run_dir, socket_name
    from vhostpci_driver.wire.device import pci_device_id

    root = _sysfs_root()
    if root == "/sys":
        import pyudev

        ctx = pyudev.Context()
        want = f"0x{pci_device_id(virtio_id):04x}"
        addrs = [
            d.sys_name
            for d in ctx.list_devices(subsystem="pci")
            if d.attributes.get("vendor") == b"0x1af4" and d.attributes.get("device") == want.encode()
        ]
        found = [sysfs.info(a, root) for a in addrs]
    else:
        found = sysfs.list_functions(device=pci_device_id(virtio_id), root=root)
    rows = [{"address": f.address, "driver": f.driver, "iommu_group": f.iommu_group,
             "service": (run_dir() / socket_name(f.address)).exists()} for f in found]  # fmt: skip
    if as_json:
        click.echo(json.dumps({"functions": rows}))
        return
    if not rows:
        click.echo("no vhost-pci function found")
    for r in rows:
        click.echo(
            f"{r['address']}  driver={r['driver'] or '-'}  iommu_group={r['iommu_group']}"
            f"  service={'running' if r['service'] else 'none'}"
        )


@main.command()
@click.argument("address")
@click.option(
    "--driver", type=click.Choice(["vfio-pci", "uio_pci_generic"]), default="vfio-pci", show_default=True
)
@click.option("--force", is_flag=True, help="Bind even if the function is not a vhost-pci function.")
@friendly
def bind(address: str, driver: str, force: bool) -> None:
    """Give a function to vfio-pci (or uio_pci_generic); 'vhostpci unbind' gives it back."""
    from vhostpci_driver.pci import sysfs
    from vhostpci_driver.spec.virtio_pci import VIRTIO_PCI_VENDOR
    from vhostpci_driver.wire.device import pci_device_id

    root = _sysfs_root()
    info = sysfs.info(address, root)
    if not force and (info.vendor, info.device) != (VIRTIO_PCI_VENDOR, pci_device_id()):
        raise Failure(
            f"{info.address} is {info.vendor:04x}:{info.device:04x}, not a vhost-pci function "
            f"({VIRTIO_PCI_VENDOR:04x}:{pci_device_id():04x}); use --force if you mean it"
        )
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
@click.argument("address")
@friendly
def unbind(address: str) -> None:
    """Give a function back to the driver it had before 'vhostpci bind'.

    A function that was unplugged meanwhile has nothing to give back: that is
    success (the unit's ExecStopPost runs this after a hot-unplug).
    """
    from vhostpci_driver.pci import sysfs

    addr = sysfs.parse_address(address)
    if not (Path(_sysfs_root()) / "bus/pci/devices" / addr).exists():
        (_state_dir() / f"{addr}.driver").unlink(missing_ok=True)
        click.echo(f"{addr} is gone (unplugged): nothing to give back")
        return
    previous, log = sysfs.unbind(address, _state_dir(), _sysfs_root())
    for path, value in log:
        click.echo(f"wrote {value.strip()!r} to {path}")
    click.echo(f"{sysfs.parse_address(address)} returned to {previous or 'the default driver'}")


def _udev_sources() -> Path:
    for candidate in (Path(__file__).resolve().parents[1] / "udev", Path(sys.prefix) / "share/vhostpci/udev"):
        if (candidate / "90-vhostpci.rules").exists():
            return candidate
    raise Failure("the udev files are not installed (reinstall the package)")


@main.command("install-udev")
@click.option("--prefix", type=click.Path(path_type=Path), default=Path("/"), show_default=True)
@friendly
def install_udev(prefix: Path) -> None:
    """Install the udev rule, the vhostpci@.service unit and the vhostpci user's sysusers.d entry."""
    src = _udev_sources()
    targets = {
        src / "90-vhostpci.rules": prefix / "etc/udev/rules.d/90-vhostpci.rules",
        src / "vhostpci@.service": prefix / "etc/systemd/system/vhostpci@.service",
        src / "vhostpci.sysusers": prefix / "etc/sysusers.d/vhostpci.conf",
    }
    for s, t in targets.items():
        t.parent.mkdir(parents=True, exist_ok=True)
        t.write_bytes(s.read_bytes())
        click.echo(f"installed {t}")
    click.echo("now: systemd-sysusers && udevadm control --reload && systemctl daemon-reload")


@main.command()
@click.option("--quick", is_flag=True, help="Fewer repetitions (about a minute).")
@click.option("--only", default=None, help="One benchmark by name (e.g. ring-batch).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: machine and rows.")
@friendly
def bench(quick: bool, only: str | None, as_json: bool) -> None:
    """Measure the control and data plane against baselines taken in the same run (never fails a build)."""
    from vhostpci_driver.bench import run_bench

    result = run_bench(quick, only, progress=None if as_json else lambda m: click.echo(f"... {m}", err=True))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{'benchmark':<22} {'figure':>12} {'baseline':>12} {'ratio':>8}  {'target':<20} {'':<6} unit")
    for r in result["benchmarks"]:
        base = "-" if r["baseline"] is None else f"{r['baseline']}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']}"
        mark = {True: "met", False: "MISSED", None: ""}[r["met"]]
        extra = f"; limited by {r['limited_by']}" if r["limited_by"] else ""
        target = r["target"] if r["met"] is not None else "(reference)"
        click.echo(
            f"{r['name']:<22} {r['figure']:>12} {base:>12} {ratio:>8}  {target:<20} {mark:<6} "
            f"{r['unit']}{' vs ' + r['baseline_name'] if r['baseline_name'] else ''}{extra}"
        )
