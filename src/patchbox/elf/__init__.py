"""ELF reading: record layouts, the reference binary, relocatable objects (fast reader and
pyelftools reference), thread-local facts, and DWARF (inlining, declarations). What
differs per architecture (relocation types among them) is :mod:`patchbox.arch`'s."""
