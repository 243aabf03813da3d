"""The program headers of an ELF file: patchbox's one program-header walk.

What a loaded file is (its build-id note, where its first PT_LOAD goes, whether it asks
for a dynamic loader, its dynamic table, the bytes of a virtual address) is read from
the ELF header and the program headers alone: no section headers, no pyelftools, so it
is cheap enough to ask of every file every process of a host maps. Layouts and the ident
check come from :mod:`patchbox.elf.records`; tests/elf/test_records.py compares the walk
with pyelftools' ``iter_segments`` on real binaries and libraries.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import BinaryIO

from patchbox.elf.records import DT, EHDR, ET, PHDR, PT, iter_dynamic, read_ehdr
from patchbox.errors import ElfError

__all__ = [
    "ProgramHeader",
    "MAX_PHNUM",
    "PF_X",
    "DF_1_PIE",
    "read_program_headers",
    "read_segment",
    "read_dynamic",
    "has_interp",
    "first_load_vaddr",
    "is_shared_library",
]

MAX_PHNUM = 4096  # more program headers than any linker writes: not read
PF_X = 0x1  # p_flags: executable
DF_1_PIE = 0x08000000  # DT_FLAGS_1: a position-independent executable
_MAX_DYNAMIC = 1 << 20  # bytes of PT_DYNAMIC read at most


@dataclass(frozen=True)
class ProgramHeader:
    """One Elf64_Phdr; fields as pyelftools names them, in the order of
    :data:`patchbox.elf.records.PHDR`."""

    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    p_align: int


assert tuple(f.name for f in fields(ProgramHeader)) == PHDR.fields


def read_program_headers(f: BinaryIO, what: str) -> list[ProgramHeader]:
    """Returns the program headers of the ELF file open as ``f`` (read from its start; []
    when it has none or an entry size or count patchbox does not read); raises ElfError
    if it is not an ELF64 little-endian file or the table runs past its end."""
    f.seek(0)
    ehdr = read_ehdr(f.read(EHDR.size), what)
    phnum = ehdr["e_phnum"]
    if ehdr["e_phentsize"] != PHDR.size or not 0 < phnum < MAX_PHNUM:
        return []
    f.seek(ehdr["e_phoff"])
    table = f.read(PHDR.size * phnum)
    if len(table) != PHDR.size * phnum:
        raise ElfError(f"{what}: the program headers run past the end of the file")
    return [ProgramHeader(*ph) for ph in PHDR.iter_table(table, 0, len(table), what)]


def read_segment(f: BinaryIO, ph: ProgramHeader, what: str, limit: int | None = None) -> bytes:
    """Returns the file bytes of segment ``ph`` (at most ``limit``); raises ElfError if
    the file ends before them."""
    n = ph.p_filesz if limit is None else min(ph.p_filesz, limit)
    f.seek(ph.p_offset)
    data = f.read(n)
    if len(data) != n:
        raise ElfError(
            f"{what}: the segment at file offset {ph.p_offset:#x} runs past the end of the file"
        )
    return data


def read_dynamic(f: BinaryIO, phdrs: list[ProgramHeader], what: str) -> list[tuple[int, int]]:
    """Returns the (d_tag, d_val) entries of the PT_DYNAMIC segment up to DT_NULL ([]
    without one: a static executable)."""
    for ph in phdrs:
        if ph.p_type == PT["DYNAMIC"]:
            raw = read_segment(f, ph, what, _MAX_DYNAMIC)
            return list(iter_dynamic(raw, 0, len(raw), f"{what}: dynamic table"))
    return []


def has_interp(phdrs: list[ProgramHeader]) -> bool:
    """Returns True if the file asks for a program interpreter (PT_INTERP: a dynamically
    linked executable)."""
    return any(ph.p_type == PT["INTERP"] for ph in phdrs)


def first_load_vaddr(phdrs: list[ProgramHeader]) -> int:
    """Returns the page-aligned p_vaddr of the PT_LOAD that maps file offset 0 (what a
    mapping of the file's start is biased against), 0 without one."""
    for ph in phdrs:
        if ph.p_type == PT["LOAD"] and ph.p_offset == 0:
            return ph.p_vaddr & ~0xFFF
    return 0


def is_shared_library(f: BinaryIO, what: str) -> bool:
    """Returns True for an ET_DYN file that is not an executable: no PT_INTERP, a
    dynamic table (a static-pie has none) without DF_1_PIE in DT_FLAGS_1."""
    f.seek(0)
    if read_ehdr(f.read(EHDR.size), what)["e_type"] != ET["DYN"]:
        return False
    phdrs = read_program_headers(f, what)
    if has_interp(phdrs):
        return False
    dynamic = read_dynamic(f, phdrs, what)
    flags_1 = next((val for tag, val in dynamic if tag == DT["FLAGS_1"]), 0)
    return bool(dynamic) and not flags_1 & DF_1_PIE
