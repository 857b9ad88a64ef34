"""What the host's KVM can do: API version, capabilities, and whether guest kernel
mode runs natively (VT-x / AMD-V) or is emulated instruction by instruction (a
software KVM, like the one on machines without hardware virtualization).

The measurement is direct: a probe VM runs the same two-instruction loop at CPL 0
and at CPL 3 and we compare the times.  Natively both take a fraction of a
nanosecond per iteration; an emulating KVM is thousands of times slower at CPL 0.
The probe takes ~50 ms where CPL 0 is emulated: `kernel_mode_native` keeps its verdict
in the user's cache for the rest of the host's boot (`pyvmm check` measures afresh).
"""

from __future__ import annotations

import functools
import json
import os
import struct
import time
from pathlib import Path
from dataclasses import dataclass

from kernel.layout import VMX_TSS_ADDR
from kernel.x86 import long_mode_state, write_gdt, write_identity_page_tables
from .kit import cache_dir
from .kvm import Kvm, exits
from .kvm import constants as c
from .long_mode import set_long_mode
from .memory import GuestMemory

PROBE_ITERATIONS = 50_000
PROBE_PORT = 0xF4
_GDT, _PML4, _CODE = 0x1000, 0x2000, 0x100000
# ns per iteration above which CPL 0 is called emulated (natively it is below 2)
EMULATED_NS_PER_ITERATION = 20.0


def probe_code(iterations: int) -> bytes:
    """mov ecx, N; 1: dec ecx; jnz 1b; out PROBE_PORT, al"""
    return b"\xb9" + struct.pack("<I", iterations) + b"\xff\xc9\x75\xfc" + bytes([0xE6, PROBE_PORT])


@dataclass
class ModeTiming:
    """The probe's loop time at CPL 0 and at CPL 3."""

    cpl0_ns: float  # per loop iteration
    cpl3_ns: float

    @property
    def kernel_mode_native(self) -> bool:
        return self.cpl0_ns < EMULATED_NS_PER_ITERATION or self.cpl0_ns < 10 * max(self.cpl3_ns, 0.1)

    @property
    def slowdown(self) -> float:
        return self.cpl0_ns / max(self.cpl3_ns, 0.01)


def _time_loop(kvm: Kvm, user: bool, iterations: int) -> float:
    vm = kvm.create_vm()
    mem = GuestMemory(4 << 20)
    vcpu = None
    try:
        vm.set_tss_addr(VMX_TSS_ADDR)
        vm.set_user_memory_region(0, 0, mem.size, mem.host_address(mem.regions[0]))
        gdt = write_gdt(mem, _GDT)
        cr3 = write_identity_page_tables(mem, _PML4, 1 << 30, user=user)
        mem.write(_CODE, probe_code(iterations))
        vcpu = vm.create_vcpu(0)
        set_long_mode(vcpu, long_mode_state(cr3=cr3, gdt=gdt, rip=_CODE, rsp=_CODE, user=user))
        start = time.perf_counter()
        for _ in range(100):
            ex = vcpu.run()
            if isinstance(ex, exits.IoOut) and ex.port == PROBE_PORT:
                return (time.perf_counter() - start) * 1e9 / iterations
            if not isinstance(ex, exits.Interrupted):
                raise RuntimeError(f"probe guest stopped unexpectedly: {ex}")
        raise RuntimeError("probe guest did not finish")
    finally:
        if vcpu is not None:
            vcpu.close()
        vm.close()
        mem.close()


def measure(kvm: Kvm, iterations: int = PROBE_ITERATIONS) -> ModeTiming:
    cpl3 = min(_time_loop(kvm, True, iterations) for _ in range(2))
    cpl0 = _time_loop(kvm, False, iterations)
    return ModeTiming(cpl0_ns=cpl0, cpl3_ns=cpl3)


@functools.lru_cache(maxsize=1)
def _cached_native(path: str) -> bool:
    key = host_key(path)
    known = _read_verdict(key) if key is not None else None
    if known is not None:
        return known
    kvm = Kvm(path)
    try:
        native = measure(kvm).kernel_mode_native
    finally:
        kvm.close()
    if key is not None:
        _write_verdict(key, native)
    return native


def kernel_mode_native(kvm: Kvm | None = None) -> bool:
    """True when guest kernel mode runs on hardware virtualization: measured once per boot of the
    host and KVM device (the verdict is kept in the user's cache, `verdict_path()`)."""
    return _cached_native(kvm.path if kvm is not None else "/dev/kvm")


def host_key(path: str) -> str | None:
    """What the verdict holds for: this boot of the host (its boot_id) and this KVM device node (a
    reloaded KVM module makes a new node, with a new inode and ctime); None where unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        st = os.stat(path)
    except OSError:
        return None
    return f"{boot_id} {path} {st.st_rdev:x} {st.st_ino:x} {st.st_ctime_ns}"


def verdict_path() -> Path:
    return cache_dir() / "kvm-mode.json"


def _read_verdict(key: str) -> bool | None:
    try:
        with open(verdict_path()) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("native"), bool):
        return saved["native"]
    return None


def _write_verdict(key: str, native: bool) -> None:
    """Best effort, atomic (a temporary file renamed): a reader sees the old verdict or the new."""
    path = verdict_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        import tempfile  # (here: only the first run after a host boot writes)

        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-kvm-mode-")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "native": native}, f)
        os.replace(tmp, path)
    except OSError:
        pass


def report(kvm: Kvm) -> str:
    """The text of `pyvmm check`."""
    lines = [f"KVM device:        {kvm.path}", f"KVM API version:   {kvm.api_version()}"
             + ("" if kvm.api_version() == c.KVM_API_VERSION else f" (pyvmm expects {c.KVM_API_VERSION})")]
    lines.append(f"max vCPUs per VM:  {kvm.max_vcpus()}")
    missing = []
    lines.append("capabilities pyvmm uses:")
    for group, caps in (("required", c.REQUIRED_CAPS), ("optional", c.OPTIONAL_CAPS)):
        for cap, why in caps.items():
            value = kvm.check_extension(cap)
            if not value and group == "required":
                missing.append(c.CAP_NAMES[cap])
            lines.append(f"  {'yes' if value else 'NO ':3} {c.CAP_NAMES[cap]:<32} {group}: {why}")
    timing = measure(kvm)
    lines.append(f"guest loop at CPL 3: {timing.cpl3_ns:8.2f} ns/iteration")
    lines.append(f"guest loop at CPL 0: {timing.cpl0_ns:8.2f} ns/iteration ({timing.slowdown:.0f}x)")
    if timing.kernel_mode_native:
        lines.append("guest kernel mode:  native (hardware virtualization): stock kernels boot normally")
    else:
        lines.append("guest kernel mode:  EMULATED (a software KVM without VT-x/AMD-V): " + EMULATED_WARNING)
    if missing:
        lines.append("MISSING required capabilities: " + ", ".join(missing))
    return "\n".join(lines)


EMULATED_WARNING = ("guest kernel code runs thousands of times slower here; a stock Linux kernel gets through "
                    "its early boot (about a minute) and then stops at an instruction the emulator lacks. "
                    "Guest user mode runs natively.")
