"""The driver guest, host side: build it, write its job into guest memory, read the results.

The driver guest (tests/guest/driver/, freestanding C) runs in guest user mode under pyvmm and
drives virtio-pci devices the way a real driver does. The host hands it a *job*: a list of
commands at JOB_ADDR; the guest runs them in order, writes each command's outputs back, and
powers off. tests/guest/driver/job.h is the reference for the layout; this module mirrors it
(tests/unit/test_driver_protocol.py checks that both agree).

    from tests.support.driver import build_driver, run_driver, blk_init, blk_read, report
    m = Machine(VmConfig(program=str(build_driver(tmp)), console=f"file:{log}"))
    m.mem.write(0x4000000, pattern)
    run = run_driver(m, [blk_init(), blk_write(0, len(pattern), 0x4000000), report(7)])
    run.check()                          # AssertionError with the console and results otherwise
    init = run.cmds[0]; init.capacity, init.device_features ...

Output fields per op (the guest overwrites the command in place):

* BLK_INIT: value = features the device offers, count = features written (negotiated),
  sector = capacity (512-byte sectors), length = blk_size (512 without VIRTIO_BLK_F_BLK_SIZE),
  queue = queues set up, depth = queue size, aux = device status read back at the end (also on
  failure, after FAILED was set); the device config space is copied to `buffer` if nonzero.
  Inputs: queue = number of queues (0: all: num_queues if MQ, else 1, at most 16), depth =
  queue size (0: the device's maximum, at most 256), value = exact feature bits to write (0: the
  driver's usual choice of what is offered), aux = INIT_* flags.
* BLK_READ / WRITE / FLUSH / DISCARD / WRITE_ZEROES / GET_ID: value = requests completed,
  aux = the used-ring `len` of the last completion.
* BLK_BENCH: value = TSC cycles from the first submission to the last completion, aux =
  notifications written. job.progress counts completions live (a clock-free progress signal).
* BLK_GARBAGE: value = GOUT_* bits | status byte << 8 | device status << 16 | used len << 32,
  aux = device status. The result is OK whatever the device did; a queue that did not get
  its request back cleanly needs a new BLK_INIT.
* BLK_RESET: aux = device status read after the reset. BLK_STATUS: value = device status,
  aux = ISR (reading it clears it), sector = config generation. BLK_CONFIG: value = capacity,
  aux = config generation, config copied to `buffer` if nonzero.
* Interrupts: each request command (READ ... BENCH) sets the queue's suppression when it starts
  and leaves it so until the next one, so an OP_REPORT right after a command sees what that
  command asked for. no_interrupt=True: with EVENT_IDX, used_event is kept 0x8000 ahead of the
  used index (never reached); without, VRING_AVAIL_F_NO_INTERRUPT. Otherwise: with EVENT_IDX,
  used_event = the used index at the command's start (exactly one interrupt per command that
  completes anything); without, avail.flags = 0 (the device may interrupt after every batch).
  Queue i's MSI-X entry is i, vector 0x40 + i; the configuration vector is 0x3f (entry = number
  of queues). With IF=0 the vectors stay pending in the LAPIC IRR: check them at an OP_REPORT
  (KVM_GET_LAPIC on the vCPU thread) or with OP_READ_IRR.
* NET_INIT: value = features offered, count = features written, sector = MAC (bytes 0-5 in
  bits 0-47, as in memory) | config status << 48, queue = pairs set up | max_virtqueue_pairs
  << 16, depth = queue size | mtu << 16 (0 without VIRTIO_NET_F_MTU), length = RX buffer size,
  buffer = the end of the RX pool, aux = device status. Inputs: queue = pairs (0: 1), depth =
  queue size (0: the device's maximum, at most 256), value = exact features (0: the usual
  choice: VERSION_1, MAC, STATUS, MTU if offered, plus what the flags ask for), buffer = RX
  pool (0: NET_RX_POOL; at or above ARENA_END), length = RX buffer size (0: 2048 with
  MRG_RXBUF, 65562 with GUEST_TSO4/6, else 1526 or more for a larger MTU), count = RX buffers
  per queue (0: as many as the ring takes, at most NET_MAX_RX_BUFS). Pair p's buffer s is at
  pool + (p * buffers + s) * ALIGN_UP(size, 64). With MQ, VQ_PAIRS_SET(pairs) is sent.
* NET_TX: value = frames completed, count = frame bytes sent (headers not counted), sector =
  TSC cycles (first submission to last completion), aux = notifications. Frame i is `buffer`
  (length bytes) itself; with F_NET_TX_SEQ a copy at buffer + ALIGN_UP(length, 64) * (1 + slot)
  (slot < depth: the host leaves that room) with the big-endian 32-bit first_seq + i at
  seq_offset (and the 16-bit checksum at csum_fix, if nonzero, updated to match); with
  F_NET_TX_LIST the count net records at buffer, each with its own header. See net_tx().
* NET_RX: value = frames, count = frame bytes, sector = TSC cycles (first buffer to last
  frame), length = bytes of net records written at buffer, aux = buffers consumed. See
  net_rx(); the records: parse_net_records().
* NET_BENCH: value = TSC cycles, sector = frames, count = frame bytes, aux = notifications (TX)
  or buffers consumed (RX).
* NET_STOP_RX: aux = buffers held (stop) or posted again (resume). NET_CTRL: aux = the ack
  byte (VIRTIO_NET_OK/ERR, 0xff: not written; the result is OK whatever it is), value = the used
  length. NET_CONFIG: value = MAC | status << 48 (raw, whatever was negotiated), aux = config
  generation, length = config length, sector = device status; config copied to `buffer`.
  NET_STATUS: value = device status, aux = ISR, sector = config generation, count = RX buffers
  held, length = RX buffers posted. NET_RESET: aux = device status.
* READ_IRR: value = LAPIC IRR bits for vectors 0x40-0x7f (bit i: vector 0x40+i, i.e. queue i),
  aux = vectors 0x20-0x3f (bit 31: 0x3f, the configuration vector).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from .guests import GUEST_DIR, LINK_FLAGS

DRIVER_DIR = GUEST_DIR / "driver"
CFLAGS = ["-std=gnu11", "-ffreestanding", "-fno-stack-protector", "-fno-pic", "-no-pie", "-static", "-nostdlib",
          "-mno-red-zone", "-O2", "-mgeneral-regs-only", "-fno-asynchronous-unwind-tables", "-fcf-protection=none",
          "-Wall", "-Wextra", "-Werror"]

# ---- the protocol (job.h) ------------------------------------------------------------------
JOB_ADDR = 0x200000
JOB_SIZE = 0x100000
JOB_MAGIC = 0x424A5650          # "PVJB"
JOB_VERSION = 1
JOB_HEADER_SIZE = 64
CMD_SIZE = 64
JOB_MAX_CMDS = (JOB_SIZE - JOB_HEADER_SIZE) // CMD_SIZE
ARENA_START, ARENA_END = 0x1000000, 0x2000000
DATA_START = 0x4000000           # where tests usually put their buffers
JOB_F_QUIET = 0x1

COM1_PORT = 0x3F8
REPORT_PORT = 0x500
SLEEP_CONTROL_PORT = 0x600
S5_SLP_EN = 0x34
SECTOR = 512

# header: magic, version, ncmds, status, cmds_done, progress, tsc_khz, timeout_ms, flags, reserved[7]
JOB_HEADER = struct.Struct("<9I28x")
# cmd: op, dev, sector, length, buffer, queue, depth, count, result, aux, value
CMD = struct.Struct("<IIQQQIIQIIQ")
assert JOB_HEADER.size == JOB_HEADER_SIZE and CMD.size == CMD_SIZE

OP_NOP = 0x00
OP_REPORT = 0x01
OP_POWEROFF = 0x02
OP_DELAY = 0x03
OP_READ_IRR = 0x04
OP_BLK_INIT = 0x10
OP_BLK_READ = 0x11
OP_BLK_WRITE = 0x12
OP_BLK_FLUSH = 0x13
OP_BLK_DISCARD = 0x14
OP_BLK_WRITE_ZEROES = 0x15
OP_BLK_GET_ID = 0x16
OP_BLK_BENCH = 0x17
OP_BLK_GARBAGE = 0x18
OP_BLK_RESET = 0x19
OP_BLK_STATUS = 0x1A
OP_BLK_CONFIG = 0x1B
OP_NET_INIT = 0x20
OP_NET_TX = 0x21
OP_NET_RX = 0x22
OP_NET_STOP_RX = 0x23
OP_NET_BENCH = 0x24
OP_NET_CONFIG = 0x25
OP_NET_CTRL = 0x26
OP_NET_RESET = 0x27
OP_NET_STATUS = 0x28
OP_NAMES = {v: k[3:].lower().replace("_", "-") for k, v in dict(globals()).items() if k.startswith("OP_")}

F_CONTINUE = 0x80000000
F_INIT_EVENT_IDX = 0x1
F_INIT_INDIRECT = 0x2
F_INIT_NO_MSIX = 0x4
F_INIT_NO_DRIVER_OK = 0x8
F_NO_INTERRUPT = 0x1
F_DIRECT = 0x2
F_WRITE = 0x4
F_RANDOM = 0x8
F_ALWAYS_KICK = 0x10
F_MARKS = 0x20
F_UNMAP = 0x40
F_SEG_SHIFT_POS = 8
F_SEG_SHIFT_MASK = 0x3F00

F_NET_CSUM = 0x10
F_NET_GUEST_CSUM = 0x20
F_NET_HOST_TSO4 = 0x40
F_NET_HOST_TSO6 = 0x80
F_NET_GUEST_TSO4 = 0x100
F_NET_GUEST_TSO6 = 0x200
F_NET_MRG_RXBUF = 0x400
F_NET_CTRL_VQ = 0x800
F_NET_MQ = 0x1000
F_NET_RX_SEG_SHIFT_POS = 16
F_NET_RX_SEG_SHIFT_MASK = 0x3F0000
F_NET_TX_CSUM = 0x4
F_NET_TX_SEQ = 0x8
F_NET_TX_LIST = 0x40
F_NET_SPLIT_HDR = 0x80
F_NET_BENCH_RX = 0x4000
F_NET_GSO_POS = 16
F_NET_GSO_MASK = 0xFF0000
F_NET_ECHO = 0x4
F_NET_TIMEOUT_OK = 0x8
F_NET_ANY_QUEUE = 0x40
F_NET_RESUME = 0x1

NET_HDR_SIZE = 12
from virtio.net_hdr import (  # noqa: E402,F401  (job.h mirrors these: test_driver_protocol checks)
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_F_RSC_INFO, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
)
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
NET_CTRL_MAX_DATA = 4096
NET_REC_SIZE = 24
NET_REC_ALIGN = 8
NET_RX_POOL = 0x8000000
NET_MAX_PAIRS = 8
NET_MAX_DEVS = 4
NET_MAX_RX_BUFS = 1024

# virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
NET_HDR = struct.Struct("<BBHHHHH")
# net record head: len, queue, nbufs, used_len, the 12 header bytes
NET_REC = struct.Struct("<IHHI12s")
assert NET_HDR.size == NET_HDR_SIZE and NET_REC.size == NET_REC_SIZE

GARBAGE_ADDR_BEYOND_RAM = 1
GARBAGE_LOOP = 2
GARBAGE_ADDR_WRAP = 3
GARBAGE_HUGE_LEN = 4
GARBAGE_HEAD_RANGE = 5
GARBAGE_NEXT_RANGE = 6
GARBAGE_AVAIL_IDX = 7
GARBAGE_SHORT_HDR = 8
GARBAGE_NO_STATUS = 9
GARBAGE_NESTED_INDIRECT = 10
GARBAGE_INDIRECT_NEXT = 11
GARBAGE_INDIRECT_LEN = 12
GARBAGE_READ_AFTER_WRITE = 13
GARBAGE_MAX = 13
GOUT_USED = 0x1
GOUT_NEEDS_RESET = 0x2
GOUT_OTHER_ID = 0x4

R_OK = 0x000
R_VIRTIO_STATUS = 0x100
R_NO_DEVICE = 0x200
R_TIMEOUT = 0x201
R_FEATURES = 0x202
R_BAD_ARG = 0x203
R_NOT_READY = 0x204
R_NO_MEM = 0x205
R_BAD_OP = 0x206
R_BAD_CAPS = 0x207
R_MSIX = 0x208
R_QUEUE = 0x209
R_DEVICE = 0x20A
R_BAD_JOB = 0x20B
R_RESET = 0x20C
R_NOT_RUN = 0xFFFFFFFF
R_IOERR = R_VIRTIO_STATUS + 1
R_UNSUPP = R_VIRTIO_STATUS + 2
R_NO_STATUS_BYTE = R_VIRTIO_STATUS + 0xFF

_RESULT_TEXT = {
    R_OK: "ok", R_NO_DEVICE: "no such device", R_TIMEOUT: "timeout", R_FEATURES: "feature negotiation refused",
    R_BAD_ARG: "bad argument", R_NOT_READY: "device not ready", R_NO_MEM: "out of memory", R_BAD_OP: "unknown op",
    R_BAD_CAPS: "bad virtio capabilities", R_MSIX: "MSI-X setup failed", R_QUEUE: "queue unavailable",
    R_DEVICE: "device error", R_BAD_JOB: "bad job block", R_RESET: "reset failed", R_NOT_RUN: "not run",
    R_IOERR: "virtio IOERR", R_UNSUPP: "virtio UNSUPP", R_NO_STATUS_BYTE: "status byte not written",
}

# virtio facts the tests need alongside
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_S_LINK_UP = 1
VS_ACKNOWLEDGE, VS_DRIVER, VS_DRIVER_OK, VS_FEATURES_OK, VS_NEEDS_RESET, VS_FAILED = 1, 2, 4, 8, 0x40, 0x80
MSI_ADDRESS = 0xFEE00000
MSI_VECTOR_QUEUE0 = 0x40         # queue i -> MSI-X entry i -> vector 0x40 + i
MSI_VECTOR_CONFIG = 0x3F         # configuration change -> entry <number of queues> -> 0x3f


def result_text(code: int) -> str:
    if code in _RESULT_TEXT:
        return _RESULT_TEXT[code]
    if R_VIRTIO_STATUS <= code < R_VIRTIO_STATUS + 0x100:
        return f"virtio status {code - R_VIRTIO_STATUS}"
    return f"error {code:#x}"


# ---- commands ------------------------------------------------------------------------------
@dataclass
class Cmd:
    """One struct cmd. Inputs are set by the helpers below; after the run, the guest's
    outputs are in the same fields (see the module docstring) and `result` is set."""

    op: int
    dev: int = 0
    sector: int = 0
    length: int = 0
    buffer: int = 0
    queue: int = 0
    depth: int = 0
    count: int = 0
    result: int = R_NOT_RUN
    aux: int = 0
    value: int = 0

    def pack(self) -> bytes:
        return CMD.pack(self.op, self.dev, self.sector, self.length, self.buffer, self.queue, self.depth,
                        self.count, self.result, self.aux, self.value)

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> "Cmd":
        return cls(*CMD.unpack_from(data, offset))

    @property
    def ok(self) -> bool:
        return self.result == R_OK

    @property
    def error(self) -> str:
        return result_text(self.result)

    @property
    def name(self) -> str:
        return OP_NAMES.get(self.op, f"op {self.op:#x}")

    # BLK_INIT outputs under their names
    @property
    def device_features(self) -> int:
        return self.value

    @property
    def driver_features(self) -> int:
        return self.count

    @property
    def capacity(self) -> int:
        return self.sector

    @property
    def device_status(self) -> int:
        return self.aux

    # BLK_GARBAGE outputs
    @property
    def garbage_used(self) -> bool:
        return bool(self.value & GOUT_USED)

    @property
    def garbage_needs_reset(self) -> bool:
        return bool(self.value & GOUT_NEEDS_RESET)

    @property
    def garbage_status_byte(self) -> int:
        return (self.value >> 8) & 0xFF

    @property
    def garbage_used_len(self) -> int:
        return self.value >> 32

    # NET_INIT outputs
    @property
    def mac(self) -> bytes:
        return (self.sector & 0xFFFFFFFFFFFF).to_bytes(6, "little")

    @property
    def link_status(self) -> int:
        return self.sector >> 48

    @property
    def pairs(self) -> int:
        return self.queue & 0xFFFF

    @property
    def max_pairs(self) -> int:
        return self.queue >> 16

    @property
    def queue_size(self) -> int:
        return self.depth & 0xFFFF

    @property
    def mtu(self) -> int:
        return self.depth >> 16

    @property
    def rx_buf_size(self) -> int:
        return self.length

    @property
    def rx_pool_end(self) -> int:
        return self.buffer

    # NET_TX / NET_RX / NET_BENCH outputs
    @property
    def frames(self) -> int:
        return self.sector if self.op == OP_NET_BENCH else self.value

    @property
    def cycles(self) -> int:
        return self.value if self.op == OP_NET_BENCH else self.sector

    @property
    def frame_bytes(self) -> int:
        return self.count

    def __str__(self) -> str:
        return (f"{self.name} dev {self.dev}: {self.error} (result {self.result:#x}) value {self.value:#x} "
                f"aux {self.aux:#x} sector {self.sector} length {self.length} count {self.count} "
                f"queue {self.queue} depth {self.depth}")


def _flags(*pairs) -> int:
    f = 0
    for cond, bit in pairs:
        if cond:
            f |= bit
    return f


def _seg_shift(seg_size: int | None) -> int:
    if not seg_size:
        return 0
    if seg_size & (seg_size - 1) or not 1 <= seg_size.bit_length() - 1 <= 63:
        raise ValueError(f"segment size {seg_size} is not a power of 2")
    return (seg_size.bit_length() - 1) << F_SEG_SHIFT_POS


def _io_flags(no_interrupt, direct, always_kick, seg_size, cont) -> int:
    return _flags((no_interrupt, F_NO_INTERRUPT), (direct, F_DIRECT), (always_kick, F_ALWAYS_KICK),
                  (cont, F_CONTINUE)) | _seg_shift(seg_size)


def nop() -> Cmd:
    return Cmd(OP_NOP)


def report(value: int) -> Cmd:
    """out value (32 bits) to port 0x500 on the vCPU thread."""
    return Cmd(OP_REPORT, value=value & 0xFFFFFFFF)


def poweroff() -> Cmd:
    return Cmd(OP_POWEROFF)


def delay(us: int) -> Cmd:
    return Cmd(OP_DELAY, value=us)


def read_irr() -> Cmd:
    return Cmd(OP_READ_IRR)


def blk_init(dev: int = 0, *, queues: int = 0, queue_size: int = 0, event_idx: bool = False,
             indirect: bool = False, msix: bool = True, driver_ok: bool = True, features: int = 0,
             config_to: int = 0, cont: bool = False) -> Cmd:
    aux = _flags((event_idx, F_INIT_EVENT_IDX), (indirect, F_INIT_INDIRECT), (not msix, F_INIT_NO_MSIX),
                 (not driver_ok, F_INIT_NO_DRIVER_OK), (cont, F_CONTINUE))
    return Cmd(OP_BLK_INIT, dev=dev, queue=queues, depth=queue_size, value=features, buffer=config_to, aux=aux)


def blk_read(sector: int, length: int, buffer: int, *, dev: int = 0, queue: int = 0, depth: int = 1,
             request_size: int = 1 << 20, no_interrupt: bool = False, direct: bool = False,
             always_kick: bool = False, seg_size: int | None = None, cont: bool = False) -> Cmd:
    """Read `length` bytes from `sector` into guest memory at `buffer`, as requests of
    `request_size` bytes, `depth` of them in flight."""
    return Cmd(OP_BLK_READ, dev=dev, sector=sector, length=length, buffer=buffer, queue=queue, depth=depth,
               count=request_size, aux=_io_flags(no_interrupt, direct, always_kick, seg_size, cont))


def blk_write(sector: int, length: int, buffer: int, *, dev: int = 0, queue: int = 0, depth: int = 1,
              request_size: int = 1 << 20, no_interrupt: bool = False, direct: bool = False,
              always_kick: bool = False, seg_size: int | None = None, cont: bool = False) -> Cmd:
    return Cmd(OP_BLK_WRITE, dev=dev, sector=sector, length=length, buffer=buffer, queue=queue, depth=depth,
               count=request_size, aux=_io_flags(no_interrupt, direct, always_kick, seg_size, cont))


def blk_flush(*, dev: int = 0, queue: int = 0, no_interrupt: bool = False, direct: bool = False,
              cont: bool = False) -> Cmd:
    return Cmd(OP_BLK_FLUSH, dev=dev, queue=queue, aux=_io_flags(no_interrupt, direct, False, None, cont))


def blk_discard(sector: int, length: int, *, dev: int = 0, queue: int = 0, depth: int = 1,
                request_size: int = 0, no_interrupt: bool = False, cont: bool = False) -> Cmd:
    """request_size 0: the device's max_discard_sectors (or 2 GiB)."""
    return Cmd(OP_BLK_DISCARD, dev=dev, sector=sector, length=length, queue=queue, depth=depth,
               count=request_size, aux=_io_flags(no_interrupt, False, False, None, cont))


def blk_write_zeroes(sector: int, length: int, *, dev: int = 0, queue: int = 0, depth: int = 1,
                     request_size: int = 0, unmap: bool = False, no_interrupt: bool = False,
                     cont: bool = False) -> Cmd:
    return Cmd(OP_BLK_WRITE_ZEROES, dev=dev, sector=sector, length=length, queue=queue, depth=depth,
               count=request_size,
               aux=_io_flags(no_interrupt, False, False, None, cont) | (F_UNMAP if unmap else 0))


def blk_get_id(buffer: int, *, length: int = 20, dev: int = 0, queue: int = 0, cont: bool = False) -> Cmd:
    return Cmd(OP_BLK_GET_ID, dev=dev, buffer=buffer, length=length, queue=queue,
               aux=_io_flags(False, False, False, None, cont))


def blk_bench(requests: int, request_size: int, buffer: int, *, write: bool = False, random: bool = False,
              region_sectors: int = 0, depth: int = 1, dev: int = 0, queue: int = 0, marks: bool = False,
              no_interrupt: bool = False, direct: bool = False, cont: bool = False) -> Cmd:
    """`requests` requests of `request_size` bytes within the first `region_sectors` sectors
    (0: the whole disk), `depth` in flight; data buffers at buffer + slot * request_size for
    slot < depth. marks: out 0xB0000000|index before and 0xB1000000|index after, on port 0x500."""
    aux = _flags((write, F_WRITE), (random, F_RANDOM), (marks, F_MARKS)) | _io_flags(
        no_interrupt, direct, False, None, cont)
    return Cmd(OP_BLK_BENCH, dev=dev, sector=region_sectors, length=request_size, buffer=buffer, queue=queue,
               depth=depth, count=requests, aux=aux)


def blk_garbage(kind: int, *, dev: int = 0, queue: int = 0, wait_ms: int = 1000, address: int = 0,
                cont: bool = False) -> Cmd:
    """Submit a malicious chain (GARBAGE_*) and watch for a used entry or NEEDS_RESET for up to
    wait_ms. `address`: the bad address (ADDR_BEYOND_RAM) or the buffer other kinds point at."""
    if not 1 <= kind <= GARBAGE_MAX:
        raise ValueError(f"no garbage kind {kind}")
    return Cmd(OP_BLK_GARBAGE, dev=dev, queue=queue, count=wait_ms, buffer=address,
               aux=kind | (F_CONTINUE if cont else 0))


def blk_reset(dev: int = 0, *, cont: bool = False) -> Cmd:
    return Cmd(OP_BLK_RESET, dev=dev, aux=F_CONTINUE if cont else 0)


def blk_status(dev: int = 0, *, cont: bool = False) -> Cmd:
    return Cmd(OP_BLK_STATUS, dev=dev, aux=F_CONTINUE if cont else 0)


def blk_config(dev: int = 0, *, buffer: int = 0, cont: bool = False) -> Cmd:
    return Cmd(OP_BLK_CONFIG, dev=dev, buffer=buffer, aux=F_CONTINUE if cont else 0)


# ---- virtio-net ----------------------------------------------------------------------------
ALL_OFFLOADS = (F_NET_CSUM | F_NET_GUEST_CSUM | F_NET_HOST_TSO4 | F_NET_HOST_TSO6 | F_NET_GUEST_TSO4
                | F_NET_GUEST_TSO6)


def _shift_bits(size: int | None, pos: int, what: str) -> int:
    if not size:
        return 0
    if size & (size - 1) or not 1 <= size.bit_length() - 1 <= 30:
        raise ValueError(f"{what} {size} is not a power of 2 up to 2^30")
    return (size.bit_length() - 1) << pos


def net_init(dev: int = 0, *, pairs: int = 1, queue_size: int = 0, csum: bool = False, guest_csum: bool = False,
             host_tso4: bool = False, host_tso6: bool = False, guest_tso4: bool = False, guest_tso6: bool = False,
             offloads: bool = False, mrg_rxbuf: bool = False, event_idx: bool = False, indirect: bool = False,
             ctrl_vq: bool = False, mq: bool = False, msix: bool = True, driver_ok: bool = True,
             features: int = 0, rx_pool: int = 0, rx_buf_size: int = 0, rx_buffers: int = 0,
             rx_seg_size: int | None = None, cont: bool = False) -> Cmd:
    """Negotiate and set up `pairs` queue pairs, RX buffers posted. offloads=True: all six of
    CSUM, GUEST_CSUM, HOST_TSO4/6, GUEST_TSO4/6. mq implies ctrl_vq. rx_seg_size: every RX
    buffer a chain of descriptors of that size. features: the exact bits to write."""
    aux = _flags((event_idx, F_INIT_EVENT_IDX), (indirect, F_INIT_INDIRECT), (not msix, F_INIT_NO_MSIX),
                 (not driver_ok, F_INIT_NO_DRIVER_OK), (csum, F_NET_CSUM), (guest_csum, F_NET_GUEST_CSUM),
                 (host_tso4, F_NET_HOST_TSO4), (host_tso6, F_NET_HOST_TSO6), (guest_tso4, F_NET_GUEST_TSO4),
                 (guest_tso6, F_NET_GUEST_TSO6), (offloads, ALL_OFFLOADS), (mrg_rxbuf, F_NET_MRG_RXBUF),
                 (ctrl_vq or mq, F_NET_CTRL_VQ), (mq, F_NET_MQ), (cont, F_CONTINUE))
    aux |= _shift_bits(rx_seg_size, F_NET_RX_SEG_SHIFT_POS, "RX segment size")
    if not 0 <= pairs <= NET_MAX_PAIRS:
        raise ValueError(f"{pairs} queue pairs; the driver sets up at most {NET_MAX_PAIRS}")
    return Cmd(OP_NET_INIT, dev=dev, queue=pairs, depth=queue_size, value=features, buffer=rx_pool,
               length=rx_buf_size, count=rx_buffers, aux=aux)


def _u16(value: int, what: str) -> int:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{what} {value} does not fit 16 bits")
    return value


def _tx_header_fields(csum, gso, mss, hdr_len) -> tuple[int, int]:
    """(cmd.sector, aux bits) for the header of NET_TX / NET_BENCH."""
    start, offset = csum if csum else (0, 0)
    sector = (_u16(start, "csum_start") | _u16(offset, "csum_offset") << 16 | _u16(mss, "gso_size") << 32
              | _u16(hdr_len, "hdr_len") << 48)
    if not 0 <= gso <= 0xFF:
        raise ValueError(f"gso_type {gso} is not a byte")
    return sector, (F_NET_TX_CSUM if csum else 0) | gso << F_NET_GSO_POS


def net_tx(buffer: int, length: int, count: int = 1, *, dev: int = 0, queue: int = 0, depth: int = 1,
           csum: tuple[int, int] | None = None, gso: int = 0, mss: int = 0, hdr_len: int = 0,
           seq_offset: int | None = None, first_seq: int = 0, csum_fix: int = 0, split_hdr: bool = False,
           seg_size: int | None = None, no_interrupt: bool = False, direct: bool = False,
           always_kick: bool = False, cont: bool = False) -> Cmd:
    """Send `count` frames of `length` bytes on pair `queue`, `depth` in flight.

    Each goes with a virtio_net_hdr: csum=(csum_start, csum_offset) sets NEEDS_CSUM; gso =
    VIRTIO_NET_HDR_GSO_* with mss (gso_size) and hdr_len. Without seq_offset every frame is the
    bytes at `buffer`; with it, frame i is seq_frame(template, i, ...): a copy with first_seq + i
    (32 bits, big-endian) at seq_offset, made at buffer + ALIGN_UP(length, 64) * (1 + slot) for
    slot < depth, so leave (depth + 1) such strides free. csum_fix: the offset of a 16-bit
    checksum to keep right (RFC 1624; the checksummed region must start at an even offset, a
    zero UDP checksum stays zero). seg_size: data in descriptors of that size; split_hdr: the
    header in two descriptors (5 + 7 bytes)."""
    sector, aux = _tx_header_fields(csum, gso, mss, hdr_len)
    value = 0
    if seq_offset is not None:
        if seq_offset + 4 > length or csum_fix & 1 or (csum_fix and csum_fix + 2 > length):
            raise ValueError(f"sequence number at {seq_offset} or checksum at {csum_fix} outside the frame")
        value = _u16(seq_offset, "seq_offset") | _u16(csum_fix, "csum_fix") << 16 | (first_seq & 0xFFFFFFFF) << 32
        aux |= F_NET_TX_SEQ
    aux |= _flags((split_hdr, F_NET_SPLIT_HDR)) | _io_flags(no_interrupt, direct, always_kick, seg_size, cont)
    return Cmd(OP_NET_TX, dev=dev, buffer=buffer, length=length, count=count, queue=queue, depth=depth,
               sector=sector, value=value, aux=aux)


def net_tx_list(buffer: int, count: int, *, area_size: int = 0, dev: int = 0, queue: int = 0, depth: int = 1,
                split_hdr: bool = False, seg_size: int | None = None, no_interrupt: bool = False,
                direct: bool = False, always_kick: bool = False, cont: bool = False) -> Cmd:
    """Send the `count` net records at `buffer` (pack_net_records()), each with its own header.
    area_size: the records must lie within it (0: unchecked)."""
    aux = F_NET_TX_LIST | _flags((split_hdr, F_NET_SPLIT_HDR)) | _io_flags(no_interrupt, direct, always_kick,
                                                                          seg_size, cont)
    return Cmd(OP_NET_TX, dev=dev, buffer=buffer, length=area_size, count=count, queue=queue, depth=depth,
               aux=aux)


def net_rx(count: int = 0, buffer: int = 0, *, max_bytes: int = 0, area_size: int = 0, dev: int = 0,
           queue: int = 0, any_queue: bool = False, echo: bool = False, timeout_ms: int = 0,
           timeout_ok: bool = False, no_interrupt: bool = False, direct: bool = False, always_kick: bool = False,
           cont: bool = False) -> Cmd:
    """Receive until `count` frames or `max_bytes` frame bytes (whichever comes first; 0: no
    such limit) on pair `queue` (any_queue: every pair), appending a net record per frame at
    `buffer` (0: store nothing) within area_size bytes (0: unchecked; a frame that does not fit
    ends the command with R_NO_MEM). echo: send every frame back out unchanged (the header's
    DATA_VALID/RSC_INFO and num_buffers cleared) on the same pair's TX queue, its RX buffers
    posted again when the TX completes. timeout_ms (0: the job's): no frame for that long ends
    the command, with R_TIMEOUT unless timeout_ok."""
    if not (count or max_bytes or timeout_ok):
        raise ValueError("net_rx needs count, max_bytes or timeout_ok")
    aux = _flags((echo, F_NET_ECHO), (timeout_ok, F_NET_TIMEOUT_OK), (any_queue, F_NET_ANY_QUEUE)) | _io_flags(
        no_interrupt, direct, always_kick, None, cont)
    return Cmd(OP_NET_RX, dev=dev, count=count, length=max_bytes, buffer=buffer, sector=area_size, queue=queue,
               depth=timeout_ms, aux=aux)


def net_stop_rx(dev: int = 0, *, cont: bool = False) -> Cmd:
    """Consumed RX buffers are held, not posted again, until net_resume_rx()."""
    return Cmd(OP_NET_STOP_RX, dev=dev, aux=F_CONTINUE if cont else 0)


def net_resume_rx(dev: int = 0, *, cont: bool = False) -> Cmd:
    return Cmd(OP_NET_STOP_RX, dev=dev, aux=F_NET_RESUME | (F_CONTINUE if cont else 0))


def net_bench_tx(count: int, length: int, buffer: int, *, dev: int = 0, queue: int = 0, depth: int = 1,
                 csum: tuple[int, int] | None = None, gso: int = 0, mss: int = 0, hdr_len: int = 0,
                 marks: bool = False, no_interrupt: bool = False, direct: bool = False, seg_size: int | None = None,
                 cont: bool = False) -> Cmd:
    """`count` copies of the frame at `buffer`, `depth` in flight; value = TSC cycles."""
    sector, aux = _tx_header_fields(csum, gso, mss, hdr_len)
    aux |= _flags((marks, F_MARKS)) | _io_flags(no_interrupt, direct, False, seg_size, cont)
    return Cmd(OP_NET_BENCH, dev=dev, buffer=buffer, length=length, count=count, queue=queue, depth=depth,
               sector=sector, aux=aux)


def net_bench_rx(count: int = 0, *, max_bytes: int = 0, dev: int = 0, queue: int = 0, any_queue: bool = False,
                 marks: bool = False, no_interrupt: bool = False, cont: bool = False) -> Cmd:
    """Receive `count` frames (or `max_bytes`) storing nothing; value = TSC cycles from the
    first buffer to the last frame."""
    if not (count or max_bytes):
        raise ValueError("net_bench_rx needs count or max_bytes")
    aux = F_NET_BENCH_RX | _flags((marks, F_MARKS), (any_queue, F_NET_ANY_QUEUE)) | _io_flags(
        no_interrupt, False, False, None, cont)
    return Cmd(OP_NET_BENCH, dev=dev, count=count, length=max_bytes, queue=queue, aux=aux)


def net_config(dev: int = 0, *, buffer: int = 0, cont: bool = False) -> Cmd:
    return Cmd(OP_NET_CONFIG, dev=dev, buffer=buffer, aux=F_CONTINUE if cont else 0)


def net_ctrl(cls: int, command: int, data: int = 0, length: int = 0, *, dev: int = 0, cont: bool = False) -> Cmd:
    """One control-queue command; its `length` data bytes at guest address `data`."""
    if length > NET_CTRL_MAX_DATA:
        raise ValueError(f"{length} bytes of control data; at most {NET_CTRL_MAX_DATA}")
    return Cmd(OP_NET_CTRL, dev=dev, value=(cls & 0xFF) | (command & 0xFF) << 8, buffer=data, length=length,
               aux=F_CONTINUE if cont else 0)


def net_reset(dev: int = 0, *, cont: bool = False) -> Cmd:
    return Cmd(OP_NET_RESET, dev=dev, aux=F_CONTINUE if cont else 0)


def net_status(dev: int = 0, *, cont: bool = False) -> Cmd:
    return Cmd(OP_NET_STATUS, dev=dev, aux=F_CONTINUE if cont else 0)


@dataclass
class NetHdr:
    """struct virtio_net_hdr (12 bytes with VERSION_1)."""

    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self) -> bytes:
        return NET_HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
                            self.csum_offset, self.num_buffers)

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> "NetHdr":
        return cls(*NET_HDR.unpack_from(data, offset))


@dataclass
class NetFrame:
    """One net record: a frame and its header (RX: also where it came in and what it took)."""

    data: bytes
    hdr: NetHdr
    queue: int = 0
    nbufs: int = 0
    used_len: int = 0


def _rec_end(offset: int, length: int) -> int:
    return (offset + NET_REC_SIZE + length + NET_REC_ALIGN - 1) & ~(NET_REC_ALIGN - 1)


def parse_net_records(data: bytes | memoryview, count: int | None = None) -> list[NetFrame]:
    """The net records in `data` (what NET_RX wrote: read `length` bytes of its output from
    its buffer), at most `count`. ValueError if a record runs past the end."""
    frames, off = [], 0
    while off < len(data) and (count is None or len(frames) < count):
        if off + NET_REC_SIZE > len(data):
            raise ValueError(f"a net record head at {off} runs past {len(data)} bytes")
        length, queue, nbufs, used, hdr = NET_REC.unpack_from(data, off)
        if off + NET_REC_SIZE + length > len(data):
            raise ValueError(f"a {length}-byte net record at {off} runs past {len(data)} bytes")
        frames.append(NetFrame(bytes(data[off + NET_REC_SIZE:off + NET_REC_SIZE + length]), NetHdr.unpack(hdr),
                               queue, nbufs, used))
        off = _rec_end(off, length)
    return frames


def read_net_records(mem, buffer: int, rx: Cmd) -> list[NetFrame]:
    """The records a finished NET_RX command (`rx`, read back) wrote at `buffer`."""
    return parse_net_records(mem.read(buffer, rx.length)) if rx.length else []


def pack_net_records(frames) -> bytes:
    """Net records for net_tx_list(): frames are NetFrame, (data, NetHdr) or plain bytes (no
    offload header)."""
    out = bytearray()
    for f in frames:
        if isinstance(f, NetFrame):
            data, hdr = f.data, f.hdr
        elif isinstance(f, (bytes, bytearray, memoryview)):
            data, hdr = bytes(f), NetHdr()
        else:
            data, hdr = f
        out += NET_REC.pack(len(data), 0, 0, 0, hdr.pack()) + bytes(data)
        out += bytes(_rec_end(0, len(data)) - NET_REC_SIZE - len(data))
    return bytes(out)


def csum16(data: bytes, initial: int = 0) -> int:
    """The 16-bit ones' complement sum (not inverted) of data, big-endian words."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    s = initial + sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def seq_frame(template: bytes, i: int, seq_offset: int, *, first_seq: int = 0, csum_fix: int = 0) -> bytes:
    """Frame i as NET_TX with seq_offset sends it: the template with (first_seq + i) & 0xffffffff
    big-endian at seq_offset and, with csum_fix, the checksum there updated (RFC 1624 eqn. 3,
    0 stays 0, a result of 0 is sent as 0xffff)."""
    f = bytearray(template)
    a, b = seq_offset & ~1, (seq_offset + 5) & ~1
    old = bytes(f[a:b])
    f[seq_offset:seq_offset + 4] = ((first_seq + i) & 0xFFFFFFFF).to_bytes(4, "big")
    if csum_fix:
        hc = int.from_bytes(f[csum_fix:csum_fix + 2], "big")
        if hc:
            s = (~hc & 0xFFFF) + csum16(bytes(~x & 0xFF for x in old)) + csum16(bytes(f[a:b]))
            while s >> 16:
                s = (s & 0xFFFF) + (s >> 16)
            r = ~s & 0xFFFF or 0xFFFF
            f[csum_fix:csum_fix + 2] = r.to_bytes(2, "big")
    return bytes(f)


# ---- the job block -------------------------------------------------------------------------
@dataclass
class JobResult:
    status: int                     # 0, the first error, or R_NOT_RUN if the guest never finished
    cmds_done: int
    progress: int
    cmds: list[Cmd]
    console: str = ""
    exit_code: int | None = None    # Machine.run()'s, when run through run_driver
    message: str | None = None      # the lifecycle's last word ("guest powered off", ...)

    @property
    def ok(self) -> bool:
        return self.status == R_OK and self.cmds_done == len(self.cmds)

    def describe(self) -> str:
        lines = [f"job status {self.status:#x} ({result_text(self.status)}), {self.cmds_done}/{len(self.cmds)} "
                 f"commands done, exit code {self.exit_code}, {self.message}"]
        lines += [f"  [{i}] {c}" for i, c in enumerate(self.cmds)]
        if self.console:
            lines += ["console:", *("  | " + line for line in self.console.splitlines()[-40:])]
        return "\n".join(lines)

    def check(self) -> "JobResult":
        """Assert every command ran and succeeded; the message shows the console."""
        if not self.ok:
            raise AssertionError("driver job failed:\n" + self.describe())
        return self


def encode_job(cmds: list[Cmd], *, tsc_khz: int = 0, timeout_ms: int = 0, quiet: bool = False) -> bytes:
    if len(cmds) > JOB_MAX_CMDS:
        raise ValueError(f"{len(cmds)} commands; the job block holds {JOB_MAX_CMDS}")
    header = JOB_HEADER.pack(JOB_MAGIC, JOB_VERSION, len(cmds), R_NOT_RUN, 0, 0, tsc_khz, timeout_ms,
                             JOB_F_QUIET if quiet else 0)
    return header + b"".join(c.pack() for c in cmds)


def decode_job(data: bytes | memoryview, ncmds: int | None = None) -> JobResult:
    magic, version, n, status, done, progress, *_ = JOB_HEADER.unpack_from(data)
    if magic != JOB_MAGIC or version != JOB_VERSION:
        raise ValueError(f"not a version-{JOB_VERSION} job block (magic {magic:#x}, version {version})")
    n = n if ncmds is None else ncmds
    if JOB_HEADER_SIZE + n * CMD_SIZE > len(data):
        raise ValueError(f"job block of {len(data)} bytes cannot hold {n} commands")
    cmds = [Cmd.unpack(data, JOB_HEADER_SIZE + i * CMD_SIZE) for i in range(n)]
    return JobResult(status=status, cmds_done=done, progress=progress, cmds=cmds)


def write_job(mem, cmds: list[Cmd], **opts) -> None:
    """Put the job block into guest memory (a vmm.memory.GuestMemory)."""
    mem.write(JOB_ADDR, encode_job(cmds, **opts))


def read_job(mem) -> JobResult:
    (n,) = struct.unpack_from("<I", mem.read(JOB_ADDR + 8, 4))
    n = min(n, JOB_MAX_CMDS)
    return decode_job(mem.read(JOB_ADDR, JOB_HEADER_SIZE + n * CMD_SIZE))


def guest_tsc_khz(machine) -> int:
    """The vCPU's TSC frequency (KVM_GET_TSC_KHZ), 0 if KVM cannot tell."""
    from vmm.kvm import constants as c
    from vmm.kvm.ioctl import IoctlError, ioctl

    try:
        return ioctl(machine.vcpus[0].fd, c.KVM_GET_TSC_KHZ, name="KVM_GET_TSC_KHZ")
    except (IoctlError, AttributeError):
        return 0


def _console_text(machine) -> str:
    console = getattr(machine.config, "console", "")
    if isinstance(console, str) and console.startswith("file:"):
        try:
            return Path(console[5:]).read_text(errors="replace")
        except OSError:
            return ""
    return ""


def run_driver(machine, cmds: list[Cmd], *, timeout: float = 60, timeout_ms: int = 0, quiet: bool = False,
               tsc_khz: int | None = None) -> JobResult:
    """Write the job, run the machine until the guest powers off (or `timeout` seconds pass:
    the VM is then stopped), and return the results. The machine is not closed: guest memory
    stays readable (data buffers); call machine.close() after. `timeout_ms` is the guest's own
    no-progress limit per command (0: 10 s)."""
    khz = guest_tsc_khz(machine) if tsc_khz is None else tsc_khz
    write_job(machine.mem, cmds, tsc_khz=khz, timeout_ms=timeout_ms, quiet=quiet)
    timer = threading.Timer(timeout, lambda: machine.lifecycle.stop(99, "driver job watchdog"))
    timer.start()
    try:
        code = machine.run()
    finally:
        timer.cancel()
    result = read_job(machine.mem)
    result.exit_code = code
    result.message = getattr(machine.lifecycle, "message", None)
    result.console = _console_text(machine)
    return result


# ---- building ------------------------------------------------------------------------------
def have_gcc() -> bool:
    return shutil.which("gcc") is not None


def driver_sources() -> list[Path]:
    return sorted(p for p in DRIVER_DIR.iterdir() if p.suffix in (".c", ".S"))


def build_driver(out_dir: Path, *, extra_cflags: list[str] = ()) -> Path:
    """Compile tests/guest/driver into out_dir/driver.elf (rebuilt when a source is newer)."""
    out_dir = Path(out_dir)
    out = out_dir / "driver.elf"
    inputs = [*driver_sources(), *DRIVER_DIR.glob("*.h"), Path(__file__)]
    if out.exists() and not extra_cflags and out.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        return out
    tmp = out_dir / "driver.elf.tmp"
    r = subprocess.run(["gcc", *CFLAGS, *extra_cflags, *LINK_FLAGS, "-I", str(DRIVER_DIR), "-o", str(tmp),
                        *map(str, driver_sources())], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"building the driver guest failed:\n{r.stderr}")
    tmp.replace(out)
    return out

