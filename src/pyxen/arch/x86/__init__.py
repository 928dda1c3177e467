"""x86 PVH boot path: kernel images (ELF, bzImage), start_info, memory map, ACPI, CPUID.

Every module here is pure (functions over bytes); only :mod:`.kernel` reads a file.
"""
