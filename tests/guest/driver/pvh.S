/* PVH entry: lets QEMU (`-kernel driver.elf`, the Xen x86/HVM direct boot ABI) start the driver
   guest the way pyvmm does, in 64-bit user mode at _start. pyvmm itself ignores all of this: it
   starts the ELF at e_entry (_start) with its own page tables and GDT.

   The ABI: the loader finds XEN_ELFNOTE_PHYS32_ENTRY in a PT_NOTE segment and enters that
   physical address in 32-bit protected mode, paging off, flat 4 GiB CS (execute/read) and
   DS/ES/SS (read/write), EBX = the physical address of struct hvm_start_info (unused here: the
   job block tells the driver everything), other registers and the stack undefined. The program
   is linked at 0x400000 with physical = virtual addresses, so this 32-bit code can run where it
   was linked.

   What it does at CPL 0, which the software KVM here emulates instruction by instruction (~0.5-2
   us each), so that part is kept short:
   - writes "pvh\n" to COM1 (the harness times the entry by it);
   - identity-maps [0, 64 GiB) with the U and RW bits, page tables at PT_BASE (0x10000, free
     conventional memory below the job block at 0x200000): 1 GiB pages when CPUID 0x80000001
     EDX.Page1GB says the CPU has them (PML4 + PDPT, 64 entries), otherwise 2 MiB pages (PML4 +
     PDPT + 64 PDs, 0x10000-0x51fff). With 2 MiB pages only the first GiB is mapped here (512
     entries, a few ms emulated); the other 32256 entries (~0.12 s emulated) are written at CPL 3
     by pvh_user, natively. (The software KVM here offers no 1 GiB pages: its shadow MMU does
     not, so QEMU's -cpu host lacks pdpe1gb; TCG's -cpu max has it.) 64 GiB covers RAM, the
     LAPIC at 0xFEE00000 and SeaBIOS's PCI windows (the 32-bit one below 4 GiB; the 64-bit one,
     used when the 32-bit one is too small, right above RAM);
   - a GDT with pyvmm's selectors (kernel code64 0x10, kernel data 0x18, user data 0x23, user
     code64 0x2b), so the driver sees the same CS/SS under both VMMs;
   - CR4 = PAE|OSFXSR|OSXMMEXCPT, CR3, EFER |= LME|SCE, CR0 = PG|AM|WP|NE|ET|MP|PE (as pyvmm's
     long_mode_state; CR0 and CR4 are written whole, which clears CD/NW/TS/EM and keeps SMEP/SMAP
     off, whatever the firmware left: this CPL 0 code runs from, and pushes to, U pages), far
     jump to 64-bit code, an empty IDT (limit 0);
   - iretq to pvh_user at CPL 3: RFLAGS = 0x3002 (IOPL 3, IF 0), SS:RSP = 0x23:0x400000,
     CS = 0x2b.
   Then at CPL 3 (pvh_user, native speed): the rest of the 2 MiB-page map, the LAPIC
   software-enabled (as pyvmm does for programs), memory BARs the firmware left unassigned given
   addresses (qboot assigns none; SeaBIOS all), and a jump to _start with RDI = 0 (vCPU index),
   RSI = 1 (vCPUs running the program: QEMU's other vCPUs stay parked by the firmware), RSP =
   0x400000: the state pyvmm's boot_program gives vCPU 0.
   No TSS of its own is loaded (no ltr): a TSS is only consulted on a privilege change into CPL 0
   (an interrupt or exception taken at CPL 3), and none can be served anyway: with IF = 0 and a
   zero-limit IDT, any exception becomes a triple fault (QEMU with -no-reboot then exits)
   instead of running stale firmware handlers. TR keeps what the loader gave it (the PVH ABI
   says: an active 32-bit TSS, base 0, limit 0x67; a vCPU reset gives a busy TSS too), which is
   also what a VMX entry insists on in long mode (TR usable, type 11). */

#define XEN_ELFNOTE_PHYS32_ENTRY 18

#define COM1            0x3F8
#define PT_BASE         0x10000         /* PML4; PDPT at +0x1000; PDs (2 MiB pages) at +0x2000 */
#define MAP_GIB         64
#define PTE_TABLE       0x7             /* P | RW | U */
#define PTE_LEAF        0x87            /* P | RW | U | PS */
#define STACK_TOP       0x400000        /* as pyvmm's vCPU 0 */

#define KERNEL_CS       0x10
#define KERNEL_DS       0x18
#define USER_DS         0x23
#define USER_CS         0x2B
#define USER_RFLAGS     0x3002          /* IOPL 3, IF 0, bit 1 */

#define LAPIC_BASE      0xFEE00000
#define LAPIC_SVR       0xF0
#define PCI_BAR0        0x10
#define PCI_WINDOW      0xC0000000      /* above q35's low RAM (at most 2.75 GiB) and its ECAM */
#define PCI_WINDOW_END  0xFEC00000      /* the IOAPIC */

#define CR0_BITS        0x80050033      /* PG | AM | WP | NE | ET | MP | PE */
#define CR4_BITS        0x620           /* OSXMMEXCPT | OSFXSR | PAE */
#define MSR_EFER        0xC0000080
#define EFER_BITS       0x101           /* LME | SCE */

/* The note, as Linux's pvh head.S declares it: 4-byte aligned, name "Xen", and an 8-byte
   descriptor (QEMU reads a pointer-sized value from a 64-bit ELF's note). */
    .section .note.Xen, "a", @note
    .balign 4
    .long 2f - 1f                       /* namesz */
    .long 4f - 3f                       /* descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY
1:  .asciz "Xen"
2:  .balign 4
3:  .quad pvh_start
4:  .balign 4

    .section .text.pvh, "ax", @progbits
    .code32
    .globl pvh_start
    .type pvh_start, @function
pvh_start:
    cli
    cld
    mov $COM1, %edx
    mov $'p', %al
    out %al, %dx
    mov $'v', %al
    out %al, %dx
    mov $'h', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx

    /* PML4 and PDPT cleared, PML4[0] -> PDPT */
    mov $PT_BASE, %edi
    xor %eax, %eax
    mov $(2 * 4096 / 4), %ecx
    rep stosl
    movl $(PT_BASE + 0x1000 + PTE_TABLE), PT_BASE

    mov $0x80000001, %eax
    cpuid
    mov $(PT_BASE + 0x1000), %edi       /* PDPT */
    mov $MAP_GIB, %ecx
    bt $26, %edx                        /* CPUID 0x80000001 EDX.Page1GB */
    jnc 2f

    /* PDPT[i] = i GiB | PS | U | RW | P */
    mov $PTE_LEAF, %eax
    xor %edx, %edx
1:  mov %eax, (%edi)
    mov %edx, 4(%edi)
    add $8, %edi
    add $0x40000000, %eax
    adc $0, %edx
    loop 1b
    jmp 4f

    /* 2 MiB pages: only the first GiB here (PDPT[0] -> PD 0, 512 entries, all below 4 GiB so
       the high halves are 0); pvh_user maps the other 63 GiB natively at CPL 3. */
2:  movl $(PT_BASE + 0x2000 + PTE_TABLE), (%edi)
    mov $(PT_BASE + 0x2000), %edi
    mov $512, %ecx
    mov $PTE_LEAF, %eax
    xor %edx, %edx
1:  mov %eax, (%edi)
    mov %edx, 4(%edi)
    add $8, %edi
    add $0x200000, %eax
    loop 1b

4:  lgdt pvh_gdt_desc
    mov $CR4_BITS, %eax
    mov %eax, %cr4
    mov $PT_BASE, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_BITS, %eax
    wrmsr
    mov $CR0_BITS, %eax
    mov %eax, %cr0                      /* long mode active (compatibility mode) */
    ljmp $KERNEL_CS, $pvh_long

    .code64
pvh_long:
    mov $KERNEL_DS, %eax
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %fs
    mov %eax, %gs
    lidt pvh_idt_desc(%rip)
    mov $STACK_TOP, %esp
    pushq $USER_DS
    pushq $STACK_TOP
    pushq $USER_RFLAGS
    pushq $USER_CS
    pushq $pvh_user
    iretq
    .size pvh_start, . - pvh_start

/* CPL 3 from here on (native speed on every KVM): the rest of the page tables, then what a
   firmware may have left undone (SeaBIOS does both of these itself: then they cost a few port
   reads), then the driver. */
    .type pvh_user, @function
pvh_user:
    /* 2 MiB pages: PD g (g = 1 .. MAP_GIB-1) filled, then hooked into PDPT[g]. The tables lie in
       the first GiB, mapped U+RW. A not-present entry is never cached (Intel SDM 4.10.4.3),
       so no TLB flush is needed (nor possible at CPL 3) when one becomes present. */
    mov $(PT_BASE + 0x1000 + 8), %edi   /* &PDPT[1] */
    cmpq $0, (%rdi)
    jne 3f                              /* 1 GiB pages: all mapped already */
    mov $(PT_BASE + 0x3000), %esi       /* PD 1 */
    mov $PTE_LEAF, %eax
    bts $30, %rax                       /* 1 GiB | PS | U | RW | P */
2:  mov $512, %ecx
1:  mov %rax, (%rsi)
    add $8, %rsi
    add $0x200000, %rax
    loop 1b
    lea (PTE_TABLE - 0x1000)(%rsi), %rdx   /* this PD | U | RW | P */
    mov %rdx, (%rdi)
    add $8, %rdi
    cmp $(PT_BASE + 0x1000 + 8 * MAP_GIB), %edi
    jb 2b
3:
    /* Software-enable the LAPIC (SVR |= enable | vector 0xff), as pyvmm does for programs, so
       MSIs land in the IRR whatever the firmware did. The page is mapped with U set. */
    mov $(LAPIC_BASE + LAPIC_SVR), %eax
    orl $0x1FF, (%rax)

    /* Memory BARs the firmware left unassigned (qboot assigns none: it leaves that to Linux) get
       addresses from PCI_WINDOW up, naturally aligned, below the IOAPIC; I/O BARs and BARs that
       already have an address are left alone. Bus 0, function 0 of type-0 headers: what the
       driver's pci_find looks at. A BAR that does not fit keeps its value (0: the driver then
       reports the device's capabilities as unusable). */
    mov $PCI_WINDOW, %r9d               /* next free address */
    xor %r8d, %r8d                      /* slot */
.Lslot:
    mov %r8d, %r11d
    shl $11, %r11d
    or $0x80000000, %r11d               /* CONFIG_ADDRESS of (bus 0, slot, function 0, reg 0) */
    mov %r11d, %eax
    call pvh_cfg_rd
    cmp $0xFFFF, %ax                    /* no device */
    je .Lnext_slot
    lea 0xC(%r11), %eax
    call pvh_cfg_rd
    test $0x7F0000, %eax                /* header type 0 only */
    jnz .Lnext_slot
    mov $PCI_BAR0, %r10d
.Lbar:
    lea (%r11, %r10), %eax
    call pvh_cfg_rd
    mov %eax, %ebx                      /* the BAR as found */
    mov %eax, %r12d
    and $7, %r12d                       /* bit 0: I/O; bits 1-2 = 2: 64-bit memory */
    test $1, %r12b
    jnz .Lbar_next
    xor %r15d, %r15d                    /* the high half as found */
    cmp $4, %r12d
    jne 1f
    lea 4(%r11, %r10), %eax
    call pvh_cfg_rd
    mov %eax, %r15d
1:  mov %ebx, %eax
    and $~0xF, %eax
    or %r15d, %eax
    jnz .Lbar_next                      /* has an address already */
    /* size it: all ones, read back the mask */
    lea (%r11, %r10), %eax
    mov $0xFFFFFFFF, %ecx
    call pvh_cfg_wr
    lea (%r11, %r10), %eax
    call pvh_cfg_rd
    and $~0xF, %eax
    mov %eax, %r13d                     /* mask, low half */
    mov $0xFFFFFFFF, %r14d              /* mask, high half (32-bit BAR: all ones) */
    cmp $4, %r12d
    jne 2f
    lea 4(%r11, %r10), %eax
    call pvh_cfg_wr                     /* %ecx still all ones */
    lea 4(%r11, %r10), %eax
    call pvh_cfg_rd
    mov %eax, %r14d
2:  shl $32, %r14
    or %r13, %r14
    neg %r14                            /* size (2^32 or more for an unimplemented BAR) */
    lea -1(%r9, %r14), %rax
    mov %r14, %rcx
    neg %rcx
    and %rcx, %rax                      /* address: next free, aligned to the size */
    lea (%rax, %r14), %rcx              /* its end */
    mov $PCI_WINDOW_END, %edx           /* (an immediate operand would be sign-extended) */
    cmp %rdx, %rcx
    ja .Lrestore
    mov %rcx, %r9
    mov %eax, %ebx                      /* the new low half */
    xor %r15d, %r15d                    /* the new high half */
.Lrestore:                              /* write back low and high halves (%ebx, %r15d) */
    lea (%r11, %r10), %eax
    mov %ebx, %ecx
    call pvh_cfg_wr
    cmp $4, %r12d
    jne .Lbar_next
    lea 4(%r11, %r10), %eax
    mov %r15d, %ecx
    call pvh_cfg_wr
.Lbar_next:
    add $4, %r10d
    cmp $4, %r12d
    jne 3f
    add $4, %r10d                       /* a 64-bit BAR takes two registers */
3:  cmp $(PCI_BAR0 + 6 * 4), %r10d
    jb .Lbar
.Lnext_slot:
    inc %r8d
    cmp $32, %r8d
    jb .Lslot

    mov $STACK_TOP, %esp
    xor %edi, %edi                      /* vCPU index */
    mov $1, %esi                        /* vCPUs running the program */
    jmp _start
    .size pvh_user, . - pvh_user

/* %eax = CONFIG_ADDRESS -> %eax = the dword; clobbers %edx */
pvh_cfg_rd:
    mov $0xCF8, %dx
    out %eax, %dx
    mov $0xCFC, %dx
    in %dx, %eax
    ret

/* %eax = CONFIG_ADDRESS, %ecx = the dword; clobbers %eax, %edx */
pvh_cfg_wr:
    mov $0xCF8, %dx
    out %eax, %dx
    mov $0xCFC, %dx
    mov %ecx, %eax
    out %eax, %dx
    ret

    .balign 8
pvh_gdt:
    .quad 0
    .quad 0
    .quad 0x00AF9B000000FFFF            /* 0x10: 64-bit code, DPL 0 (accessed) */
    .quad 0x00CF93000000FFFF            /* 0x18: data, DPL 0 */
    .quad 0x00CFF3000000FFFF            /* 0x20: data, DPL 3 */
    .quad 0x00AFFB000000FFFF            /* 0x28: 64-bit code, DPL 3 */
pvh_gdt_end:
    .balign 8
    .word 0
pvh_gdt_desc:                           /* limit, base (lgdt in 32-bit mode reads 6 bytes) */
    .word pvh_gdt_end - pvh_gdt - 1
    .quad pvh_gdt
    .word 0
pvh_idt_desc:
    .word 0
    .quad 0

    .section .note.GNU-stack, "", @progbits
