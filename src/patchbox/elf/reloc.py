"""x86-64 relocation types: one table keyed by name (style of pyelftools' relocation.py).

Every type has its number, the size of the field it writes, whether its value is
relative to the place (``S + A - P``) and, if a live patch can carry it, the
:class:`Recipe` by which :mod:`patchbox.extract` turns it into patch fix-ups
(docs/patch-format.md, "How extract-patch fills it"). Types without a recipe are refused
by name with :class:`UnsupportedRelocation`; the object comparison
(:mod:`patchbox.compare`) uses size and pc-relativity of every type.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from patchbox.errors import UnsupportedRelocation

__all__ = [
    "Recipe",
    "TLS_MODELS",
    "RelocType",
    "RELOC_TYPES",
    "get_reloc",
    "reloc_name",
    "get_reloc_type",
]


class Recipe(Enum):
    """How one relocation becomes fix-ups."""

    NONE = "none"  # nothing to write
    PCREL = "pcrel"  # int32 S + A - P: PC32 to the target; to an import only from call/jmp
    CALL = "call"  # like PCREL, but a call/jmp: an import goes through a stub in text
    GOT = "got"  # int32 G + A - P: PC32 to an 8-byte GOT slot in text, slot ABS64 to target
    ABS64 = "abs64"  # uint64 S + A: ABS64 with the target's base
    # Thread-local accesses (patchbox.extract.tls): the variable is the running program's,
    # reached as the program's own code reaches it.
    TLS_LE = "tls_le"  # int32 TP offset of the variable: a constant, executables only
    TLS_IE = "tls_ie"  # int32 G + A - P: PC32 to a slot holding the TP offset
    TLS_GD = "tls_gd"  # int32 pc-relative to a {module id, offset} pair: PC32 to the binary's
    TLS_LD = "tls_ld"  # int32 pc-relative to the module's {module id, 0} pair: PC32 to the binary's
    TLS_DTPOFF = "tls_dtpoff"  # int32 offset of the variable in its module's block: a constant
    TLS_DESC = "tls_desc"  # int32 pc-relative to a TLS descriptor: PC32 to the binary's


#: The access model each thread-local recipe belongs to, as messages name it.
TLS_MODELS: dict[Recipe, str] = {
    Recipe.TLS_LE: "local-exec",
    Recipe.TLS_IE: "initial-exec",
    Recipe.TLS_GD: "general-dynamic",
    Recipe.TLS_LD: "local-dynamic",
    Recipe.TLS_DTPOFF: "local-dynamic",
    Recipe.TLS_DESC: "general-dynamic through a descriptor (-mtls-dialect=gnu2)",
}


@dataclass(frozen=True)
class RelocType:
    """One x86-64 relocation type."""

    name: str
    number: int
    size: int  # bytes of the field written at the place
    pcrel: bool  # the value is relative to the place
    recipe: Recipe | None = None  # None: a live patch cannot carry it


def _table(*types: RelocType) -> dict[str, RelocType]:
    return {t.name: t for t in types}


# The psABI's x86-64 relocation types (System V AMD64 ABI, table 4.9; CODE_4_* from
# the APX extension, emitted by newer assemblers).
RELOC_TYPES: dict[str, RelocType] = _table(
    RelocType("R_X86_64_NONE", 0, 0, False, Recipe.NONE),
    RelocType("R_X86_64_64", 1, 8, False, Recipe.ABS64),
    RelocType("R_X86_64_PC32", 2, 4, True, Recipe.PCREL),
    RelocType("R_X86_64_GOT32", 3, 4, False),
    RelocType("R_X86_64_PLT32", 4, 4, True, Recipe.CALL),
    RelocType("R_X86_64_COPY", 5, 0, False),
    RelocType("R_X86_64_GLOB_DAT", 6, 8, False),
    RelocType("R_X86_64_JUMP_SLOT", 7, 8, False),
    RelocType("R_X86_64_RELATIVE", 8, 8, False),
    RelocType("R_X86_64_GOTPCREL", 9, 4, True, Recipe.GOT),
    RelocType("R_X86_64_32", 10, 4, False),
    RelocType("R_X86_64_32S", 11, 4, False),
    RelocType("R_X86_64_16", 12, 2, False),
    RelocType("R_X86_64_PC16", 13, 2, True),
    RelocType("R_X86_64_8", 14, 1, False),
    RelocType("R_X86_64_PC8", 15, 1, True),
    RelocType("R_X86_64_DTPMOD64", 16, 8, False),
    RelocType("R_X86_64_DTPOFF64", 17, 8, False),
    RelocType("R_X86_64_TPOFF64", 18, 8, False),
    RelocType("R_X86_64_TLSGD", 19, 4, True, Recipe.TLS_GD),
    RelocType("R_X86_64_TLSLD", 20, 4, True, Recipe.TLS_LD),
    RelocType("R_X86_64_DTPOFF32", 21, 4, False, Recipe.TLS_DTPOFF),
    RelocType("R_X86_64_GOTTPOFF", 22, 4, True, Recipe.TLS_IE),
    RelocType("R_X86_64_TPOFF32", 23, 4, False, Recipe.TLS_LE),
    RelocType("R_X86_64_PC64", 24, 8, True),
    RelocType("R_X86_64_GOTOFF64", 25, 8, False),
    RelocType("R_X86_64_GOTPC32", 26, 4, True),
    RelocType("R_X86_64_GOT64", 27, 8, False),
    RelocType("R_X86_64_GOTPCREL64", 28, 8, True),
    RelocType("R_X86_64_GOTPC64", 29, 8, True),
    RelocType("R_X86_64_GOTPLT64", 30, 8, False),
    RelocType("R_X86_64_PLTOFF64", 31, 8, False),
    RelocType("R_X86_64_SIZE32", 32, 4, False),
    RelocType("R_X86_64_SIZE64", 33, 8, False),
    RelocType("R_X86_64_GOTPC32_TLSDESC", 34, 4, True, Recipe.TLS_DESC),
    RelocType("R_X86_64_TLSDESC_CALL", 35, 0, False, Recipe.NONE),  # marks the call only
    RelocType("R_X86_64_TLSDESC", 36, 16, False),
    RelocType("R_X86_64_IRELATIVE", 37, 8, False),
    RelocType("R_X86_64_RELATIVE64", 38, 8, False),
    RelocType("R_X86_64_GOTPCRELX", 41, 4, True, Recipe.GOT),
    RelocType("R_X86_64_REX_GOTPCRELX", 42, 4, True, Recipe.GOT),
    RelocType("R_X86_64_CODE_4_GOTPCRELX", 43, 4, True),
    RelocType("R_X86_64_CODE_4_GOTTPOFF", 44, 4, True),
    RelocType("R_X86_64_CODE_4_GOTPC32_TLSDESC", 45, 4, True),
)
_BY_NUMBER: dict[int, RelocType] = {t.number: t for t in RELOC_TYPES.values()}


def get_reloc(rtype: int) -> RelocType | None:
    """Returns the table entry of relocation number ``rtype``, None if unknown."""
    return _BY_NUMBER.get(rtype)


def reloc_name(rtype: int) -> str:
    """Returns the ELF name of x86-64 relocation type ``rtype`` (or a numbered placeholder)."""
    known = _BY_NUMBER.get(rtype)
    return known.name if known else f"R_X86_64_<{rtype}>"


def get_reloc_type(rtype: int, where: str, target: str) -> RelocType:
    """Returns the entry of ``rtype`` if a live patch can carry it; raises
    UnsupportedRelocation naming type and place otherwise.

    ``where`` is the place of the relocation (``.text.foo+0x12``), ``target`` the symbol
    it refers to; both go into the message.
    """
    known = _BY_NUMBER.get(rtype)
    if known is not None and known.recipe is not None:
        return known
    raise UnsupportedRelocation(
        f"unsupported relocation {reloc_name(rtype)} in {where} against {target!r}" + _hint(rtype)
    )


def _hint(rtype: int) -> str:
    name = reloc_name(rtype)
    if "TPOFF" in name or "TLS" in name or "DTP" in name:
        return (
            " (a thread-local access a live patch cannot carry: compile the fix with the "
            "flags of the running program, whose accesses are initial-exec or local-exec in "
            "an executable, general- or local-dynamic in a shared library)"
        )
    if name in ("R_X86_64_32", "R_X86_64_32S"):
        return " (absolute 32-bit address: compile the patch with -fPIE)"
    return ""
