"""ProtectedModeIret: the vCPU exit hook that completes an IRET an emulating KVM cannot run."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

IRET = 0xCF
OPERAND_SIZE_PREFIX = 0x66
EFLAGS_FIXED = 1 << 1
EFLAGS_NT = 1 << 14
EFLAGS_VM = 1 << 17
# What IRET at CPL 0 loads from the stack (Intel SDM, IRET: "RETURN-TO-SAME-PRIVILEGE-LEVEL"):
# CF PF AF ZF SF TF IF DF OF IOPL NT, and with a 32-bit operand RF AC VIF VIP ID.
IRET_FLAGS_32 = 0x3F7FD5
IRET_FLAGS_16 = 0x7FD5
X86_CR0_PE, X86_CR0_PG = 1 << 0, 1 << 31


class ProtectedModeIret:
    """Completes the one instruction firmware needs that KVM's instruction emulator lacks.

    Where KVM emulates guest kernel mode (a software KVM, as on hosts without VT-x/AMD-V),
    every CPL 0 instruction goes through KVM's x86 emulator, whose IRET handles real mode
    only ("iret from protected mode unimplemented yet"): KVM_RUN fails with an emulation
    error.  iPXE takes the timer interrupt in 32-bit protected mode and returns with IRET.
    As an `on_exit` hook of the firmware's vCPU threads this does such an IRET itself when
    it is the simple kind: protected mode, CPL 0, to the same privilege level, no task return
    (NT), no return to virtual-8086 mode, a GDT code segment.  Anything else is left to the
    usual crash report.  On KVM with VT-x/AMD-V the exit never happens.

    Where the frame is: at SS:ESP, as the architecture has it.  The software KVM measured
    here (kvm_pvm) delivers interrupts in protected mode by writing the frame at the *flat*
    address ESP, ignoring the base of SS (iPXE runs with segment bases of 0x1FF5C000 and so
    on); so when SS has a base and the bytes at SS:ESP are no valid frame (a present GDT
    code segment with RPL 0, EFLAGS with bit 1 set and the reserved bits clear), the frame at
    the flat address is taken if it is a valid one.
    """

    def __init__(self, mem):
        self.mem = mem
        self.count = 0

    def __call__(self, thread, ex) -> bool:
        from ..kvm import exits

        if type(ex) is not exits.InternalError or ex.suberror != 1:
            return False
        try:
            done = self._iret(thread.vcpu)
        except Exception as e:  # guest memory that is not RAM, a malformed descriptor...
            log.debug("vcpu%d: cannot complete IRET: %s", thread.vcpu.id, e)
            return False
        if done:
            self.count += 1
            if self.count == 1:
                log.info("vcpu%d: completing protected-mode IRETs that this KVM's emulator cannot run",
                         thread.vcpu.id)
        return done

    def _valid_frame(self, sregs, new_ip: int, selector: int, flags: int, *, operand32: bool):
        """(ip, selector, flags, descriptor bytes, limit) if the three popped values make an IRET
        this class completes, else None."""
        selector &= 0xFFFF
        if not flags & EFLAGS_FIXED or flags & (0xFFC0_8028 if operand32 else 0x8028):
            return None  # not an EFLAGS image: bit 1 clear or reserved bits set
        if operand32 and flags & EFLAGS_VM:
            return None  # return to virtual-8086 mode
        if selector & 3 != 0 or selector & 4 or selector < 8 or (selector | 7) > sregs.gdt.limit:
            return None  # to an outer privilege level, through the LDT, null, or past the GDT
        raw = self.mem.read(self._linear(sregs, sregs.gdt.base + (selector & ~7)), 8)
        access, flags_limit = raw[5], raw[6]
        if not access & 0x80 or not access & 0x10 or not access & 0x08 or (access >> 5) & 3:
            return None  # not present, not a code segment, or not DPL 0
        limit = int.from_bytes(raw[0:2], "little") | (flags_limit & 0x0F) << 16
        if flags_limit & 0x80:
            limit = limit << 12 | 0xFFF
        if new_ip > limit:
            return None
        return new_ip, selector, flags, raw, limit

    def _linear(self, sregs, address: int) -> int:
        if sregs.cr0 & X86_CR0_PG:
            from kernel.x86 import translate

            phys = translate(self.mem, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, address)
            if phys is None:
                raise ValueError(f"{address:#x} is not mapped")
            return phys
        return address & 0xFFFF_FFFF

    def _read(self, sregs, address: int, size: int) -> int:
        return self.mem.read_int(self._linear(sregs, address), size)

    def _iret(self, vcpu) -> bool:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        if not sregs.cr0 & X86_CR0_PE or sregs.efer & (1 << 10) or sregs.cs.dpl != 0:
            return False  # real mode is emulated by KVM; long mode and CPL > 0 are not ours
        if regs.rflags & (EFLAGS_NT | EFLAGS_VM):
            return False
        rip = sregs.cs.base + regs.rip
        opcode = self._read(sregs, rip, 1)
        operand32 = bool(sregs.cs.db)
        if opcode == OPERAND_SIZE_PREFIX:
            operand32 = not operand32
            opcode = self._read(sregs, rip + 1, 1)
        if opcode != IRET:
            return False
        size = 4 if operand32 else 2
        sp_mask = 0xFFFF_FFFF if sregs.ss.db else 0xFFFF
        sp = regs.rsp & sp_mask
        frame = None
        for base in (sregs.ss.base, 0) if sregs.ss.base else (0,):
            values = [self._read(sregs, base + ((sp + i * size) & sp_mask), size) for i in range(3)]
            frame = self._valid_frame(sregs, *values, operand32=operand32)
            if frame is not None:
                break
        if frame is None:
            return False
        new_ip, selector, flags, raw, limit = frame
        access, flags_limit = raw[5], raw[6]
        cs = sregs.cs
        cs.selector, cs.base = selector, int.from_bytes(raw[2:5], "little") | raw[7] << 24
        cs.limit, cs.type, cs.s, cs.dpl, cs.present = limit, (access & 0x0F) | 1, 1, (access >> 5) & 3, 1
        cs.avl, cs.l, cs.db, cs.g, cs.unusable = (flags_limit >> 4) & 1, (flags_limit >> 5) & 1, \
            (flags_limit >> 6) & 1, flags_limit >> 7, 0
        mask = IRET_FLAGS_32 if operand32 else IRET_FLAGS_16
        regs.rflags = (regs.rflags & ~mask) | (flags & mask) | EFLAGS_FIXED
        regs.rip = new_ip
        regs.rsp = (regs.rsp & ~sp_mask) | ((sp + 3 * size) & sp_mask)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        return True
