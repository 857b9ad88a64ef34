"""vmm/early.py and vmm/boot.py finish_linux: a direct boot's kernel placed and loading before the
VM exists, the rest of the boot written afterwards."""

import pytest

from kernel import layout
from kernel.errors import KernelImageError
from vmm import early as early_mod
from vmm.boot import finish_linux
from vmm.config import VmConfig
from vmm.early import EarlyLinux, start_linux, wants_early_linux
from tests.unit.test_elf import make_kernel_like_elf

MiB = 1 << 20


@pytest.fixture
def kernel_files(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel.write_bytes(make_kernel_like_elf(text=b"\x90" * 4096 + b"\xf4"))
    initrd.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    return str(kernel), str(initrd)


def cmdline(mem) -> bytes:
    return mem.read(layout.CMDLINE, layout.CMDLINE_MAX_SIZE).split(b"\0")[0]


def config(kernel, initrd, **kw):
    return VmConfig(kernel=kernel, initrd=initrd, cmdline="console=ttyS0 quiet", mem_size=64 * MiB, **kw)


def test_only_a_direct_linux_boot_starts_early(kernel_files):
    kernel, initrd = kernel_files
    assert wants_early_linux(config(kernel, initrd))
    assert not wants_early_linux(VmConfig(program="guest.elf"))
    assert not wants_early_linux(config(kernel, initrd, firmware=""))


@pytest.fixture
def early(kernel_files):
    started = start_linux(config(*kernel_files))
    yield started
    started.abandon()


def test_the_kernel_and_initrd_are_in_guest_ram_once_the_loads_are_waited_for(early):
    early.loads.wait()
    linux = early.linux
    assert early.mem.read(linux.entry, 4) == b"\x90" * 4
    assert early.mem.read(linux.initrd_start, linux.initrd_size) == bytes(range(256)) * 4096
    assert cmdline(early.mem) == b"console=ttyS0 quiet"
    assert early.pci_layout.e820_reserved()[0][0] in {e.addr for e in linux.e820}


def test_finish_writes_the_tables_and_replaces_the_command_line_when_asked(early):
    early.loads.wait()
    plan = finish_linux(early.mem, early.linux, cpus=2, cmdline="console=ttyS0 quiet clearcpuid=xsave")
    assert cmdline(early.mem) == b"console=ttyS0 quiet clearcpuid=xsave"
    assert early.mem.read(layout.ACPI_START, 8) == b"RSD PTR "
    assert plan.states[0].rsi == early.linux.zero_page and plan.linux is early.linux
    finish_linux(early.mem, early.linux, cpus=2)  # no replacement: the last one stays
    assert cmdline(early.mem) == b"console=ttyS0 quiet clearcpuid=xsave"


def test_a_replacement_command_line_is_held_to_the_kernels_limit(early):
    limit = early.linux.cmdline_limit
    with pytest.raises(KernelImageError, match=f"accepts at most {limit}"):
        finish_linux(early.mem, early.linux, cpus=1, cmdline="x" * (limit + 1))


def test_a_kernel_that_cannot_be_loaded_leaves_no_guest_ram_behind(kernel_files, tmp_path, monkeypatch):
    kernel, _ = kernel_files
    made = []
    real = early_mod.GuestMemory
    monkeypatch.setattr(early_mod, "GuestMemory", lambda size: made.append(real(size)) or made[-1])
    with pytest.raises(KernelImageError, match="cannot read initrd"):
        start_linux(config(kernel, str(tmp_path / "missing")))
    assert made and made[0].buffer is None  # closed


def test_abandon_waits_for_the_loads_before_freeing_guest_ram():
    order = []

    class Loads:
        def wait(self, raise_errors=True):
            order.append(("wait", raise_errors))

    class Mem:
        def close(self):
            order.append("close")

    EarlyLinux(Mem(), Loads(), linux=None, pci_layout=None).abandon()
    assert order == [("wait", False), "close"]
