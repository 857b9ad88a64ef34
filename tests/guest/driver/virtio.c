#include "virtio.h"
#include "job.h"

u64 timeout_tsc;
static u64 arena_next = ARENA_START;

/* ---- transport ------------------------------------------------------------------------ */

int virtio_probe(struct vdev *d, unsigned type, unsigned index)
{
    memset(d, 0, offsetof(struct vdev, arena));    /* the arena stays the device's */
    d->type = type;
    d->index = index;
    if (!pci_find(PCI_VENDOR_VIRTIO, PCI_DEVICE_VIRTIO(type), index, &d->pci))
        return R_NO_DEVICE;
    u8 slot = d->pci.slot;
    unsigned guard = 0;
    for (u8 pos = pci_next_cap(slot, 0, &guard); pos; pos = pci_next_cap(slot, pos, &guard)) {
        u8 id = pci_read8(slot, pos);
        if (id == PCI_CAP_ID_MSIX && !d->msix_cap) {
            u16 ctrl = pci_read16(slot, pos + 2);
            u32 table = pci_read32(slot, pos + 4);
            u8 bir = table & 7;
            if (bir < 6 && d->pci.bar[bir]) {
                d->msix_cap = pos;
                d->msix_size = (ctrl & 0x7FF) + 1;
                d->msix_table = d->pci.bar[bir] + (table & ~7u);
            }
        } else if (id == PCI_CAP_ID_VNDR) {
            u8 cfg_type = pci_read8(slot, pos + 3);
            u8 bar = pci_read8(slot, pos + 4);
            u32 off = pci_read32(slot, pos + 8);
            u32 len = pci_read32(slot, pos + 12);
            if (bar > 5 || !d->pci.bar[bar])
                continue;
            u64 addr = d->pci.bar[bar] + off;
            switch (cfg_type) {   /* the first of each type is the one to use (4.1.4.1) */
            case VIRTIO_PCI_CAP_COMMON_CFG:
                if (!d->common && len >= 56)
                    d->common = addr;
                break;
            case VIRTIO_PCI_CAP_NOTIFY_CFG:
                if (!d->notify) {
                    d->notify = addr;
                    d->notify_len = len;
                    d->notify_mult = pci_read32(slot, pos + 16);
                }
                break;
            case VIRTIO_PCI_CAP_ISR_CFG:
                if (!d->isr)
                    d->isr = addr;
                break;
            case VIRTIO_PCI_CAP_DEVICE_CFG:
                if (!d->devcfg) {
                    d->devcfg = addr;
                    d->devcfg_len = len;
                }
                break;
            }
        }
    }
    if (!d->common || !d->notify || !d->devcfg) {
        printf("virtio: slot %u: missing capabilities (common %lx notify %lx device %lx)\n",
               slot, d->common, d->notify, d->devcfg);
        return R_BAD_CAPS;
    }
    /* memory decode (pyvmm enables it already) and bus mastering: the device may DMA now.
       The high half (status) is RW1C: writing 0 there changes nothing. */
    u16 cmd = pci_read16(slot, PCI_COMMAND);
    pci_write32(slot, PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    d->found = true;
    return R_OK;
}

u8 virtio_get_status(struct vdev *d) { return rd8(d->common + CC_DEVICE_STATUS); }
void virtio_set_status(struct vdev *d, u8 s) { wr8(d->common + CC_DEVICE_STATUS, s); }

bool virtio_broken(struct vdev *d)
{
    return virtio_get_status(d) & (VS_NEEDS_RESET | VS_FAILED);
}

int virtio_reset(struct vdev *d)
{
    d->ready = false;
    virtio_set_status(d, 0);
    u64 start = rdtsc();
    while (virtio_get_status(d) != 0) {    /* 4.1.4.3.2: wait until it reads back 0 */
        if (rdtsc() - start > timeout_tsc)
            return R_RESET;
        udelay(10);
    }
    return R_OK;
}

u64 virtio_device_features(struct vdev *d)
{
    wr32(d->common + CC_DEVICE_FEATURE_SELECT, 0);
    u64 lo = rd32(d->common + CC_DEVICE_FEATURE);
    wr32(d->common + CC_DEVICE_FEATURE_SELECT, 1);
    u64 hi = rd32(d->common + CC_DEVICE_FEATURE);
    return lo | hi << 32;
}

void virtio_write_features(struct vdev *d, u64 f)
{
    wr32(d->common + CC_DRIVER_FEATURE_SELECT, 0);
    wr32(d->common + CC_DRIVER_FEATURE, (u32)f);
    wr32(d->common + CC_DRIVER_FEATURE_SELECT, 1);
    wr32(d->common + CC_DRIVER_FEATURE, (u32)(f >> 32));
    d->drv_features = f;
}

u8 virtio_cfg_generation(struct vdev *d) { return rd8(d->common + CC_CONFIG_GENERATION); }

u32 virtio_cfg_read32(struct vdev *d, u32 off)
{
    u8 gen;
    u32 v;
    do {
        gen = virtio_cfg_generation(d);
        v = rd32(d->devcfg + off);
    } while (gen != virtio_cfg_generation(d));
    return v;
}

u16 virtio_cfg_read16(struct vdev *d, u32 off)
{
    u8 gen;
    u16 v;
    do {
        gen = virtio_cfg_generation(d);
        v = rd16(d->devcfg + off);
    } while (gen != virtio_cfg_generation(d));
    return v;
}

u64 virtio_cfg_read64(struct vdev *d, u32 off)
{
    u8 gen;
    u64 v;
    do {   /* 64-bit fields are read as two 32-bit halves (4.1.3.1) */
        gen = virtio_cfg_generation(d);
        v = rd32(d->devcfg + off) | (u64)rd32(d->devcfg + off + 4) << 32;
    } while (gen != virtio_cfg_generation(d));
    return v;
}

void virtio_cfg_dump(struct vdev *d, u64 dest)
{
    u32 len = d->devcfg_len < 256 ? d->devcfg_len : 256;
    u8 gen;
    do {
        gen = virtio_cfg_generation(d);
        for (u32 off = 0; off + 4 <= ALIGN_UP(len, 4); off += 4)
            *(volatile u32 *)(dest + off) = rd32(d->devcfg + off);
    } while (gen != virtio_cfg_generation(d));
}

static u64 arena_alloc(u64 size)
{
    u64 base = ALIGN_UP(arena_next, 4096);
    if (base + size > ARENA_END || base + size < base)
        return 0;
    arena_next = base + size;
    return base;
}

static int setup_msix(struct vdev *d, unsigned nq)
{
    u8 slot = d->pci.slot, cap = d->msix_cap;
    if (!cap || d->msix_size < nq + 1) {
        printf("virtio: MSI-X %s (%u entries, %u needed)\n", cap ? "table too small" : "capability missing",
               d->msix_size, nq + 1);
        return R_MSIX;
    }
    u32 head = pci_read32(slot, cap) & 0xFFFF;      /* cap id, next: read-only */
    u32 enable = 1u << 31, fmask = 1u << 30;       /* message control bits 15, 14 */
    pci_write32(slot, cap, head | enable | fmask);
    for (unsigned e = 0; e <= nq; e++) {
        u64 ent = d->msix_table + 16 * e;
        wr32(ent + 0, MSI_ADDRESS);                /* destination APIC 0, physical */
        wr32(ent + 4, 0);
        wr32(ent + 8, e < nq ? MSI_VECTOR_QUEUE0 + e : MSI_VECTOR_CONFIG);  /* fixed, edge */
        wr32(ent + 12, 0);                         /* unmasked */
    }
    pci_write32(slot, cap, head | enable);
    wr16(d->common + CC_CONFIG_MSIX_VECTOR, nq);
    u16 back = rd16(d->common + CC_CONFIG_MSIX_VECTOR);
    if (back != nq) {
        printf("virtio: config vector %u refused (reads %u)\n", nq, back);
        return R_MSIX;
    }
    return R_OK;
}

static u64 queue_bytes(unsigned size, u32 stride, u64 *desc_off, u64 *avail_off, u64 *used_off,
                       u64 *next_off, u64 *ctx_off)
{
    u64 o = 0;
    *desc_off = o;
    o = ALIGN_UP(o + 16ull * size, 4096);
    *avail_off = o;
    o = ALIGN_UP(o + 6 + 2ull * size, 4096);
    *used_off = o;
    o = ALIGN_UP(o + 6 + 8ull * size, 4096);
    *next_off = o;
    o = ALIGN_UP(o + 2ull * size, 4096);
    *ctx_off = o;
    return ALIGN_UP(o + (u64)stride * size, 4096);
}

int virtio_setup_queues(struct vdev *d, unsigned nq, unsigned size, u32 flags)
{
    bool indirect = d->drv_features & BIT(VIRTIO_F_INDIRECT_DESC);
    bool event_idx = d->drv_features & BIT(VIRTIO_F_EVENT_IDX);
    u32 stride = indirect ? CTX_INDIRECT_STRIDE : CTX_DIRECT_STRIDE;
    u64 o_desc, o_avail, o_used, o_next, o_ctx;
    u64 per_queue = queue_bytes(size, stride, &o_desc, &o_avail, &o_used, &o_next, &o_ctx);
    u64 need = per_queue * nq;
    if (need > d->arena_size) {
        u64 base = arena_alloc(need);
        if (!base) {
            printf("virtio: arena exhausted (%lu bytes for %u queues of %u)\n", need, nq, size);
            return R_NO_MEM;
        }
        d->arena = base;
        d->arena_size = need;
    }
    memset((void *)d->arena, 0, need);

    if (!(flags & F_INIT_NO_MSIX)) {
        int r = setup_msix(d, nq);
        if (r)
            return r;
    } else {
        wr16(d->common + CC_CONFIG_MSIX_VECTOR, VIRTIO_MSI_NO_VECTOR);
    }

    for (unsigned i = 0; i < nq; i++) {
        struct vq *q = &d->vqs[i];
        u64 base = d->arena + per_queue * i;
        memset(q, 0, sizeof(*q));
        q->index = i;
        q->size = size;
        q->event_idx = event_idx;
        q->indirect = indirect;
        q->desc = (struct vring_desc *)(base + o_desc);
        q->avail = base + o_avail;
        q->used = base + o_used;
        q->next = (u16 *)(base + o_next);
        q->ctx = base + o_ctx;
        q->ctx_stride = stride;
        for (unsigned j = 0; j < size; j++)
            q->next[j] = (u16)(j + 1);
        q->free_head = 0;
        q->num_free = size;

        wr16(d->common + CC_QUEUE_SELECT, i);
        u16 max = rd16(d->common + CC_QUEUE_SIZE);
        if (max == 0 || size > max) {
            printf("virtio: queue %u: size %u not available (max %u)\n", i, size, max);
            return max == 0 ? R_QUEUE : R_BAD_ARG;
        }
        if (rd16(d->common + CC_QUEUE_ENABLE)) {
            printf("virtio: queue %u enabled after reset\n", i);
            return R_DEVICE;
        }
        wr16(d->common + CC_QUEUE_SIZE, size);
        wr32(d->common + CC_QUEUE_DESC, (u32)(base + o_desc));
        wr32(d->common + CC_QUEUE_DESC + 4, (u32)((base + o_desc) >> 32));
        wr32(d->common + CC_QUEUE_DRIVER, (u32)q->avail);
        wr32(d->common + CC_QUEUE_DRIVER + 4, (u32)(q->avail >> 32));
        wr32(d->common + CC_QUEUE_DEVICE, (u32)q->used);
        wr32(d->common + CC_QUEUE_DEVICE + 4, (u32)(q->used >> 32));
        u16 vector = (flags & F_INIT_NO_MSIX) ? VIRTIO_MSI_NO_VECTOR : i;
        wr16(d->common + CC_QUEUE_MSIX_VECTOR, vector);
        u16 back = rd16(d->common + CC_QUEUE_MSIX_VECTOR);
        if (back != vector) {
            printf("virtio: queue %u: vector %u refused (reads %u)\n", i, vector, back);
            return R_MSIX;
        }
        u64 noff = (u64)rd16(d->common + CC_QUEUE_NOTIFY_OFF) * d->notify_mult;
        if (noff + 2 > d->notify_len) {
            printf("virtio: queue %u: notify offset %lx outside the capability (%u bytes)\n", i, noff,
                   d->notify_len);
            return R_BAD_CAPS;
        }
        q->notify_addr = d->notify + noff;
        wr16(d->common + CC_QUEUE_ENABLE, 1);
    }
    d->nqueues = nq;
    return R_OK;
}

/* ---- split virtqueue (2.7) ------------------------------------------------------------- */

int vq_reserve(struct vq *q, unsigned n)
{
    if (n == 0 || q->num_free < n)
        return -1;
    u16 head = q->free_head, last = head;
    for (unsigned i = 1; i < n; i++)
        last = q->next[last];
    q->free_head = q->next[last];
    q->num_free -= n;
    return head;
}

void vq_release(struct vq *q, u16 head, unsigned n)
{
    u16 last = head;
    for (unsigned i = 1; i < n; i++)
        last = q->next[last];
    q->next[last] = q->free_head;
    q->free_head = head;
    q->num_free += n;
}

void vq_write_chain(struct vq *q, u16 head, const struct sg *sg, unsigned n, bool indirect)
{
    struct req_ctx *c = vq_ctx(q, head);
    if (indirect) {
        for (unsigned i = 0; i < n; i++) {
            c->table[i].addr = sg[i].addr;
            c->table[i].len = sg[i].len;
            c->table[i].flags = sg[i].flags | (i + 1 < n ? VRING_DESC_F_NEXT : 0);
            c->table[i].next = (u16)(i + 1 < n ? i + 1 : 0);
        }
        q->desc[head].addr = (u64)c->table;
        q->desc[head].len = n * sizeof(struct vring_desc);
        q->desc[head].flags = VRING_DESC_F_INDIRECT;
        q->desc[head].next = 0;
        c->ndesc = 1;
        return;
    }
    u16 id = head;
    for (unsigned i = 0; i < n; i++) {
        struct vring_desc *dd = &q->desc[id];
        dd->addr = sg[i].addr;
        dd->len = sg[i].len;
        dd->flags = sg[i].flags | (i + 1 < n ? VRING_DESC_F_NEXT : 0);
        dd->next = i + 1 < n ? q->next[id] : 0;
        id = q->next[id];
    }
    c->ndesc = (u16)n;
}

void vq_add_avail(struct vq *q, u16 head)
{
    vq_avail_ring(q)[q->avail_idx % q->size] = head;
    q->avail_idx++;
    q->inflight++;
}

void vq_kick(struct vq *q, bool force)
{
    u16 nw = q->avail_idx, old = q->published;
    if (nw == old && !force)
        return;
    barrier();                                   /* ring entries before the index */
    WRITE_ONCE(*(u16 *)(q->avail + 2), nw);
    q->published = nw;
    mb();                                        /* the index before reading the suppression */
    bool need;
    if (force)
        need = true;
    else if (q->event_idx)
        need = (u16)(nw - READ_ONCE(*vq_avail_event(q)) - 1) < (u16)(nw - old);
    else
        need = !(READ_ONCE(*(u16 *)q->used) & VRING_USED_F_NO_NOTIFY);
    if (need) {
        wr16(q->notify_addr, q->index);
        q->kicks++;
    }
}

/* Interrupt suppression is set at the start of each request command and stays until the next.
 * With EVENT_IDX the device interrupts when used.idx crosses used_event (2.7.10):
 *  - on:  used_event = the used index when the command starts, written once. The device's
 *         first publication in the command crosses it: exactly one interrupt per command
 *         (rewriting it as entries are consumed would race with the device's check and hide it);
 *  - off: used_event stays 0x8000 ahead of what the driver has seen, which the device cannot
 *         reach while at most 32768 buffers are outstanding; refreshed as entries are consumed.
 * Without EVENT_IDX: avail.flags = VRING_AVAIL_F_NO_INTERRUPT (off) or 0 (on). Nothing is
 * restored at the end of a command: a device checking the flags just after its last
 * publication must still see what this command asked for. */
#define USED_EVENT_NEVER 0x8000

void vq_set_irq(struct vq *q, bool off)
{
    q->irq_off = off;
    if (q->event_idx)
        WRITE_ONCE(*vq_used_event(q), (u16)(off ? q->last_used + USED_EVENT_NEVER : q->last_used));
    else
        WRITE_ONCE(*(u16 *)q->avail, off ? VRING_AVAIL_F_NO_INTERRUPT : 0);
    mb();
}

int vq_poll(struct vq *q, u32 *id, u32 *len)
{
    u16 uidx = vq_used_idx(q);
    if (uidx == q->last_used)
        return 0;
    if ((u16)(uidx - q->last_used) > q->size) {
        printf("virtio: queue %u: used idx %u jumped past %u\n", q->index, uidx, q->last_used);
        return -R_DEVICE;
    }
    barrier();                                   /* the index before the entry */
    u64 e = q->used + 4 + 8ull * (q->last_used % q->size);
    *id = READ_ONCE(*(u32 *)e);
    *len = READ_ONCE(*(u32 *)(e + 4));
    q->last_used++;
    if (q->event_idx && q->irq_off)
        WRITE_ONCE(*vq_used_event(q), (u16)(q->last_used + USED_EVENT_NEVER));
    return 1;
}
