"""``python -m vhostpci_driver`` is the ``vhostpci`` command."""

from vhostpci_driver.cli import main

if __name__ == "__main__":
    main()
