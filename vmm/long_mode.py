"""A vCPU put straight into 64-bit mode: a kernel.x86.LongModeState copied into KVM's registers
(what Machine does for Linux and programs, and the host check for its probe guest)."""

from __future__ import annotations

from .kvm import structs as s

FCW_DEFAULT = 0x37F  # x87 control word after FNINIT: all exceptions masked, 64-bit precision
MXCSR_DEFAULT = 0x1F80  # SSE control after reset: all exceptions masked


def set_long_mode(vcpu, st) -> None:
    """Copy a kernel.x86.LongModeState into the vCPU's registers."""
    sregs = vcpu.get_sregs()
    _load_segment(sregs.cs, st.cs)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _load_segment(getattr(sregs, name), st.ds)
    sregs.gdt.base, sregs.gdt.limit = st.gdt
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = st.cr0, st.cr3, st.cr4, st.efer
    vcpu.set_sregs(sregs)
    vcpu.set_regs(s.kvm_regs(rip=st.rip, rsp=st.rsp, rsi=st.rsi, rdi=st.rdi, rflags=st.rflags))
    vcpu.set_fpu(s.kvm_fpu(fcw=FCW_DEFAULT, mxcsr=MXCSR_DEFAULT))


def _load_segment(seg, src) -> None:
    for f in ("selector", "base", "limit", "type", "present", "dpl", "db", "s", "l", "g", "avl"):
        setattr(seg, f, getattr(src, f))
    seg.unusable = 0
