"""struct virtio_net_hdr (OASIS virtio 1.2, 5.1.6): what precedes every frame on a
virtio-net queue, both ways, and, with IFF_VNET_HDR and a 12-byte vnet header, on
the tap too (the kernel's struct virtio_net_hdr_mrg_rxbuf has the same layout).

    flags u8, gso_type u8, hdr_len le16, gso_size le16, csum_start le16,
    csum_offset le16, num_buffers le16

num_buffers (always there in virtio 1.x) is the one field the device writes on
receive: how many descriptor chains the frame spans (1 without MRG_RXBUF).
"""

import struct

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1  # csum_start/csum_offset say where the checksum goes
VIRTIO_NET_HDR_F_DATA_VALID = 2  # (receive) the checksum was checked
VIRTIO_NET_HDR_F_RSC_INFO = 4
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

VIRTIO_NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = VIRTIO_NET_HDR.size  # 12
NUM_BUFFERS_OFFSET = 10
