"""Guest RAM: one shared memfd mapping, advised for transparent huge pages; files loaded into it."""

import errno
import mmap
import os

import pytest

from vmm import memory as memory_mod
from vmm.memory import GuestMemory, GuestMemoryError, advise_huge_pages


def _vm_flags(address: int) -> list[str]:
    """VmFlags of the mapping that starts at `address`, from /proc/self/smaps."""
    flags, inside = None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start = int(head.split("-")[0], 16)
                inside = start == address
            elif inside and head == "VmFlags:":
                flags = line.split()[1:]
    assert flags is not None, f"no mapping at {address:#x}"
    return flags


def _address(buffer: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def test_guest_ram_is_advised_for_huge_pages():
    mem = GuestMemory(64 << 20)
    try:
        flags = _vm_flags(_address(mem.buffer))
    finally:
        mem.close()
    assert "hg" in flags  # VM_HUGEPAGE: the host may back it with 2 MiB pages
    assert "sh" in flags  # and it stays one shared mapping of the memfd


def test_advising_never_fails_the_start():
    class NoThp:
        def madvise(self, advice):
            raise OSError(22, "Invalid argument")  # a kernel without transparent huge pages

    advise_huge_pages(NoThp())


# -- load_file: a file's bytes into guest RAM without Python copying them -------------------------------
@pytest.fixture
def blob(tmp_path):
    data = os.urandom(3 << 20) + b"tail"
    path = tmp_path / "blob"
    path.write_bytes(data)
    with open(path, "rb") as f:
        yield f, data


@pytest.mark.parametrize("sendfile", ["works", "refused"])
def test_load_file_puts_the_bytes_where_asked(blob, monkeypatch, sendfile):
    f, data = blob
    if sendfile == "refused":  # a file sendfile cannot read: preadv does it all
        def refuse(*_):
            raise OSError(errno.EINVAL, "refused")
        monkeypatch.setattr(memory_mod.os, "sendfile", refuse)
    with GuestMemory(64 << 20) as mem:
        mem.load_file(0x100000 + 3, len(data) - 100, f.fileno(), 100)
        assert mem.read(0x100000 + 3, len(data) - 100) == data[100:]
        assert mem.read(0x100000, 3) == b"\0\0\0" and mem.read(0x100000 + 3 + len(data) - 100, 8) == bytes(8)


def test_load_file_above_the_hole_lands_in_high_ram(blob):
    f, data = blob
    with GuestMemory(5 << 30) as mem:  # (sparse: only what is written is allocated)
        high = mem.regions[1]
        mem.load_file(high.gpa + 4096, len(data), f.fileno())
        assert mem.read(high.gpa + 4096, len(data)) == data


def test_load_file_checks_the_range_and_the_file(blob):
    f, data = blob
    with GuestMemory(16 << 20) as mem:
        with pytest.raises(GuestMemoryError, match="not RAM"):
            mem.load_file((16 << 20) - 10, len(data), f.fileno())
        with pytest.raises(GuestMemoryError, match="short"):
            mem.load_file(0x100000, len(data) + 10, f.fileno())
