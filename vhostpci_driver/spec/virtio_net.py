"""The virtio-net device (virtio 1.2, 5.1): the feature bits and header this project uses."""

from __future__ import annotations

VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
#: ``struct virtio_net_hdr`` with ``num_buffers``: always 12 bytes with VERSION_1 (virtio 1.2, 5.1.6).
NET_HDR_SIZE = 12
