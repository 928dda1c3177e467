/* Hypercall round-trip benchmark guest (PVH, 64-bit). Markers on port 0xE9:
 *   'A' first instruction, 'B' before N direct hypercalls, 'C' after them (before N bare
 *   port exits), 'D' after those, 'E' after N hypercalls through the hypercall page.
 * N is taken from the start_info command line's first character count... kept fixed here. */
#define N 2000
.section .note.Xen, "a"
.balign 4
.long 4, 8, 18
.asciz "Xen"
.balign 4
.quad _start
.text
.code32
.globl _start
_start:
  mov $0x41, %al
  out %al, $0xe9
  lgdt gdtr
  mov $0x201003, %eax
  mov %eax, 0x200000
  mov $0x202003, %eax
  mov %eax, 0x201000
  xor %ecx, %ecx
1: mov %ecx, %eax
  shl $21, %eax
  or $0x83, %eax
  mov %eax, 0x202000(,%ecx,8)
  inc %ecx
  cmp $512, %ecx
  jne 1b
  mov $0x200000, %eax
  mov %eax, %cr3
  mov %cr4, %eax
  or $0x20, %eax
  mov %eax, %cr4
  mov $0xC0000080, %ecx
  rdmsr
  or $0x100, %eax
  wrmsr
  mov %cr0, %eax
  or $0x80000001, %eax
  mov %eax, %cr0
  ljmp $0x08, $long
.code64
long:
  mov $0x10, %ax
  mov %ax, %ds
  mov %ax, %ss
  mov $0x180000, %rsp
  /* pick the hypercall instruction like Linux: AMD/Hygon -> vmmcall */
  xor %eax, %eax
  cpuid
  lea xen_hypercall_intel(%rip), %r12
  cmp $0x68747541, %ebx            /* "Auth" */
  jne 2f
  lea xen_hypercall_amd(%rip), %r12
2:
  mov $0x42, %al
  out %al, $0xe9
  mov $N, %r13d
3: mov $17, %eax
  xor %edi, %edi
  xor %esi, %esi
  call *%r12
  dec %r13d
  jnz 3b
  mov $0x43, %al
  out %al, $0xe9
  mov $N, %r13d
4: out %al, $0x80                  /* a bare port exit the VMM ignores */
  dec %r13d
  jnz 4b
  mov $0x44, %al
  out %al, $0xe9
  /* hypercall page at 0x300000 (MSR index from CPUID 0x40000002 EBX) */
  mov $0x40000002, %eax
  cpuid
  mov %ebx, %ecx
  mov $0x300000, %eax
  xor %edx, %edx
  wrmsr
  mov $N, %r13d
5: xor %edi, %edi
  xor %esi, %esi
  call 0x300000 + 17*32
  dec %r13d
  jnz 5b
  mov $0x45, %al
  out %al, $0xe9
  movl $0, reason(%rip)
  mov $2, %edi
  lea reason(%rip), %rsi
  mov $29, %eax
  call *%r12
  hlt
.balign 16
.globl xen_hypercall_amd
xen_hypercall_amd:
  vmmcall
  ret
.balign 16
.globl xen_hypercall_intel
xen_hypercall_intel:
  vmcall
  ret
.data
reason: .long 0
.balign 16
gdt: .quad 0, 0x00af9a000000ffff, 0x00cf92000000ffff
gdtr: .word 23
  .quad gdt
