"""ELF64 little-endian record layouts, declared once, read with bounds checks.

Every reader of ELF bytes in patchbox takes its layouts and its one ident check
(:func:`read_ehdr`) from here: the fast object reader (:mod:`patchbox.elf.fastread`),
the program-header walk (:mod:`patchbox.elf.segments`), the build-id reader, the
reference binary's bulk symbol reader and the dynamic-section reader of
:mod:`patchbox.elf.exports`. Field names and the names of enumerated values are
pyelftools' (``elftools/elf/structs.py``, ``elftools/elf/enums.py``), so a record read
here and one read by pyelftools compare equal field by field (tests/elf/test_records.py
checks it on real objects and binaries).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from elftools.elf.enums import (
    ENUM_D_TAG_COMMON,
    ENUM_E_MACHINE,
    ENUM_E_TYPE,
    ENUM_P_TYPE_BASE,
    ENUM_SH_TYPE_BASE,
    ENUM_ST_INFO_BIND,
    ENUM_ST_INFO_TYPE,
)

from patchbox.arch import Arch
from patchbox.errors import ElfError

__all__ = [
    "Layout",
    "EHDR",
    "SHDR",
    "SYM",
    "RELA",
    "PHDR",
    "NHDR",
    "DYN",
    "ELFMAG",
    "read_ehdr",
    "enum_name",
    "SHN_UNDEF",
    "SHN_LORESERVE",
    "SHN_ABS",
    "SHN_COMMON",
    "SHN_XINDEX",
    "SHT",
    "PT",
    "DT",
    "ET",
    "iter_dynamic",
    "sym_type",
    "sym_bind",
    "section_type",
    "cstring",
    "SH_NAME",
    "SH_TYPE",
    "SH_FLAGS",
    "SH_OFFSET",
    "SH_SIZE",
    "SH_LINK",
    "SH_INFO",
    "SH_ALIGN",
    "ST_NAME",
    "ST_SHNDX",
]

# Special section indices (st_shndx), as in <elf.h>.
SHN_UNDEF = 0
SHN_LORESERVE = 0xFF00
SHN_ABS = 0xFFF1
SHN_COMMON = 0xFFF2
SHN_XINDEX = 0xFFFF


def _numbers(enum: Mapping[str, object], prefix: str) -> dict[str, int]:
    """Returns {name without ``prefix``: number} of a pyelftools enumeration."""
    return {
        name.removeprefix(prefix): value
        for name, value in enum.items()
        if isinstance(value, int) and name.startswith(prefix)
    }


# Numbers of the enumerations the readers use, by pyelftools' names without the prefix
# (SHT["SYMTAB"], PT["LOAD"], DT["NEEDED"], ET["REL"]).
SHT = _numbers(ENUM_SH_TYPE_BASE, "SHT_")
PT = _numbers(ENUM_P_TYPE_BASE, "PT_")
DT = _numbers(ENUM_D_TAG_COMMON, "DT_")
ET = _numbers(ENUM_E_TYPE, "ET_")

# e_ident: the magic, then EI_CLASS (ELFCLASS64) and EI_DATA (ELFDATA2LSB).
ELFMAG = b"\x7fELF"
_ELFCLASS64, _ELFDATA2LSB = 2, 1


@dataclass(frozen=True)
class Layout:
    """One fixed-size record: a :class:`struct.Struct` and its pyelftools field names."""

    name: str
    struct: struct.Struct
    fields: tuple[str, ...]

    @property
    def size(self) -> int:
        """Returns the record size in bytes."""
        return self.struct.size

    def unpack_from(self, buf: bytes, offset: int, what: str) -> tuple[int, ...]:
        """Returns one record at ``offset``; raises ElfError naming ``what`` if the buffer
        does not hold it."""
        if offset < 0 or offset + self.size > len(buf):
            raise ElfError(
                f"{what}: {self.name} at offset {offset:#x} runs past the end of the "
                f"{len(buf)}-byte file"
            )
        return self.struct.unpack_from(buf, offset)

    def iter_table(
        self, buf: bytes, offset: int, size: int, what: str
    ) -> Iterator[tuple[int, ...]]:
        """Returns an iterator over the records of a table of ``size`` bytes at ``offset``;
        raises ElfError if the table is not inside the buffer or not a whole number of
        records."""
        if offset < 0 or size < 0 or offset + size > len(buf):
            raise ElfError(
                f"{what}: table of {size} bytes at offset {offset:#x} runs past the end "
                f"of the {len(buf)}-byte file"
            )
        if size % self.size:
            raise ElfError(
                f"{what}: table size {size} is not a multiple of {self.name} ({self.size})"
            )
        return self.struct.iter_unpack(memoryview(buf)[offset : offset + size])


def _layout(name: str, fmt: str, fields: str) -> Layout:
    layout = Layout(name, struct.Struct(fmt), tuple(fields.split()))
    assert len(layout.fields) == len(layout.struct.unpack(bytes(layout.size)))
    return layout


EHDR = _layout(
    "Elf64_Ehdr",
    "<16sHHIQQQIHHHHHH",
    "e_ident e_type e_machine e_version e_entry e_phoff e_shoff e_flags e_ehsize "
    "e_phentsize e_phnum e_shentsize e_shnum e_shstrndx",
)
SHDR = _layout(
    "Elf64_Shdr",
    "<IIQQQQIIQQ",
    "sh_name sh_type sh_flags sh_addr sh_offset sh_size sh_link sh_info sh_addralign sh_entsize",
)
SYM = _layout("Elf64_Sym", "<IBBHQQ", "st_name st_info st_other st_shndx st_value st_size")
# Columns of the tuples SHDR's and SYM's tables yield, by field name.
SH_NAME, SH_TYPE, SH_FLAGS, SH_OFFSET, SH_SIZE, SH_LINK, SH_INFO, SH_ALIGN = (
    SHDR.fields.index(f)
    for f in (
        "sh_name",
        "sh_type",
        "sh_flags",
        "sh_offset",
        "sh_size",
        "sh_link",
        "sh_info",
        "sh_addralign",
    )
)
ST_NAME, ST_SHNDX = (SYM.fields.index(f) for f in ("st_name", "st_shndx"))
RELA = _layout("Elf64_Rela", "<QQq", "r_offset r_info r_addend")
PHDR = _layout(
    "Elf64_Phdr",
    "<IIQQQQQQ",
    "p_type p_flags p_offset p_vaddr p_paddr p_filesz p_memsz p_align",
)
NHDR = _layout("Elf64_Nhdr", "<III", "n_namesz n_descsz n_type")
DYN = _layout("Elf64_Dyn", "<qQ", "d_tag d_val")


def read_ehdr(buf: bytes, what: str) -> dict[str, int]:
    """Returns the ELF header at the start of ``buf`` by field name; raises ElfError if
    ``buf`` does not start with one of an ELF64 little-endian file: patchbox's one ident
    check."""
    if len(buf) < EHDR.size or buf[:4] != ELFMAG or buf[4] != _ELFCLASS64 or buf[5] != _ELFDATA2LSB:
        raise ElfError(f"{what}: not an ELF64 little-endian file")
    return dict(zip(EHDR.fields, EHDR.unpack_from(buf, 0, what), strict=True))


def iter_dynamic(buf: bytes, offset: int, size: int, what: str) -> Iterator[tuple[int, int]]:
    """Returns an iterator over the (d_tag, d_val) entries of the dynamic table of
    ``size`` bytes at ``offset``, up to DT_NULL; raises ElfError if the table is not
    inside ``buf``."""
    for d_tag, d_val in DYN.iter_table(buf, offset, size - size % DYN.size, what):
        if d_tag == DT["NULL"]:
            return
        yield d_tag, d_val


_TYPES = {v: k.removeprefix("STT_") for k, v in ENUM_ST_INFO_TYPE.items() if isinstance(v, int)}
_BINDS = {v: k.removeprefix("STB_") for k, v in ENUM_ST_INFO_BIND.items() if isinstance(v, int)}
_SH_TYPES = {
    v: k for k, v in ENUM_SH_TYPE_BASE.items() if isinstance(v, int) and k.startswith("SHT_")
}


def sym_type(st_info: int) -> str:
    """Returns the symbol type of ``st_info`` as pyelftools names it, without ``STT_``
    (``FUNC``; GNU's IFUNC is pyelftools' ``LOOS``)."""
    t = st_info & 0xF
    return _TYPES.get(t, str(t))


def sym_bind(st_info: int) -> str:
    """Returns the binding of ``st_info`` as pyelftools names it, without ``STB_``
    (``GLOBAL``; GNU's UNIQUE is pyelftools' ``LOOS``)."""
    b = st_info >> 4
    return _BINDS.get(b, str(b))


def enum_name(enum: str, value: int) -> str:
    """Returns pyelftools' name of ``value`` in the ELF header enumeration ``enum``
    (``e_type``: ``ET_EXEC``, ``ET_DYN``), else the number."""
    table = {"e_type": ENUM_E_TYPE, "e_machine": ENUM_E_MACHINE}[enum]
    return next((k for k, v in table.items() if v == value and k[:3] in ("ET_", "EM_")), str(value))


def section_type(sh_type: int, arch: Arch) -> str | int:
    """Returns the section type name pyelftools gives (``SHT_PROGBITS``; a
    processor-specific one of ``arch``), or the number."""
    name = _SH_TYPES.get(sh_type)
    return name if name is not None else arch.section_types.get(sh_type, sh_type)


def cstring(buf: bytes, offset: int) -> str:
    """Returns the NUL-terminated string at ``offset`` of a string table (UTF-8, bad
    bytes replaced); "" past the end of the table."""
    if offset >= len(buf):
        return ""
    end = buf.find(b"\0", offset)
    return buf[offset : end if end >= 0 else len(buf)].decode("utf-8", "replace")
