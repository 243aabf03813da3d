"""x86-64 relocation types as a table of recipes (style of pyelftools' relocation.py).

Each supported ELF relocation type maps to a :class:`Recipe` saying how
:mod:`patchbox.build.extract` turns it into patch fix-ups (docs/patch-format.md,
"How extract-patch fills it"). Every other type is refused by name with
:class:`UnsupportedRelocation`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from elftools.elf.enums import ENUM_RELOC_TYPE_x64

from patchbox.errors import UnsupportedRelocation

__all__ = ["Recipe", "RelocType", "RELOC_TYPES", "reloc_name", "get_reloc_type"]


class Recipe(Enum):
    """How one relocation becomes fix-ups."""

    NONE = "none"  # nothing to write
    PCREL = "pcrel"  # int32 S + A - P: PC32 to the target; to an import only from call/jmp
    CALL = "call"  # like PCREL, but a call/jmp: an import goes through a stub in text
    GOT = "got"  # int32 G + A - P: PC32 to an 8-byte GOT slot in text, slot ABS64 to target
    ABS64 = "abs64"  # uint64 S + A: ABS64 with the target's base


@dataclass(frozen=True)
class RelocType:
    """A supported relocation type: its name, field size and recipe."""

    name: str
    size: int
    recipe: Recipe


RELOC_TYPES: dict[int, RelocType] = {
    0: RelocType("R_X86_64_NONE", 0, Recipe.NONE),
    1: RelocType("R_X86_64_64", 8, Recipe.ABS64),
    2: RelocType("R_X86_64_PC32", 4, Recipe.PCREL),
    4: RelocType("R_X86_64_PLT32", 4, Recipe.CALL),
    9: RelocType("R_X86_64_GOTPCREL", 4, Recipe.GOT),
    41: RelocType("R_X86_64_GOTPCRELX", 4, Recipe.GOT),
    42: RelocType("R_X86_64_REX_GOTPCRELX", 4, Recipe.GOT),
}

# Names for messages; pyelftools' table lacks a few newer types.
_NAMES: dict[int, str] = {v: k for k, v in ENUM_RELOC_TYPE_x64.items() if isinstance(v, int)}
_NAMES.update({32: "R_X86_64_SIZE32", 33: "R_X86_64_SIZE64", 38: "R_X86_64_RELATIVE64",
               41: "R_X86_64_GOTPCRELX", 43: "R_X86_64_CODE_4_GOTPCRELX",
               44: "R_X86_64_CODE_4_GOTTPOFF", 45: "R_X86_64_CODE_4_GOTPC32_TLSDESC"})


def reloc_name(rtype: int) -> str:
    """Returns the ELF name of x86-64 relocation type ``rtype`` (or a numbered placeholder)."""
    return _NAMES.get(rtype, f"R_X86_64_<{rtype}>")


def get_reloc_type(rtype: int, where: str, target: str) -> RelocType:
    """Returns the recipe of ``rtype``; raises UnsupportedRelocation naming type and place.

    ``where`` is the place of the relocation (``.text.foo+0x12``), ``target`` the symbol
    it refers to; both go into the message.
    """
    try:
        return RELOC_TYPES[rtype]
    except KeyError:
        raise UnsupportedRelocation(
            f"unsupported relocation {reloc_name(rtype)} in {where} against {target!r}"
            + _hint(rtype)) from None


def _hint(rtype: int) -> str:
    name = reloc_name(rtype)
    if "TPOFF" in name or "TLS" in name or "DTP" in name:
        return " (thread-local variables cannot be reached from a live patch)"
    if rtype in (10, 11):
        return " (absolute 32-bit address: compile the patch with -fPIE)"
    return ""
