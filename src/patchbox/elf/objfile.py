"""A relocatable x86-64 object file (``.o``): sections, symbols, RELA relocations.

Everything is read once into plain dataclasses; the file is not kept open. Two readers
fill them: :func:`patchbox.elf.fastread.load_object` (the one patchbox uses: bulk
:mod:`struct` unpacking) and :meth:`ObjectFile.load` here (pyelftools: the reference
the fast reader is tested against, and its fallback for unusual files).
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableIndexSection, SymbolTableSection

from patchbox.elf.records import SHN_ABS, SHN_COMMON, SHN_LORESERVE, SHN_UNDEF, SHN_XINDEX
from patchbox.errors import ElfError

__all__ = ["Section", "ObjSymbol", "Relocation", "ObjectFile"]

_SPECIAL_SHNDX = {"SHN_UNDEF": SHN_UNDEF, "SHN_ABS": SHN_ABS, "SHN_COMMON": SHN_COMMON}


@dataclass
class Section:
    """One section of the object."""

    index: int
    name: str
    type: str | int  # pyelftools' name (SHT_PROGBITS, SHT_NOBITS, ...), else the number
    flags: int
    size: int
    align: int
    data: bytes  # b"" for SHT_NOBITS
    offset: int = 0  # sh_offset: where ``data`` lies in the file

    @property
    def is_alloc(self) -> bool:
        """Returns True if the section occupies memory at run time."""
        return bool(self.flags & SH_FLAGS.SHF_ALLOC)

    @property
    def is_exec(self) -> bool:
        """Returns True for code."""
        return bool(self.flags & SH_FLAGS.SHF_EXECINSTR)

    @property
    def is_write(self) -> bool:
        """Returns True for writable data."""
        return bool(self.flags & SH_FLAGS.SHF_WRITE)

    @property
    def is_tls(self) -> bool:
        """Returns True for thread-local data."""
        return bool(self.flags & SH_FLAGS.SHF_TLS)

    @property
    def is_nobits(self) -> bool:
        """Returns True for zero-initialised data (bss)."""
        return self.type == "SHT_NOBITS"

    @property
    def is_rodata(self) -> bool:
        """Returns True for loaded, read-only, non-code, non-TLS data."""
        return self.is_alloc and not self.is_exec and not self.is_write and not self.is_tls


@dataclass
class ObjSymbol:
    """One symbol of the object's ``.symtab``."""

    index: int
    name: str  # a SECTION symbol carries its section's name
    value: int  # offset in its section
    size: int
    type: str  # FUNC, OBJECT, NOTYPE, SECTION, FILE, TLS, ... (pyelftools' names)
    bind: str  # LOCAL, GLOBAL, WEAK, ...
    shndx: int  # section header index (SHN_XINDEX resolved) if defined, else SHN_UNDEF/ABS/COMMON
    defined: bool  # lives in a section of this object (decided on the raw st_shndx)

    @property
    def is_undef(self) -> bool:
        """Returns True for an undefined symbol (defined by another object or library)."""
        return not self.defined and self.shndx == SHN_UNDEF

    @property
    def is_abs(self) -> bool:
        """Returns True for an absolute symbol (SHN_ABS)."""
        return not self.defined and self.shndx == SHN_ABS

    @property
    def is_common(self) -> bool:
        """Returns True for a common symbol (tentative definition, -fcommon)."""
        return not self.defined and self.shndx == SHN_COMMON

    @property
    def is_local(self) -> bool:
        """Returns True for a LOCAL symbol."""
        return self.bind == "LOCAL"


@dataclass
class Relocation:
    """One RELA relocation: at ``offset`` of a section, against ``symbol``, plus ``addend``."""

    offset: int
    type: int
    symbol: ObjSymbol
    addend: int


@dataclass
class ObjectFile:
    """A relocatable x86-64 ELF object read into memory."""

    path: Path
    sections: list[Section]
    symbols: list[ObjSymbol]
    relocations: dict[int, list[Relocation]] = field(default_factory=dict)
    source_file: str | None = None  # the STT_FILE name (as the compiler wrote it)

    @classmethod
    def load(cls, path: str | Path) -> ObjectFile:
        """Returns the object at ``path`` read with pyelftools; raises ElfError if it is
        not an x86-64 .o."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise ElfError(f"cannot read object file {path}: {err.strerror}") from err
        try:
            elf = ELFFile(io.BytesIO(raw))
            return cls._parse(path, elf)
        except (_PyElfError, ValueError, KeyError, IndexError) as err:
            raise ElfError(f"{path}: not a readable ELF object: {err}") from err

    @classmethod
    def _parse(cls, path: Path, elf: ELFFile) -> ObjectFile:
        if elf["e_machine"] != "EM_X86_64":
            raise ElfError(f"{path}: not an x86-64 object ({elf['e_machine']})")
        if elf["e_type"] != "ET_REL":
            raise ElfError(
                f"{path}: not a relocatable object ({elf['e_type']}); "
                f"pass the patched .o (gcc -c), not a linked file"
            )
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
        symtab_idx = next(
            (i for i, s in enumerate(elf.iter_sections()) if s["sh_type"] == "SHT_SYMTAB"), -1
        )
        symtab = elf.get_section(symtab_idx) if symtab_idx >= 0 else None
        if not isinstance(symtab, SymbolTableSection):
            raise ElfError(f"{path}: no symbol table")
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
            if sec["sh_type"] == "SHT_REL":
                raise ElfError(f"{path}: REL relocation section {sec.name} (x86-64 uses RELA)")
            if not isinstance(sec, RelocationSection) or sec["sh_type"] != "SHT_RELA":
                continue
            if sec["sh_link"] != symtab_idx:
                continue
            target = sec["sh_info"]
            for rel in sec.iter_relocations():
                relocs[target].append(
                    Relocation(
                        offset=rel["r_offset"],
                        type=rel["r_info_type"],
                        symbol=symbols[rel["r_info_sym"]],
                        addend=rel["r_addend"],
                    )
                )
        return cls(
            path=path,
            sections=sections,
            symbols=symbols,
            relocations=dict(relocs),
            source_file=source,
        )

    def get_section(self, index: int) -> Section:
        """Returns the section with header index ``index``."""
        return self.sections[index]

    def get_symbol_section(self, sym: ObjSymbol) -> Section:
        """Returns the section a defined symbol lives in; raises ElfError for others."""
        if not sym.defined or sym.shndx >= len(self.sections):
            raise ElfError(
                f"{self.path}: symbol {sym.name!r} has no section (shndx {sym.shndx:#x})"
            )
        return self.sections[sym.shndx]

    def get_relocations(self, section: Section) -> list[Relocation]:
        """Returns the relocations that apply to ``section`` (sorted by offset)."""
        return sorted(self.relocations.get(section.index, []), key=lambda r: r.offset)

    def get_section_symbols(self, section: Section) -> list[ObjSymbol]:
        """Returns the named FUNC/OBJECT/NOTYPE/TLS symbols defined in ``section``."""
        return [
            s
            for s in self.symbols
            if s.defined
            and s.shndx == section.index
            and s.type not in ("SECTION", "FILE")
            and s.name
            and not s.name.startswith(".L")
        ]

    def get_function(self, name: str) -> ObjSymbol | None:
        """Returns the defined FUNC symbol ``name`` or None."""
        for sym in self.symbols:
            if sym.name == name and sym.type == "FUNC" and sym.defined:
                return sym
        return None
