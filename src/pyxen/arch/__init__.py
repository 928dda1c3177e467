"""Architecture-specific guest construction (boot protocols, CPUID, firmware tables)."""
