"""kernel/cache.py: decompressed kernels on disk, and load_linux taking its kernel from there
(its segments and the initrd loaded side by side in threads)."""

import errno
import gzip
import hashlib
import logging
import os
import threading
import time

import pytest

from kernel import cache as cache_mod
from kernel.cache import BY_STAT, SUFFIX, KernelCache
from kernel.errors import KernelImageError
from kernel.linux import load_linux
from tests.unit.test_bzimage import make_bzimage
from tests.unit.test_elf import make_kernel_like_elf
from vmm.memory import GuestMemory

MiB = 1 << 20


def vmlinux(tag: bytes) -> bytes:
    """A small valid vmlinux-like ELF whose code is `tag` (entries are checked as ELF files)."""
    return make_kernel_like_elf(text=tag + b"\xf4")


class Counting:
    """A decompress() that counts its calls."""

    def __init__(self, data: bytes):
        self.data, self.calls = data, 0

    def __call__(self) -> bytes:
        self.calls += 1
        return self.data


@pytest.fixture
def bzimage(tmp_path):
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"a bzImage " * 1000)
    return path


def content(vmlinux) -> bytes:
    """What KernelCache.vmlinux gave: bytes (decompressed now) or the cached file (read, closed)."""
    if isinstance(vmlinux, bytes):
        return vmlinux
    with vmlinux:
        return vmlinux.read()


def entries(directory):
    return sorted(p.name for p in directory.glob(f"*{SUFFIX}"))


def test_a_second_boot_takes_the_kernel_from_the_cache(tmp_path, bzimage):
    cache, decompress = KernelCache(tmp_path / "c"), Counting(vmlinux(b"vmlinux bytes"))
    assert cache.vmlinux(str(bzimage), bzimage.read_bytes(), decompress) == vmlinux(b"vmlinux bytes")
    again = cache.vmlinux(str(bzimage), bzimage.read_bytes(), decompress)
    assert not isinstance(again, bytes) and content(again) == vmlinux(b"vmlinux bytes")
    assert decompress.calls == 1
    digest = hashlib.sha256(bzimage.read_bytes()).hexdigest()
    size = len(vmlinux(b"vmlinux bytes"))
    assert entries(tmp_path / "c") == [f"{digest}-{size}{SUFFIX}"]  # (the length: one cut short is seen)


def test_the_entry_is_found_by_content_when_the_file_is_new(tmp_path, bzimage):
    """A copy of the same bzImage (another inode) hashes to the same entry: no decompression."""
    cache, decompress = KernelCache(tmp_path / "c"), Counting(vmlinux(b"v"))
    cache.vmlinux(str(bzimage), bzimage.read_bytes(), decompress)
    copy = tmp_path / "copy"
    copy.write_bytes(bzimage.read_bytes())
    assert content(cache.vmlinux(str(copy), copy.read_bytes(), decompress)) == vmlinux(b"v")
    assert decompress.calls == 1
    assert len(list((tmp_path / "c" / BY_STAT).iterdir())) == 2  # both files indexed by their stat


def test_a_changed_bzimage_is_decompressed_again(tmp_path, bzimage):
    cache = KernelCache(tmp_path / "c")
    cache.vmlinux(str(bzimage), bzimage.read_bytes(), Counting(vmlinux(b"old")))
    bzimage.write_bytes(b"another kernel " * 700)  # same path, new bytes (and ctime)
    new = Counting(vmlinux(b"new"))
    assert content(cache.vmlinux(str(bzimage), bzimage.read_bytes(), new)) == vmlinux(b"new") and new.calls == 1
    assert content(cache.vmlinux(str(bzimage), bzimage.read_bytes(), new)) == vmlinux(b"new") and new.calls == 1


def test_an_entry_cut_short_is_not_used(tmp_path, bzimage):
    cache = KernelCache(tmp_path / "c")
    cache.vmlinux(str(bzimage), bzimage.read_bytes(), Counting(vmlinux(b"complete kernel")))
    (entry,) = (tmp_path / "c").glob(f"*{SUFFIX}")
    entry.write_bytes(vmlinux(b"complete kernel")[:40])  # a crash while writing, a full disk
    again = Counting(vmlinux(b"complete kernel"))
    assert content(cache.vmlinux(str(bzimage), bzimage.read_bytes(), again)) == vmlinux(b"complete kernel")
    assert again.calls == 1
    assert (tmp_path / "c" / entry.name).read_bytes() == vmlinux(b"complete kernel")  # stored again


def test_a_damaged_entry_is_thrown_away_and_the_kernel_decompressed_again(tmp_path, bzimage, caplog):
    """Entries are renamed into place whole; one whose headers no longer hold together was damaged on
    disk: it is not handed to the loader, and the next store replaces it."""
    cache = KernelCache(tmp_path / "c")
    cache.vmlinux(str(bzimage), bzimage.read_bytes(), Counting(vmlinux(b"good kernel")))
    (entry,) = (tmp_path / "c").glob(f"*{SUFFIX}")
    damaged = bytearray(entry.read_bytes())
    damaged[32:40] = (1 << 40).to_bytes(8, "little")  # e_phoff far past the end
    entry.write_bytes(bytes(damaged))  # (same length)
    again = Counting(vmlinux(b"good kernel"))
    with caplog.at_level(logging.INFO, logger=cache_mod.__name__):
        assert content(cache.vmlinux(str(bzimage), bzimage.read_bytes(), again)) == vmlinux(b"good kernel")
    assert again.calls == 1 and "is damaged" in caplog.text
    assert entry.read_bytes() == vmlinux(b"good kernel")  # stored again
    assert content(cache.vmlinux(str(bzimage), bzimage.read_bytes(), again)) == vmlinux(b"good kernel")
    assert again.calls == 1


def test_a_full_disk_costs_only_the_time(tmp_path, bzimage, monkeypatch, caplog):
    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_mod.os, "replace", full)
    cache, decompress = KernelCache(tmp_path / "c"), Counting(vmlinux(b"kernel"))
    with caplog.at_level(logging.INFO, logger=cache_mod.__name__):
        assert cache.vmlinux(str(bzimage), bzimage.read_bytes(), decompress) == vmlinux(b"kernel")
    assert entries(tmp_path / "c") == [] and not list((tmp_path / "c").glob(".tmp-*"))
    assert "No space left on device" in caplog.text


def test_no_cache_directory_costs_only_the_time(tmp_path, bzimage):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache, decompress = KernelCache(blocker / "c"), Counting(vmlinux(b"kernel"))
    assert cache.vmlinux(str(bzimage), bzimage.read_bytes(), decompress) == vmlinux(b"kernel")
    assert cache.vmlinux(str(bzimage), bzimage.read_bytes(), decompress) == vmlinux(b"kernel")
    assert decompress.calls == 2


def test_the_least_recently_used_kernels_go_first(tmp_path):
    cache = KernelCache(tmp_path / "c", max_entries=2)
    paths = []
    for i in range(3):
        p = tmp_path / f"k{i}"
        p.write_bytes(b"kernel %d " % i * 100)
        paths.append(p)
        cache.vmlinux(str(p), p.read_bytes(), Counting(vmlinux(b"v%d" % i)))
        os.utime(next(e for e in (tmp_path / "c").glob(f"*{SUFFIX}") if e.read_bytes() == vmlinux(b"v%d" % i)),
                 ns=(i * 10**9, i * 10**9))  # k0 oldest
    kept = sorted((tmp_path / "c" / e).read_bytes() for e in entries(tmp_path / "c"))
    assert kept == sorted([vmlinux(b"v1"), vmlinux(b"v2")])
    assert all(link.exists() for link in (tmp_path / "c" / BY_STAT).iterdir())  # k0's link gone too
    again = Counting(vmlinux(b"v0"))
    cache.vmlinux(str(paths[0]), paths[0].read_bytes(), again)
    assert again.calls == 1


def test_concurrent_writers_leave_one_complete_entry(tmp_path, bzimage):
    data = vmlinux(os.urandom(4 * MiB))
    results, start = [], threading.Barrier(4)

    def boot():
        start.wait()
        results.append(content(KernelCache(tmp_path / "c").vmlinux(str(bzimage), bzimage.read_bytes(),
                                                                     Counting(data))))

    threads = [threading.Thread(target=boot) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [data] * 4
    (entry,) = (tmp_path / "c").glob(f"*{SUFFIX}")
    assert entry.read_bytes() == data and not list((tmp_path / "c").glob(".tmp-*"))


def test_load_linux_boots_the_same_kernel_from_the_cache(tmp_path):
    """The guest memory a cached boot leaves is the uncached one's, initrd (read from its file) included."""
    elf = make_kernel_like_elf()
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage(gzip.compress(elf)))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(os.urandom(3 * MiB + 5))
    images = []
    for kernel_cache in (None, KernelCache(tmp_path / "c"), KernelCache(tmp_path / "c")):
        with GuestMemory(64 * MiB) as mem:
            boot = load_linux(mem, str(kernel), str(initrd), "console=ttyS0", kernel_cache=kernel_cache)
            assert mem.read(boot.initrd_start, boot.initrd_size) == initrd.read_bytes()
            images.append((boot, mem.read(0, 64 * MiB)))
    assert images[0] == images[1] == images[2]
    assert len(entries(tmp_path / "c")) == 1


@pytest.mark.parametrize("failing", ["kernel", "initrd"])
def test_a_failed_load_in_the_background_fails_the_boot(tmp_path, monkeypatch, failing):
    """The cached kernel's segments and the initrd move in threads; an I/O error in either is the
    boot's KernelImageError, raised only once both threads are done with guest memory."""
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage(gzip.compress(make_kernel_like_elf())))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(os.urandom(MiB))
    cache = KernelCache(tmp_path / "c")
    with GuestMemory(64 * MiB) as mem:
        load_linux(mem, str(kernel), str(initrd), kernel_cache=cache)  # (now cached: a file)
        real = GuestMemory.load_file
        done = []

        def load_file(self, gpa, length, fd, offset=0):
            time.sleep(0.05)
            if (failing == "initrd") == (length == MiB):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real(self, gpa, length, fd, offset)
            done.append(gpa)

        monkeypatch.setattr(GuestMemory, "load_file", load_file)
        message = "cannot read initrd" if failing == "initrd" else "cannot read an ELF segment"
        with pytest.raises(KernelImageError, match=f"{message}.*Input/output error"):
            load_linux(mem, str(kernel), str(initrd), kernel_cache=cache)
        assert done  # the other load ran to its end before the error came back
        assert not [t for t in threading.enumerate() if t.name == "pyvmm-load"]
