"""click parameter types of both command-line tools: checked once, normalised once, completed.

Each converts what a user typed into the one form the code uses (a PCI address
with its domain, an absolute vfio-user socket path, an integer in range) or
fails as a usage error (exit 2) naming the option. The address types complete
vhost-pci functions' PCI addresses and socket paths (docs/cli.md, "Shell
completion").
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import click
from click.shell_completion import CompletionItem

from vhostpci_driver.errors import TransportError

#: sockaddr_un.sun_path holds 108 bytes with the terminating NUL (unix(7))
MAX_SOCKET_PATH = 107
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def _vhost_pci_addresses(incomplete: str) -> list[CompletionItem]:
    from vhostpci_driver.pci import sysfs  # noqa: PLC0415
    from vhostpci_driver.wire.device import pci_device_id  # noqa: PLC0415

    try:
        found = sysfs.list_functions(device=pci_device_id(), root=sysfs.default_root())
    except (OSError, TransportError):
        return []
    return [
        CompletionItem(f.address, help=f"vhost-pci, driver {f.driver or 'none'}")
        for f in found
        if f.address.startswith(incomplete) or f.address[5:].startswith(incomplete)
    ]


def _socket_paths(incomplete: str, prefix: str = "") -> list[CompletionItem]:
    """Directories and UNIX sockets whose path starts with ``incomplete``."""
    head, _, tail = incomplete.rpartition("/")
    base = Path(head or ("/" if incomplete.startswith("/") else "."))
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    out = []
    for p in entries:
        if not p.name.startswith(tail):
            continue
        shown = f"{head}/{p.name}" if head or incomplete.startswith("/") else p.name
        try:
            if p.is_dir():
                out.append(CompletionItem(f"{prefix}{shown}/", type="plain", help="directory"))
            elif p.is_socket():
                out.append(CompletionItem(f"{prefix}{shown}", help="socket"))
        except OSError:
            continue
    return out


class DeviceAddress(click.ParamType):  # type: ignore[type-arg]  # generic only in click's stubs
    """A PCI address or ``vfio-user:PATH``, normalised."""

    name = "address"

    def __init__(self, *, pci_only: bool = False) -> None:
        self.pci_only = pci_only

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "PCI_ADDRESS" if self.pci_only else "ADDRESS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not isinstance(value, str):
            self.fail(f"{value!r} is not an address", param, ctx)
        try:
            if self.pci_only:
                from vhostpci_driver.pci.sysfs import parse_address  # noqa: PLC0415

                return parse_address(value)
            from vhostpci_driver.pci.open import normalize_address  # noqa: PLC0415

            return normalize_address(value)
        except TransportError as e:
            self.fail(str(e), param, ctx)

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        items = _vhost_pci_addresses(incomplete)
        if not self.pci_only:
            if incomplete.startswith("vfio-user:"):
                items += _socket_paths(incomplete.removeprefix("vfio-user:"), "vfio-user:")
            elif "vfio-user:".startswith(incomplete):
                items.append(CompletionItem("vfio-user:", help="a device served on a vfio-user socket"))
        return items


class SocketPath(click.ParamType):  # type: ignore[type-arg]  # generic only in click's stubs
    """A UNIX socket path that fits ``sun_path``, in a directory that exists (nothing is created)."""

    name = "path"

    def __init__(self, *, must_exist: bool = False) -> None:
        self.must_exist = must_exist

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        path = Path(value)
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            self.fail(
                f"{value!r} is {len(os.fsencode(path))} bytes; a UNIX socket path takes at most "
                f"{MAX_SOCKET_PATH} (put it in a shorter directory)",
                param,
                ctx,
            )
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            self.fail(f"{value!r}: directory {str(parent)!r} does not exist", param, ctx)
        if self.must_exist and not path.is_socket():
            self.fail(f"{value!r} is not a socket (is the server running?)", param, ctx)
        return path

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        return _socket_paths(incomplete)


class Integer(click.ParamType):  # type: ignore[type-arg]  # generic only in click's stubs
    """An integer in decimal, ``0x`` hex, ``0o`` or ``0b``, within ``[min, max]``."""

    name = "integer"

    def __init__(self, min: int = 0, max: int | None = None, metavar: str = "INTEGER") -> None:
        self.min, self.max, self.metavar = min, max, metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return self.metavar

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            n = value
        else:
            try:
                n = int(str(value), 0)
            except ValueError:
                self.fail(f"{value!r} is not an integer (decimal or 0x hex)", param, ctx)
        if n < self.min or (self.max is not None and n > self.max):
            top = "" if self.max is None else f"{self.max:#x}"
            self.fail(f"{value} is outside {self.min}..{top}", param, ctx)
        return n


class FrameSize(click.ParamType):  # type: ignore[type-arg]  # generic only in click's stubs
    """A frame size in bytes (64..65536) or ``mixed``."""

    name = "size"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "64..65536|mixed"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if text == "mixed" or (text.isdigit() and 64 <= int(text) <= 65536):
            return text
        self.fail(f"{value!r}: a size in 64..65536 or 'mixed'", param, ctx)


class MacAddress(click.ParamType):  # type: ignore[type-arg]  # generic only in click's stubs
    """A MAC address, ``52:54:00:12:34:56``."""

    name = "mac"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower().replace("-", ":")
        if not MAC.match(text):
            self.fail(f"{value!r} is not a MAC address like 52:54:00:12:34:56", param, ctx)
        return text


class QueueSize(click.ParamType):  # type: ignore[type-arg]  # generic only in click's stubs
    """A split virtqueue size: a power of two, 1..32768 (virtio 1.2, 2.7)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            n = int(str(value), 0)
        except ValueError:
            n = -1
        if n < 1 or n > 32768 or n & (n - 1):
            self.fail(f"{value!r}: a queue size is a power of two in 1..32768 (virtio 1.2, 2.7)", param, ctx)
        return n
