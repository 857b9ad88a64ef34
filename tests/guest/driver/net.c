/* virtio-net (virtio 1.2, 5.1) driven by polling: the OP_NET_* commands.
 *
 * Queue pair p is receiveq p (virtqueue 2p) and transmitq p (2p + 1); the control queue is
 * virtqueue 2 * max_virtqueue_pairs with MQ, 2 without (5.1.2). MSI-X: queue i -> entry i ->
 * vector 0x40 + i, the configuration change -> the entry after the last queue -> 0x3f.
 *
 * RX buffers live in a pool the host names (OP_NET_INIT cmd.buffer, default NET_RX_POOL):
 * pair p's buffer s is at pool + (p * rx_bufs + s) * rx_stride. Each is one device-writable
 * buffer of rx_buf_size bytes (the 12-byte header first), one descriptor or a chain of 2^n-byte
 * ones. A consumed buffer is posted again at once, unless OP_NET_STOP_RX said not to (it is then
 * held until F_NET_RESUME) or it is being echoed (it is posted again when the echo's TX completes).
 */
#include "net.h"

#define VIRTIO_NET_F_CSUM         0
#define VIRTIO_NET_F_GUEST_CSUM   1
#define VIRTIO_NET_F_MTU          3
#define VIRTIO_NET_F_MAC          5
#define VIRTIO_NET_F_GUEST_TSO4   7
#define VIRTIO_NET_F_GUEST_TSO6   8
#define VIRTIO_NET_F_GUEST_UFO    10
#define VIRTIO_NET_F_HOST_TSO4    11
#define VIRTIO_NET_F_HOST_TSO6    12
#define VIRTIO_NET_F_HOST_UFO     14
#define VIRTIO_NET_F_MRG_RXBUF    15
#define VIRTIO_NET_F_STATUS       16
#define VIRTIO_NET_F_CTRL_VQ      17
#define VIRTIO_NET_F_MQ           22

/* struct virtio_net_config offsets */
#define NETCFG_MAC        0
#define NETCFG_STATUS     6
#define NETCFG_MAX_PAIRS  8
#define NETCFG_MTU        10

/* virtio_net_hdr field offsets */
#define HDR_FLAGS       0
#define HDR_GSO_TYPE    1
#define HDR_HDR_LEN     2
#define HDR_GSO_SIZE    4
#define HDR_CSUM_START  6
#define HDR_CSUM_OFFSET 8
#define HDR_NUM_BUFFERS 10

#define RX_BUF_MRG      2048        /* default RX buffer with MRG_RXBUF */
#define RX_BUF_SMALL    1526        /* header + 14 + 1500 (5.1.6.3.1) */
#define RX_BUF_BIG      65562       /* with GUEST_TSO4/6 or UFO and no MRG_RXBUF */
#define CTRL_QSIZE      64
#define CTRL_MEM        0x5000      /* desc, avail, used, free list, contexts: a page each */
#define NET_MAX_TX_SLOTS 4096       /* F_NET_TX_SEQ: copies in flight at most */
#define NO_SLOT         0xFFFF

struct rxq {
    u16 nheld;                      /* consumed and held (stopped) */
    bool kick;                      /* buffers posted since the last notification */
    /* the frame being assembled: with MRG_RXBUF it takes num_buffers used entries */
    u16 need, nbufs, first, last;
    u32 used, len;
    u8 hdr[NET_HDR_SIZE];           /* its header, from the first buffer */
    u16 held[NET_MAX_RX_BUFS];
    u16 link[NET_MAX_RX_BUFS];      /* the next buffer of the same frame, NO_SLOT at the end */
    u32 used_len[NET_MAX_RX_BUFS];  /* what the device wrote into each buffer */
};

struct netdev {
    struct vdev d;
    bool ctrl, mrg, repost;
    u16 pairs, max_pairs, qsize, mtu, link, ctrl_index;
    u8 mac[6];
    u32 rx_buf_size, rx_seg, rx_nseg, rx_bufs;
    u64 rx_stride, pool, pool_end;
    struct vq cvq;
    struct rxq rx[NET_MAX_PAIRS];
};

static struct netdev nets[NET_MAX_DEVS];
static u8 ctrl_mem[NET_MAX_DEVS][CTRL_MEM] __attribute__((aligned(4096)));
static u8 ctrl_data[NET_MAX_DEVS][16] __attribute__((aligned(16)));
static u16 tx_slots[NET_MAX_TX_SLOTS];

static inline void copy(u64 dst, u64 src, u64 n)
{
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
}

static inline u16 get16(const u8 *p) { return (u16)(p[0] | p[1] << 8); }
static inline void put16(u8 *p, u16 v) { p[0] = (u8)v; p[1] = (u8)(v >> 8); }
static inline struct vq *rxvq(struct netdev *n, unsigned p) { return &n->d.vqs[2 * p]; }
static inline struct vq *txvq(struct netdev *n, unsigned p) { return &n->d.vqs[2 * p + 1]; }

static inline u64 rx_addr(struct netdev *n, unsigned p, u16 slot)
{
    return n->pool + ((u64)p * n->rx_bufs + slot) * n->rx_stride;
}

/* ---- RX buffers ------------------------------------------------------------------------ */

/* Post buffer `slot` of pair p (not yet published). 0, or -1: no room in the ring. */
static int rx_post(struct netdev *n, unsigned p, u16 slot)
{
    struct vq *q = rxvq(n, p);
    bool ind = q->indirect && n->rx_nseg > 1;
    int head = vq_reserve(q, ind ? 1 : n->rx_nseg);
    if (head < 0)
        return -1;
    u64 addr = rx_addr(n, p, slot);
    struct sg sg[MAX_SG];
    for (u32 k = 0; k < n->rx_nseg; k++) {
        u32 off = k * n->rx_seg;
        u32 l = n->rx_buf_size - off < n->rx_seg ? n->rx_buf_size - off : n->rx_seg;
        sg[k] = (struct sg){addr + off, l, VRING_DESC_F_WRITE};
    }
    vq_write_chain(q, (u16)head, sg, n->rx_nseg, ind);
    struct req_ctx *c = vq_ctx(q, (u16)head);
    c->in_use = 1;
    c->tag = slot;
    vq_add_avail(q, (u16)head);
    n->rx[p].kick = true;
    return 0;
}

/* A consumed buffer goes back to the device, or is held while RX is stopped. */
static void rx_recycle(struct netdev *n, unsigned p, u16 slot)
{
    struct rxq *r = &n->rx[p];
    if (n->repost && rx_post(n, p, slot) == 0)
        return;
    r->held[r->nheld++] = slot;
}

static void rx_recycle_chain(struct netdev *n, unsigned p, u16 slot)
{
    while (slot != NO_SLOT) {
        u16 next = n->rx[p].link[slot];
        rx_recycle(n, p, slot);
        slot = next;
    }
}

static void rx_kick(struct netdev *n, unsigned p, u32 flags)
{
    if (n->rx[p].kick) {
        n->rx[p].kick = false;
        vq_kick(rxvq(n, p), flags & F_ALWAYS_KICK);
    }
}

/* Post every held buffer of pair p; how many. */
static u32 rx_unhold(struct netdev *n, unsigned p)
{
    struct rxq *r = &n->rx[p];
    u32 done = 0;
    while (r->nheld) {
        if (rx_post(n, p, r->held[r->nheld - 1]) < 0)
            break;
        r->nheld--;
        done++;
    }
    return done;
}

/* One used RX buffer: 1 (slot, len), 0: none, <0: -R_DEVICE. */
static int rx_get(struct netdev *n, unsigned p, u16 *slot, u32 *len)
{
    struct vq *q = rxvq(n, p);
    u32 id, l;
    int r = vq_poll(q, &id, &l);
    if (r <= 0)
        return r;
    struct req_ctx *c = id < q->size ? vq_ctx(q, (u16)id) : 0;
    if (!c || !c->in_use) {
        printf("net%u: rx queue %u: used id %u was not posted\n", n->d.index, q->index, id);
        return -R_DEVICE;
    }
    c->in_use = 0;
    vq_release(q, (u16)id, c->ndesc);
    q->inflight--;
    *slot = (u16)c->tag;
    *len = l;
    if (l > n->rx_buf_size) {
        printf("net%u: rx queue %u: used len %u > buffer size %u\n", n->d.index, q->index, l, n->rx_buf_size);
        return -R_DEVICE;
    }
    return 1;
}

/* ---- the control queue ----------------------------------------------------------------- */

static void msix_entry(struct vdev *d, unsigned e, u32 vector)
{
    u64 ent = d->msix_table + 16ull * e;
    wr32(ent + 12, 1);                         /* masked while it changes */
    wr32(ent + 0, MSI_ADDRESS);
    wr32(ent + 4, 0);
    wr32(ent + 8, vector);
    wr32(ent + 12, 0);
}

static int setup_ctrl(struct netdev *n, unsigned dev, u32 flags)
{
    struct vdev *d = &n->d;
    unsigned ci = n->ctrl_index;
    wr16(d->common + CC_QUEUE_SELECT, (u16)ci);
    u16 max = rd16(d->common + CC_QUEUE_SIZE);
    if (max == 0) {
        printf("net%u: control queue %u not available\n", dev, ci);
        return R_QUEUE;
    }
    if (rd16(d->common + CC_QUEUE_ENABLE)) {
        printf("net%u: control queue %u enabled after reset\n", dev, ci);
        return R_DEVICE;
    }
    unsigned size = max < CTRL_QSIZE ? max : CTRL_QSIZE;
    while (size & (size - 1))
        size &= size - 1;
    u64 base = (u64)ctrl_mem[dev];
    memset(ctrl_mem[dev], 0, CTRL_MEM);
    struct vq *q = &n->cvq;
    memset(q, 0, sizeof(*q));
    q->index = (u16)ci;
    q->size = (u16)size;
    q->event_idx = d->drv_features & BIT(VIRTIO_F_EVENT_IDX);
    q->desc = (struct vring_desc *)base;
    q->avail = base + 0x1000;
    q->used = base + 0x2000;
    q->next = (u16 *)(base + 0x3000);
    q->ctx = base + 0x4000;
    q->ctx_stride = CTX_DIRECT_STRIDE;
    for (unsigned j = 0; j < size; j++)
        q->next[j] = (u16)(j + 1);
    q->num_free = (u16)size;
    wr16(d->common + CC_QUEUE_SIZE, (u16)size);
    wr32(d->common + CC_QUEUE_DESC, (u32)base);
    wr32(d->common + CC_QUEUE_DESC + 4, 0);
    wr32(d->common + CC_QUEUE_DRIVER, (u32)q->avail);
    wr32(d->common + CC_QUEUE_DRIVER + 4, 0);
    wr32(d->common + CC_QUEUE_DEVICE, (u32)q->used);
    wr32(d->common + CC_QUEUE_DEVICE + 4, 0);
    u16 vector = VIRTIO_MSI_NO_VECTOR;
    if (!(flags & F_INIT_NO_MSIX)) {
        /* virtio_setup_queues gave the configuration entry 2 * pairs: it moves behind us */
        if (ci + 2 > d->msix_size || MSI_VECTOR_QUEUE0 + ci > 0xFE) {
            printf("net%u: MSI-X table of %u entries, %u needed\n", dev, d->msix_size, ci + 2);
            return R_MSIX;
        }
        msix_entry(d, ci, MSI_VECTOR_QUEUE0 + ci);
        msix_entry(d, ci + 1, MSI_VECTOR_CONFIG);
        wr16(d->common + CC_CONFIG_MSIX_VECTOR, (u16)(ci + 1));
        u16 back = rd16(d->common + CC_CONFIG_MSIX_VECTOR);
        if (back != ci + 1) {
            printf("net%u: config vector %u refused (reads %u)\n", dev, ci + 1, back);
            return R_MSIX;
        }
        wr16(d->common + CC_QUEUE_SELECT, (u16)ci);
        vector = (u16)ci;
    }
    wr16(d->common + CC_QUEUE_MSIX_VECTOR, vector);
    u16 back = rd16(d->common + CC_QUEUE_MSIX_VECTOR);
    if (back != vector) {
        printf("net%u: control queue vector %u refused (reads %u)\n", dev, vector, back);
        return R_MSIX;
    }
    u64 noff = (u64)rd16(d->common + CC_QUEUE_NOTIFY_OFF) * d->notify_mult;
    if (noff + 2 > d->notify_len) {
        printf("net%u: control queue notify offset %lx outside the capability\n", dev, noff);
        return R_BAD_CAPS;
    }
    q->notify_addr = d->notify + noff;
    wr16(d->common + CC_QUEUE_ENABLE, 1);
    return R_OK;
}

/* One control command: class, command, `len` data bytes at `data`; the ack byte into *ack
   (0xff: not written), the used length into *used. R_OK once the device returned it. */
static int ctrl_cmd(struct netdev *n, u8 cls, u8 cmd, u64 data, u32 len, u8 *ack, u32 *used)
{
    struct vq *q = &n->cvq;
    unsigned k = len ? 3 : 2;
    int head = vq_reserve(q, k);
    if (head < 0)
        return R_NOT_READY;
    struct req_ctx *c = vq_ctx(q, (u16)head);
    c->hdr[0] = cls;
    c->hdr[1] = cmd;
    c->status = 0xFF;
    c->in_use = 1;
    struct sg sg[3];
    unsigned i = 0;
    sg[i++] = (struct sg){(u64)c->hdr, 2, 0};
    if (len)
        sg[i++] = (struct sg){data, len, 0};
    sg[i++] = (struct sg){(u64)&c->status, 1, VRING_DESC_F_WRITE};
    vq_write_chain(q, (u16)head, sg, i, false);
    vq_add_avail(q, (u16)head);
    vq_kick(q, false);
    u64 start = rdtsc();
    for (;;) {
        u32 id, l;
        int r = vq_poll(q, &id, &l);
        if (r < 0)
            return -r;
        if (r > 0) {
            if (id != (u32)head) {
                printf("net%u: control queue: used id %u, submitted %d\n", n->d.index, id, head);
                return R_DEVICE;
            }
            c->in_use = 0;
            vq_release(q, (u16)head, c->ndesc);
            q->inflight--;
            *ack = READ_ONCE(c->status);
            *used = l;
            return R_OK;
        }
        if (rdtsc() - start > timeout_tsc) {
            printf("net%u: control command %u/%u: no answer (status %x)\n", n->d.index, cls, cmd,
                   virtio_get_status(&n->d));
            return R_TIMEOUT;
        }
        cpu_relax();
    }
}

/* ---- OP_NET_INIT ----------------------------------------------------------------------- */

static int init_fail(struct vdev *d, struct cmd *c, int r)
{
    u8 st = virtio_get_status(d);
    virtio_set_status(d, st | VS_FAILED);
    c->aux = virtio_get_status(d);
    return r;
}

static void read_mac(struct vdev *d, u8 *mac)
{
    u8 gen;
    do {
        gen = virtio_cfg_generation(d);
        for (int i = 0; i < 6; i++)
            mac[i] = rd8(d->devcfg + NETCFG_MAC + i);
    } while (gen != virtio_cfg_generation(d));
}

static u64 mac_bits(const u8 *mac)
{
    u64 v = 0;
    for (int i = 5; i >= 0; i--)
        v = v << 8 | mac[i];
    return v;
}

/* The driver's usual choice among the offered features, dependencies respected (5.1.3.1). */
static u64 choose_features(u64 offered, u32 flags)
{
    u64 want = BIT(VIRTIO_F_VERSION_1) | BIT(VIRTIO_NET_F_MAC) | BIT(VIRTIO_NET_F_STATUS) |
               BIT(VIRTIO_NET_F_MTU);
    static const struct { u32 flag; u8 bit; } map[] = {
        {F_NET_CSUM, VIRTIO_NET_F_CSUM},           {F_NET_GUEST_CSUM, VIRTIO_NET_F_GUEST_CSUM},
        {F_NET_HOST_TSO4, VIRTIO_NET_F_HOST_TSO4}, {F_NET_HOST_TSO6, VIRTIO_NET_F_HOST_TSO6},
        {F_NET_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO4}, {F_NET_GUEST_TSO6, VIRTIO_NET_F_GUEST_TSO6},
        {F_NET_MRG_RXBUF, VIRTIO_NET_F_MRG_RXBUF}, {F_NET_CTRL_VQ, VIRTIO_NET_F_CTRL_VQ},
        {F_NET_MQ, VIRTIO_NET_F_MQ},
    };
    for (unsigned i = 0; i < ARRAY_SIZE(map); i++)
        if (flags & map[i].flag)
            want |= BIT(map[i].bit);
    if (flags & F_NET_MQ)
        want |= BIT(VIRTIO_NET_F_CTRL_VQ);
    if (flags & F_INIT_EVENT_IDX)
        want |= BIT(VIRTIO_F_EVENT_IDX);
    if (flags & F_INIT_INDIRECT)
        want |= BIT(VIRTIO_F_INDIRECT_DESC);
    want &= offered;
    if (!(want & BIT(VIRTIO_NET_F_CSUM)))
        want &= ~(BIT(VIRTIO_NET_F_HOST_TSO4) | BIT(VIRTIO_NET_F_HOST_TSO6));
    if (!(want & BIT(VIRTIO_NET_F_GUEST_CSUM)))
        want &= ~(BIT(VIRTIO_NET_F_GUEST_TSO4) | BIT(VIRTIO_NET_F_GUEST_TSO6));
    if (!(want & BIT(VIRTIO_NET_F_CTRL_VQ)))
        want &= ~BIT(VIRTIO_NET_F_MQ);
    return want;
}

static int op_init(struct cmd *c, u32 flags)
{
    unsigned dev = c->dev;
    struct netdev *n = &nets[dev];
    struct vdev *d = &n->d;
    u64 exact = c->value, want_bufs = c->count;
    /* everything but the device's arena is forgotten */
    memset((u8 *)n + sizeof(n->d), 0, sizeof(*n) - sizeof(n->d));
    int r = virtio_probe(d, VIRTIO_ID_NET, dev);
    if (r)
        return r;
    r = virtio_reset(d);
    if (r) {
        c->aux = virtio_get_status(d);
        return r;
    }
    virtio_set_status(d, VS_ACKNOWLEDGE);
    virtio_set_status(d, VS_ACKNOWLEDGE | VS_DRIVER);
    u64 offered = virtio_device_features(d);
    c->value = offered;
    if (!exact && !(offered & BIT(VIRTIO_F_VERSION_1))) {
        printf("net%u: VERSION_1 not offered (features %lx)\n", dev, offered);
        return init_fail(d, c, R_FEATURES);
    }
    u64 want = exact ? exact : choose_features(offered, flags);
    virtio_write_features(d, want);
    c->count = want;
    virtio_set_status(d, VS_ACKNOWLEDGE | VS_DRIVER | VS_FEATURES_OK);
    u8 st = virtio_get_status(d);
    if (!(st & VS_FEATURES_OK)) {
        printf("net%u: features %lx refused (status %x)\n", dev, want, st);
        return init_fail(d, c, R_FEATURES);
    }

    /* device configuration (5.1.4): fields exist only with their features */
    if (want & BIT(VIRTIO_NET_F_MAC))
        read_mac(d, n->mac);
    n->link = (want & BIT(VIRTIO_NET_F_STATUS)) ? virtio_cfg_read16(d, NETCFG_STATUS) : 0;
    n->max_pairs = (want & BIT(VIRTIO_NET_F_MQ)) ? virtio_cfg_read16(d, NETCFG_MAX_PAIRS) : 1;
    n->mtu = (want & BIT(VIRTIO_NET_F_MTU)) ? virtio_cfg_read16(d, NETCFG_MTU) : 0;
    n->mrg = want & BIT(VIRTIO_NET_F_MRG_RXBUF);
    n->ctrl = want & BIT(VIRTIO_NET_F_CTRL_VQ);
    bool mq = want & BIT(VIRTIO_NET_F_MQ);
    c->sector = mac_bits(n->mac) | (u64)n->link << 48;
    if (mq && n->max_pairs == 0) {
        printf("net%u: max_virtqueue_pairs is 0\n", dev);
        return init_fail(d, c, R_DEVICE);
    }

    unsigned pairs = c->queue ? c->queue : 1;
    if (pairs > n->max_pairs || pairs > NET_MAX_PAIRS) {
        printf("net%u: %u queue pairs asked, %u available (at most %u here)%s\n", dev, pairs, n->max_pairs,
               NET_MAX_PAIRS, mq ? "" : ", MQ not negotiated");
        return init_fail(d, c, R_BAD_ARG);
    }
    n->ctrl_index = (u16)(mq ? 2 * n->max_pairs : 2);
    u16 cc_nq = rd16(d->common + CC_NUM_QUEUES);
    unsigned needq = n->ctrl ? n->ctrl_index + 1u : 2 * pairs;
    if (cc_nq < needq) {
        printf("net%u: %u virtqueues, %u needed\n", dev, cc_nq, needq);
        return init_fail(d, c, R_QUEUE);
    }
    unsigned size = c->depth;
    if (!size) {
        wr16(d->common + CC_QUEUE_SELECT, 0);
        size = rd16(d->common + CC_QUEUE_SIZE);
        if (size > 256)
            size = 256;
        while (size & (size - 1))
            size &= size - 1;
    }
    if (size == 0 || size > MAX_QSIZE || (size & (size - 1))) {
        printf("net%u: queue size %u is not a power of 2 up to %u\n", dev, size, MAX_QSIZE);
        return init_fail(d, c, size == 0 ? R_QUEUE : R_BAD_ARG);
    }

    /* RX buffers (5.1.6.3.1) */
    bool big = want & (BIT(VIRTIO_NET_F_GUEST_TSO4) | BIT(VIRTIO_NET_F_GUEST_TSO6) | BIT(VIRTIO_NET_F_GUEST_UFO));
    u32 bufsize = (u32)c->length;
    if (!bufsize) {
        bufsize = n->mrg ? RX_BUF_MRG : big ? RX_BUF_BIG : RX_BUF_SMALL;
        if (!n->mrg && !big && n->mtu > 1500)
            bufsize = NET_HDR_SIZE + 18 + n->mtu;      /* Ethernet header and a VLAN tag */
    }
    unsigned shift = (flags & F_NET_RX_SEG_SHIFT_MASK) >> F_NET_RX_SEG_SHIFT_POS;
    u32 seg = shift && shift < 31 ? 1u << shift : bufsize;
    u32 nseg = (bufsize + seg - 1) / seg;
    bool ind = (want & BIT(VIRTIO_F_INDIRECT_DESC)) && nseg > 1;
    u32 per_buf = ind ? 1 : nseg;
    if (c->length > 0xFFFFFFFFull || bufsize < NET_HDR_SIZE || nseg > MAX_SG || per_buf > size) {
        printf("net%u: RX buffers of %u bytes in %u descriptors do not fit a queue of %u\n", dev, bufsize, nseg,
               size);
        return init_fail(d, c, R_BAD_ARG);
    }
    u32 nbufs = size / per_buf;                 /* as many as the ring takes, or fewer if asked */
    if (want_bufs && want_bufs < nbufs)
        nbufs = (u32)want_bufs;
    if (nbufs > NET_MAX_RX_BUFS)
        nbufs = NET_MAX_RX_BUFS;
    n->rx_buf_size = bufsize;
    n->rx_seg = seg;
    n->rx_nseg = nseg;
    n->rx_bufs = nbufs;
    n->rx_stride = ALIGN_UP(bufsize, 64);
    n->pool = c->buffer ? c->buffer : NET_RX_POOL;
    n->pool_end = n->pool + n->rx_stride * nbufs * pairs;
    if (n->pool < ARENA_END || n->pool_end < n->pool) {
        printf("net%u: RX pool at %lx: below %lx or wrapping\n", dev, n->pool, ARENA_END);
        return init_fail(d, c, R_BAD_ARG);
    }

    r = virtio_setup_queues(d, 2 * pairs, size, flags);
    if (r)
        return init_fail(d, c, r);
    if (n->ctrl && (r = setup_ctrl(n, dev, flags)))
        return init_fail(d, c, r);
    n->pairs = (u16)pairs;
    n->qsize = (u16)size;
    n->repost = true;

    if (!(flags & F_INIT_NO_DRIVER_OK))
        virtio_set_status(d, VS_ACKNOWLEDGE | VS_DRIVER | VS_FEATURES_OK | VS_DRIVER_OK);
    st = virtio_get_status(d);
    c->aux = st;
    c->queue = pairs | (u32)n->max_pairs << 16;
    c->depth = size | (u32)n->mtu << 16;
    c->length = bufsize;
    c->buffer = n->pool_end;
    if (st & (VS_NEEDS_RESET | VS_FAILED)) {
        printf("net%u: device status %x after DRIVER_OK\n", dev, st);
        return R_DEVICE;
    }
    if (flags & F_INIT_NO_DRIVER_OK) {
        d->ready = true;
        return R_OK;
    }
    /* the receive queues get their buffers; notifications only after DRIVER_OK (3.1.1) */
    for (unsigned p = 0; p < pairs; p++) {
        for (u32 s = 0; s < nbufs; s++)
            rx_post(n, p, (u16)s);
        rx_kick(n, p, 0);
    }
    if (mq) {
        u8 ack;
        u32 used;
        put16(ctrl_data[dev], (u16)pairs);     /* struct virtio_net_ctrl_mq */
        r = ctrl_cmd(n, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, (u64)ctrl_data[dev], 2, &ack, &used);
        if (r)
            return r;
        if (ack != VIRTIO_NET_OK) {
            printf("net%u: VQ_PAIRS_SET %u: ack %u\n", dev, pairs, ack);
            return R_VIRTIO_STATUS + ack;
        }
    }
    d->ready = true;
    info("net%u: slot %u, %u pair(s) of %u of %u, features %lx of %lx, mac %x:%x:%x:%x:%x:%x, status %x, "
         "mtu %u, %u rx buffers of %u bytes each\n", dev, d->pci.slot, pairs, n->max_pairs, size, want, offered,
         n->mac[0], n->mac[1], n->mac[2], n->mac[3], n->mac[4], n->mac[5], n->link, n->mtu, nbufs, bufsize);
    return R_OK;
}

/* ---- OP_NET_TX ------------------------------------------------------------------------- */

struct txrun {
    struct netdev *n;
    struct vq *q;
    u32 flags;
    u64 nframes, depth;
    u64 buffer, length, stride;     /* the frame (template) */
    u64 list, list_end;             /* F_NET_TX_LIST: next record, end (0: unbounded) */
    u32 seq_off, csum_off, seq;
    u8 hdr[NET_HDR_SIZE];
    u32 nfree;
    /* out */
    u64 completed, bytes, cycles;
    u32 kicks;
};

/* RFC 1624 incremental update of the 16-bit ones' complement checksum at `csum` (big-endian)
   for the bytes [a, b) changing from old to new (a, b even: the checksummed region starts at
   an even offset). A zero checksum (UDP: none) stays zero. */
static void csum_update(u8 *csum, const u8 *old, const u8 *new, u32 n)
{
    u16 hc = (u16)(csum[0] << 8 | csum[1]);
    if (!hc)
        return;
    u32 s = (u16)~hc;
    for (u32 i = 0; i + 1 < n; i += 2) {
        s += (u16)~(old[i] << 8 | old[i + 1]);
        s += (u16)(new[i] << 8 | new[i + 1]);
    }
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    u16 r = (u16)~s;
    if (!r)
        r = 0xFFFF;
    csum[0] = (u8)(r >> 8);
    csum[1] = (u8)r;
}

static void seq_patch(struct txrun *t, u8 *f, u64 i)
{
    u32 a = t->seq_off & ~1u, b = ALIGN_UP(t->seq_off + 4, 2);
    u8 old[6];
    memcpy(old, f + a, b - a);
    u32 v = t->seq + (u32)i;
    f[t->seq_off] = (u8)(v >> 24);
    f[t->seq_off + 1] = (u8)(v >> 16);
    f[t->seq_off + 2] = (u8)(v >> 8);
    f[t->seq_off + 3] = (u8)v;
    if (t->csum_off)
        csum_update(f + t->csum_off, old, f + a, b - a);
}

static unsigned data_descs(u64 len, u32 flags)
{
    unsigned shift = (flags & F_SEG_SHIFT_MASK) >> F_SEG_SHIFT_POS;
    u64 seg = shift ? 1ull << shift : 1ull << 31;
    return (unsigned)((len + seg - 1) / seg);
}

/* Every 100 ms of a polling loop: whether the device set NEEDS_RESET or reset itself (then it is
 * marked not ready and its status printed). */
static bool device_broken(struct netdev *n, u64 now, u64 *last_check)
{
    if (now - *last_check <= ms_to_tsc(100))
        return false;
    *last_check = now;
    if (!virtio_broken(&n->d))
        return false;
    printf("net%u: device status %x\n", n->d.index, virtio_get_status(&n->d));
    n->d.ready = false;
    return true;
}

/* Put frame i on the ring (not yet published): 1, 0: no room, <0: -R_*. */
static int tx_submit(struct txrun *t, u64 i)
{
    struct vq *q = t->q;
    u64 data = t->buffer, len = t->length, rec = 0;
    if (t->flags & F_NET_TX_LIST) {
        rec = t->list;
        if (t->list_end && rec + NET_REC_SIZE > t->list_end)
            return -R_BAD_ARG;
        len = ((struct net_rec *)rec)->len;
        data = rec + NET_REC_SIZE;
        if (t->list_end && data + len > t->list_end)
            return -R_BAD_ARG;
    }
    unsigned nh = (t->flags & F_NET_SPLIT_HDR) ? 2 : 1;
    unsigned n = nh + data_descs(len, t->flags);
    bool ind = q->indirect && !(t->flags & F_DIRECT) && n > 1;
    if (n > MAX_SG || (!ind && n > q->size))
        return -R_BAD_ARG;
    if (t->flags & F_NET_TX_SEQ && !t->nfree)
        return 0;
    int head = vq_reserve(q, ind ? 1 : n);
    if (head < 0)
        return 0;
    struct req_ctx *c = vq_ctx(q, (u16)head);
    u64 hdr = (u64)c->hdr;
    u32 slot = 0;
    if (t->flags & F_NET_TX_LIST) {
        hdr = rec + 12;
        t->list = ALIGN_UP(data + len, NET_REC_ALIGN);
    } else {
        memcpy(c->hdr, t->hdr, NET_HDR_SIZE);
        if (t->flags & F_NET_TX_SEQ) {
            slot = tx_slots[--t->nfree];
            data = t->buffer + t->stride * (1 + slot);
            copy(data, t->buffer, len);
            seq_patch(t, (u8 *)data, i);
        }
    }
    struct sg sg[MAX_SG];
    unsigned k = 0;
    if (nh == 2) {
        sg[k++] = (struct sg){hdr, 5, 0};
        sg[k++] = (struct sg){hdr + 5, NET_HDR_SIZE - 5, 0};
    } else {
        sg[k++] = (struct sg){hdr, NET_HDR_SIZE, 0};
    }
    unsigned shift = (t->flags & F_SEG_SHIFT_MASK) >> F_SEG_SHIFT_POS;
    u64 seg = shift ? 1ull << shift : 1ull << 31;
    for (u64 off = 0; off < len; off += seg)
        sg[k++] = (struct sg){data + off, (u32)(len - off < seg ? len - off : seg), 0};
    vq_write_chain(q, (u16)head, sg, k, ind);
    c->in_use = 1;
    c->tag = len | (u64)slot << 32;
    vq_add_avail(q, (u16)head);
    return 1;
}

static int tx_run(struct txrun *t)
{
    struct netdev *n = t->n;
    struct vq *q = t->q;
    u64 issued = 0;
    int err = 0;
    u32 kicks0 = q->kicks;
    u64 start = rdtsc(), last = start, last_check = start, end = start;
    vq_set_irq(q, t->flags & F_NO_INTERRUPT);
    WRITE_ONCE(job_block->progress, 0);
    while (issued > t->completed || (issued < t->nframes && !err)) {
        bool added = false;
        while (!err && issued < t->nframes && issued - t->completed < t->depth) {
            int r = tx_submit(t, issued);
            if (r == 0) {
                if (issued == t->completed) {
                    printf("net%u: tx queue %u: no free descriptors\n", n->d.index, q->index);
                    err = R_NOT_READY;
                }
                break;
            }
            if (r < 0) {
                printf("net%u: frame %lu does not fit (%u descriptors max, queue of %u)\n", n->d.index, issued,
                       MAX_SG, q->size);
                err = -r;
                break;
            }
            issued++;
            added = true;
        }
        if (added)
            vq_kick(q, t->flags & F_ALWAYS_KICK);
        u32 id, len;
        int r, got = 0;
        while ((r = vq_poll(q, &id, &len)) > 0) {
            struct req_ctx *c = id < q->size ? vq_ctx(q, (u16)id) : 0;
            if (!c || !c->in_use) {
                printf("net%u: tx queue %u: used id %u was not submitted\n", n->d.index, q->index, id);
                n->d.ready = false;
                err = R_DEVICE;
                goto out;
            }
            c->in_use = 0;
            vq_release(q, (u16)id, c->ndesc);
            q->inflight--;
            if (t->flags & F_NET_TX_SEQ)
                tx_slots[t->nfree++] = (u16)(c->tag >> 32);
            t->completed++;
            t->bytes += (u32)c->tag;
            WRITE_ONCE(job_block->progress, (u32)t->completed);
            got++;
        }
        if (r < 0) {
            n->d.ready = false;
            err = -r;
            goto out;
        }
        u64 now = rdtsc();
        if (got || added) {
            if (got)
                end = now;
            last = now;
            continue;
        }
        if (now - last > timeout_tsc) {
            printf("net%u: tx queue %u: no progress: avail %u used %u seen %u in flight %u status %x\n",
                   n->d.index, q->index, q->published, vq_used_idx(q), q->last_used, q->inflight,
                   virtio_get_status(&n->d));
            n->d.ready = false;
            err = R_TIMEOUT;
            goto out;
        }
        if (device_broken(n, now, &last_check)) {
            err = R_DEVICE;
            goto out;
        }
        cpu_relax();
    }
out:
    t->cycles = end - start;
    t->kicks = q->kicks - kicks0;
    return err;
}

static int ready_pair(struct cmd *c, struct netdev **np)
{
    struct netdev *n = &nets[c->dev];
    if (!n->d.ready) {
        printf("net%u: not initialised\n", c->dev);
        return R_NOT_READY;
    }
    if (c->queue >= n->pairs) {
        printf("net%u: no queue pair %u (%u)\n", c->dev, c->queue, n->pairs);
        return R_BAD_ARG;
    }
    *np = n;
    return R_OK;
}

static int tx_prepare(struct cmd *c, u32 flags, struct txrun *t)
{
    struct netdev *n;
    int r = ready_pair(c, &n);
    if (r)
        return r;
    memset(t, 0, sizeof(*t));
    t->n = n;
    t->q = txvq(n, c->queue);
    t->flags = flags;
    t->nframes = c->count;
    t->depth = c->depth ? c->depth : 1;
    t->buffer = c->buffer;
    t->length = c->length;
    t->hdr[HDR_FLAGS] = (flags & F_NET_TX_CSUM) ? VIRTIO_NET_HDR_F_NEEDS_CSUM : 0;
    t->hdr[HDR_GSO_TYPE] = (u8)((flags & F_NET_GSO_MASK) >> F_NET_GSO_POS);
    put16(t->hdr + HDR_HDR_LEN, (u16)(c->sector >> 48));
    put16(t->hdr + HDR_GSO_SIZE, (u16)(c->sector >> 32));
    put16(t->hdr + HDR_CSUM_START, (u16)c->sector);
    put16(t->hdr + HDR_CSUM_OFFSET, (u16)(c->sector >> 16));
    if ((flags & F_NET_TX_LIST) && (flags & F_NET_TX_SEQ))
        return R_BAD_ARG;
    if (flags & F_NET_TX_LIST) {
        t->list = c->buffer;
        t->list_end = c->length ? c->buffer + c->length : 0;
        if (!c->buffer)
            return R_BAD_ARG;
        return R_OK;
    }
    if (c->length > 0xFFFFFFFFull || (c->length && !c->buffer))
        return R_BAD_ARG;
    if (flags & F_NET_TX_SEQ) {
        t->seq_off = (u16)c->value;
        t->csum_off = (u16)(c->value >> 16);
        t->seq = (u32)(c->value >> 32);
        t->stride = ALIGN_UP(c->length, 64);
        u32 a = t->seq_off & ~1u, b = ALIGN_UP(t->seq_off + 4, 2);
        if (t->seq_off + 4 > c->length || t->depth > NET_MAX_TX_SLOTS ||
            (t->csum_off && (t->csum_off + 2 > c->length || (t->csum_off & 1) ||
                             (t->csum_off + 2 > a && t->csum_off < b)))) {
            printf("net%u: bad sequence number (%u) or checksum (%u) offset for %lu-byte frames\n", c->dev,
                   t->seq_off, t->csum_off, c->length);
            return R_BAD_ARG;
        }
        t->nfree = (u32)t->depth;
        for (u32 i = 0; i < t->nfree; i++)
            tx_slots[i] = (u16)(t->nfree - 1 - i);
    }
    return R_OK;
}

static int op_tx(struct cmd *c, u32 flags, unsigned index, bool bench)
{
    struct txrun t;
    int r = tx_prepare(c, flags, &t);
    if (r)
        return r;
    if (bench && (flags & F_MARKS))
        outl(REPORT_PORT, 0xB0000000u | (index & 0xFFFFFF));
    r = tx_run(&t);
    if (bench && (flags & F_MARKS))
        outl(REPORT_PORT, 0xB1000000u | (index & 0xFFFFFF));
    u64 us = t.cycles * 1000 / tsc_khz;
    if (bench) {
        c->value = t.cycles;
        c->sector = t.completed;
    } else {
        c->value = t.completed;
        c->sector = t.cycles;
    }
    c->count = t.bytes;
    c->aux = t.kicks;
    info("net%u: tx %lu frames, %lu bytes, depth %lu: %lu us, %lu frames/s, %lu Mbit/s, %u kicks\n", c->dev,
         t.completed, t.bytes, t.depth, us, us ? t.completed * 1000000 / us : 0, us ? t.bytes * 8 / us : 0,
         t.kicks);
    return r;
}

/* ---- OP_NET_RX ------------------------------------------------------------------------- */

struct rxrun {
    struct netdev *n;
    u32 flags;
    unsigned p0, np;                /* the pairs polled */
    u64 area, area_end, pos;        /* records (area 0: none), end (0: unbounded), next record */
    u64 max_frames, max_bytes, tmo;
    /* out */
    u64 frames, bytes, bufs, first, last;
};

static bool rx_limits(struct rxrun *x)
{
    return (x->max_frames && x->frames >= x->max_frames) || (x->max_bytes && x->bytes >= x->max_bytes);
}

/* Echo pair p's complete frame: its buffers are held until the TX completes. R_*. */
static int echo_reap(struct rxrun *x, unsigned p, bool *progress);

static int echo_submit(struct rxrun *x, unsigned p)
{
    struct netdev *n = x->n;
    struct rxq *r = &n->rx[p];
    struct vq *q = txvq(n, p);
    u8 gso = r->hdr[HDR_GSO_TYPE] & ~VIRTIO_NET_HDR_GSO_ECN;
    u64 f = n->d.drv_features;
    if (((r->hdr[HDR_FLAGS] & VIRTIO_NET_HDR_F_NEEDS_CSUM) && !(f & BIT(VIRTIO_NET_F_CSUM))) ||
        (gso == VIRTIO_NET_HDR_GSO_TCPV4 && !(f & BIT(VIRTIO_NET_F_HOST_TSO4))) ||
        (gso == VIRTIO_NET_HDR_GSO_TCPV6 && !(f & BIT(VIRTIO_NET_F_HOST_TSO6))) ||
        (gso && gso != VIRTIO_NET_HDR_GSO_TCPV4 && gso != VIRTIO_NET_HDR_GSO_TCPV6)) {
        printf("net%u: echo: frame with flags %x gso %x needs offloads not negotiated (%lx)\n", n->d.index,
               r->hdr[HDR_FLAGS], r->hdr[HDR_GSO_TYPE], f);
        rx_recycle_chain(n, p, r->first);
        return R_FEATURES;
    }
    struct sg sg[MAX_SG];
    unsigned k = 1;
    for (u16 s = r->first; s != NO_SLOT; s = r->link[s]) {
        u64 a = rx_addr(n, p, s);
        u32 l = r->used_len[s];
        if (s == r->first) {
            a += NET_HDR_SIZE;
            l -= NET_HDR_SIZE;
        }
        if (!l)
            continue;
        if (k == MAX_SG) {
            printf("net%u: echo: a frame of %u buffers does not fit %u descriptors\n", n->d.index, r->nbufs, MAX_SG);
            rx_recycle_chain(n, p, r->first);
            return R_BAD_ARG;
        }
        sg[k++] = (struct sg){a, l, 0};
    }
    bool ind = q->indirect && !(x->flags & F_DIRECT) && k > 1;
    if (!ind && k > q->size) {
        rx_recycle_chain(n, p, r->first);
        return R_BAD_ARG;
    }
    u64 start = rdtsc();
    int head;
    while ((head = vq_reserve(q, ind ? 1 : k)) < 0) {
        bool progress = false;
        int e = echo_reap(x, p, &progress);
        if (e)
            return e;
        if (!progress) {
            if (rdtsc() - start > x->tmo) {
                printf("net%u: echo: tx queue %u stuck (in flight %u)\n", n->d.index, q->index, q->inflight);
                n->d.ready = false;
                return R_TIMEOUT;
            }
            cpu_relax();
        }
    }
    struct req_ctx *c = vq_ctx(q, (u16)head);
    memcpy(c->hdr, r->hdr, NET_HDR_SIZE);
    c->hdr[HDR_FLAGS] &= VIRTIO_NET_HDR_F_NEEDS_CSUM;     /* DATA_VALID and RSC_INFO are RX only */
    put16(c->hdr + HDR_NUM_BUFFERS, 0);
    sg[0] = (struct sg){(u64)c->hdr, NET_HDR_SIZE, 0};
    vq_write_chain(q, (u16)head, sg, k, ind);
    c->in_use = 1;
    c->tag = r->first;
    vq_add_avail(q, (u16)head);
    vq_kick(q, x->flags & F_ALWAYS_KICK);
    return R_OK;
}

static int echo_reap(struct rxrun *x, unsigned p, bool *progress)
{
    struct netdev *n = x->n;
    struct vq *q = txvq(n, p);
    u32 id, len;
    int r;
    while ((r = vq_poll(q, &id, &len)) > 0) {
        struct req_ctx *c = id < q->size ? vq_ctx(q, (u16)id) : 0;
        if (!c || !c->in_use) {
            printf("net%u: tx queue %u: used id %u was not submitted\n", n->d.index, q->index, id);
            n->d.ready = false;
            return R_DEVICE;
        }
        c->in_use = 0;
        vq_release(q, (u16)id, c->ndesc);
        q->inflight--;
        rx_recycle_chain(n, p, (u16)c->tag);
        *progress = true;
    }
    if (r < 0) {
        n->d.ready = false;
        return -r;
    }
    rx_kick(n, p, x->flags);
    return R_OK;
}

/* A complete frame on pair p: record it, count it, echo or recycle its buffers. R_*. */
static int rx_frame(struct rxrun *x, unsigned p)
{
    struct netdev *n = x->n;
    struct rxq *r = &n->rx[p];
    if (x->area) {
        u64 end = ALIGN_UP(x->pos + NET_REC_SIZE + r->len, NET_REC_ALIGN);
        if (x->area_end && end > x->area_end) {
            printf("net%u: rx area full: a %u-byte frame after %lu frames\n", n->d.index, r->len, x->frames);
            rx_recycle_chain(n, p, r->first);
            return R_NO_MEM;
        }
        struct net_rec *rec = (struct net_rec *)x->pos;
        rec->len = r->len;
        rec->queue = (u16)p;
        rec->nbufs = r->nbufs;
        rec->used_len = r->used;
        memcpy(rec->hdr, r->hdr, NET_HDR_SIZE);
        u64 dst = x->pos + NET_REC_SIZE;
        for (u16 s = r->first; s != NO_SLOT; s = r->link[s]) {
            u64 a = rx_addr(n, p, s);
            u32 l = r->used_len[s];
            if (s == r->first) {
                a += NET_HDR_SIZE;
                l -= NET_HDR_SIZE;
            }
            copy(dst, a, l);
            dst += l;
        }
        while (dst < end)
            *(u8 *)dst++ = 0;
        x->pos = end;
    }
    x->frames++;
    x->bytes += r->len;
    x->last = rdtsc();
    WRITE_ONCE(job_block->progress, (u32)x->frames);
    if (x->flags & F_NET_ECHO)
        return echo_submit(x, p);
    rx_recycle_chain(n, p, r->first);
    return R_OK;
}

/* One used buffer of pair p. R_*. */
static int rx_buffer(struct rxrun *x, unsigned p, u16 s, u32 l)
{
    struct netdev *n = x->n;
    struct rxq *r = &n->rx[p];
    if (s >= n->rx_bufs) {
        printf("net%u: rx queue %u: buffer %u unknown\n", n->d.index, 2 * p, s);
        return R_DEVICE;
    }
    if (!x->bufs++)
        x->first = rdtsc();
    r->used_len[s] = l;
    r->link[s] = NO_SLOT;
    if (!r->need) {
        u64 a = rx_addr(n, p, s);
        if (l < NET_HDR_SIZE) {
            printf("net%u: rx queue %u: used len %u < header\n", n->d.index, 2 * p, l);
            rx_recycle(n, p, s);
            return R_DEVICE;
        }
        memcpy(r->hdr, (void *)a, NET_HDR_SIZE);
        u16 nb = n->mrg ? get16(r->hdr + HDR_NUM_BUFFERS) : 1;
        if (nb == 0 || nb > n->rx_bufs) {
            printf("net%u: rx queue %u: num_buffers %u (%u buffers posted)\n", n->d.index, 2 * p, nb, n->rx_bufs);
            rx_recycle(n, p, s);
            return R_DEVICE;
        }
        r->need = nb;
        r->nbufs = 0;
        r->first = s;
        r->used = 0;
        r->len = 0;
        l -= NET_HDR_SIZE;
    } else {
        r->link[r->last] = s;
    }
    r->last = s;
    r->nbufs++;
    r->used += r->used_len[s];
    r->len += l;
    if (--r->need)
        return R_OK;
    return rx_frame(x, p);
}

static int rx_run(struct rxrun *x)
{
    struct netdev *n = x->n;
    bool echo = x->flags & F_NET_ECHO;
    int err = R_OK;
    for (unsigned p = x->p0; p < x->p0 + x->np; p++) {
        vq_set_irq(rxvq(n, p), x->flags & F_NO_INTERRUPT);
        if (echo)
            vq_set_irq(txvq(n, p), x->flags & F_NO_INTERRUPT);
        n->rx[p].need = 0;
    }
    WRITE_ONCE(job_block->progress, 0);
    u64 last = rdtsc(), last_check = last;
    for (;;) {
        bool progress = false, partial = false, echoing = false;
        for (unsigned p = x->p0; p < x->p0 + x->np; p++) {
            struct rxq *r = &n->rx[p];
            u16 s;
            u32 l;
            int g = 0;
            while ((r->need || !rx_limits(x)) && (g = rx_get(n, p, &s, &l)) > 0) {
                progress = true;
                if ((err = rx_buffer(x, p, s, l)))
                    goto out;
            }
            if (g < 0) {
                n->d.ready = false;
                err = -g;
                goto out;
            }
            if (echo && (err = echo_reap(x, p, &progress)))
                goto out;
            rx_kick(n, p, x->flags);
            partial |= r->need != 0;
            echoing |= echo && txvq(n, p)->inflight;
        }
        if (rx_limits(x) && !partial && !echoing)
            break;
        u64 now = rdtsc();
        if (progress) {
            last = now;
            continue;
        }
        if (now - last > x->tmo) {
            if (!partial && !echoing && (x->flags & F_NET_TIMEOUT_OK))
                break;
            printf("net%u: rx: nothing for %lu ms: %lu frames, %lu bytes%s%s\n", n->d.index, x->tmo / tsc_khz,
                   x->frames, x->bytes, partial ? ", a frame incomplete" : "", echoing ? ", echoes in flight" : "");
            if (echoing)
                n->d.ready = false;
            err = R_TIMEOUT;
            goto out;
        }
        if (device_broken(n, now, &last_check)) {
            err = R_DEVICE;
            goto out;
        }
        cpu_relax();
    }
out:
    /* a frame left incomplete gives its buffers back */
    for (unsigned p = x->p0; p < x->p0 + x->np; p++) {
        struct rxq *r = &n->rx[p];
        if (r->need && n->d.ready) {
            rx_recycle_chain(n, p, r->first);
            rx_kick(n, p, x->flags);
        }
        r->need = 0;
    }
    return err;
}

static int op_rx(struct cmd *c, u32 flags, unsigned index, bool bench)
{
    struct netdev *n;
    int r = ready_pair(c, &n);
    if (r)
        return r;
    struct rxrun x;
    memset(&x, 0, sizeof(x));
    x.n = n;
    x.flags = flags;
    x.p0 = (flags & F_NET_ANY_QUEUE) ? 0 : c->queue;
    x.np = (flags & F_NET_ANY_QUEUE) ? n->pairs : 1;
    x.max_frames = c->count;
    x.max_bytes = c->length;
    x.tmo = bench ? timeout_tsc : c->depth ? ms_to_tsc(c->depth) : timeout_tsc;
    if (!bench) {
        x.area = x.pos = c->buffer;
        x.area_end = c->buffer && c->sector ? c->buffer + c->sector : 0;
    }
    if (!x.max_frames && !x.max_bytes && !(flags & F_NET_TIMEOUT_OK)) {
        printf("net%u: rx: no frame or byte count, and no F_NET_TIMEOUT_OK\n", c->dev);
        return R_BAD_ARG;
    }
    if (bench && (flags & F_MARKS))
        outl(REPORT_PORT, 0xB0000000u | (index & 0xFFFFFF));
    r = rx_run(&x);
    if (bench && (flags & F_MARKS))
        outl(REPORT_PORT, 0xB1000000u | (index & 0xFFFFFF));
    u64 cycles = x.frames ? x.last - x.first : 0;
    u64 us = cycles * 1000 / tsc_khz;
    if (bench) {
        c->value = cycles;
        c->sector = x.frames;
    } else {
        c->value = x.frames;
        c->sector = cycles;
        c->length = x.pos - x.area;
    }
    c->count = x.bytes;
    c->aux = (u32)x.bufs;
    info("net%u: rx %lu frames, %lu bytes, %lu buffers%s: %lu us, %lu frames/s, %lu Mbit/s\n", c->dev, x.frames,
         x.bytes, x.bufs, (flags & F_NET_ECHO) ? ", echoed" : "", us, us ? x.frames * 1000000 / us : 0,
         us ? x.bytes * 8 / us : 0);
    return r;
}

/* ---- the rest -------------------------------------------------------------------------- */

static int op_stop_rx(struct cmd *c, u32 flags)
{
    struct netdev *n = &nets[c->dev];
    if (!n->d.ready) {
        printf("net%u: not initialised\n", c->dev);
        return R_NOT_READY;
    }
    u32 total = 0;
    if (flags & F_NET_RESUME) {
        n->repost = true;
        for (unsigned p = 0; p < n->pairs; p++) {
            total += rx_unhold(n, p);
            rx_kick(n, p, flags);
        }
    } else {
        n->repost = false;
        for (unsigned p = 0; p < n->pairs; p++)
            total += n->rx[p].nheld;
    }
    c->aux = total;
    return R_OK;
}

static int found_dev(struct cmd *c, struct netdev **np)
{
    struct netdev *n = &nets[c->dev];
    if (!n->d.found) {
        int r = virtio_probe(&n->d, VIRTIO_ID_NET, c->dev);
        if (r)
            return r;
    }
    *np = n;
    return R_OK;
}

int net_op(struct cmd *c, u32 flags, unsigned index)
{
    if (c->dev >= NET_MAX_DEVS) {
        printf("net%u: at most %u devices\n", c->dev, NET_MAX_DEVS);
        return R_BAD_ARG;
    }
    struct netdev *n;
    int r;
    switch (c->op) {
    case OP_NET_INIT:
        return op_init(c, flags);
    case OP_NET_TX:
        return op_tx(c, flags, index, false);
    case OP_NET_RX:
        return op_rx(c, flags, index, false);
    case OP_NET_BENCH:
        return (flags & F_NET_BENCH_RX) ? op_rx(c, flags, index, true) : op_tx(c, flags, index, true);
    case OP_NET_STOP_RX:
        return op_stop_rx(c, flags);
    case OP_NET_CTRL: {
        n = &nets[c->dev];
        if (!n->d.ready || !n->ctrl) {
            printf("net%u: %s\n", c->dev, n->d.ready ? "no control queue" : "not initialised");
            return R_NOT_READY;
        }
        if (c->length > NET_CTRL_MAX_DATA || (c->length && !c->buffer))
            return R_BAD_ARG;
        u8 ack = 0xFF;
        u32 used = 0;
        r = ctrl_cmd(n, (u8)c->value, (u8)(c->value >> 8), c->buffer, (u32)c->length, &ack, &used);
        if (r == R_TIMEOUT || r == R_DEVICE)
            n->d.ready = false;
        c->aux = ack;
        c->value = used;
        return r;
    }
    case OP_NET_RESET:
        if ((r = found_dev(c, &n)))
            return r;
        r = virtio_reset(&n->d);
        c->aux = virtio_get_status(&n->d);
        return r;
    case OP_NET_STATUS: {
        if ((r = found_dev(c, &n)))
            return r;
        c->value = virtio_get_status(&n->d);
        c->aux = n->d.isr ? rd8(n->d.isr) : 0;
        c->sector = virtio_cfg_generation(&n->d);
        u64 held = 0, posted = 0;
        if (n->d.ready)
            for (unsigned p = 0; p < n->pairs; p++) {
                held += n->rx[p].nheld;
                posted += rxvq(n, p)->inflight;
            }
        c->count = held;
        c->length = posted;
        return R_OK;
    }
    case OP_NET_CONFIG: {
        if ((r = found_dev(c, &n)))
            return r;
        if (c->buffer)
            virtio_cfg_dump(&n->d, c->buffer);
        u8 mac[6];
        read_mac(&n->d, mac);
        c->value = mac_bits(mac) | (u64)virtio_cfg_read16(&n->d, NETCFG_STATUS) << 48;
        c->aux = virtio_cfg_generation(&n->d);
        c->length = n->d.devcfg_len;
        c->sector = virtio_get_status(&n->d);
        return R_OK;
    }
    }
    return R_BAD_OP;
}
