"""The reference host side of vhost-pci.

* :mod:`vhostpci_host.vfio_device`: the interface between the vfio-user server
  and a device model;
* the vfio-user server, the vhost-pci device model, the vhost-pci server socket
  and the driver-VM simulator build on it.
"""
