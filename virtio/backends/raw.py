"""A raw disk image: a regular file or a block device, byte for byte what the guest sees.

    image = RawImage.open("disk.img", cache="none")
    image.readv([view1, view2], offset)     # os.preadv straight into the views
    image.writev([view], offset)
    image.flush()                           # fdatasync
    io = image.open_batch_io()              # many requests per call (raw_batch.py: io_uring)
    image.discard(offset, length)           # punch a hole
    image.write_zeroes(offset, length, unmap=False)
    image.close()

This module knows nothing of virtio; it takes memoryviews (of guest RAM, but it
does not know that) and byte offsets.

Locking: `open` takes an flock on the image - exclusive for a writable image,
shared for a read-only one - so two VMs cannot write one image, nor one read an
image another is writing.  flock locks belong to the open file description, so
two opens in one process conflict just as two processes do.  The lock goes
with the file descriptor on close (or when the process dies).

Cache modes:
  * "writeback" (default): buffered I/O through the host page cache; a guest
    flush request becomes fdatasync.
  * "none": O_DIRECT, bypassing the host page cache.  O_DIRECT wants the file
    offset, the length and every buffer's address aligned (the offset and
    length to the disk's logical block size; the buffers to a DMA alignment).
    Guest requests usually are (page-cache pages, 512-byte sectors), and go
    straight through; the others - a buffer at an odd address, a 512-byte
    request on a disk that wants 4096 - go through an aligned bounce buffer,
    which costs a copy, and for a partial-block write a read-modify-write of
    the blocks at either end.  The alignment comes from statx(STATX_DIOALIGN)
    where the kernel reports it (Linux 6.1+, e.g. ext4, xfs), BLKSSZGET for a
    block device, else a safe 4096.
    A filesystem that refuses O_DIRECT (tmpfs before Linux 6.6, so /dev/shm,
    answers EINVAL at open) gets buffered I/O with a warning: on tmpfs the page
    cache *is* the storage, so there is nothing to bypass.  `direct` says what
    was obtained.

The Python `fcntl` module is not used (a project rule): flock, fallocate,
ioctl and statx are called in libc through ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import stat
import struct
import threading
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # (numpy and io_uring are loaded only when a device takes the batch path)
    from .raw_batch import BlockBatchIO

from .errors import ImageError

log = logging.getLogger(__name__)

SECTOR_SIZE = 512

CACHE_MODES = ("writeback", "none")

# <sys/file.h>
LOCK_SH = 1
LOCK_EX = 2
LOCK_NB = 4

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# <linux/fs.h> block device ioctls: _IO(0x12, 104), _IO(0x12, 123)
BLKSSZGET = 0x1268  # logical sector size (int)
BLKPBSZGET = 0x127B  # physical sector size (unsigned int)

# statx(2): the direct I/O alignment (Linux 6.1+)
AT_EMPTY_PATH = 0x1000
STATX_DIOALIGN = 0x2000
_STATX_SIZE = 256  # sizeof(struct statx)
_STATX_MASK = struct.Struct("<I")  # stx_mask at offset 0
_STATX_DIOALIGN = struct.Struct("<II")  # stx_dio_mem_align, stx_dio_offset_align at offset 152
_STATX_DIOALIGN_OFFSET = 152

# The alignment assumed for O_DIRECT when the kernel does not say.
DEFAULT_DIRECT_ALIGN = 4096
# The bounce buffer for unaligned O_DIRECT requests; bigger requests go through it in pieces.
BOUNCE_SIZE = 1 << 20
# Most iovecs one preadv/pwritev takes (Linux's UIO_MAXIOV).
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024

_libc = ctypes.CDLL(None, use_errno=True)
_flock = _libc.flock
_flock.argtypes = [ctypes.c_int, ctypes.c_int]
_flock.restype = ctypes.c_int
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int
_statx = getattr(_libc, "statx", None)  # glibc 2.28+
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    _statx.restype = ctypes.c_int


class ImageLockedError(ImageError):
    """Another VM (another open of the image) holds a conflicting lock."""

    def __init__(self, path: str, read_only: bool = False):
        how = "read it" if read_only else "write it"
        super().__init__(
            f"disk image {path} is in use by another VM (it is locked); cannot {how}. "
            "Stop the other VM, or share the image read-only (readonly=on) with every VM using it"
        )
        self.path = path


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError (EOPNOTSUPP where the filesystem cannot do `mode`)."""
    if _fallocate(fd, mode, offset, length) != 0:
        _raise_errno(f"fallocate(mode={mode:#x}, {offset:#x}+{length:#x})")


def _ioctl_int(fd: int, request: int, ctype: type) -> int:
    value = ctype(0)
    if _ioctl(fd, request, ctypes.byref(value)) != 0:
        _raise_errno(f"ioctl({request:#x})")
    return value.value


def _direct_io_alignment(fd: int) -> tuple[int, int] | None:
    """(memory alignment, offset alignment) for O_DIRECT on fd, if the kernel reports them."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(fd, b"", AT_EMPTY_PATH, STATX_DIOALIGN, buf) != 0:
        return None
    (mask,) = _STATX_MASK.unpack_from(buf, 0)
    if not mask & STATX_DIOALIGN:
        return None
    mem_align, offset_align = _STATX_DIOALIGN.unpack_from(buf, _STATX_DIOALIGN_OFFSET)
    if not mem_align or not offset_align:  # 0: direct I/O is not supported there
        return None
    return mem_align, offset_align


def _buffer_address(view: memoryview) -> int:
    """The address of a writable buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _advance(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """The views without their first n bytes (a new list; the views are not changed)."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = list(views[i:])
    if n:
        rest[0] = rest[0][n:]
    return rest


def transfer_all(call: Callable, fd: int, views: Sequence[memoryview], offset: int) -> None:
    """os.preadv / os.pwritev `views` at `offset` until every byte is done.

    A short transfer (a signal, a filesystem's whim) is retried from where it
    stopped; more than IOV_MAX views go in several calls.  End of file (a
    transfer of 0 bytes) raises OSError(EIO): a raw image does not end before
    its size.
    """
    total = sum(map(len, views))
    while total:
        done = call(fd, views if len(views) <= IOV_MAX else views[:IOV_MAX], offset)
        if done == total:
            return
        if done <= 0:
            raise OSError(errno.EIO, f"unexpected end of the image at offset {offset:#x}")
        total -= done
        offset += done
        views = _advance(views, done)


class _ViewCursor:
    """A position in a list of views, for copying them to or from a contiguous buffer in pieces."""

    __slots__ = ("views", "index", "offset")

    def __init__(self, views: Sequence[memoryview]):
        self.views = views
        self.index = 0
        self.offset = 0

    def copy(self, buf: memoryview, *, into_views: bool) -> None:
        """Copy len(buf) bytes between buf and the views from the cursor on, and move on."""
        pos = 0
        while pos < len(buf):
            view = self.views[self.index]
            n = min(len(view) - self.offset, len(buf) - pos)
            if into_views:
                view[self.offset : self.offset + n] = buf[pos : pos + n]
            else:
                buf[pos : pos + n] = view[self.offset : self.offset + n]
            pos += n
            self.offset += n
            if self.offset == len(view):
                self.index += 1
                self.offset = 0


class RawImage:
    """An open raw image.  Use RawImage.open(); see the module docstring."""

    supports_write_zeroes = True  # with fallocate, or by writing zeroes

    def __init__(
        self,
        fd: int,
        path: str,
        *,
        size: int,
        read_only: bool,
        direct: bool,
        block_device: bool,
        logical_block_size: int = SECTOR_SIZE,
        physical_block_size: int = 4096,
        mem_align: int = 1,
        offset_align: int = 1,
    ):
        self.fd = fd
        self.path = path
        self.size = size
        self.read_only = read_only
        self.direct = direct
        self.cache = "none" if direct else "writeback"
        self.block_device = block_device
        self.logical_block_size = logical_block_size
        self.physical_block_size = physical_block_size
        self.mem_align = mem_align
        self.offset_align = offset_align
        self.supports_discard = False
        # Whether the file does I/O without blocking when asked to (RWF_NOWAIT; FMODE_NOWAIT in the
        # kernel), for reads and for writes.  Where it does not (tmpfs; ext4's buffered writes),
        # io_uring hands every request to a kernel worker thread (io-wq), which costs more than a
        # preadv / pwritev of our own (raw_batch.py chooses by these).
        self.nowait_reads = self.nowait_writes = False
        self.bounced = 0  # requests that went through the bounce buffer (cache=none)
        self._zero_range_ok = True
        self._bounce: mmap.mmap | None = None
        self._bounce_lock = threading.Lock()
        self._zeroes: mmap.mmap | None = None

    # -- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, *, read_only: bool = False, cache: str = "writeback") -> "RawImage":
        """Open and lock a raw image; raises ImageError with a message fit for the user."""
        if cache not in CACHE_MODES:
            raise ValueError(f"cache mode {cache!r} is not one of {', '.join(CACHE_MODES)}")
        path = os.fspath(path)
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        fd, direct = cls._open_fd(path, flags, cache == "none", read_only)
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                block_device = True
            elif stat.S_ISREG(st.st_mode):
                block_device = False
            else:
                raise ImageError(f"disk image {path} is not a regular file or a block device")
            if _flock(fd, (LOCK_SH if read_only else LOCK_EX) | LOCK_NB) != 0:
                err = ctypes.get_errno()
                if err in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise ImageLockedError(path, read_only)
                raise ImageError(f"cannot lock disk image {path}: {os.strerror(err)}")
            image = cls._describe(fd, path, st, read_only=read_only, direct=direct, block_device=block_device)
        except OSError as err:
            os.close(fd)
            raise ImageError(f"cannot use disk image {path}: {err.strerror or err}") from None
        except BaseException:
            os.close(fd)
            raise
        if not read_only:
            image.supports_discard = image._probe_discard()
        image.nowait_reads, image.nowait_writes = image._probe_nowait()
        return image

    @staticmethod
    def _open_fd(path: str, flags: int, direct: bool, read_only: bool) -> tuple[int, bool]:
        """The file descriptor, and whether it has O_DIRECT."""
        try:
            if direct:
                try:
                    return os.open(path, flags | os.O_DIRECT), True
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    log.warning(
                        "%s: the filesystem does not support O_DIRECT (cache=none); using buffered I/O "
                        "(cache=writeback) instead",
                        path,
                    )
            return os.open(path, flags), False
        except FileNotFoundError:
            raise ImageError(f"disk image {path} does not exist") from None
        except PermissionError:
            hint = "" if read_only else " (for read-only access, add readonly=on)"
            raise ImageError(f"no permission to open disk image {path}{hint}") from None
        except IsADirectoryError:
            raise ImageError(f"disk image {path} is a directory") from None
        except OSError as err:
            raise ImageError(f"cannot open disk image {path}: {err.strerror}") from None

    @classmethod
    def _describe(
        cls, fd: int, path: str, st: os.stat_result, *, read_only: bool, direct: bool, block_device: bool
    ) -> "RawImage":
        """Size and block sizes of the open image."""
        if block_device:
            size = os.lseek(fd, 0, os.SEEK_END)  # what ioctl BLKGETSIZE64 says, without an ioctl
            logical = _ioctl_int(fd, BLKSSZGET, ctypes.c_int)
            physical = _ioctl_int(fd, BLKPBSZGET, ctypes.c_uint)
        else:
            size = st.st_size
            logical = SECTOR_SIZE
            physical = st.st_blksize
        mem_align = offset_align = 1
        if direct:
            reported = _direct_io_alignment(fd)
            if reported is not None:
                mem_align, offset_align = reported
                # A disk that cannot do 512-byte direct I/O (a 4K-native disk) tells the guest so.
                logical = max(logical, offset_align)
            elif block_device:
                mem_align = offset_align = logical
            else:
                mem_align = offset_align = DEFAULT_DIRECT_ALIGN
        physical = max(physical, logical)
        if physical & (physical - 1) or physical > 65536:
            physical = logical

        usable = size - size % SECTOR_SIZE
        if direct:
            # The last partial block could only be written by extending the file.
            usable -= usable % offset_align
        if usable != size:
            log.warning(
                "%s: size %d is not a multiple of %d; the guest sees only the first %d bytes",
                path, size, offset_align if direct else SECTOR_SIZE, usable,
            )
        return cls(
            fd,
            path,
            size=usable,
            read_only=read_only,
            direct=direct,
            block_device=block_device,
            logical_block_size=logical,
            physical_block_size=physical,
            mem_align=mem_align,
            offset_align=offset_align,
        )

    def _probe_discard(self) -> bool:
        """Can this file punch holes?  Asked beyond the end of the file, so nothing changes."""
        if self.block_device:
            return True  # Linux 4.9+ punches holes in block devices; a failure later is only a hint lost
        probe_at = _round_up(max(self.size, 1), 1 << 20) + (1 << 20)
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, probe_at, 4096)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                log.debug("%s: discard probe: %s", self.path, err)
            return False
        return True

    def _probe_nowait(self) -> tuple[bool, bool]:
        """(reads, writes): does the file take RWF_NOWAIT, or answer EOPNOTSUPP?  Asked of the
        first block: read, and for a regular file written back unchanged (at open: the guest is not
        running yet, and the lock keeps other VMs out); a block device is not written (a disk takes
        RWF_NOWAIT both ways or neither).  Data or EAGAIN (it would have to wait) both say yes."""
        block = max(self.offset_align, SECTOR_SIZE)
        if self.size < block:
            return False, False
        buf = mmap.mmap(-1, _round_up(block, mmap.PAGESIZE))  # page-aligned, for O_DIRECT too
        try:
            view = memoryview(buf)[:block]
            try:
                reads = self._nowait_ok(os.preadv, view)
                if self.read_only or self.block_device:
                    return reads, reads and not self.read_only
                transfer_all(os.preadv, self.fd, [view], 0)
                return reads, self._nowait_ok(os.pwritev, view)
            finally:
                view.release()
        except OSError as err:
            log.debug("%s: RWF_NOWAIT probe: %s", self.path, err)
            return False, False
        finally:
            buf.close()

    def _nowait_ok(self, call: Callable, view: memoryview) -> bool:
        try:
            call(self.fd, [view], 0, os.RWF_NOWAIT)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return False
            if err.errno != errno.EAGAIN:
                raise
        return True

    # -- I/O ----------------------------------------------------------------------
    def readv(self, views: Sequence[memoryview], offset: int) -> None:
        if self.direct:
            self._direct_io(os.preadv, views, offset)
        else:
            transfer_all(os.preadv, self.fd, views, offset)

    def writev(self, views: Sequence[memoryview], offset: int) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is open read-only")
        if self.direct:
            self._direct_io(os.pwritev, views, offset)
        else:
            transfer_all(os.pwritev, self.fd, views, offset)

    def open_batch_io(self) -> "BlockBatchIO":
        """The batch I/O of one queue (raw_batch.py): many requests per call, through io_uring where
        the kernel has it.  Close it before the image (an io_uring holds the file, and its lock)."""
        from .raw_batch import open_batch_io

        return open_batch_io(self, self.fd, nowait_reads=self.nowait_reads, nowait_writes=self.nowait_writes)

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole (the file keeps its size).  Only a hint: where holes cannot be punched, nothing happens."""
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is open read-only")
        if not self.supports_discard or length == 0:
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as err:
            if err.errno != errno.EOPNOTSUPP:
                raise
            self.supports_discard = False

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero a range: punch a hole if `unmap` allows it, else FALLOC_FL_ZERO_RANGE, else write zeroes."""
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is open read-only")
        if length == 0:
            return
        if unmap and self.supports_discard:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as err:
                if err.errno != errno.EOPNOTSUPP:
                    raise
                self.supports_discard = False
        if self._zero_range_ok:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as err:
                if err.errno != errno.EOPNOTSUPP:
                    raise
                self._zero_range_ok = False  # e.g. tmpfs
        self._write_zero_bytes(offset, length)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        if self._zeroes is None:
            self._zeroes = mmap.mmap(-1, BOUNCE_SIZE)  # page-aligned, so fine for O_DIRECT too
        zeroes = memoryview(self._zeroes)
        end = offset + length
        while offset < end:
            n = min(BOUNCE_SIZE, end - offset)
            self.writev([zeroes[:n]], offset)
            offset += n

    # -- O_DIRECT ------------------------------------------------------------------
    def _direct_io(self, call: Callable, views: Sequence[memoryview], offset: int) -> None:
        if self._aligned(views, offset):
            try:
                transfer_all(call, self.fd, views, offset)
                return
            except OSError as err:
                if err.errno != errno.EINVAL:  # the kernel wanted more alignment than we thought
                    raise
        self._bounce_io(call is os.pwritev, views, offset)

    def _aligned(self, views: Sequence[memoryview], offset: int) -> bool:
        """Can these go to O_DIRECT as they are?"""
        off_mask = self.offset_align - 1
        mem_mask = self.mem_align - 1
        if offset & off_mask:
            return False
        total = 0
        for view in views:
            length = len(view)
            total += length
            if length & mem_mask or view.readonly or _buffer_address(view) & mem_mask:
                return False
        return not total & off_mask

    def _bounce_io(self, write: bool, views: Sequence[memoryview], offset: int) -> None:
        """O_DIRECT through an aligned buffer, for requests whose buffers or range are not aligned.

        The request goes in pieces of at most BOUNCE_SIZE, each widened to whole
        aligned blocks.  A write first reads back a partial block at either end
        (read-modify-write).  One bounce buffer per image, under a lock, which
        also keeps two partial-block writes to one block from undoing each other.
        """
        align = self.offset_align
        fd = self.fd
        total = sum(map(len, views))
        cursor = _ViewCursor(views)
        with self._bounce_lock:
            if self._bounce is None:
                self._bounce = mmap.mmap(-1, max(BOUNCE_SIZE, 2 * align))  # page-aligned
            bounce = memoryview(self._bounce)
            try:
                done = 0
                while done < total:
                    start = offset + done
                    head = start % align  # bytes of the first block before the request
                    block_start = start - head
                    n = min(total - done, len(bounce) - head)  # request bytes in this piece
                    span = _round_up(head + n, align)  # whole blocks in this piece
                    if write:
                        if head:
                            transfer_all(os.preadv, fd, [bounce[:align]], block_start)
                        if (head + n) % align and (span > align or not head):
                            transfer_all(os.preadv, fd, [bounce[span - align : span]], block_start + span - align)
                        cursor.copy(bounce[head : head + n], into_views=False)
                        transfer_all(os.pwritev, fd, [bounce[:span]], block_start)
                    else:
                        transfer_all(os.preadv, fd, [bounce[:span]], block_start)
                        cursor.copy(bounce[head : head + n], into_views=True)
                    done += n
            finally:
                bounce.release()
            self.bounced += 1

    # -- lifetime ------------------------------------------------------------------
    def close(self) -> None:
        """Close the image, which releases its lock."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for buf in (self._bounce, self._zeroes):
            if buf is not None:
                buf.close()
        self._bounce = self._zeroes = None

    def __enter__(self) -> "RawImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"RawImage({self.path!r}, {mode}, cache={self.cache}, size={self.size})"

