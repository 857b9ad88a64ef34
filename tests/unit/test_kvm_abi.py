"""Our ctypes mirrors of <linux/kvm.h> against the C compiler's view of the same headers,
plus a few ioctl numbers written down from the kernel documentation."""

import ctypes
import pathlib
import re
import shutil
import subprocess

import pytest

from vmm.kvm import constants as c
from vmm.kvm import structs as s

STRUCTS = ["kvm_userspace_memory_region", "kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs", "kvm_fpu",
           "kvm_msr_entry", "kvm_msrs", "kvm_lapic_state", "kvm_mp_state", "kvm_cpuid_entry2", "kvm_cpuid2",
           "kvm_irq_level", "kvm_pit_config", "kvm_irqfd", "kvm_ioeventfd", "kvm_msi", "kvm_irq_routing_entry",
           "kvm_irq_routing", "kvm_clock_data"]
OFFSETS = [("kvm_run", "exit_reason"), ("kvm_run", "immediate_exit"), ("kvm_run", "io"), ("kvm_run", "mmio"),
           ("kvm_run", "kvm_valid_regs"), ("kvm_sregs", "efer"), ("kvm_sregs", "interrupt_bitmap"),
           ("kvm_fpu", "mxcsr"), ("kvm_ioeventfd", "flags"), ("kvm_irq_routing_entry", "u")]
IOCTLS = [n for n in dir(c) if re.fullmatch(r"KVM_(GET|SET|CREATE|RUN|CHECK|IRQ|IOEVENTFD|SIGNAL|KVMCLOCK)\w*", n)
          and not n.startswith("KVM_CAP")]
CAPS = [n for n in dir(c) if n.startswith("KVM_CAP_")]


@pytest.fixture(scope="module")
def c_view(tmp_path_factory):
    if not shutil.which("gcc") or not pathlib.Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("needs gcc and the kernel headers (linux-libc-dev)")
    src = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    src += [f'printf("sizeof {n} %zu\\n", sizeof(struct {n}));' for n in STRUCTS + ["kvm_run"]]
    src += [f'printf("offsetof {t}.{f} %zu\\n", offsetof(struct {t}, {f}));' for t, f in OFFSETS]
    src += [f'printf("value {n} %lu\\n", (unsigned long){n});' for n in IOCTLS + CAPS]
    src += ["return 0; }"]
    d = tmp_path_factory.mktemp("abi")
    (d / "probe.c").write_text("\n".join(src))
    subprocess.run(["gcc", "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout
    return dict(line.rsplit(" ", 1) for line in out.splitlines())


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_sizes(c_view, name):
    assert ctypes.sizeof(getattr(s, name)) == int(c_view[f"sizeof {name}"])


def test_kvm_run_prefix_fits(c_view):
    # we mirror the head of kvm_run (up to kvm_dirty_regs); the page is bigger
    assert ctypes.sizeof(s.kvm_run) <= int(c_view["sizeof kvm_run"])


@pytest.mark.parametrize("struct,field", OFFSETS)
def test_field_offsets(c_view, struct, field):
    ours = getattr(s, struct)
    if struct == "kvm_run" and field in ("io", "mmio"):
        offset = s.kvm_run.exit.offset
    else:
        offset = getattr(ours, field).offset
    assert offset == int(c_view[f"offsetof {struct}.{field}"])


@pytest.mark.parametrize("name", IOCTLS + CAPS)
def test_numbers_match_headers(c_view, name):
    assert getattr(c, name) == int(c_view[f"value {name}"])


def test_known_ioctl_numbers():
    # from Documentation/virt/kvm/api.rst and strace of other VMMs
    assert c.KVM_GET_API_VERSION == 0xAE00
    assert c.KVM_CREATE_VM == 0xAE01
    assert c.KVM_RUN == 0xAE80
    assert c.KVM_GET_REGS == 0x8090AE81
    assert c.KVM_SET_SREGS == 0x4138AE84
    assert c.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert c.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert c.KVM_SET_CPUID2 == 0x4008AE90
    assert c.KVM_IRQFD == 0x4020AE76
    assert c.KVM_IOEVENTFD == 0x4040AE79
    assert c.KVM_SET_GSI_ROUTING == 0x4008AE6A
    assert c.KVM_GET_LAPIC == 0x8400AE8E
    assert c.KVM_SIGNAL_MSI == 0x4020AEA5


def test_package_never_imports_fcntl():
    root = pathlib.Path(__file__).resolve().parents[2]
    offenders = []
    for pkg in ("vmm", "kernel", "virtio"):
        for path in (root / pkg).rglob("*.py"):
            for line in path.read_text().splitlines():
                if re.match(r"\s*(import\s+fcntl\b|from\s+fcntl\s+import)", line):
                    offenders.append(f"{path.relative_to(root)}: {line.strip()}")
    assert offenders == []
