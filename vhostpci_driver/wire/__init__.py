"""The wire contract in code: every controlq, ackq and server-socket message.

* :mod:`.layout`: :class:`WireStruct`, each structure declared once, with the
  offset table that docs/protocol.md must match (a test checks both);
* :mod:`.ctrl`: the controlq and ackq messages between the device and our driver;
* :mod:`.sock`: the vhost-pci server socket between a driver VM and the host.

Decoders validate everything and raise only
:class:`~vhostpci_driver.errors.ProtocolError`, naming the field.
"""
