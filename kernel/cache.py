"""Decompressed kernels kept on disk, so a second boot of a bzImage skips its decompression.

    cache = KernelCache(Path("~/.cache/pyvmm/vmlinux").expanduser())
    vmlinux = cache.vmlinux(path, bzimage_bytes, decompress)   # bytes, or the cached file, open

An entry is the vmlinux ELF of one bzImage, named by the SHA-256 of the bzImage's bytes and
its own length (`<sha256>-<length>.vmlinux`): a file cut short (a crash while writing, a full
disk) has the wrong length and is ignored.  So that a boot need not hash the bzImage, a
symbolic link `by-stat/<device-inode-size-mtime-ctime>` points at the entry of the file as it
was when hashed (any change to the file changes its ctime, which no one can set).  An entry whose
ELF headers do not hold together (damaged on disk) is thrown away and the kernel decompressed again.

Safe with concurrent writers: each writes its own temporary file and renames it into place
(rename is atomic; two writers of one kernel write the same bytes).  Every failure of the
cache (no home, read-only or full disk) costs only the time saved: the kernel is then
decompressed in memory as without a cache.  At most `max_entries` kernels are kept, the
least recently used go first.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import BinaryIO, Callable

from .elf import parse_elf
from .errors import KernelImageError

log = logging.getLogger(__name__)

SUFFIX = ".vmlinux"
BY_STAT = "by-stat"
DEFAULT_MAX_ENTRIES = 8
HEADER_BYTES = 64 * 1024  # what is read to check an entry's ELF and program headers
STALE_TMP_NS = 3600 * 10**9


def stat_key(st: os.stat_result) -> str:
    """What identifies one version of a file without reading it."""
    return f"{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ctime_ns:x}"


class KernelCache:
    def __init__(self, directory: Path, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.directory = Path(directory)
        self.max_entries = max_entries

    def vmlinux(self, path: str, bzimage: bytes, decompress: Callable[[], bytes]) -> bytes | BinaryIO:
        """The vmlinux of the bzImage at `path` (whose bytes are `bzimage`): the cached file, open
        for reading (the caller closes it), or `decompress()`ed and stored for next time."""
        try:
            key = stat_key(os.stat(path))
        except OSError:
            key = None
        cached = self._open(self.directory / BY_STAT / key) if key else None
        if cached is not None:
            return cached
        import hashlib  # (here: a boot that finds its kernel by stat does without it)

        name = hashlib.sha256(bzimage).hexdigest()
        entry = next(self.directory.glob(f"{name}-*{SUFFIX}"), None) if self.directory.is_dir() else None
        cached = self._open(entry) if entry is not None else None
        if cached is not None:
            self._link(key, entry)
            return cached
        data = decompress()
        entry = self._store(name, data)
        if entry is not None:
            self._link(key, entry)
            self._prune()
        return data

    def _open(self, entry: Path) -> BinaryIO | None:
        """A cached vmlinux open for reading, or None where there is none (or a damaged one)."""
        try:
            f = open(entry, "rb")
        except OSError:
            return None
        try:
            size = os.fstat(f.fileno()).st_size
            if size == 0 or not os.path.realpath(entry).endswith(f"-{size}{SUFFIX}"):
                f.close()  # cut short
                return None
            parse_elf(os.pread(f.fileno(), HEADER_BYTES, 0), file_size=size)
            os.utime(f.fileno())  # recently used
            return f
        except KernelImageError:  # damaged (not by us: entries are renamed in whole): thrown away
            log.info("kernel cache %s: %s is damaged; decompressing again", self.directory, entry)
            f.close()
            _unlink(Path(os.path.realpath(entry)))
            return None
        except OSError:
            f.close()
            return None

    def _store(self, name: str, data: bytes) -> Path | None:
        entry = self.directory / f"{name}-{len(data)}{SUFFIX}"
        tmp = None
        try:
            (self.directory / BY_STAT).mkdir(parents=True, exist_ok=True)
            import tempfile

            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, entry)
            return entry
        except OSError as e:
            log.info("kernel cache %s: cannot store a decompressed kernel: %s", self.directory, e.strerror or e)
            if tmp is not None:
                _unlink(Path(tmp))
            return None

    def _link(self, key: str | None, entry: Path) -> None:
        if key is None:
            return
        link = self.directory / BY_STAT / key
        tmp = self.directory / BY_STAT / f".tmp-{os.getpid()}-{key}"
        try:
            (self.directory / BY_STAT).mkdir(parents=True, exist_ok=True)
            _unlink(tmp)
            os.symlink(os.path.join("..", entry.name), tmp)
            os.replace(tmp, link)
        except OSError as e:
            log.info("kernel cache %s: cannot index %s: %s", self.directory, entry.name, e.strerror or e)
            _unlink(tmp)

    def _prune(self) -> None:
        """Keep the `max_entries` most recently used kernels; drop links to the others, and what
        writers that died left (temporary files older than an hour)."""
        try:
            entries = sorted(self.directory.glob(f"*{SUFFIX}"), key=_mtime, reverse=True)
            for old in entries[self.max_entries :]:
                _unlink(old)
            for tmp in self.directory.glob(".tmp-*"):
                if _mtime(tmp) < time.time_ns() - STALE_TMP_NS:
                    _unlink(tmp)
            for link in (self.directory / BY_STAT).iterdir():
                if not link.exists():  # (a link whose entry is gone)
                    _unlink(link)
        except OSError as e:
            log.info("kernel cache %s: cannot prune: %s", self.directory, e.strerror or e)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
