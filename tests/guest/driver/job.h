/* The job protocol between the host (tests/support/driver.py) and the driver guest.
 *
 * The host writes a job block at JOB_ADDR before the vCPU starts; the guest runs the commands
 * in order, writes each command's outputs back into its struct cmd, and powers off.
 * Everything is little-endian and packed exactly as below (checked by static asserts here and
 * by tests/unit/test_driver_protocol.py against the Python encoder).
 *
 * Guest physical memory used by the guest:
 *   0x0000000 - 0x03fffff  pyvmm's page tables and GDT, the vCPU stacks (64 KiB each, below 4 MiB)
 *   0x0200000 - 0x02fffff  the job block (this file)
 *   0x0400000 - ...        the program itself (text, data, bss), well below 16 MiB
 *   0x1000000 - 0x1ffffff  the guest's arena: virtqueues, request headers, status bytes
 *   buffers named by the commands (the host picks them, e.g. from 0x4000000 up)
 *   0x8000000 - ...        OP_NET_INIT's RX buffer pool unless the command names another
 */
#ifndef PYVMM_DRIVER_JOB_H
#define PYVMM_DRIVER_JOB_H

#include <stdint.h>

#define JOB_ADDR        0x200000UL
#define JOB_SIZE        0x100000UL
#define JOB_MAGIC       0x424A5650u     /* "PVJB" in memory */
#define JOB_VERSION     1u
#define JOB_HEADER_SIZE 64u
#define CMD_SIZE        64u
#define JOB_MAX_CMDS    ((JOB_SIZE - JOB_HEADER_SIZE) / CMD_SIZE)   /* 16383 */

#define ARENA_START     0x1000000UL
#define ARENA_END       0x2000000UL

/* job.flags (host -> guest) */
#define JOB_F_QUIET     0x1u    /* print only errors on the console */

/* Ports */
#define COM1_PORT       0x3F8
#define REPORT_PORT     0x500   /* OP_REPORT: 32-bit out of cmd.value */
#define SLEEP_CONTROL_PORT 0x600
#define S5_SLP_EN       0x34    /* SLP_TYP 5 | SLP_EN */

/* Operations (cmd.op) */
#define OP_NOP              0x00
#define OP_REPORT           0x01    /* out value (32 bits) to REPORT_PORT */
#define OP_POWEROFF         0x02    /* power off now (after writing status and cmds_done) */
#define OP_DELAY            0x03    /* spin value microseconds */
#define OP_READ_IRR         0x04    /* value = LAPIC IRR for vectors 0x40-0x7f, aux = 0x20-0x3f */
#define OP_BLK_INIT         0x10
#define OP_BLK_READ         0x11
#define OP_BLK_WRITE        0x12
#define OP_BLK_FLUSH        0x13
#define OP_BLK_DISCARD      0x14
#define OP_BLK_WRITE_ZEROES 0x15
#define OP_BLK_GET_ID       0x16
#define OP_BLK_BENCH        0x17
#define OP_BLK_GARBAGE      0x18
#define OP_BLK_RESET        0x19
#define OP_BLK_STATUS       0x1A
#define OP_BLK_CONFIG       0x1B
#define OP_NET_INIT         0x20    /* negotiate, set up queue pairs, post RX buffers (net.c) */
#define OP_NET_TX           0x21    /* send count frames */
#define OP_NET_RX           0x22    /* receive frames into net records (optionally echo them) */
#define OP_NET_STOP_RX      0x23    /* stop re-posting RX buffers (aux F_NET_RESUME: resume) */
#define OP_NET_BENCH        0x24    /* TX (or RX with F_NET_BENCH_RX) throughput, TSC cycles */
#define OP_NET_CONFIG       0x25    /* copy the device config space to buffer */
#define OP_NET_CTRL         0x26    /* one control-queue command: class, command, data */
#define OP_NET_RESET        0x27    /* reset the device */
#define OP_NET_STATUS       0x28    /* device status, ISR, config generation, RX state */

/* cmd.aux input flags. Bit 31 applies to every op. */
#define F_CONTINUE          0x80000000u /* a failure of this command does not stop the job */
/* OP_BLK_INIT */
#define F_INIT_EVENT_IDX    0x1u        /* accept VIRTIO_F_EVENT_IDX if offered */
#define F_INIT_INDIRECT     0x2u        /* accept VIRTIO_F_INDIRECT_DESC if offered */
#define F_INIT_NO_MSIX      0x4u        /* leave MSI-X off: every vector VIRTIO_MSI_NO_VECTOR */
#define F_INIT_NO_DRIVER_OK 0x8u        /* stop before setting DRIVER_OK */
/* request ops (READ, WRITE, FLUSH, DISCARD, WRITE_ZEROES, GET_ID, BENCH) */
#define F_NO_INTERRUPT      0x1u        /* suppress used-buffer interrupts from this command on.
                                           The state is set when each request command starts and
                                           is not undone at its end (see vq_set_irq in virtio.c):
                                           without the flag, EVENT_IDX gives exactly one interrupt
                                           per command, no EVENT_IDX one per device batch. */
#define F_DIRECT            0x2u        /* no indirect descriptors even if negotiated */
#define F_WRITE             0x4u        /* BENCH: write (else read) */
#define F_RANDOM            0x8u        /* BENCH: pseudo-random sectors (else sequential) */
#define F_ALWAYS_KICK       0x10u       /* notify after every batch, ignoring suppression */
#define F_MARKS             0x20u       /* BENCH: out 0xB0000000|i at start, 0xB1000000|i at end */
#define F_UNMAP             0x40u       /* WRITE_ZEROES: set the unmap flag */
#define F_SEG_SHIFT_POS     8           /* bits 8-13: data split into 2^n-byte segments (0: one) */
#define F_SEG_SHIFT_MASK    0x3F00u

/* OP_NET_INIT (cmd.aux): bits 0-3 are the F_INIT_* flags above; the offloads, each on its
   own flag, are accepted only if offered and with what they depend on (5.1.3.1). MAC, STATUS and
   MTU are always accepted when offered. */
#define F_NET_CSUM          0x10u       /* VIRTIO_NET_F_CSUM (device computes TX checksums) */
#define F_NET_GUEST_CSUM    0x20u       /* VIRTIO_NET_F_GUEST_CSUM (partial RX checksums ok) */
#define F_NET_HOST_TSO4     0x40u       /* VIRTIO_NET_F_HOST_TSO4 (needs CSUM) */
#define F_NET_HOST_TSO6     0x80u       /* VIRTIO_NET_F_HOST_TSO6 (needs CSUM) */
#define F_NET_GUEST_TSO4    0x100u      /* VIRTIO_NET_F_GUEST_TSO4 (needs GUEST_CSUM) */
#define F_NET_GUEST_TSO6    0x200u      /* VIRTIO_NET_F_GUEST_TSO6 (needs GUEST_CSUM) */
#define F_NET_MRG_RXBUF     0x400u      /* VIRTIO_NET_F_MRG_RXBUF */
#define F_NET_CTRL_VQ       0x800u      /* VIRTIO_NET_F_CTRL_VQ: set up the control queue */
#define F_NET_MQ            0x1000u     /* VIRTIO_NET_F_MQ (needs CTRL_VQ): VQ_PAIRS_SET is sent */
#define F_NET_RX_SEG_SHIFT_POS  16      /* bits 16-21: each RX buffer a chain of 2^n-byte
                                           descriptors (0: one descriptor) */
#define F_NET_RX_SEG_SHIFT_MASK 0x3F0000u
/* OP_NET_TX / OP_NET_BENCH (cmd.aux): F_NO_INTERRUPT, F_DIRECT, F_ALWAYS_KICK, F_MARKS and the
   F_SEG_SHIFT_* bits (frame data in 2^n-byte descriptors) as for the blk request ops */
#define F_NET_TX_CSUM       0x4u        /* hdr.flags = NEEDS_CSUM, csum_start/offset from cmd.sector */
#define F_NET_TX_SEQ        0x8u        /* frame i = a copy of the template with a sequence number */
#define F_NET_TX_LIST       0x40u       /* buffer holds net records, each sent with its own header */
#define F_NET_SPLIT_HDR     0x80u       /* the header in two descriptors (5 + 7 bytes) */
#define F_NET_BENCH_RX      0x4000u     /* OP_NET_BENCH: receive (else transmit) */
#define F_NET_GSO_POS       16          /* bits 16-23: hdr.gso_type (VIRTIO_NET_HDR_GSO_*) */
#define F_NET_GSO_MASK      0xFF0000u
/* OP_NET_RX (cmd.aux); F_NO_INTERRUPT as above */
#define F_NET_ECHO          0x4u        /* send every frame back out on the pair's TX queue */
#define F_NET_TIMEOUT_OK    0x8u        /* a quiet spell ends the command with R_OK, not R_TIMEOUT */
#define F_NET_ANY_QUEUE     0x40u       /* poll every RX queue (else cmd.queue's) */
/* OP_NET_STOP_RX (cmd.aux) */
#define F_NET_RESUME        0x1u        /* post the held buffers again and resume re-posting */

/* virtio_net_hdr (virtio 1.2, 5.1.6), 12 bytes with VERSION_1 */
#define NET_HDR_SIZE                12
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_F_DATA_VALID 2
#define VIRTIO_NET_HDR_F_RSC_INFO   4
#define VIRTIO_NET_HDR_GSO_NONE     0
#define VIRTIO_NET_HDR_GSO_TCPV4    1
#define VIRTIO_NET_HDR_GSO_UDP      3
#define VIRTIO_NET_HDR_GSO_TCPV6    4
#define VIRTIO_NET_HDR_GSO_UDP_L4   5
#define VIRTIO_NET_HDR_GSO_ECN      0x80
/* control queue (5.1.6.5) */
#define VIRTIO_NET_OK               0
#define VIRTIO_NET_ERR              1
#define VIRTIO_NET_CTRL_RX          0
#define VIRTIO_NET_CTRL_MAC         1
#define VIRTIO_NET_CTRL_MQ          4
#define VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 0
#define NET_CTRL_MAX_DATA           4096    /* OP_NET_CTRL: data bytes at most */

/* Net records: what OP_NET_RX appends to its buffer and what OP_NET_TX with F_NET_TX_LIST
   sends. Each is a 24-byte head (struct net_rec), `len` frame bytes, then zeros up to the
   next multiple of 8 (NET_REC_ALIGN). */
#define NET_REC_SIZE        24
#define NET_REC_ALIGN       8
#define NET_RX_POOL         0x8000000UL /* OP_NET_INIT: default RX buffer pool (128 MiB) */
#define NET_MAX_PAIRS       8
#define NET_MAX_DEVS        4
#define NET_MAX_RX_BUFS     1024        /* RX buffers posted per queue at most */

/* OP_BLK_GARBAGE kinds (cmd.aux bits 0-7) */
#define GARBAGE_ADDR_BEYOND_RAM 1   /* data descriptor at cmd.buffer (default 1 TiB) */
#define GARBAGE_LOOP            2   /* header -> data -> header ... */
#define GARBAGE_ADDR_WRAP       3   /* data at 0xfffffffffffff000, 0x2000 bytes: wraps 2^64 */
#define GARBAGE_HUGE_LEN        4   /* four 0xfffff000-byte data descriptors: > 4 GiB in all */
#define GARBAGE_HEAD_RANGE      5   /* avail ring entry >= queue size */
#define GARBAGE_NEXT_RANGE      6   /* header's next >= queue size */
#define GARBAGE_AVAIL_IDX       7   /* avail idx moved by queue size + 1 */
#define GARBAGE_SHORT_HDR       8   /* 8-byte request header */
#define GARBAGE_NO_STATUS       9   /* no device-writable descriptor at all */
#define GARBAGE_NESTED_INDIRECT 10  /* an indirect table holding an indirect descriptor */
#define GARBAGE_INDIRECT_NEXT   11  /* a descriptor with both INDIRECT and NEXT */
#define GARBAGE_INDIRECT_LEN    12  /* an indirect table of 17 bytes */
#define GARBAGE_READ_AFTER_WRITE 13 /* header (R), status (W), then data (R) */
#define GARBAGE_MAX             13
/* OP_BLK_GARBAGE outcome (cmd.value) */
#define GOUT_USED           0x1ull      /* a used entry came back; status byte in bits 8-15,
                                           used len in bits 32-63 */
#define GOUT_NEEDS_RESET    0x2ull      /* the device set DEVICE_NEEDS_RESET */
#define GOUT_OTHER_ID       0x4ull      /* a used entry for an id we did not submit */
/* bits 16-23: device status read at the end */

/* cmd.result */
#define R_OK                0x000
#define R_VIRTIO_STATUS     0x100       /* + the request's virtio status byte (1 IOERR, 2 UNSUPP,
                                           0xff: the device did not write it) */
#define R_NO_DEVICE         0x200       /* no virtio device of that type and index */
#define R_TIMEOUT           0x201       /* no progress within job.timeout_ms */
#define R_FEATURES          0x202       /* VERSION_1 not offered, or FEATURES_OK not kept */
#define R_BAD_ARG           0x203       /* the command's fields make no sense */
#define R_NOT_READY         0x204       /* device not initialised (or broken by an earlier op) */
#define R_NO_MEM            0x205       /* the arena is exhausted */
#define R_BAD_OP            0x206       /* unknown op */
#define R_BAD_CAPS          0x207       /* virtio capabilities missing or unusable */
#define R_MSIX              0x208       /* no MSI-X, table too small, or a vector refused */
#define R_QUEUE             0x209       /* queue not available (size 0) or too large */
#define R_DEVICE            0x20A       /* device misbehaved: NEEDS_RESET/FAILED, bad used id */
#define R_BAD_JOB           0x20B       /* job.magic/version/ncmds wrong (job.status only) */
#define R_RESET             0x20C       /* device status did not read 0 after reset */
#define R_NOT_RUN           0xFFFFFFFFu /* written by the host; the guest never got there */

#ifndef __ASSEMBLER__
struct job {
    uint32_t magic;         /* 0  host */
    uint32_t version;       /* 4  host */
    uint32_t ncmds;         /* 8  host */
    uint32_t status;        /* 12 guest: 0 or the first error (host writes R_NOT_RUN) */
    uint32_t cmds_done;     /* 16 guest: commands finished so far */
    uint32_t progress;      /* 20 guest: requests completed in the current command (live) */
    uint32_t tsc_khz;       /* 24 host: guest TSC frequency (0: assume 2 GHz) */
    uint32_t timeout_ms;    /* 28 host: no-progress timeout (0: 10000 ms) */
    uint32_t flags;         /* 32 host: JOB_F_* */
    uint32_t reserved[7];   /* 36 */
    struct cmd {
        uint32_t op;        /* 0 */
        uint32_t dev;       /* 4  index among the devices of the op's type, PCI order */
        uint64_t sector;    /* 8 */
        uint64_t length;    /* 16 */
        uint64_t buffer;    /* 24 guest physical address */
        uint32_t queue;     /* 32 */
        uint32_t depth;     /* 36 */
        uint64_t count;     /* 40 */
        uint32_t result;    /* 48 guest: R_* */
        uint32_t aux;       /* 52 in: flags; out: op-specific */
        uint64_t value;     /* 56 in/out: op-specific */
    } cmds[];
};

struct net_rec {
    uint32_t len;           /* 0  frame bytes after the head (the virtio header not counted) */
    uint16_t queue;         /* 4  RX: the queue pair it came in on; TX: ignored */
    uint16_t nbufs;         /* 6  RX: used entries (buffers) it took; TX: ignored */
    uint32_t used_len;      /* 8  RX: sum of the used lengths (header included); TX: ignored */
    uint8_t hdr[NET_HDR_SIZE]; /* 12 the virtio_net_hdr: as the device wrote it (RX), as it
                                      is sent (TX): flags, gso_type, hdr_len, gso_size,
                                      csum_start, csum_offset, num_buffers */
};

_Static_assert(sizeof(struct net_rec) == NET_REC_SIZE, "struct net_rec is 24 bytes");
_Static_assert(sizeof(struct cmd) == CMD_SIZE, "struct cmd is 64 bytes");
_Static_assert(sizeof(struct job) == JOB_HEADER_SIZE, "job header is 64 bytes");
_Static_assert(__builtin_offsetof(struct cmd, result) == 48, "cmd.result at 48");
_Static_assert(__builtin_offsetof(struct cmd, value) == 56, "cmd.value at 56");
#endif

#endif
