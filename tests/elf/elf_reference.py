"""pyelftools as the reference for patchbox's own ELF readers (a helper, not a test module).

patchbox reads objects and program headers with hand-written :mod:`struct` code for speed
(src/patchbox/elf/fastread.py says why); these functions read the same files with
pyelftools into the same values, so tests can compare the two field by field.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_D_TAG, ENUM_P_TYPE_BASE
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableIndexSection, SymbolTableSection

from patchbox.arch import get_arch_by_machine
from patchbox.elf.objfile import ObjectFile, ObjSymbol, Relocation, Section
from patchbox.elf.records import SHN_ABS, SHN_COMMON, SHN_LORESERVE, SHN_UNDEF, SHN_XINDEX
from patchbox.elf.segments import ProgramHeader

__all__ = ["load_object_pyelftools", "program_headers_pyelftools", "dynamic_pyelftools"]

_SPECIAL_SHNDX = {"SHN_UNDEF": SHN_UNDEF, "SHN_ABS": SHN_ABS, "SHN_COMMON": SHN_COMMON}
_P_TYPES = ENUM_P_TYPE_BASE


def _number(value: object, names: Mapping[str, object]) -> int:
    """Returns the number of an enumerated field pyelftools gives by name (or as is)."""
    if isinstance(value, str):
        value = names[value]
    assert isinstance(value, int)
    return value


def load_object_pyelftools(path: str | Path) -> ObjectFile:
    """Returns the relocatable object at ``path`` as pyelftools reads it."""
    path = Path(path)
    elf = ELFFile(io.BytesIO(path.read_bytes()))
    assert elf["e_type"] == "ET_REL", path
    sections: list[Section] = []
    xindex: SymbolTableIndexSection | None = None
    for i, sec in enumerate(elf.iter_sections()):
        nobits = sec["sh_type"] == "SHT_NOBITS"
        sections.append(
            Section(
                index=i,
                name=sec.name,
                type=sec["sh_type"],
                flags=sec["sh_flags"],
                size=sec["sh_size"],
                align=max(1, sec["sh_addralign"]),
                data=b"" if nobits else sec.data(),
                offset=sec["sh_offset"],
            )
        )
        if isinstance(sec, SymbolTableIndexSection):
            xindex = sec
    symtab_idx = next(i for i, s in enumerate(elf.iter_sections()) if s["sh_type"] == "SHT_SYMTAB")
    symtab = elf.get_section(symtab_idx)
    assert isinstance(symtab, SymbolTableSection)
    symbols: list[ObjSymbol] = []
    source = None
    for i, sym in enumerate(symtab.iter_symbols()):
        stype = sym["st_info"]["type"].removeprefix("STT_")
        raw_ndx = sym["st_shndx"]
        if isinstance(raw_ndx, str):
            shndx, defined = _SPECIAL_SHNDX.get(raw_ndx, SHN_UNDEF), False
        elif raw_ndx == SHN_XINDEX and xindex is not None:
            shndx, defined = xindex.get_section_index(i), True
        else:
            shndx, defined = raw_ndx, 0 < raw_ndx < SHN_LORESERVE
        name = sym.name
        if stype == "SECTION" and defined and shndx < len(sections):
            name = sections[shndx].name
        if stype == "FILE" and source is None and name:
            source = name
        symbols.append(
            ObjSymbol(
                index=i,
                name=name,
                value=sym["st_value"],
                size=sym["st_size"],
                type=stype,
                bind=sym["st_info"]["bind"].removeprefix("STB_"),
                shndx=shndx,
                defined=defined,
            )
        )
    relocs: dict[int, list[Relocation]] = defaultdict(list)
    for sec in elf.iter_sections():
        if not isinstance(sec, RelocationSection) or sec["sh_type"] != "SHT_RELA":
            continue
        if sec["sh_link"] != symtab_idx:
            continue
        for rel in sec.iter_relocations():
            relocs[sec["sh_info"]].append(
                Relocation(
                    offset=rel["r_offset"],
                    type=rel["r_info_type"],
                    symbol=symbols[rel["r_info_sym"]],
                    addend=rel["r_addend"],
                )
            )
    return ObjectFile(
        path=path,
        arch=get_arch_by_machine(elf["e_machine"], str(path)),
        sections=sections,
        symbols=symbols,
        relocations=dict(relocs),
        source_file=source,
    )


def program_headers_pyelftools(path: str | Path) -> list[ProgramHeader]:
    """Returns the program headers of ``path`` as pyelftools reads them (types and flags
    as numbers)."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        out = []
        for seg in elf.iter_segments():
            h = dict(seg.header)
            out.append(
                ProgramHeader(
                    _number(h["p_type"], _P_TYPES),
                    h["p_flags"],
                    h["p_offset"],
                    h["p_vaddr"],
                    h["p_paddr"],
                    h["p_filesz"],
                    h["p_memsz"],
                    h["p_align"],
                )
            )
        return out


def dynamic_pyelftools(path: str | Path) -> list[tuple[int, int]]:
    """Returns the (d_tag, d_val) entries of ``path``'s PT_DYNAMIC up to DT_NULL, as
    pyelftools reads them ([] without one)."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            if isinstance(seg, DynamicSegment):
                out = []
                for tag in seg.iter_tags():
                    if tag.entry.d_tag == "DT_NULL":
                        break
                    out.append((_number(tag.entry.d_tag, ENUM_D_TAG), tag.entry.d_val))
                return out
    return []
