//! PVH entry: the Xen ELF note, the 32-bit entry point, and the switch to long mode.
//!
//! PVH boot ABI (what the monitor guarantees at `pvh_start`): 32-bit protected mode,
//! paging off, CS/DS/ES/SS flat 4 GiB, interrupts off, `EBX` = physical address of
//! `struct hvm_start_info`. Nothing else (no stack, no GDT in guest memory).
//!
//! What this code does, in order:
//! 1. writes the boot marker (byte 1 to I/O port 0x505) — before anything else;
//! 2. zeroes `.bss` (a loader need not do it) with a plain `mov` loop, no `rep stos`;
//! 3. builds identity page tables for 0..4 GiB with 2 MiB pages (this covers RAM, the
//!    command line, `hvm_start_info`, and virtio-mmio windows below 4 GiB);
//! 4. loads its own GDT, enables PAE, sets CR3, EFER.LME, CR0.PG, far-jumps to 64-bit code;
//! 5. sets a stack and calls `probe_main(start_info_paddr)`, which never returns.
//!
//! Every instruction here runs through KVM's instruction emulator on a PVM host, so the
//! code sticks to plain integer instructions (mov/add/cmp/jcc, control and MSR moves).
//! 1 GiB pages are not used: QEMU's default TCG CPU does not offer them.

use core::arch::global_asm;

global_asm!(
    r#"
    /* --- XEN_ELFNOTE_PHYS32_ENTRY (type 18), name "Xen" ----------------------------- */
    /* The descriptor is 8 bytes (.quad), as in Linux: QEMU reads a 64-bit value for    */
    /* ELF64 files; linux-loader reads the low 32 bits.                                 */
    .pushsection .note.Xen, "a", @note
    .p2align 2
    .long 4                 /* namesz: "Xen\0" */
    .long 8                 /* descsz */
    .long 18                /* type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .quad pvh_start
    .popsection

    /* --- page tables and GDT -------------------------------------------------------- */
    .pushsection .bss.page_tables, "aw", @nobits
    .p2align 12
probe_pml4:
    .skip 4096
probe_pdpt:
    .skip 4096
probe_pd:                   /* 4 page directories: 4 x 512 x 2 MiB = 4 GiB */
    .skip 4 * 4096
probe_pd_end:
    .popsection

    .pushsection .stack, "aw", @nobits
    .p2align 12
    .skip 16384
probe_stack_top:
    .popsection

    .pushsection .rodata.gdt, "a", @progbits
    .p2align 3
probe_gdt:
    .quad 0                     /* null */
    .quad 0x00af9b000000ffff    /* 0x08: 64-bit code, DPL0, present, accessed */
    .quad 0x00cf93000000ffff    /* 0x10: flat data, DPL0, present, accessed */
probe_gdt_end:
    .p2align 2
probe_gdt_ptr:
    .word probe_gdt_end - probe_gdt - 1
    .long probe_gdt
    .popsection

    /* --- 32-bit entry ---------------------------------------------------------------- */
    .pushsection .text.pvh_start, "ax", @progbits
    .code32
    .globl pvh_start
pvh_start:
    /* boot marker: the very first thing */
    movw $0x505, %dx
    movb $1, %al
    outb %al, %dx
    cli

    movl %ebx, %esi             /* keep the hvm_start_info address in ESI */

    /* zero .bss (page tables included; the stack is outside it) */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    xorl %eax, %eax
1:  cmpl %ecx, %edi
    jae 2f
    movl %eax, (%edi)
    addl $4, %edi
    jmp 1b
2:
    /* PML4[0] -> PDPT */
    movl $probe_pdpt, %eax
    orl $0x3, %eax              /* present | writable */
    movl %eax, probe_pml4
    /* PDPT[0..4] -> the 4 page directories */
    movl $probe_pd, %eax
    orl $0x3, %eax
    movl $probe_pdpt, %edi
    movl $4, %ecx
3:  movl %eax, (%edi)
    addl $4096, %eax
    addl $8, %edi
    decl %ecx
    jnz 3b
    /* PD entries: 2048 x 2 MiB, identity. High dwords stay 0 from the bss clear. */
    /* Caching attributes are left write-back everywhere: device windows are MMIO */
    /* exits for a VMM and QEMU alike, nothing is cached for them.                */
    movl $probe_pd, %edi
    movl $0x83, %eax            /* present | writable | 2 MiB page */
4:  movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    cmpl $probe_pd_end, %edi
    jb 4b

    lgdtl probe_gdt_ptr

    movl %cr4, %eax
    orl $0x20, %eax             /* CR4.PAE */
    movl %eax, %cr4
    movl $probe_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx      /* IA32_EFER */
    rdmsr
    orl $0x100, %eax            /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax       /* CR0.PG | CR0.PE */
    movl %eax, %cr0
    ljmpl $0x08, $5f

    /* --- 64-bit ------------------------------------------------------------------------ */
    .code64
5:  movl $0x10, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $probe_stack_top, %esp /* zero-extends into RSP; 16-byte aligned */
    movl %esi, %edi             /* arg 0: hvm_start_info physical address */
    call probe_main
6:  cli
    hlt
    jmp 6b
    .popsection
"#,
    options(att_syntax)
);
