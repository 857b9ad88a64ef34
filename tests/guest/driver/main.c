/* The driver guest: runs the job the host left at JOB_ADDR, then powers off.
   See job.h for the protocol and tests/support/driver.py for the host side. */
#include "blk.h"
#include "job.h"
#include "lib.h"
#include "net.h"

struct job *const job_block = (struct job *)JOB_ADDR;

static const char *op_name(u32 op)
{
    switch (op) {
    case OP_NOP: return "nop";
    case OP_REPORT: return "report";
    case OP_POWEROFF: return "poweroff";
    case OP_DELAY: return "delay";
    case OP_READ_IRR: return "read-irr";
    case OP_BLK_INIT: return "blk-init";
    case OP_BLK_READ: return "blk-read";
    case OP_BLK_WRITE: return "blk-write";
    case OP_BLK_FLUSH: return "blk-flush";
    case OP_BLK_DISCARD: return "blk-discard";
    case OP_BLK_WRITE_ZEROES: return "blk-write-zeroes";
    case OP_BLK_GET_ID: return "blk-get-id";
    case OP_BLK_BENCH: return "blk-bench";
    case OP_BLK_GARBAGE: return "blk-garbage";
    case OP_BLK_RESET: return "blk-reset";
    case OP_BLK_STATUS: return "blk-status";
    case OP_BLK_CONFIG: return "blk-config";
    case OP_NET_INIT: return "net-init";
    case OP_NET_TX: return "net-tx";
    case OP_NET_RX: return "net-rx";
    case OP_NET_STOP_RX: return "net-stop-rx";
    case OP_NET_BENCH: return "net-bench";
    case OP_NET_CONFIG: return "net-config";
    case OP_NET_CTRL: return "net-ctrl";
    case OP_NET_RESET: return "net-reset";
    case OP_NET_STATUS: return "net-status";
    }
    return "?";
}

static const char *result_name(u32 r)
{
    if (r >= R_VIRTIO_STATUS && r < R_VIRTIO_STATUS + 0x100) {
        switch (r - R_VIRTIO_STATUS) {
        case 1: return "virtio IOERR";
        case 2: return "virtio UNSUPP";
        case 0xFF: return "status byte not written";
        }
        return "virtio status";
    }
    switch (r) {
    case R_OK: return "ok";
    case R_NO_DEVICE: return "no such device";
    case R_TIMEOUT: return "timeout";
    case R_FEATURES: return "feature negotiation refused";
    case R_BAD_ARG: return "bad argument";
    case R_NOT_READY: return "device not ready";
    case R_NO_MEM: return "out of memory";
    case R_BAD_OP: return "unknown op";
    case R_BAD_CAPS: return "bad virtio capabilities";
    case R_MSIX: return "MSI-X setup failed";
    case R_QUEUE: return "queue unavailable";
    case R_DEVICE: return "device error";
    case R_RESET: return "reset failed";
    }
    return "error";
}

#define LAPIC_IRR 0xFEE00200ull

static int run_cmd(struct cmd *c, u32 flags, unsigned index)
{
    switch (c->op) {
    case OP_NOP:
        return R_OK;
    case OP_REPORT:
        outl(REPORT_PORT, (u32)c->value);
        return R_OK;
    case OP_DELAY:
        udelay(c->value);
        return R_OK;
    case OP_READ_IRR: {
        u32 irr[8];
        for (int i = 0; i < 8; i++)
            irr[i] = rd32(LAPIC_IRR + 0x10 * i);
        c->value = irr[2] | (u64)irr[3] << 32;
        c->aux = irr[1];
        return R_OK;
    }
    }
    if (c->op >= OP_BLK_INIT && c->op <= OP_BLK_CONFIG)
        return blk_op(c, flags, index);
    if (c->op >= OP_NET_INIT && c->op <= OP_NET_STATUS)
        return net_op(c, flags, index);
    return R_BAD_OP;
}

__attribute__((noreturn)) void main(u64 cpu, u64 ncpus)
{
    struct job *j = job_block;
    (void)cpu;
    if (j->magic != JOB_MAGIC || j->version != JOB_VERSION || j->ncmds > JOB_MAX_CMDS) {
        printf("driver: bad job block (magic %x version %u, %u commands)\n", j->magic, j->version, j->ncmds);
        j->status = R_BAD_JOB;
        poweroff();
    }
    quiet = j->flags & JOB_F_QUIET;
    if (j->tsc_khz)
        tsc_khz = j->tsc_khz;
    timeout_tsc = ms_to_tsc(j->timeout_ms ? j->timeout_ms : 10000);
    info("driver: %u commands, %lu vCPUs, TSC %lu kHz\n", j->ncmds, ncpus, tsc_khz);
    u32 status = R_OK;
    for (u32 i = 0; i < j->ncmds; i++) {
        struct cmd *c = &j->cmds[i];
        u32 flags = c->aux;
        if (c->op == OP_POWEROFF) {
            c->result = R_OK;
            barrier();
            j->cmds_done = i + 1;
            j->status = status;
            info("driver: power off\n");
            poweroff();
        }
        int r = run_cmd(c, flags, i);
        c->result = r;
        if (r)
            printf("cmd %u %s dev %u: %s (%x)\n", i, op_name(c->op), c->dev, result_name(r), r);
        else
            info("cmd %u %s: ok value %lx aux %x\n", i, op_name(c->op), c->value, c->aux);
        barrier();
        j->cmds_done = i + 1;
        if (r && status == R_OK)
            status = r;
        if (r && !(flags & F_CONTINUE))
            break;
    }
    j->status = status;
    info("driver: done, status %x\n", status);
    poweroff();
}
