"""A fast reader of x86-64 relocatable objects into :class:`patchbox.elf.objfile.ObjectFile`.

`patchbox build` reads every object of a tree, and objects built with
``-ffunction-sections -fdata-sections`` have thousands of sections; pyelftools parses each
header through `construct` (about 2 ms per function). This reader unpacks the section
headers, the symbol table and the RELA sections with :mod:`struct` in bulk and gives the
same dataclasses as :meth:`ObjectFile.load` (tests/test_build_diff.py checks they are
equal). Anything unusual (not ELF64 little-endian x86-64 ET_REL) falls back to
:meth:`ObjectFile.load`, which reports the error.
"""
from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path

from elftools.elf.enums import ENUM_SH_TYPE_BASE, ENUM_SH_TYPE_AMD64

from patchbox.elf.objfile import ObjectFile, ObjSymbol, Relocation, Section
from patchbox.errors import ElfError

__all__ = ["load_object"]

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_RELA = struct.Struct("<QQq")
_SHT = {v: k for k, v in {**ENUM_SH_TYPE_BASE, **ENUM_SH_TYPE_AMD64}.items()
        if isinstance(v, int) and k != "_default_"}
_STT = {0: "NOTYPE", 1: "OBJECT", 2: "FUNC", 3: "SECTION", 4: "FILE", 5: "COMMON", 6: "TLS",
        10: "GNU_IFUNC"}
_STB = {0: "LOCAL", 1: "GLOBAL", 2: "WEAK", 10: "GNU_UNIQUE"}
_SHN = {0: "SHN_UNDEF", 0xFFF1: "SHN_ABS", 0xFFF2: "SHN_COMMON"}
SHT_SYMTAB, SHT_RELA, SHT_NOBITS, SHT_SYMTAB_SHNDX = 2, 4, 8, 18


def _cstr(buf: bytes, off: int) -> str:
    end = buf.find(b"\0", off)
    return buf[off:end if end >= 0 else len(buf)].decode("utf-8", "replace")


def load_object(path: str | Path) -> ObjectFile:
    """Returns the object at ``path`` (as :meth:`ObjectFile.load` would)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ElfError(f"cannot read object file {path}: {err.strerror}") from err
    if len(raw) < _EHDR.size or raw[:4] != b"\x7fELF" or raw[4] != 2 or raw[5] != 1:
        return ObjectFile.load(path)
    (_i, e_type, e_machine, _v, _e, _ph, shoff, _f, _eh, _phes, _phn, shentsize, shnum,
     shstrndx) = _EHDR.unpack_from(raw)
    if e_type != 1 or e_machine != 62 or shentsize != _SHDR.size:
        return ObjectFile.load(path)
    try:
        if shnum == 0:
            shnum = _SHDR.unpack_from(raw, shoff)[5]
        if shstrndx == 0xFFFF:
            shstrndx = _SHDR.unpack_from(raw, shoff)[6]
        hdrs = list(_SHDR.iter_unpack(raw[shoff:shoff + shnum * _SHDR.size]))
        sh_names = hdrs[shstrndx]
        shstr = raw[sh_names[4]:sh_names[4] + sh_names[5]]
        sections = []
        for i, (name, stype, flags, _a, off, size, _l, _inf, align, _es) in enumerate(hdrs):
            nobits = stype == SHT_NOBITS
            sections.append(Section(index=i, name=_cstr(shstr, name),
                                    type=_SHT.get(stype, stype), flags=flags, size=size,
                                    align=max(1, align),
                                    data=b"" if nobits else raw[off:off + size]))
        symtab_idx = next((i for i, h in enumerate(hdrs) if h[1] == SHT_SYMTAB), -1)
        if symtab_idx < 0:
            raise ElfError(f"{path}: no symbol table")
        st = hdrs[symtab_idx]
        strh = hdrs[st[6]]
        strtab = raw[strh[4]:strh[4] + strh[5]]
        xindex: tuple[int, ...] = ()
        for h in hdrs:
            if h[1] == SHT_SYMTAB_SHNDX and h[6] == symtab_idx:
                xindex = struct.unpack_from(f"<{h[5] // 4}I", raw, h[4])
        symbols: list[ObjSymbol] = []
        source = None
        for i, (name, info, _o, shndx, value, size) in enumerate(
                _SYM.iter_unpack(raw[st[4]:st[4] + st[5]])):
            stype = _STT.get(info & 0xF, str(info & 0xF))
            ndx: int | str
            if shndx == 0xFFFF and xindex:
                ndx = xindex[i]
            elif shndx in _SHN or shndx >= 0xFF00:
                ndx = _SHN.get(shndx, f"SHN_{shndx:#x}")
            else:
                ndx = shndx
            sname = _cstr(strtab, name)
            if stype == "SECTION" and isinstance(ndx, int):
                sname = sections[ndx].name
            if stype == "FILE" and source is None and sname:
                source = sname
            symbols.append(ObjSymbol(index=i, name=sname, value=value, size=size, type=stype,
                                     bind=_STB.get(info >> 4, str(info >> 4)), shndx=ndx))
        relocs: dict[int, list[Relocation]] = defaultdict(list)
        for h in hdrs:
            if h[1] == 9:
                raise ElfError(f"{path}: REL relocation section (x86-64 uses RELA)")
            if h[1] != SHT_RELA or h[6] != symtab_idx:
                continue
            target = relocs[h[7]]
            for off, info, addend in _RELA.iter_unpack(raw[h[4]:h[4] + h[5]]):
                target.append(Relocation(offset=off, type=info & 0xFFFFFFFF,
                                         symbol=symbols[info >> 32], addend=addend))
    except (struct.error, IndexError) as err:
        raise ElfError(f"{path}: not a readable ELF object: {err}") from err
    return ObjectFile(path=path, sections=sections, symbols=symbols,
                      relocations={k: v for k, v in relocs.items() if v}, source_file=source)
