/* virtio-blk (virtio 1.2, 5.2) driven by polling: the OP_BLK_* commands. */
#include "blk.h"
#include "job.h"

#define VIRTIO_BLK_F_SIZE_MAX     1
#define VIRTIO_BLK_F_SEG_MAX      2
#define VIRTIO_BLK_F_RO           5
#define VIRTIO_BLK_F_BLK_SIZE     6
#define VIRTIO_BLK_F_FLUSH        9
#define VIRTIO_BLK_F_MQ           12
#define VIRTIO_BLK_F_DISCARD      13
#define VIRTIO_BLK_F_WRITE_ZEROES 14

#define VIRTIO_BLK_T_IN           0
#define VIRTIO_BLK_T_OUT          1
#define VIRTIO_BLK_T_FLUSH        4
#define VIRTIO_BLK_T_GET_ID       8
#define VIRTIO_BLK_T_DISCARD      11
#define VIRTIO_BLK_T_WRITE_ZEROES 13
#define VIRTIO_BLK_ID_BYTES       20
#define VIRTIO_BLK_WZ_UNMAP       1

/* struct virtio_blk_config offsets */
#define BLKCFG_CAPACITY           0
#define BLKCFG_BLK_SIZE           20
#define BLKCFG_NUM_QUEUES         34
#define BLKCFG_MAX_DISCARD_SECTORS 36
#define BLKCFG_MAX_WZ_SECTORS     48

#define SECTOR 512ull

struct blkinfo {
    u64 capacity;
    u32 max_discard_sectors, max_wz_sectors;
};

static struct vdev blk[MAX_DEVS];
static struct blkinfo info_[MAX_DEVS];

/* ---- requests ------------------------------------------------------------------------- */

struct rq {
    u32 type;
    u64 sector;
    u64 data, len;          /* data buffer (len 0: none) */
    bool dev_writes;        /* the device writes the data (IN, GET_ID) */
    bool seg;               /* DISCARD/WRITE_ZEROES: one segment, in the request's ctx */
    u64 seg_sector;
    u32 seg_num, seg_flags;
    u64 tag;
};

typedef void (*fill_fn)(void *st, u64 i, struct rq *rq);
typedef void (*done_fn)(void *st, u64 tag);

struct engine {
    struct vdev *d;
    struct vq *q;
    u32 flags, depth;
    u64 n;                  /* requests to issue */
    fill_fn fill;
    done_fn done;
    void *st;
    /* out */
    u64 completed;
    u32 last_len;
    u32 kicks;
    u64 cycles;             /* first submission to last completion */
};

/* Put one request on the ring (not yet published). Head, -1 when the ring is full, or -R_*. */
static int submit(struct engine *e, const struct rq *rq)
{
    struct vq *q = e->q;
    unsigned shift = (e->flags & F_SEG_SHIFT_MASK) >> F_SEG_SHIFT_POS;
    u64 seg = shift ? 1ull << shift : 1ull << 31;
    u64 ndata = rq->seg ? 1 : (rq->len + seg - 1) / seg;
    if (ndata + 2 > MAX_SG)
        return -R_BAD_ARG;
    unsigned n = (unsigned)ndata + 2;
    bool ind = q->indirect && !(e->flags & F_DIRECT);
    if (!ind && n > q->size)
        return -R_BAD_ARG;
    int head = vq_reserve(q, ind ? 1 : n);
    if (head < 0)
        return -1;
    struct req_ctx *c = vq_ctx(q, (u16)head);
    u32 *h32 = (u32 *)c->hdr;
    h32[0] = rq->type;
    h32[1] = 0;
    *(u64 *)(c->hdr + 8) = rq->sector;
    c->status = 0xFF;       /* stays 0xff if the device never writes it */
    c->in_use = 1;
    c->tag = rq->tag;

    struct sg sg[MAX_SG];
    unsigned k = 0;
    sg[k++] = (struct sg){(u64)c->hdr, 16, 0};
    if (rq->seg) {
        *(u64 *)c->extra = rq->seg_sector;
        *(u32 *)(c->extra + 8) = rq->seg_num;
        *(u32 *)(c->extra + 12) = rq->seg_flags;
        sg[k++] = (struct sg){(u64)c->extra, 16, 0};
    } else {
        for (u64 off = 0; off < rq->len; off += seg) {
            u64 l = rq->len - off < seg ? rq->len - off : seg;
            sg[k++] = (struct sg){rq->data + off, (u32)l, rq->dev_writes ? VRING_DESC_F_WRITE : 0};
        }
    }
    sg[k++] = (struct sg){(u64)&c->status, 1, VRING_DESC_F_WRITE};
    vq_write_chain(q, (u16)head, sg, k, ind);
    vq_add_avail(q, (u16)head);
    return head;
}

static void timeout_report(struct vdev *d, struct vq *q)
{
    printf("blk%u: queue %u: no progress: avail %u used %u seen %u in flight %u status %x\n", d->index,
           q->index, q->published, vq_used_idx(q), q->last_used, q->inflight, virtio_get_status(d));
}

static int run(struct engine *e)
{
    struct vdev *d = e->d;
    struct vq *q = e->q;
    u64 issued = 0;
    int err = 0;
    u32 kicks0 = q->kicks;
    u64 start = rdtsc(), last = start, last_check = start, end = start;
    vq_set_irq(q, e->flags & F_NO_INTERRUPT);
    WRITE_ONCE(job_block->progress, 0);
    while (issued > e->completed || (issued < e->n && !err)) {
        bool added = false;
        while (!err && issued < e->n && issued - e->completed < e->depth) {
            struct rq rq;
            memset(&rq, 0, sizeof(rq));
            e->fill(e->st, issued, &rq);
            int h = submit(e, &rq);
            if (h == -1) {
                if (issued == e->completed) {   /* nothing in flight, yet no room: leaked */
                    printf("blk%u: queue %u: no free descriptors\n", d->index, q->index);
                    err = R_NOT_READY;
                }
                break;
            }
            if (h < 0) {
                printf("blk%u: request %lu does not fit (%u descriptors max)\n", d->index, issued, MAX_SG);
                err = -h;
                break;
            }
            issued++;
            added = true;
        }
        if (added)
            vq_kick(q, e->flags & F_ALWAYS_KICK);
        u32 id, len;
        int r, got = 0;
        while ((r = vq_poll(q, &id, &len)) > 0) {
            struct req_ctx *c = id < q->size ? vq_ctx(q, (u16)id) : 0;
            if (!c || !c->in_use) {
                printf("blk%u: queue %u: used id %u was not submitted\n", d->index, q->index, id);
                d->ready = false;
                err = R_DEVICE;
                goto out;
            }
            c->in_use = 0;
            u8 st = READ_ONCE(c->status);
            vq_release(q, (u16)id, c->ndesc);
            q->inflight--;
            e->completed++;
            e->last_len = len;
            WRITE_ONCE(job_block->progress, (u32)e->completed);
            if (st != 0 && !err) {
                printf("blk%u: request %lu: virtio status %u\n", d->index, c->tag, st);
                err = R_VIRTIO_STATUS + st;
            }
            if (e->done)
                e->done(e->st, c->tag);
            got++;
        }
        if (r < 0) {
            d->ready = false;
            err = -r;
            goto out;
        }
        u64 now = rdtsc();
        if (got) {
            end = now;
            last = now;
            continue;
        }
        if (added) {
            last = now;
            continue;
        }
        if (now - last > timeout_tsc) {
            timeout_report(d, q);
            d->ready = false;
            err = R_TIMEOUT;
            goto out;
        }
        if (now - last_check > ms_to_tsc(100)) {
            last_check = now;
            if (virtio_broken(d)) {
                printf("blk%u: device status %x\n", d->index, virtio_get_status(d));
                d->ready = false;
                err = R_DEVICE;
                goto out;
            }
        }
        cpu_relax();
    }
out:
    e->cycles = end - start;
    e->kicks = q->kicks - kicks0;
    return err;
}

/* ---- OP_BLK_INIT ---------------------------------------------------------------------- */

static int init_fail(struct vdev *d, struct cmd *c, int r)
{
    u8 st = virtio_get_status(d);
    virtio_set_status(d, st | VS_FAILED);
    c->aux = virtio_get_status(d);
    return r;
}

static int op_init(struct cmd *c, u32 flags)
{
    struct vdev *d = &blk[c->dev];
    struct blkinfo *bi = &info_[c->dev];
    u64 exact = c->value;
    int r = virtio_probe(d, VIRTIO_ID_BLOCK, c->dev);
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
    u64 accept = BIT(VIRTIO_F_VERSION_1) | BIT(VIRTIO_BLK_F_SEG_MAX) | BIT(VIRTIO_BLK_F_BLK_SIZE) |
                 BIT(VIRTIO_BLK_F_FLUSH) | BIT(VIRTIO_BLK_F_MQ) | BIT(VIRTIO_BLK_F_DISCARD) |
                 BIT(VIRTIO_BLK_F_WRITE_ZEROES) | BIT(VIRTIO_BLK_F_RO);
    if (flags & F_INIT_EVENT_IDX)
        accept |= BIT(VIRTIO_F_EVENT_IDX);
    if (flags & F_INIT_INDIRECT)
        accept |= BIT(VIRTIO_F_INDIRECT_DESC);
    u64 want = exact ? exact : offered & accept;
    if (!exact && !(offered & BIT(VIRTIO_F_VERSION_1))) {
        printf("blk%u: VERSION_1 not offered (features %lx)\n", c->dev, offered);
        return init_fail(d, c, R_FEATURES);
    }
    virtio_write_features(d, want);
    c->count = want;
    virtio_set_status(d, VS_ACKNOWLEDGE | VS_DRIVER | VS_FEATURES_OK);
    u8 st = virtio_get_status(d);
    if (!(st & VS_FEATURES_OK)) {
        printf("blk%u: features %lx refused (status %x)\n", c->dev, want, st);
        return init_fail(d, c, R_FEATURES);
    }

    unsigned avail = 1;
    if (want & BIT(VIRTIO_BLK_F_MQ))
        avail = virtio_cfg_read16(d, BLKCFG_NUM_QUEUES);
    u16 cc_nq = rd16(d->common + CC_NUM_QUEUES);
    if (cc_nq < avail)
        avail = cc_nq;
    unsigned nq = c->queue ? c->queue : (avail < MAX_QUEUES ? avail : MAX_QUEUES);
    if (nq == 0 || nq > avail || nq > MAX_QUEUES) {
        printf("blk%u: %u queues asked, %u available (at most %u here)\n", c->dev, nq, avail, MAX_QUEUES);
        return init_fail(d, c, nq == 0 ? R_QUEUE : R_BAD_ARG);
    }
    unsigned size = c->depth;
    if (!size) {
        wr16(d->common + CC_QUEUE_SELECT, 0);
        size = rd16(d->common + CC_QUEUE_SIZE);
        if (size > 256)
            size = 256;
        while (size & (size - 1))     /* round down to a power of 2 */
            size &= size - 1;
    }
    if (size == 0 || size > MAX_QSIZE || (size & (size - 1))) {
        printf("blk%u: queue size %u is not a power of 2 up to %u\n", c->dev, size, MAX_QSIZE);
        return init_fail(d, c, size == 0 ? R_QUEUE : R_BAD_ARG);
    }
    r = virtio_setup_queues(d, nq, size, flags);
    if (r)
        return init_fail(d, c, r);

    bi->capacity = virtio_cfg_read64(d, BLKCFG_CAPACITY);
    bi->max_discard_sectors = (want & BIT(VIRTIO_BLK_F_DISCARD)) ? virtio_cfg_read32(d, BLKCFG_MAX_DISCARD_SECTORS) : 0;
    bi->max_wz_sectors = (want & BIT(VIRTIO_BLK_F_WRITE_ZEROES)) ? virtio_cfg_read32(d, BLKCFG_MAX_WZ_SECTORS) : 0;
    u32 blk_size = (want & BIT(VIRTIO_BLK_F_BLK_SIZE)) ? virtio_cfg_read32(d, BLKCFG_BLK_SIZE) : 512;
    if (c->buffer)
        virtio_cfg_dump(d, c->buffer);

    if (!(flags & F_INIT_NO_DRIVER_OK))
        virtio_set_status(d, VS_ACKNOWLEDGE | VS_DRIVER | VS_FEATURES_OK | VS_DRIVER_OK);
    st = virtio_get_status(d);
    c->aux = st;
    c->sector = bi->capacity;
    c->length = blk_size;
    c->queue = nq;
    c->depth = size;
    if (st & (VS_NEEDS_RESET | VS_FAILED)) {
        printf("blk%u: device status %x after DRIVER_OK\n", c->dev, st);
        return R_DEVICE;
    }
    d->ready = true;
    info("blk%u: slot %u, %u queue(s) of %u, features %lx of %lx, %lu sectors\n", c->dev, d->pci.slot, nq,
         size, want, offered, bi->capacity);
    return R_OK;
}

/* ---- the request ops ------------------------------------------------------------------- */

struct xfer {
    u32 type;
    bool dev_writes;
    u64 sector, buffer, length, chunk;
    u32 seg_flags;
};

static void xfer_fill(void *st, u64 i, struct rq *rq)
{
    struct xfer *x = st;
    u64 off = i * x->chunk;
    u64 len = x->length - off < x->chunk ? x->length - off : x->chunk;
    rq->type = x->type;
    rq->tag = i;
    if (x->type == VIRTIO_BLK_T_DISCARD || x->type == VIRTIO_BLK_T_WRITE_ZEROES) {
        rq->seg = true;
        rq->seg_sector = x->sector + off / SECTOR;
        rq->seg_num = (u32)(len / SECTOR);
        rq->seg_flags = x->seg_flags;
        return;
    }
    if (x->type == VIRTIO_BLK_T_IN || x->type == VIRTIO_BLK_T_OUT)
        rq->sector = x->sector + off / SECTOR;
    rq->data = x->buffer + off;
    rq->len = len;
    rq->dev_writes = x->dev_writes;
}

static int ready_queue(struct cmd *c, struct vdev **dp, struct vq **qp)
{
    struct vdev *d = &blk[c->dev];
    if (!d->ready) {
        printf("blk%u: not initialised\n", c->dev);
        return R_NOT_READY;
    }
    if (c->queue >= d->nqueues) {
        printf("blk%u: no queue %u (%u)\n", c->dev, c->queue, d->nqueues);
        return R_BAD_ARG;
    }
    *dp = d;
    *qp = &d->vqs[c->queue];
    return R_OK;
}

static int op_xfer(struct cmd *c, u32 flags)
{
    struct vdev *d;
    struct vq *q;
    int r = ready_queue(c, &d, &q);
    if (r)
        return r;
    struct xfer x = {0};
    u64 n;
    x.buffer = c->buffer;
    x.length = c->length;
    switch (c->op) {
    case OP_BLK_READ:
    case OP_BLK_WRITE:
        x.type = c->op == OP_BLK_READ ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
        x.dev_writes = c->op == OP_BLK_READ;
        x.sector = c->sector;
        x.chunk = c->count ? c->count : 1 << 20;
        if (x.chunk % SECTOR || (x.length && !x.buffer))
            return R_BAD_ARG;
        n = (x.length + x.chunk - 1) / x.chunk;
        break;
    case OP_BLK_DISCARD:
    case OP_BLK_WRITE_ZEROES: {
        bool discard = c->op == OP_BLK_DISCARD;
        u32 max = discard ? info_[c->dev].max_discard_sectors : info_[c->dev].max_wz_sectors;
        x.type = discard ? VIRTIO_BLK_T_DISCARD : VIRTIO_BLK_T_WRITE_ZEROES;
        x.sector = c->sector;
        x.seg_flags = (!discard && (flags & F_UNMAP)) ? VIRTIO_BLK_WZ_UNMAP : 0;
        x.chunk = c->count ? c->count : (max ? max : 0x400000u) * SECTOR;
        if (x.chunk % SECTOR || x.length % SECTOR || x.chunk / SECTOR > 0xFFFFFFFFu)
            return R_BAD_ARG;
        n = (x.length + x.chunk - 1) / x.chunk;
        break;
    }
    case OP_BLK_FLUSH:
        x.type = VIRTIO_BLK_T_FLUSH;
        x.length = 0;
        x.chunk = 1;
        n = 1;
        break;
    default: /* OP_BLK_GET_ID */
        x.type = VIRTIO_BLK_T_GET_ID;
        x.dev_writes = true;
        x.length = c->length ? c->length : VIRTIO_BLK_ID_BYTES;
        x.chunk = x.length;
        if (!x.buffer)
            return R_BAD_ARG;
        n = 1;
        break;
    }
    struct engine e = {.d = d, .q = q, .flags = flags, .depth = c->depth ? c->depth : 1, .n = n,
                       .fill = xfer_fill, .st = &x};
    r = run(&e);
    c->value = e.completed;
    c->aux = e.last_len;
    return r;
}

/* ---- OP_BLK_BENCH ---------------------------------------------------------------------- */

struct bench {
    u64 region_units;       /* request-sized units in the region */
    u64 req_sectors, buffer, length;
    bool random;
    u64 rng;
    u32 *free_slots;
    u32 nfree;
    u32 type;
};

static u32 bench_slots[4096];

static void bench_fill(void *st, u64 i, struct rq *rq)
{
    struct bench *b = st;
    u64 unit;
    if (b->random) {
        b->rng ^= b->rng << 13;
        b->rng ^= b->rng >> 7;
        b->rng ^= b->rng << 17;
        unit = b->rng % b->region_units;
    } else {
        unit = i % b->region_units;
    }
    u32 slot = b->free_slots[--b->nfree];
    rq->type = b->type;
    rq->sector = unit * b->req_sectors;
    rq->data = b->buffer + (u64)slot * b->length;
    rq->len = b->length;
    rq->dev_writes = b->type == VIRTIO_BLK_T_IN;
    rq->tag = slot;
}

static void bench_done(void *st, u64 tag)
{
    struct bench *b = st;
    b->free_slots[b->nfree++] = (u32)tag;
}

static int op_bench(struct cmd *c, u32 flags, unsigned index)
{
    struct vdev *d;
    struct vq *q;
    int r = ready_queue(c, &d, &q);
    if (r)
        return r;
    u32 depth = c->depth ? c->depth : 1;
    u64 region = c->sector ? c->sector : info_[c->dev].capacity;
    if (!c->length || c->length % SECTOR || !c->buffer || depth > ARRAY_SIZE(bench_slots) ||
        region < c->length / SECTOR) {
        printf("blk%u: bench: bad arguments\n", c->dev);
        return R_BAD_ARG;
    }
    struct bench b = {.req_sectors = c->length / SECTOR, .buffer = c->buffer, .length = c->length,
                      .random = flags & F_RANDOM, .rng = 0x9E3779B97F4A7C15ull ^ index,
                      .free_slots = bench_slots, .nfree = depth,
                      .type = (flags & F_WRITE) ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN};
    b.region_units = region / b.req_sectors;
    for (u32 i = 0; i < depth; i++)
        bench_slots[i] = depth - 1 - i;
    if (flags & F_MARKS)
        outl(REPORT_PORT, 0xB0000000u | (index & 0xFFFFFF));
    struct engine e = {.d = d, .q = q, .flags = flags, .depth = depth, .n = c->count, .fill = bench_fill,
                       .done = bench_done, .st = &b};
    r = run(&e);
    if (flags & F_MARKS)
        outl(REPORT_PORT, 0xB1000000u | (index & 0xFFFFFF));
    c->value = e.cycles;
    c->aux = e.kicks;
    u64 us = e.cycles * 1000 / tsc_khz;
    info("blk%u: bench %s%s %lu x %lu bytes, depth %u: %lu us, %lu IOPS, %lu kicks\n", c->dev,
         b.random ? "random " : "", b.type == VIRTIO_BLK_T_IN ? "read" : "write", e.completed, c->length, depth,
         us, us ? e.completed * 1000000 / us : 0, (u64)e.kicks);
    return r;
}

/* ---- OP_BLK_GARBAGE -------------------------------------------------------------------- */

static struct vring_desc scratch[8] __attribute__((aligned(64)));

static void set_desc(struct vring_desc *d, u64 addr, u32 len, u16 flags, u16 next)
{
    d->addr = addr;
    d->len = len;
    d->flags = flags;
    d->next = next;
}

static int op_garbage(struct cmd *c, u32 flags)
{
    struct vdev *d;
    struct vq *q;
    int r = ready_queue(c, &d, &q);
    if (r)
        return r;
    unsigned kind = flags & 0xFF;
    u64 wait = ms_to_tsc(c->count ? c->count : 1000);
    u64 good = c->buffer ? c->buffer : 0x4000000;
    if (kind == 0 || kind > GARBAGE_MAX || q->inflight)
        return R_BAD_ARG;
    static const u8 ndescs[GARBAGE_MAX + 1] = {0, 3, 2, 3, 6, 0, 1, 0, 2, 2, 1, 2, 1, 3};
    unsigned n = ndescs[kind];
    u16 ids[8];
    int head = -1;
    struct req_ctx *x = 0;
    if (n) {
        head = vq_reserve(q, n);
        if (head < 0)
            return R_NOT_READY;
        ids[0] = (u16)head;
        for (unsigned i = 1; i < n; i++)
            ids[i] = q->next[ids[i - 1]];
        x = vq_ctx(q, (u16)head);
        memset(x, 0, 64);
        x->status = 0xFF;
        x->in_use = 1;
        x->ndesc = (u16)n;
    }
    struct vring_desc *D = q->desc;
    u16 W = VRING_DESC_F_WRITE, N = VRING_DESC_F_NEXT, I = VRING_DESC_F_INDIRECT;
    u64 hdr = x ? (u64)x->hdr : 0, status = x ? (u64)&x->status : 0;
    switch (kind) {
    case GARBAGE_ADDR_BEYOND_RAM:
        set_desc(&D[ids[0]], hdr, 16, N, ids[1]);
        set_desc(&D[ids[1]], c->buffer ? c->buffer : 1ull << 40, 4096, W | N, ids[2]);
        set_desc(&D[ids[2]], status, 1, W, 0);
        break;
    case GARBAGE_LOOP:
        set_desc(&D[ids[0]], hdr, 16, N, ids[1]);
        set_desc(&D[ids[1]], (u64)x->extra, 16, N, ids[0]);   /* all readable: only the loop is wrong */
        break;
    case GARBAGE_ADDR_WRAP:
        set_desc(&D[ids[0]], hdr, 16, N, ids[1]);
        set_desc(&D[ids[1]], 0xFFFFFFFFFFFFF000ull, 0x2000, W | N, ids[2]);
        set_desc(&D[ids[2]], status, 1, W, 0);
        break;
    case GARBAGE_HUGE_LEN:
        set_desc(&D[ids[0]], hdr, 16, N, ids[1]);
        for (int i = 1; i <= 4; i++)
            set_desc(&D[ids[i]], good, 0xFFFFF000u, W | N, ids[i + 1]);
        set_desc(&D[ids[5]], status, 1, W, 0);
        break;
    case GARBAGE_NEXT_RANGE:
        set_desc(&D[ids[0]], hdr, 16, N, (u16)(q->size + 7));
        break;
    case GARBAGE_SHORT_HDR:
        ((u32 *)x->hdr)[0] = VIRTIO_BLK_T_FLUSH;
        set_desc(&D[ids[0]], hdr, 8, N, ids[1]);
        set_desc(&D[ids[1]], status, 1, W, 0);
        break;
    case GARBAGE_NO_STATUS:
        ((u32 *)x->hdr)[0] = VIRTIO_BLK_T_OUT;
        set_desc(&D[ids[0]], hdr, 16, N, ids[1]);
        set_desc(&D[ids[1]], good, 512, 0, 0);
        break;
    case GARBAGE_NESTED_INDIRECT:
        set_desc(&scratch[0], hdr, 16, N, 1);
        set_desc(&scratch[1], (u64)scratch, 3 * 16, I | N, 2);
        set_desc(&scratch[2], status, 1, W, 0);
        set_desc(&D[ids[0]], (u64)scratch, 3 * 16, I, 0);
        break;
    case GARBAGE_INDIRECT_NEXT:
        ((u32 *)x->hdr)[0] = VIRTIO_BLK_T_FLUSH;
        set_desc(&scratch[0], hdr, 16, N, 1);
        set_desc(&scratch[1], status, 1, W, 0);
        set_desc(&D[ids[0]], (u64)scratch, 2 * 16, I | N, ids[1]);
        set_desc(&D[ids[1]], status, 1, W, 0);
        break;
    case GARBAGE_INDIRECT_LEN:
        ((u32 *)x->hdr)[0] = VIRTIO_BLK_T_FLUSH;
        set_desc(&scratch[0], hdr, 16, N, 1);
        set_desc(&scratch[1], status, 1, W, 0);
        set_desc(&D[ids[0]], (u64)scratch, 17, I, 0);
        break;
    case GARBAGE_READ_AFTER_WRITE:
        ((u32 *)x->hdr)[0] = VIRTIO_BLK_T_OUT;
        set_desc(&D[ids[0]], hdr, 16, N, ids[1]);
        set_desc(&D[ids[1]], status, 1, W | N, ids[2]);
        set_desc(&D[ids[2]], good, 512, 0, 0);
        break;
    }
    if (kind == GARBAGE_AVAIL_IDX) {
        q->avail_idx += q->size + 1;
        vq_kick(q, true);
    } else {
        vq_add_avail(q, kind == GARBAGE_HEAD_RANGE ? (u16)(q->size + 7) : (u16)head);
        vq_kick(q, true);
    }

    u64 out = 0, start = rdtsc(), last_check = 0;
    bool ours = false;
    for (;;) {
        u32 id, len;
        int p = vq_poll(q, &id, &len);
        if (p > 0) {
            u8 st = x ? READ_ONCE(x->status) : 0xFF;
            out |= GOUT_USED | (u64)st << 8 | (u64)len << 32;
            if (head >= 0 && id == (u32)head) {
                ours = true;
                x->in_use = 0;
                vq_release(q, (u16)head, n);
                q->inflight--;
            } else {
                out |= GOUT_OTHER_ID;
            }
            break;
        }
        u64 now = rdtsc();
        if (p < 0 || now - last_check > ms_to_tsc(5)) {
            last_check = now;
            if (virtio_get_status(d) & VS_NEEDS_RESET) {
                out |= GOUT_NEEDS_RESET;
                break;
            }
        }
        if (now - start > wait)
            break;
        cpu_relax();
    }
    u8 st = virtio_get_status(d);
    if (st & VS_NEEDS_RESET)
        out |= GOUT_NEEDS_RESET;
    out |= (u64)st << 16;
    c->value = out;
    c->aux = st;
    /* the queue goes on only if the device answered this very request and stays well */
    if (!ours || (st & (VS_NEEDS_RESET | VS_FAILED)) || kind == GARBAGE_AVAIL_IDX || kind == GARBAGE_HEAD_RANGE)
        d->ready = false;
    info("blk%u: garbage %u: %s%s%s status byte %u len %u, device status %x\n", c->dev, kind,
         out & GOUT_USED ? "used " : "", out & GOUT_NEEDS_RESET ? "needs-reset " : "",
         out & (GOUT_USED | GOUT_NEEDS_RESET) ? "" : "nothing ", (unsigned)(out >> 8) & 0xFF,
         (unsigned)(out >> 32), st);
    return R_OK;
}

/* ---- reset, status, config ------------------------------------------------------------ */

static int found_dev(struct cmd *c, struct vdev **dp)
{
    struct vdev *d = &blk[c->dev];
    if (!d->found) {
        int r = virtio_probe(d, VIRTIO_ID_BLOCK, c->dev);
        if (r)
            return r;
    }
    *dp = d;
    return R_OK;
}

int blk_op(struct cmd *c, u32 flags, unsigned index)
{
    if (c->dev >= MAX_DEVS) {
        printf("blk%u: at most %u devices\n", c->dev, MAX_DEVS);
        return R_BAD_ARG;
    }
    struct vdev *d;
    int r;
    switch (c->op) {
    case OP_BLK_INIT:
        return op_init(c, flags);
    case OP_BLK_READ:
    case OP_BLK_WRITE:
    case OP_BLK_FLUSH:
    case OP_BLK_DISCARD:
    case OP_BLK_WRITE_ZEROES:
    case OP_BLK_GET_ID:
        return op_xfer(c, flags);
    case OP_BLK_BENCH:
        return op_bench(c, flags, index);
    case OP_BLK_GARBAGE:
        return op_garbage(c, flags);
    case OP_BLK_RESET:
        if ((r = found_dev(c, &d)))
            return r;
        r = virtio_reset(d);
        c->aux = virtio_get_status(d);
        return r;
    case OP_BLK_STATUS:
        if ((r = found_dev(c, &d)))
            return r;
        c->value = virtio_get_status(d);
        c->aux = d->isr ? rd8(d->isr) : 0;
        c->sector = virtio_cfg_generation(d);
        return R_OK;
    case OP_BLK_CONFIG:
        if ((r = found_dev(c, &d)))
            return r;
        if (c->buffer)
            virtio_cfg_dump(d, c->buffer);
        c->value = virtio_cfg_read64(d, BLKCFG_CAPACITY);
        c->aux = virtio_cfg_generation(d);
        return R_OK;
    }
    return R_BAD_OP;
}
