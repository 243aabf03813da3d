"""A relocatable ELF object file (``.o``): sections, symbols, RELA relocations, and the
architecture it is for (:class:`patchbox.arch.Arch`, from its ``e_machine``).

Everything is read once into plain dataclasses; the file is not kept open. One reader
fills them: :func:`patchbox.elf.fastread.load_object` (tests compare what it reads with
pyelftools).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.constants import SH_FLAGS

from patchbox.arch import Arch
from patchbox.elf.records import SHN_ABS, SHN_COMMON, SHN_UNDEF
from patchbox.errors import ElfError

# The ELF mapping symbols (the processor ABIs' "$x", "$d", "$a", "$t", with an optional
# ".N"): GCC accepts "$" in C identifiers, so a name merely starting with one may be code.
_MAPPING_SYMBOL = re.compile(r"\$[adtx](?:\.\w*)?")

__all__ = ["Section", "ObjSymbol", "Relocation", "ObjectFile"]


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
    """A relocatable ELF object read into memory."""

    path: Path
    arch: Arch
    sections: list[Section]
    symbols: list[ObjSymbol]
    relocations: dict[int, list[Relocation]] = field(default_factory=dict)
    source_file: str | None = None  # the STT_FILE name (as the compiler wrote it)

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
        """Returns the named FUNC/OBJECT/NOTYPE/TLS symbols defined in ``section``: not
        the assembler's local labels (``.L``) nor the ELF mapping symbols that mark where
        code and data start in a section (``$x``, ``$d.1``; where a processor ABI defines
        them, every code section has one, so they name no one place of a program)."""
        return [
            s
            for s in self.symbols
            if s.defined
            and s.shndx == section.index
            and s.type not in ("SECTION", "FILE")
            and s.name
            and not s.name.startswith(".L")
            and not _MAPPING_SYMBOL.fullmatch(s.name)
        ]

    def get_function(self, name: str) -> ObjSymbol | None:
        """Returns the defined FUNC symbol ``name`` or None."""
        for sym in self.symbols:
            if sym.name == name and sym.type == "FUNC" and sym.defined:
                return sym
        return None
