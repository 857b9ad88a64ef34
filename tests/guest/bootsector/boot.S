/*
 * A 16-bit boot sector for firmware-boot tests (tests/kvm/test_firmware.py).
 *
 * The BIOS loads it at 0000:7C00 with DL = the boot drive.  It:
 *   1. prints "PYVMM-BOOT <ID> DL=<drive>" on COM1, writing the UART directly;
 *   2. checks for the BIOS enhanced disk services (int 13h AH=41h);
 *   3. reads SECTORS sectors from LBA 1 on, CHUNK at a time, with int 13h AH=42h
 *      (extended read, a disk address packet) into 1000:0000, and hashes them:
 *      h = 0x811C9DC5, then for each little-endian 32-bit word w in order,
 *      h = (h ^ w) * 0x01000193 mod 2^32 (FNV-1a, a word at a time);
 *   4. prints "PYVMM-SUM <hash in 8 hex digits>" (or "PYVMM-ERR <what> <AH>");
 *   5. powers the machine off through pyvmm's ACPI sleep control register
 *      (0x34 to port 0x600: SLP_EN with SLP_TYP 5), and halts should that fail.
 *
 * Build (the tests do): gcc -m32 -c [-DDISK_ID="'B'"] [-DSECTORS=N] boot.S;
 * ld -m elf_i386 -Ttext=0x7c00; objcopy -O binary  ->  exactly 512 bytes.
 */

#ifndef DISK_ID
#define DISK_ID 'A'
#endif
#ifndef SECTORS
#define SECTORS 256             /* a multiple of CHUNK */
#endif
#define CHUNK 64                /* sectors per int 13h call: 32 KiB */
#define BUF_SEG 0x1000          /* the buffer: linear 0x10000 - 0x17FFF */
#define COM1 0x3F8
#define UART_LSR 5
#define LSR_THRE 0x20
#define SLEEP_CONTROL_PORT 0x600
#define SLEEP_S5 0x34
#define FNV_OFFSET 0x811C9DC5
#define FNV_PRIME 0x01000193

        .code16
        .text
        .globl _start
_start:
        cli
        ljmp    $0, $normalised         /* CS:IP = 0000:7Cxx whatever the BIOS used */
normalised:
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x7C00, %sp
        cld
        sti
        mov     %dl, drive

        mov     $msg_boot, %si
        call    puts
        mov     drive, %al
        call    puthex8
        call    crlf

        /* Enhanced disk drive services present? */
        mov     $0x41, %ah
        mov     $0x55AA, %bx
        mov     drive, %dl
        int     $0x13
        jc      no_edd
        cmp     $0xAA55, %bx
        jne     no_edd
        test    $1, %cl                 /* bit 0: the extended access functions (42h...) */
        jz      no_edd

read_loop:
        movw    $CHUNK, dap_count
        movw    $0, dap_offset
        movw    $BUF_SEG, dap_segment
        movl    lba, %eax
        movl    %eax, dap_lba
        mov     $0x42, %ah
        mov     drive, %dl
        mov     $dap, %si
        int     $0x13
        jc      read_error

        push    %ds
        mov     $BUF_SEG, %ax
        mov     %ax, %ds
        xor     %si, %si
        mov     $(CHUNK * 512 / 4), %cx
        movl    %cs:hash, %eax
hash_word:
        xorl    (%si), %eax
        imull   $FNV_PRIME, %eax, %eax
        add     $4, %si
        loop    hash_word
        movl    %eax, %cs:hash
        pop     %ds

        addl    $CHUNK, lba
        decw    chunks_left
        jnz     read_loop

        mov     $msg_sum, %si
        call    puts
        movl    hash, %eax
        call    puthex32
        call    crlf
        jmp     poweroff

no_edd:
        mov     $msg_no_edd, %si
        jmp     error
read_error:
        mov     $msg_read, %si
error:
        push    %ax
        call    puts
        pop     %ax
        mov     %ah, %al
        call    puthex8
        call    crlf

poweroff:
        mov     $SLEEP_CONTROL_PORT, %dx
        mov     $SLEEP_S5, %al
        out     %al, %dx
        cli
halt:   hlt
        jmp     halt

/* putc: AL to COM1, once the transmitter holding register is empty; keeps all registers. */
putc:
        push    %dx
        push    %ax
        mov     $(COM1 + UART_LSR), %dx
1:      in      %dx, %al
        test    $LSR_THRE, %al
        jz      1b
        pop     %ax
        mov     $COM1, %dx
        out     %al, %dx
        pop     %dx
        ret

/* puts: the NUL-terminated string at DS:SI. */
puts:
        lodsb
        test    %al, %al
        jz      1f
        call    putc
        jmp     puts
1:      ret

crlf:
        mov     $msg_crlf, %si
        jmp     puts

/* puthex32: EAX as 8 hex digits; puthex8: AL as 2. */
puthex32:
        mov     $8, %cx
        jmp     hex_digits
puthex8:
        mov     $2, %cx
        rorl    $8, %eax                /* AL to bits 31:24, where the digits come from */
hex_digits:
        roll    $4, %eax
        push    %ax
        and     $0x0F, %al
        add     $'0', %al
        cmp     $'9', %al
        jbe     1f
        add     $('A' - '9' - 1), %al
1:      call    putc
        pop     %ax
        loop    hex_digits
        ret

msg_boot:       .ascii  "PYVMM-BOOT "
disk_id:        .byte   DISK_ID
                .asciz  " DL="
msg_sum:        .asciz  "PYVMM-SUM "
msg_no_edd:     .asciz  "PYVMM-ERR no-int13-extensions "
msg_read:       .asciz  "PYVMM-ERR read "
msg_crlf:       .asciz  "\r\n"

drive:          .byte   0
chunks_left:    .word   SECTORS / CHUNK
lba:            .long   1
hash:           .long   FNV_OFFSET
dap:            .byte   16, 0           /* disk address packet: size, reserved */
dap_count:      .word   0
dap_offset:     .word   0
dap_segment:    .word   0
dap_lba:        .long   0, 0

        .org    510
        .word   0xAA55
