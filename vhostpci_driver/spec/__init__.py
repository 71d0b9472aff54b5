"""The constants of the specifications we implement, declared once (pure, no I/O).

* :mod:`.virtio`: virtio 1.2 itself: device status, feature bits, device ids, split rings;
* :mod:`.virtio_net`: the virtio-net device's feature bits and header (virtio 1.2, 5.1);
* :mod:`.virtio_pci`: the virtio-pci modern transport (virtio 1.2, 4.1): capabilities,
  the common configuration structure, ISR bits;
* :mod:`.pci`: PCI configuration space (PCI Local Bus 3.0, 6) and MSI-X;
* :mod:`.vfio`: ``include/uapi/linux/vfio.h``'s indices and flags (the structures and
  ioctl numbers are in :mod:`vhostpci_driver.pci.vfio_uapi`).

Both the guest toolkit and the host side (``tools/vhostpci_host``) import these,
the way rust-vmm keeps ``virtio-bindings`` and ``vfio-bindings`` apart from the
code that uses them. Nothing here imports anything above
:mod:`vhostpci_driver.wire.layout`.
"""
