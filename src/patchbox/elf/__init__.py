"""ELF reading: record layouts, the reference binary, relocatable objects (fast reader and
pyelftools reference), the x86-64 relocation table, and DWARF (inlining, declarations)."""
