"""Guest RAM: one shared memfd mapping, advised for transparent huge pages."""

import mmap

from vmm.memory import GuestMemory, advise_huge_pages


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
