"""The ``vhostpci-host`` command: the reference host side."""

from __future__ import annotations

import click

from vhostpci_driver import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vhostpci-host")
def main() -> None:
    """Serve vhost-pci devices to device VMs and simulate driver VMs."""
