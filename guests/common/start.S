/*
 * PVH entry for the pyxen test guests.
 *
 * Entry state (Xen docs/misc/pvh.pandoc): 32-bit protected mode, flat
 * CS/DS/ES/SS, paging off, interrupts off, EBX = guest-physical address of
 * struct hvm_start_info, no usable stack or GDT.
 *
 * We load our own GDT, zero .bss, identity-map 0..4 GiB with 2 MiB pages
 * (PAE), enable EFER.LME + CR0.PG, far-jump to 64-bit code and call
 * rt_entry(start_info) (common/rt.c), which calls guest_main().
 */

#define STACK_SIZE 16384

/* ---- ELF notes (owner "Xen"), emitted in a PT_NOTE segment ---- */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4                 /* namesz */
        .long 4                 /* descsz */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .balign 4
        .long _start32          /* physical 32-bit entry point */
        .balign 4
        .long 4
        .long 4
        .long 14                /* XEN_ELFNOTE_SUSPEND_CANCEL */
        .asciz "Xen"
        .balign 4
        .long 1
        .balign 4

/* ---- 32-bit entry ---- */
        .section .text.entry, "ax"
        .code32
        .globl _start32
        .type _start32, @function
_start32:
        cli
        cld
        lgdt    gdt_desc
        ljmp    $0x18, $1f              /* flat 32-bit code */
1:
        movl    $0x10, %eax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    %ax, %fs
        movw    %ax, %gs

        /* Zero .bss (EBX, the start_info pointer, is preserved). */
        movl    $__bss_start, %edi
        movl    $__bss_end, %ecx
        subl    %edi, %ecx
        shrl    $2, %ecx
        xorl    %eax, %eax
        rep stosl

        movl    $(cpu_stacks + STACK_SIZE), %esp

        /* PML4[0] -> PDPT; PDPT[0..3] -> PD (4 contiguous pages). */
        movl    $pdpt, %eax
        orl     $0x3, %eax
        movl    %eax, pml4
        movl    $pd, %eax
        orl     $0x3, %eax
        movl    %eax, pdpt
        addl    $4096, %eax
        movl    %eax, pdpt + 8
        addl    $4096, %eax
        movl    %eax, pdpt + 16
        addl    $4096, %eax
        movl    %eax, pdpt + 24

        /* 2048 PDEs: i<<21 | P|RW|PS, plus PCD|PWT from 3 GiB (MMIO area). */
        xorl    %ecx, %ecx
2:
        movl    %ecx, %eax
        shll    $21, %eax
        orl     $0x83, %eax
        cmpl    $1536, %ecx
        jb      3f
        orl     $0x18, %eax
3:
        movl    %eax, pd(, %ecx, 8)
        incl    %ecx
        cmpl    $2048, %ecx
        jb      2b

        movl    %cr4, %eax
        orl     $0x20, %eax             /* CR4.PAE */
        movl    %eax, %cr4
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $0xC0000080, %ecx       /* EFER */
        rdmsr
        orl     $0x100, %eax            /* EFER.LME */
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000001, %eax       /* CR0.PG | CR0.PE */
        movl    %eax, %cr0
        ljmp    $0x08, $long_entry

        .code64
long_entry:
        movl    $0x10, %eax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    %ax, %fs
        movw    %ax, %gs
        movq    $(cpu_stacks + STACK_SIZE), %rsp
        movl    %ebx, %edi              /* struct hvm_start_info * */
        call    rt_entry
4:      cli
        hlt
        jmp     4b
        .size _start32, . - _start32

/*
 * Secondary vCPU entry, started by VCPUOP_initialise (VCPU_HVM_MODE_64B):
 * Xen gives a 64-bit code segment (selector 0), our CR3, RSP and RDI.
 */
        .globl ap_entry64
        .type ap_entry64, @function
ap_entry64:
        lgdt    gdt_desc(%rip)
        pushq   $0x08
        leaq    1f(%rip), %rax
        pushq   %rax
        lretq
1:
        movl    $0x10, %eax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    %ax, %fs
        movw    %ax, %gs
        call    ap_entry_c              /* rdi = vcpu id */
2:      cli
        hlt
        jmp     2b
        .size ap_entry64, . - ap_entry64

/* ---- interrupt and exception entry points ---- */
        .macro PUSH_REGS
        pushq   %rax
        pushq   %rcx
        pushq   %rdx
        pushq   %rbx
        pushq   %rbp
        pushq   %rsi
        pushq   %rdi
        pushq   %r8
        pushq   %r9
        pushq   %r10
        pushq   %r11
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15
        .endm

        .macro POP_REGS
        popq    %r15
        popq    %r14
        popq    %r13
        popq    %r12
        popq    %r11
        popq    %r10
        popq    %r9
        popq    %r8
        popq    %rdi
        popq    %rsi
        popq    %rbp
        popq    %rbx
        popq    %rdx
        popq    %rcx
        popq    %rax
        .endm

        /* Event channel upcall (vector 0xF3): save all GPRs, handle, iretq. */
        .globl upcall_entry
        .type upcall_entry, @function
upcall_entry:
        PUSH_REGS
        movq    %rsp, %rbx
        andq    $-16, %rsp
        cld
        call    upcall_handler_c
        movq    %rbx, %rsp
        POP_REGS
        iretq
        .size upcall_entry, . - upcall_entry

        .globl irq_other_entry
        .type irq_other_entry, @function
irq_other_entry:
        PUSH_REGS
        movq    %rsp, %rbx
        andq    $-16, %rsp
        cld
        call    irq_other_c
        movq    %rbx, %rsp
        POP_REGS
        iretq
        .size irq_other_entry, . - irq_other_entry

        /* Spurious LAPIC vector 0xFF: no EOI. */
        .globl spurious_entry
spurious_entry:
        iretq

        .macro EXC_NOERR v
        .balign 16
exc_\v:
        pushq   $0
        pushq   $\v
        jmp     exc_common
        .endm

        .macro EXC_ERR v
        .balign 16
exc_\v:
        pushq   $\v
        jmp     exc_common
        .endm

exc_common:
        PUSH_REGS
        movq    %rsp, %rdi
        andq    $-16, %rsp
        cld
        call    exception_c             /* does not return */
5:      cli
        hlt
        jmp     5b

        EXC_NOERR 0
        EXC_NOERR 1
        EXC_NOERR 2
        EXC_NOERR 3
        EXC_NOERR 4
        EXC_NOERR 5
        EXC_NOERR 6
        EXC_NOERR 7
        EXC_ERR   8
        EXC_NOERR 9
        EXC_ERR   10
        EXC_ERR   11
        EXC_ERR   12
        EXC_ERR   13
        EXC_ERR   14
        EXC_NOERR 15
        EXC_NOERR 16
        EXC_ERR   17
        EXC_NOERR 18
        EXC_NOERR 19
        EXC_NOERR 20
        EXC_ERR   21
        EXC_NOERR 22
        EXC_NOERR 23
        EXC_NOERR 24
        EXC_NOERR 25
        EXC_NOERR 26
        EXC_NOERR 27
        EXC_NOERR 28
        EXC_ERR   29
        EXC_ERR   30
        EXC_NOERR 31

/*
 * The only two hypercall instructions in the image, laid out like Linux
 * >= 6.1.119 (arch/x86/xen/xen-head.S): 16-byte aligned, the Intel one
 * 16 bytes after the AMD one.  The host traps these two addresses.
 */
        .section .text.hypercall, "ax"
        .balign 16
        .globl xen_hypercall_amd
        .type xen_hypercall_amd, @function
xen_hypercall_amd:
        vmmcall
        ret
        .size xen_hypercall_amd, . - xen_hypercall_amd
        .balign 16, 0x90
        .globl xen_hypercall_intel
        .type xen_hypercall_intel, @function
xen_hypercall_intel:
        vmcall
        ret
        .size xen_hypercall_intel, . - xen_hypercall_intel
        .balign 16, 0x90

/* ---- data ---- */
        .section .rodata
        .balign 8
        .globl exc_table
exc_table:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad exc_\v
        .endr

        .section .data
        .balign 16
gdt:
        .quad 0
        .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
        .quad 0x00cf92000000ffff        /* 0x10: flat data */
        .quad 0x00cf9a000000ffff        /* 0x18: flat 32-bit code */
gdt_end:
        .balign 8
        .globl gdt_desc
gdt_desc:
        .word gdt_end - gdt - 1
        .quad gdt

        .section .bss
        .balign 4096
        .globl pml4, pdpt, pd
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4 * 4096
