"""The ``vhostpci`` command (guest side)."""

from __future__ import annotations

import click

from vhostpci_driver import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vhostpci")
def main() -> None:
    """Drive vhost-pci functions from inside the device VM."""
