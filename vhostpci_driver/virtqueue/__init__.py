"""Split virtqueues (virtio 1.2, 2.7), pure: rings over any buffer plus an address translator.

* :mod:`.layout`: sizes, flags, alignment and the event-index rule;
* :mod:`.driver`: the driver side, for our own controlq and ackq;
* :mod:`.device`: the device side, for the frontends' rings in the driver VM's
  memory, where every byte is hostile.
"""
