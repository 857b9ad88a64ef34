"""virtio/backends: where a device's bytes go (disk images, tap devices).

A backend knows nothing of virtio: a block device hands it memoryviews and a
byte offset, never a descriptor.  `BlockBackend` is what virtio/blk.py expects
of a disk; virtio/backends/raw.py's `RawImage` is the one implementation.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class BlockBackend(Protocol):
    """A disk as the virtio-blk device uses it.

    Sizes and offsets are in bytes.  Every I/O method either does all of the
    work or raises OSError (the device turns that into VIRTIO_BLK_S_IOERR).
    The methods may be called from several threads at once (one per queue).
    """

    size: int  # bytes the guest may address
    read_only: bool
    logical_block_size: int  # the smallest unit of I/O the disk does natively (512 or 4096)
    physical_block_size: int  # a hint: its internal block size (>= logical_block_size)
    supports_discard: bool  # discard() can deallocate
    supports_write_zeroes: bool  # write_zeroes() works (efficiently or not)

    def readv(self, views: Sequence[memoryview], offset: int) -> None:
        """Fill `views`, in order, from the disk starting at `offset`."""

    def writev(self, views: Sequence[memoryview], offset: int) -> None:
        """Write `views`, in order, to the disk starting at `offset`."""

    def flush(self) -> None:
        """Return once every completed write is on stable storage."""

    def discard(self, offset: int, length: int) -> None:
        """A hint that the range is no longer needed; its contents become undefined."""

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make the range read as zeroes; `unmap` allows deallocating it."""

    # A backend may also have open_batch_io() -> a raw_batch.BlockBatchIO (many requests per
    # call, e.g. through io_uring); the device calls it once per queue, and otherwise moves a
    # batch's requests with readv / writev one by one (raw_batch.LoopBlockIO).

    def close(self) -> None: ...
