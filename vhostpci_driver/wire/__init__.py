"""The wire contract in code: every controlq, ackq, server-socket and vfio-user message.

* :mod:`.layout`: :class:`WireStruct`, each structure declared once, with the
  offset table that docs/protocol.md must match (a test checks both);
* :mod:`.ctrl`: the controlq and ackq messages between the device and our driver;
* :mod:`.device`: the guest-visible function: IDs, features, BAR layout, device config;
* :mod:`.sock`: the vhost-pci server socket between a driver VM and the host;
* :mod:`.vfio_user`: vfio-user messages, the codec of both our client and our server.

Decoders validate everything and raise only
:class:`~vhostpci_driver.errors.ProtocolError`, naming the field.
"""
