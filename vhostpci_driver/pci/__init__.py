"""The PCI layer: one :class:`PciFunction` interface, three backends (VFIO, UIO, vfio-user)."""
