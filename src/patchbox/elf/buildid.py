"""The GNU build-id of an ELF file, read from its program headers alone.

Cheap enough to ask of every process on a host (`patchbox ps`, `apply --all`): the ELF
header, the program headers and the PT_NOTE segments, nothing else (no section headers,
no pyelftools). Layouts come from :mod:`patchbox.elf.records`.
"""

from __future__ import annotations

import os

from patchbox.elf.records import EHDR, NHDR, PHDR
from patchbox.errors import ElfError

__all__ = ["read_build_id", "NT_GNU_BUILD_ID", "PT_NOTE"]

PT_NOTE = 4
NT_GNU_BUILD_ID = 3
_MAX_NOTES = 64 * 1024  # bytes of PT_NOTE read at most


def _align(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


def read_build_id(path: str | os.PathLike[str]) -> bytes | None:
    """Returns the GNU build-id of the ELF file ``path`` (x86-64, ELF64 LE), None if it
    has none; raises ElfError if it is not such a file or cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(EHDR.size)
            if len(head) < EHDR.size or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                raise ElfError(f"{path}: not an ELF64 little-endian file")
            ehdr = dict(zip(EHDR.fields, EHDR.unpack_from(head, 0, str(path)), strict=True))
            if ehdr["e_phentsize"] != PHDR.size or not 0 < ehdr["e_phnum"] < 4096:
                return None
            f.seek(ehdr["e_phoff"])
            table = f.read(PHDR.size * ehdr["e_phnum"])
            for ph in PHDR.iter_table(table, 0, len(table), f"{path}: program headers"):
                p_type, _flags, offset, _va, _pa, filesz, _memsz, align = ph
                if p_type != PT_NOTE or filesz > _MAX_NOTES:
                    continue
                f.seek(offset)
                found = _scan_notes(f.read(filesz), 8 if align == 8 else 4)
                if found is not None:
                    return found
    except OSError as err:
        raise ElfError(f"cannot read {path}: {err.strerror}") from err
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
