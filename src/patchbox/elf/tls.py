"""The thread-local storage of a linked binary, as a live patch must reach it.

A patch reaches the running program's thread-local variables the way the program's own
code does (docs/decisions.md, "Thread-local variables"); what that takes is read here
from the reference binary, never from the running process:

- its TLS segment (``PT_TLS``): in an executable, the offset of a variable from the
  thread pointer is a link-time constant, what ld writes into the executable's own
  code: in variant II the executable's block ends at the thread pointer, so
  ``tp_offset(v) = st_value - round_up(p_memsz, p_align)``; in variant I it starts
  after the thread control block, ``tp_offset(v) = round_up(tcb_size, p_align) +
  st_value`` (which variant, and the names of the relocations below, are the binary's
  architecture's: ``Arch.tls``, :mod:`patchbox.arch`);
- the GOT entries the dynamic loader fills for it (``.rela.dyn``, ``.rela.plt``): a
  TP-offset slot (``tpoff``, initial-exec: the variable's offset from the thread
  pointer), a module-id pair (``dtpmod`` + ``dtpoff``, general- and local-dynamic: the
  module id and the offset in the module's block, what ``__tls_get_addr`` takes) and a
  descriptor (``desc``). In a shared library the module id and the offsets are known
  only at run time; these entries are where the loader put them.

Each kind of entry is found by the variable's name (a relocation against its dynamic
symbol: the loader binds it as the binary's own code does, interposition included) or,
for one the binary binds to itself (symbol 0), by its offset in the binary's TLS block.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError

from patchbox.arch import TlsFacts
from patchbox.elf.binary import Binary
from patchbox.elf.records import PT, RELA, SYM, cstring
from patchbox.errors import ElfError

__all__ = ["TlsSlots", "TlsImage", "read_tls"]

_SHF_ALLOC = 0x2


@dataclass(frozen=True)
class TlsSlots:
    """GOT entries of one kind: link-time address by the variable's dynamic symbol name,
    and by its offset in the binary's TLS block for those the binary binds to itself."""

    by_name: Mapping[str, int] = field(default_factory=dict)
    by_offset: Mapping[int, int] = field(default_factory=dict)

    def find(self, name: str | None, offset: int | None) -> int | None:
        """Returns the address of the entry for the variable ``name`` (by name first, as
        the binary's own code reaches it), else for ``offset`` of this binary's block
        (None: the variable is not this binary's), else None."""
        if name is not None and name in self.by_name:
            return self.by_name[name]
        if offset is not None:
            return self.by_offset.get(offset)
        return None


@dataclass(frozen=True)
class TlsImage:
    """The thread-local facts of a reference binary."""

    memsz: int  # PT_TLS p_memsz (0: the binary has no TLS segment)
    align: int  # PT_TLS p_align
    tpoff: TlsSlots  # TlsFacts.tpoff: 8-byte offset from the thread pointer
    pairs: TlsSlots  # TlsFacts.dtpmod (+ dtpoff): 16-byte {module id, offset}
    descriptors: TlsSlots  # TlsFacts.desc: 16-byte {resolver, argument}
    facts: TlsFacts  # the architecture's: variant, relocation names

    def tp_offset(self, offset: int) -> int:
        """Returns the offset from the thread pointer of the executable's variable at
        ``offset`` of its TLS block (meaningless for a shared library)."""
        align = max(1, self.align)
        if self.facts.variant == 1:
            return -(-self.facts.tcb_size // align) * align + offset
        return offset - -(-self.memsz // align) * align

    @property
    def ld_pair(self) -> int | None:
        """Returns the address of a {module id, 0} pair of this binary (what a
        local-dynamic access hands ``__tls_get_addr``), or None."""
        return self.pairs.by_offset.get(0)


def _dynamic_relocations(binary: Binary) -> list[tuple[int, int, str | None, int]]:
    """Returns (type, r_offset, symbol name or None for symbol 0, r_addend) of every TLS
    relocation of the binary's allocated SHT_RELA sections (.rela.dyn, .rela.plt); raises
    ElfError for tables that cannot be read."""
    try:
        return _read_dynamic_relocations(binary)
    except (ELFError, ValueError, IndexError, KeyError, struct.error) as err:
        raise ElfError(f"{binary.path}: corrupt dynamic relocations: {err}") from err


def _read_dynamic_relocations(binary: Binary) -> list[tuple[int, int, str | None, int]]:
    elf = binary.elf
    kinds = _kinds(binary)
    out = []
    for sec in elf.iter_sections():
        if sec["sh_type"] != "SHT_RELA" or not sec["sh_flags"] & _SHF_ALLOC:
            continue
        what = f"{binary.path}: {sec.name}"
        raw = sec.data()
        rows = [
            r
            for r in RELA.iter_table(raw, 0, len(raw) - len(raw) % RELA.size, what)
            if r[1] & 0xFFFFFFFF in kinds
        ]
        if not rows:
            continue
        symtab = elf.get_section(sec["sh_link"])
        if symtab["sh_type"] != "SHT_DYNSYM":
            raise ElfError(f"{what}: linked to {symtab.name}, not a dynamic symbol table")
        syms, strtab = symtab.data(), elf.get_section(symtab["sh_link"]).data()
        for r_offset, r_info, r_addend in rows:
            index = r_info >> 32
            name = None
            if index:
                st_name = SYM.unpack_from(syms, index * SYM.size, f"{what}: symbol {index}")[0]
                name = cstring(strtab, st_name).split("@")[0]
            out.append((r_info & 0xFFFFFFFF, r_offset, name, r_addend))
    return out


def read_tls(binary: Binary) -> TlsImage:
    """Returns the TLS segment and the loader-filled TLS GOT entries of ``binary``."""
    tls = next((s for s in binary.segments if s.p_type == PT["TLS"]), None)
    relocs = _dynamic_relocations(binary)
    facts = binary.arch.tls
    dtpmod_, dtpoff_, tpoff_, desc_ = _kinds(binary)
    dtpoff = {off: (name, addend) for t, off, name, addend in relocs if t == dtpoff_}
    tpoff: tuple[dict[str, int], dict[int, int]] = ({}, {})
    pairs: tuple[dict[str, int], dict[int, int]] = ({}, {})
    descs: tuple[dict[str, int], dict[int, int]] = ({}, {})
    for rtype, off, name, addend in relocs:
        if rtype == tpoff_:
            _add(tpoff, name, addend, off)
        elif rtype == desc_:
            _add(descs, name, addend, off)
        elif rtype == dtpmod_:
            second = dtpoff.get(off + 8)
            if name is not None:
                # A pair for a symbol: its second word is the loader's dtpoff of it.
                if second is not None and second[0] == name:
                    _add(pairs, name, 0, off)
            elif second is not None:
                if second[0] is None:
                    _add(pairs, None, second[1], off)
            else:
                # This module's own pair: ld wrote the offset into the GOT itself (0 for
                # the local-dynamic pair).
                word = int.from_bytes(binary.read(off + 8, 8), "little")
                _add(pairs, None, word, off)
    return TlsImage(
        memsz=tls.p_memsz if tls else 0,
        align=tls.p_align if tls else 1,
        tpoff=TlsSlots(*tpoff),
        pairs=TlsSlots(*pairs),
        descriptors=TlsSlots(*descs),
        facts=facts,
    )


def _kinds(binary: Binary) -> tuple[int, int, int, int]:
    """Returns the numbers of the (dtpmod, dtpoff, tpoff, desc) relocations of
    ``binary``'s architecture."""
    facts, r = binary.arch.tls, binary.arch.relocs
    return (
        r[facts.dtpmod].number,
        r[facts.dtpoff].number,
        r[facts.tpoff].number,
        r[facts.desc].number,
    )


def _add(
    slots: tuple[dict[str, int], dict[int, int]], name: str | None, offset: int, address: int
) -> None:
    if name is not None:
        slots[0].setdefault(name, address)
    else:
        slots[1].setdefault(offset, address)
