"""``python -m vhostpci_host`` is the ``vhostpci-host`` command."""

from vhostpci_host.cli import main

if __name__ == "__main__":
    main()
