"""virtio-blk: a block device (OASIS virtio 1.2, section 5.2).

Each request is one descriptor chain:

    struct virtio_blk_req {
        le32 type;          \\
        le32 reserved;       > the header: 16 device-readable bytes (any split into descriptors)
        le64 sector;        /
        u8 data[];          device-readable (OUT, DISCARD, WRITE_ZEROES) or -writable (IN, GET_ID)
        u8 status;          the last device-writable byte: VIRTIO_BLK_S_*
    };

The split follows Firecracker and Cloud Hypervisor: this module parses and
checks requests and turns them into calls on a backend (virtio/backends: a
`BlockBackend`, e.g. a RawImage) with memoryviews of guest RAM and byte
offsets; the backend never sees a descriptor.  IN and OUT go straight between
guest RAM and the file with os.preadv / os.pwritev: no copy in Python.

Threads: `activate()` (DRIVER_OK) starts one IoThread per queue, woken by the
queue's eventfd (an ioeventfd: the driver's notification does not exit the
vCPU).  Each wake-up completes every available request through the queue's
ring path (virtio/blk_path.py: plain reads and writes in batches, through the
backend's batch I/O - io_uring -, everything else one chain at a time here),
publishes the used ring once per batch, and interrupts the driver if it asked
to be (EVENT_IDX).  `deactivate()` (reset) stops and joins them.

Errors: a malformed request fails alone (VIRTIO_BLK_S_IOERR, or UNSUPP for an
unknown type) with a rate-limited log line; an unusable queue sets
DEVICE_NEEDS_RESET and that queue is not served until the driver resets.
"""

from __future__ import annotations

import logging
import os
import struct
from functools import partial
from typing import TYPE_CHECKING, Callable

from vmm.memory import GuestMemory
from .backends import BlockBackend
from .counters import QueueCounters
from .device import VIRTIO_ID_BLOCK, VirtioDevice
from .ratelimit import RateLimitedLog
from .queue import DescriptorChain, QueueError
from .worker import IoThread

if TYPE_CHECKING:  # (numpy and io_uring are loaded once a queue has requests)
    from .blk_path import BlkPath

log = logging.getLogger(__name__)

# Feature bits (5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
VIRTIO_BLK_F_LIFETIME = 15
VIRTIO_BLK_F_SECURE_ERASE = 16
VIRTIO_BLK_F_ZONED = 17

# Request types (5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

# Request status (5.2.6)
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

# struct virtio_blk_discard_write_zeroes flags
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

VIRTIO_BLK_ID_BYTES = 20  # the device ID string of GET_ID
SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT

# Our limits, as the config space tells the driver.
MAX_DISCARD_SEGMENTS = 32  # max_discard_seg, max_write_zeroes_seg
MAX_DISCARD_SECTORS = 0x3FFFFF  # max_discard_sectors, max_write_zeroes_sectors: just under 2 GiB
MAX_QUEUES = 64

# struct virtio_blk_req: type, reserved (was ioprio), sector
REQ_HEADER = struct.Struct("<IIQ")
# struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags
DISCARD_SEGMENT = struct.Struct("<QII")

# struct virtio_blk_config, up to write_zeroes_may_unmap and its padding (the
# secure-erase and zoned fields after it belong to features we do not offer).
#   0 capacity           le64     24 topology.physical_block_exp u8   36 max_discard_sectors      le32
#   8 size_max           le32     25 topology.alignment_offset   u8   40 max_discard_seg          le32
#  12 seg_max            le32     26 topology.min_io_size      le16   44 discard_sector_alignment le32
#  16 geometry.cylinders le16     28 topology.opt_io_size      le32   48 max_write_zeroes_sectors le32
#  18 geometry.heads     u8       32 writeback                   u8   52 max_write_zeroes_seg     le32
#  19 geometry.sectors   u8       33 unused0                     u8   56 write_zeroes_may_unmap   u8
#  20 blk_size           le32     34 num_queues                le16   57 unused1[3]
VIRTIO_BLK_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert VIRTIO_BLK_CONFIG.size == 60


def check_serial(serial: str) -> bytes:
    """The serial as GET_ID returns it: printable ASCII, at most 20 bytes.  Raises ValueError."""
    if len(serial) > VIRTIO_BLK_ID_BYTES or not all(" " <= c <= "~" for c in serial):
        raise ValueError(f"disk serial {serial!r} is not at most {VIRTIO_BLK_ID_BYTES} printable ASCII characters")
    return serial.encode("ascii")


def _views(mem: GuestMemory, regions: list[tuple[int, int]], start: int, end: int) -> list[memoryview]:
    """Memoryviews of bytes [start, end) of the concatenated (gpa, length) regions."""
    view = mem.view
    out = []
    pos = 0
    for gpa, length in regions:
        if pos >= end:
            break
        nxt = pos + length
        if nxt > start:
            lo = start - pos if start > pos else 0
            hi = end - pos if end < nxt else length
            out.append(view(gpa + lo, hi - lo))
        pos = nxt
    return out


def _gather(mem: GuestMemory, regions: list[tuple[int, int]], start: int, end: int) -> bytes:
    """A copy of bytes [start, end) of the regions (for small things: a split header, segments)."""
    return b"".join(_views(mem, regions, start, end))


class _BadRequest(Exception):
    """A request the driver got wrong: completed with `status`."""

    def __init__(self, reason: str, status: int = VIRTIO_BLK_S_IOERR):
        super().__init__(reason)
        self.status = status


# Requests moving at least this much are completed (used.idx published) one by one; smaller ones
# once per batch, which costs less per request.
PUBLISH_EARLY_BYTES = 64 << 10


class VirtioBlk(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    name = "virtio-blk"
    request_name = "request"

    def __init__(
        self,
        mem: GuestMemory,
        backend: BlockBackend,
        *,
        num_queues: int = 1,
        queue_size: int = 256,
        serial: str = "",
        read_only: bool = False,
        batches: bool = True,
    ):
        """`batches=False`: every request one chain at a time (the reference the batch path is
        tested against)."""
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ValueError(f"virtio-blk: {num_queues} queues is not from 1 to {MAX_QUEUES}")
        self.backend = backend
        self.read_only = read_only or backend.read_only
        self.serial = check_serial(serial)
        self.capacity = backend.size >> SECTOR_SHIFT  # in 512-byte sectors, whatever blk_size says
        self.discard = backend.supports_discard and not self.read_only
        self.write_zeroes = backend.supports_write_zeroes and not self.read_only

        features = (
            1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_TOPOLOGY
        )
        if num_queues > 1:
            features |= 1 << VIRTIO_BLK_F_MQ
        if self.read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        if self.discard:
            features |= 1 << VIRTIO_BLK_F_DISCARD
        if self.write_zeroes:
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
        super().__init__(mem, num_queues=num_queues, queue_size=queue_size, features=features)
        self._config = self._build_config(queue_size, num_queues)

        self._handlers: dict[int, Callable[[DescriptorChain, int], int]] = {
            VIRTIO_BLK_T_IN: self._read,
            VIRTIO_BLK_T_OUT: self._write,
            VIRTIO_BLK_T_FLUSH: self._flush,
            VIRTIO_BLK_T_GET_ID: self._get_id,
            VIRTIO_BLK_T_DISCARD: self._discard,
            VIRTIO_BLK_T_WRITE_ZEROES: self._write_zeroes,
        }
        self._threads: list[IoThread] = []
        self._batches = batches
        self._paths: list[BlkPath | None] = [None] * num_queues  # made on a queue's first request
        self._guest_error = RateLimitedLog(log)
        self._io_error = RateLimitedLog(log)

    # -- configuration space ---------------------------------------------------------
    def _build_config(self, queue_size: int, num_queues: int) -> bytes:
        backend = self.backend
        blk_size = max(SECTOR_SIZE, backend.logical_block_size)
        physical_block_exp = max(0, (backend.physical_block_size // blk_size).bit_length() - 1)
        discard_alignment = max(1, max(blk_size, backend.physical_block_size) >> SECTOR_SHIFT)
        return VIRTIO_BLK_CONFIG.pack(
            self.capacity,
            0,  # size_max: VIRTIO_BLK_F_SIZE_MAX not offered, any segment size will do
            queue_size - 2,  # seg_max: a chain also holds the header and the status
            0, 0, 0,  # geometry: VIRTIO_BLK_F_GEOMETRY not offered
            blk_size,
            physical_block_exp,
            0,  # alignment_offset
            1 << physical_block_exp,  # min_io_size, in logical blocks: one physical block
            0,  # opt_io_size: no preference
            1,  # writeback: there is a volatile cache (the host's); FLUSH makes writes stable
            0,  # unused0
            num_queues,
            MAX_DISCARD_SECTORS if self.discard else 0,
            MAX_DISCARD_SEGMENTS if self.discard else 0,
            discard_alignment if self.discard else 0,
            MAX_DISCARD_SECTORS if self.write_zeroes else 0,
            MAX_DISCARD_SEGMENTS if self.write_zeroes else 0,
            1 if self.write_zeroes and self.discard else 0,  # write_zeroes_may_unmap
        )

    def config_bytes(self) -> bytes:
        return self._config

    # -- threads -----------------------------------------------------------------------
    def activate(self) -> None:
        for index in range(len(self.queue_events)):
            thread = IoThread(f"{self.name}-q{index}")
            self.watch_queue(thread, index, lambda index=index: self.process_queue(index))
            self._threads.append(thread)
            thread.start()

    def deactivate(self) -> None:
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.stop()  # joins: no request is in progress after this

    def reset(self) -> None:
        with self._lock:
            super().reset()  # the threads are stopped first
            paths, self._paths = self._paths, [None] * len(self.queues)
            for path in paths:
                if path is not None:
                    path.close()

    def close(self) -> None:
        super().close()
        self.backend.close()

    # -- the request path ----------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        """Complete every available request of queue `index` (on its I/O thread)."""
        if self._queue_failed[index]:
            return
        try:
            (self._paths[index] or self._open_path(index)).drain()
        except QueueError as err:
            self.fail_queue(index, err)

    def _open_path(self, index: int) -> "BlkPath":
        """Queue `index`'s ring path, with the backend's batch I/O (kept once the queue is ready)."""
        from .backends.raw_batch import LoopBlockIO
        from .blk_path import BlkPath

        queue = self.queues[index]
        io = None
        if self._batches and queue.ready:
            open_batch_io = getattr(self.backend, "open_batch_io", None)
            io = open_batch_io() if open_batch_io is not None else LoopBlockIO(self.backend)
        path = BlkPath(queue, io, capacity=self.capacity, read_only=self.read_only, counters=self.counters[index],
                       complete=self.complete_request, chain_error=partial(self._on_chain_error, queue),
                       publish=partial(self.publish_and_notify, index), io_error=self._batch_io_error)
        if queue.ready:
            self._paths[index] = path
        return path

    def _batch_io_error(self, err: int) -> None:
        self._io_error("%s: I/O error on %s: %s", self.name, getattr(self.backend, "path", "disk"), os.strerror(err))

    def complete_request(self, chain: DescriptorChain, counters: QueueCounters | None = None) -> int:
        """Execute one request, write its status byte; return the used length.  `counters` (the
        queue's) count it: a request, its data bytes either way, or an error."""
        counters = counters or QueueCounters()
        counters.requests += 1
        writable = chain.writable
        if not writable:
            self._guest_error("%s: request %d has no device-writable status byte", self.name, chain.head)
            counters.errors += 1
            return 0
        try:
            status, written = VIRTIO_BLK_S_OK, self._execute(chain)
            counters.bytes += written + max(0, chain.readable_len - REQ_HEADER.size)
        except _BadRequest as err:
            self._guest_error("%s: request %d: %s", self.name, chain.head, err)
            status, written = err.status, 0
            counters.errors += 1
        except OSError as err:
            self._io_error("%s: I/O error on %s: %s", self.name, getattr(self.backend, "path", "disk"), err)
            status, written = VIRTIO_BLK_S_IOERR, 0
            counters.errors += 1
        mem = self.mem
        gpa, length = writable[-1]
        mem.buffer[mem.offset(gpa + length - 1, 1)] = status
        return written + 1

    def _execute(self, chain: DescriptorChain) -> int:
        """Parse the header and run the request; return the data bytes written to the driver."""
        mem = self.mem
        readable = chain.readable
        if chain.readable_len < REQ_HEADER.size:
            raise _BadRequest(f"header is {chain.readable_len} bytes, not {REQ_HEADER.size}")
        gpa, length = readable[0]
        if length >= REQ_HEADER.size:
            rtype, _, sector = REQ_HEADER.unpack_from(mem.buffer, mem.offset(gpa, REQ_HEADER.size))
        else:
            rtype, _, sector = REQ_HEADER.unpack(_gather(mem, readable, 0, REQ_HEADER.size))
        handler = self._handlers.get(rtype)
        if handler is None:
            raise _BadRequest(f"unsupported request type {rtype}", VIRTIO_BLK_S_UNSUPP)
        return handler(chain, sector)

    def _data_range(self, sector: int, length: int) -> int:
        """Check an IN/OUT data length and range; return its byte offset on the disk."""
        if length & (SECTOR_SIZE - 1):
            raise _BadRequest(f"data length {length} is not a multiple of {SECTOR_SIZE}")
        if sector + (length >> SECTOR_SHIFT) > self.capacity:
            raise _BadRequest(f"sectors {sector}+{length >> SECTOR_SHIFT} are beyond the capacity {self.capacity}")
        return sector << SECTOR_SHIFT

    def _read(self, chain: DescriptorChain, sector: int) -> int:
        if chain.readable_len != REQ_HEADER.size:
            raise _BadRequest("read request with device-readable data")
        length = chain.writable_len - 1
        offset = self._data_range(sector, length)
        if length:
            self.backend.readv(_views(self.mem, chain.writable, 0, length), offset)
        return length

    def _write(self, chain: DescriptorChain, sector: int) -> int:
        if self.read_only:
            raise _BadRequest("write to a read-only disk")
        if chain.writable_len != 1:
            raise _BadRequest("write request with device-writable data")
        length = chain.readable_len - REQ_HEADER.size
        offset = self._data_range(sector, length)
        if length:
            self.backend.writev(_views(self.mem, chain.readable, REQ_HEADER.size, chain.readable_len), offset)
        return 0

    def _flush(self, chain: DescriptorChain, sector: int) -> int:
        self.backend.flush()  # the request completes only once the data is stable
        return 0

    def _get_id(self, chain: DescriptorChain, sector: int) -> int:
        """The serial, NUL-padded to 20 bytes, cut to the driver's buffer."""
        length = min(chain.writable_len - 1, VIRTIO_BLK_ID_BYTES)
        ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        pos = 0
        for view in _views(self.mem, chain.writable, 0, length):
            view[:] = ident[pos : pos + len(view)]
            pos += len(view)
        return length

    def _discard(self, chain: DescriptorChain, sector: int) -> int:
        for offset, length, _ in self._segments(chain, VIRTIO_BLK_T_DISCARD, self.discard):
            self.backend.discard(offset, length)
        return 0

    def _write_zeroes(self, chain: DescriptorChain, sector: int) -> int:
        for offset, length, unmap in self._segments(chain, VIRTIO_BLK_T_WRITE_ZEROES, self.write_zeroes):
            self.backend.write_zeroes(offset, length, unmap)
        return 0

    def _segments(self, chain: DescriptorChain, rtype: int, offered: bool) -> list[tuple[int, int, bool]]:
        """The checked segments of a DISCARD / WRITE_ZEROES request as (offset, length, unmap) in bytes.

        Every segment is checked before any is carried out.
        """
        name = "discard" if rtype == VIRTIO_BLK_T_DISCARD else "write-zeroes"
        if self.read_only:
            raise _BadRequest(f"{name} on a read-only disk")
        if not offered:
            raise _BadRequest(f"{name} is not supported by this disk", VIRTIO_BLK_S_UNSUPP)
        if chain.writable_len != 1:
            raise _BadRequest(f"{name} request with device-writable data")
        length = chain.readable_len - REQ_HEADER.size
        count, rest = divmod(length, DISCARD_SEGMENT.size)
        if rest or not 1 <= count <= MAX_DISCARD_SEGMENTS:
            raise _BadRequest(f"{name} data of {length} bytes is not 1 to {MAX_DISCARD_SEGMENTS} segments")
        # Only WRITE_ZEROES has a flag (unmap); any other bit is unknown: UNSUPP (5.2.6.2).
        known_flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if rtype == VIRTIO_BLK_T_WRITE_ZEROES else 0
        segments = []
        data = _gather(self.mem, chain.readable, REQ_HEADER.size, chain.readable_len)
        for sector, num_sectors, flags in DISCARD_SEGMENT.iter_unpack(data):
            if flags & ~known_flags:
                raise _BadRequest(f"{name} segment with unsupported flags {flags:#x}", VIRTIO_BLK_S_UNSUPP)
            if num_sectors > MAX_DISCARD_SECTORS or sector + num_sectors > self.capacity:
                raise _BadRequest(f"{name} of sectors {sector}+{num_sectors}: beyond the capacity or the limit")
            segments.append((sector << SECTOR_SHIFT, num_sectors << SECTOR_SHIFT, bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)))
        return segments
