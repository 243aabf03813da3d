"""The GNU build-id of an ELF file, read from its program headers alone.

Cheap enough to ask of every process on a host (`patchbox ps`, `apply --all`): the ELF
header, the program headers (:mod:`patchbox.elf.segments`) and the PT_NOTE segments,
nothing else (no section headers, no pyelftools). Layouts come from
:mod:`patchbox.elf.records`.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from patchbox.elf.records import NHDR, PT
from patchbox.elf.segments import ProgramHeader, read_program_headers, read_segment
from patchbox.errors import ElfError

__all__ = ["read_build_id", "build_id_of", "NT_GNU_BUILD_ID"]

NT_GNU_BUILD_ID = 3
_MAX_NOTES = 64 * 1024  # bytes of PT_NOTE read at most
# Notes are 4-byte aligned, but 8-byte aligned in a segment aligned to 8 (GNU property
# notes).
_NOTE_ALIGN, _WIDE_NOTE_ALIGN = 4, 8


def _align(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


def read_build_id(path: str | os.PathLike[str]) -> bytes | None:
    """Returns the GNU build-id of the ELF file ``path`` (ELF64 LE), None if it
    has none; raises ElfError if it is not such a file or cannot be read."""
    try:
        with open(path, "rb") as f:
            return build_id_of(f, read_program_headers(f, str(path)), str(path))
    except OSError as err:
        raise ElfError(f"cannot read {path}: {err.strerror}") from err


def build_id_of(f: BinaryIO, phdrs: list[ProgramHeader], what: str) -> bytes | None:
    """Returns the GNU build-id in the PT_NOTE segments ``phdrs`` names of the file open
    as ``f``, None if it has none; raises ElfError if a note segment is cut short."""
    for ph in phdrs:
        if ph.p_type != PT["NOTE"] or ph.p_filesz > _MAX_NOTES:
            continue
        align = _WIDE_NOTE_ALIGN if ph.p_align == _WIDE_NOTE_ALIGN else _NOTE_ALIGN
        found = _scan_notes(read_segment(f, ph, what), align)
        if found is not None:
            return found
    return None


def _scan_notes(buf: bytes, align: int) -> bytes | None:
    pos = 0
    while pos + NHDR.size <= len(buf):
        namesz, descsz, ntype = NHDR.unpack_from(buf, pos, "note")
        name_at = pos + NHDR.size
        desc_at = name_at + _align(namesz, align)
        end = desc_at + _align(descsz, align)
        if end > len(buf) or end <= pos:
            return None
        if ntype == NT_GNU_BUILD_ID and buf[name_at : name_at + namesz] == b"GNU\0" and descsz:
            return bytes(buf[desc_at : desc_at + descsz])
        pos = end
    return None
