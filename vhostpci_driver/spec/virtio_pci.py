"""The virtio-pci modern transport (virtio 1.2, 4.1): ids, capabilities, common config, ISR.

``struct virtio_pci_common_cfg`` is a :class:`~vhostpci_driver.wire.layout.WireStruct`,
so docs/protocol.md's table of it and this declaration agree by test, and the
driver's register offsets and the reference device's register decoder both come
from this one field list.
"""

from __future__ import annotations

import enum

from vhostpci_driver.wire.layout import WireStruct

#: PCI vendor id of every virtio device (virtio 1.2, 4.1.2).
VIRTIO_PCI_VENDOR = 0x1AF4
#: virtio 1.2, 4.1.2.1: modern-only devices use PCI device id 0x1040 + virtio id.
MODERN_DEVICE_ID_BASE = 0x1040
#: virtio 1.2, 4.1.2.1: a non-transitional device has revision id 1 or higher.
MODERN_REVISION = 1


class CfgType(enum.IntEnum):
    """``virtio_pci_cap.cfg_type`` (virtio 1.2, 4.1.4)."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5
    SHARED_MEMORY = 8
    VENDOR = 9


#: ``struct virtio_pci_cap`` is 16 bytes; the notify capability adds ``notify_off_multiplier``
#: and the PCI_CFG capability ``pci_cfg_data`` (virtio 1.2, 4.1.4.4 and 4.1.4.9), 20 each.
CAP_SIZE = 16
NOTIFY_CAP_SIZE = 20
PCI_CFG_CAP_SIZE = 20
#: within ``virtio_pci_cfg_cap``: where ``cap.bar``, ``cap.offset``, ``cap.length`` and ``pci_cfg_data`` sit
CAP_BAR, CAP_OFFSET, CAP_LENGTH, PCI_CFG_DATA = 4, 8, 12, 16

# virtio 1.2, 4.1.4.3
COMMON_CFG = WireStruct(
    "virtio_pci_common_cfg",
    [
        ("device_feature_select", "I"),
        ("device_feature", "I"),
        ("driver_feature_select", "I"),
        ("driver_feature", "I"),
        ("config_msix_vector", "H"),
        ("num_queues", "H"),
        ("device_status", "B"),
        ("config_generation", "B"),
        ("queue_select", "H"),
        ("queue_size", "H"),
        ("queue_msix_vector", "H"),
        ("queue_enable", "H"),
        ("queue_notify_off", "H"),
        ("queue_desc", "Q"),
        ("queue_driver", "Q"),
        ("queue_device", "Q"),
        ("queue_notify_data", "H"),
        ("queue_reset", "H"),
    ],
)
#: ``field name -> (offset, width)`` of the common config
COMMON_FIELDS = {name: (off, size) for off, size, name in COMMON_CFG.offsets()}
DEVICE_FEATURE_SELECT = COMMON_FIELDS["device_feature_select"][0]
DEVICE_FEATURE = COMMON_FIELDS["device_feature"][0]
DRIVER_FEATURE_SELECT = COMMON_FIELDS["driver_feature_select"][0]
DRIVER_FEATURE = COMMON_FIELDS["driver_feature"][0]
CONFIG_MSIX_VECTOR = COMMON_FIELDS["config_msix_vector"][0]
NUM_QUEUES = COMMON_FIELDS["num_queues"][0]
DEVICE_STATUS = COMMON_FIELDS["device_status"][0]
CONFIG_GENERATION = COMMON_FIELDS["config_generation"][0]
QUEUE_SELECT = COMMON_FIELDS["queue_select"][0]
QUEUE_SIZE = COMMON_FIELDS["queue_size"][0]
QUEUE_MSIX_VECTOR = COMMON_FIELDS["queue_msix_vector"][0]
QUEUE_ENABLE = COMMON_FIELDS["queue_enable"][0]
QUEUE_NOTIFY_OFF = COMMON_FIELDS["queue_notify_off"][0]
QUEUE_DESC = COMMON_FIELDS["queue_desc"][0]
QUEUE_DRIVER = COMMON_FIELDS["queue_driver"][0]
QUEUE_DEVICE = COMMON_FIELDS["queue_device"][0]
#: the fields through ``queue_device``: a COMMON structure shorter than this is unusable
#: (``queue_notify_data`` and ``queue_reset`` belong to features we do not negotiate)
COMMON_CFG_MIN_SIZE = QUEUE_DEVICE + 8

#: virtio 1.2, 4.1.5.1.2: VIRTIO_MSI_NO_VECTOR, "no vector", and the device's answer to one it cannot map
NO_VECTOR = 0xFFFF

# virtio 1.2, 4.1.4.5: ISR status bits
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2
