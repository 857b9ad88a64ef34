/* virtio-pci modern transport (virtio 1.2, 4.1) and split virtqueues (2.7), polled. */
#ifndef PYVMM_DRIVER_VIRTIO_H
#define PYVMM_DRIVER_VIRTIO_H

#include "lib.h"
#include "pci.h"

#define VIRTIO_ID_NET   1
#define VIRTIO_ID_BLOCK 2

/* device status (2.1) */
#define VS_ACKNOWLEDGE  0x01
#define VS_DRIVER       0x02
#define VS_DRIVER_OK    0x04
#define VS_FEATURES_OK  0x08
#define VS_NEEDS_RESET  0x40
#define VS_FAILED       0x80

/* reserved feature bits (6) */
#define VIRTIO_F_INDIRECT_DESC  28
#define VIRTIO_F_EVENT_IDX      29
#define VIRTIO_F_VERSION_1      32
#define BIT(n) (1ull << (n))

/* virtio-pci capabilities (4.1.4) */
#define VIRTIO_PCI_CAP_COMMON_CFG 1
#define VIRTIO_PCI_CAP_NOTIFY_CFG 2
#define VIRTIO_PCI_CAP_ISR_CFG    3
#define VIRTIO_PCI_CAP_DEVICE_CFG 4

/* struct virtio_pci_common_cfg offsets */
#define CC_DEVICE_FEATURE_SELECT 0
#define CC_DEVICE_FEATURE        4
#define CC_DRIVER_FEATURE_SELECT 8
#define CC_DRIVER_FEATURE        12
#define CC_CONFIG_MSIX_VECTOR    16
#define CC_NUM_QUEUES            18
#define CC_DEVICE_STATUS         20
#define CC_CONFIG_GENERATION     21
#define CC_QUEUE_SELECT          22
#define CC_QUEUE_SIZE            24
#define CC_QUEUE_MSIX_VECTOR     26
#define CC_QUEUE_ENABLE          28
#define CC_QUEUE_NOTIFY_OFF      30
#define CC_QUEUE_DESC            32
#define CC_QUEUE_DRIVER          40
#define CC_QUEUE_DEVICE          48
#define VIRTIO_MSI_NO_VECTOR     0xFFFF

/* MSI-X as the driver programs it: vector 0x40 + queue, configuration changes 0x3f */
#define MSI_ADDRESS       0xFEE00000u
#define MSI_VECTOR_QUEUE0 0x40
#define MSI_VECTOR_CONFIG 0x3F

#define VRING_DESC_F_NEXT     1
#define VRING_DESC_F_WRITE    2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY     1

#define MAX_DEVS    8
#define MAX_QUEUES  16
#define MAX_QSIZE   32768
#define MAX_SG      130             /* descriptors per request (indirect table entries) */
#define CTX_DIRECT_STRIDE   64
#define CTX_INDIRECT_STRIDE ALIGN_UP(64 + MAX_SG * 16, 64)

struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
_Static_assert(sizeof(struct vring_desc) == 16, "vring_desc");

/* Per-request driver memory, one per descriptor index (the chain's head), in the arena. */
struct req_ctx {
    u8 hdr[16];         /* 0: device-readable request header (virtio_blk_req without data) */
    u8 status;          /* 16: device-writable status byte */
    u8 in_use;          /* 17 */
    u16 ndesc;          /* 18: descriptors of the ring this request holds */
    u32 pad;
    u64 tag;            /* 24: the submitter's */
    u8 extra[32];       /* 32: more device-readable bytes (a discard segment) */
    struct vring_desc table[]; /* 64: indirect table, MAX_SG entries (indirect only) */
};
_Static_assert(__builtin_offsetof(struct req_ctx, table) == 64, "req_ctx");

struct sg {
    u64 addr;
    u32 len;
    u16 flags;      /* VRING_DESC_F_WRITE or 0 */
};

struct vq {
    u16 index, size;
    bool event_idx, indirect, irq_off;
    struct vring_desc *desc;
    u64 avail;          /* flags, idx, ring[size], used_event */
    u64 used;           /* flags, idx, ring[size] of {id, len}, avail_event */
    u16 *next;          /* driver-private: free list, and the order of allocated chains */
    u64 ctx;
    u32 ctx_stride;
    u16 free_head, num_free;
    u16 avail_idx, published, last_used;
    u32 inflight;
    u64 notify_addr;
    u32 kicks;
};

struct vdev {
    bool found, ready;
    unsigned type, index;
    struct pci_dev pci;
    u64 common, notify, isr, devcfg;
    u32 notify_len, notify_mult, devcfg_len;
    u8 msix_cap;
    u16 msix_size;
    u64 msix_table;
    u64 dev_features, drv_features;
    u16 nqueues;
    struct vq vqs[MAX_QUEUES];
    u64 arena, arena_size;
};

static inline struct req_ctx *vq_ctx(struct vq *q, u16 id)
{
    return (struct req_ctx *)(q->ctx + (u64)id * q->ctx_stride);
}
static inline u16 vq_used_idx(struct vq *q) { return READ_ONCE(*(u16 *)(q->used + 2)); }
static inline u16 *vq_avail_ring(struct vq *q) { return (u16 *)(q->avail + 4); }
static inline u16 *vq_used_event(struct vq *q) { return (u16 *)(q->avail + 4 + 2 * (u64)q->size); }
static inline u16 *vq_avail_event(struct vq *q) { return (u16 *)(q->used + 4 + 8 * (u64)q->size); }

/* transport */
int virtio_probe(struct vdev *d, unsigned type, unsigned index);
int virtio_reset(struct vdev *d);
u8 virtio_get_status(struct vdev *d);
void virtio_set_status(struct vdev *d, u8 s);
u64 virtio_device_features(struct vdev *d);
void virtio_write_features(struct vdev *d, u64 f);
int virtio_setup_queues(struct vdev *d, unsigned nq, unsigned size, u32 flags);
u32 virtio_cfg_read32(struct vdev *d, u32 off);     /* device config, generation-checked */
u64 virtio_cfg_read64(struct vdev *d, u32 off);
u16 virtio_cfg_read16(struct vdev *d, u32 off);
u8 virtio_cfg_generation(struct vdev *d);
void virtio_cfg_dump(struct vdev *d, u64 dest);      /* whole device config, 32-bit reads */
bool virtio_broken(struct vdev *d);                  /* NEEDS_RESET or FAILED set */

/* virtqueue */
int vq_reserve(struct vq *q, unsigned n);            /* head, or -1: not enough descriptors */
void vq_release(struct vq *q, u16 head, unsigned n);
void vq_write_chain(struct vq *q, u16 head, const struct sg *sg, unsigned n, bool indirect);
void vq_add_avail(struct vq *q, u16 head);
void vq_kick(struct vq *q, bool force);              /* publish avail idx, notify if wanted */
void vq_set_irq(struct vq *q, bool off);
int vq_poll(struct vq *q, u32 *id, u32 *len);        /* 1: got one, 0: none, <0: -R_DEVICE */

extern u64 timeout_tsc;

#endif
