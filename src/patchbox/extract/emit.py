"""The last extraction passes: lay one member's copied sections out, then write its
bytes and fix-ups. Neither finds anything: the closure (:mod:`patchbox.extract.closure`)
already says what is copied and where every relocation goes.

Text layout of one member: replaced functions (each its whole section with its own
patchable entry, 16-aligned), other copied functions, copied read-only data (16-aligned),
import stubs (``Branches.stub`` of the object's architecture: an indirect jump through the
8-byte slot at ``stub_slot``, ``stub_size`` bytes in all), GOT slots
(8 bytes each: an address, or an executable's thread-local offset). Thread-local offsets
known at build time (local-exec, local-dynamic's offset in the block) are written into
the code itself. Data: copied writable data, then bss (only its size is stored).
:mod:`patchbox.extract.combine` puts the members of one patch one after the other.
"""

from __future__ import annotations

from collections.abc import Sequence

from patchbox.arch import Arch, Recipe, RelocType
from patchbox.elf.objfile import Relocation, Section
from patchbox.errors import UnsupportedRelocation
from patchbox.extract.closure import is_branch, where
from patchbox.extract.model import (
    Binding,
    Closure,
    Emitted,
    Layout,
    Member,
    PlacedFixup,
    SectionKind,
    Target,
    TargetKind,
    align,
)
from patchbox.format.model import Fixup
from patchbox.wire import FixupBase, FixupSection, FixupType

__all__ = ["GOT_SLOT", "layout", "emit", "new_symbols"]

GOT_SLOT = 8


def layout(member: Member, closure: Closure) -> Layout:
    """Returns ``member``'s text and data with every copied section placed."""
    obj = member.obj
    fill = obj.arch.entry.fill
    text, data = bytearray(), bytearray()
    placement: dict[int, tuple[FixupSection, int]] = {}
    first = [r.section.index for r in member.replaced]
    funcs = first + [i for i, k in closure.copied if k is SectionKind.FUNC and i not in first]
    for i in funcs:
        sec = obj.get_section(i)
        align(text, max(16, sec.align), fill)
        placement[i] = (FixupSection.TEXT, len(text))
        text += sec.data
    align(text, 16, fill)
    for i, kind in closure.copied:
        if kind is SectionKind.RODATA:
            sec = obj.get_section(i)
            align(text, sec.align)
            placement[i] = (FixupSection.TEXT, len(text))
            text += sec.data
    for i, kind in closure.copied:
        if kind is SectionKind.DATA:
            sec = obj.get_section(i)
            align(data, sec.align)
            placement[i] = (FixupSection.DATA, len(data))
            data += sec.data
    end = len(data)
    for i, kind in closure.copied:
        if kind is SectionKind.BSS:
            sec = obj.get_section(i)
            end = -(-end // sec.align) * sec.align
            placement[i] = (FixupSection.DATA, end)
            end += sec.size
    return Layout(bytes(text), bytes(data), end - len(data), placement)


def emit(member: Member, closure: Closure, layouts: Sequence[Layout]) -> Emitted:
    """Returns ``member``'s final text and data and its fix-ups; ``layouts`` are every
    member's, for targets copied into another member (MEMBER)."""
    out = _Emitter(member, layouts)
    # Stubs and GOT slots go after everything copied, so their offsets are known now.
    stubs = out.import_stubs(closure)
    got = out.got_slots(closure)
    out.fix_bindings(closure, stubs, got)
    out.fix_bound_branches(closure)
    return Emitted(bytes(out.text), bytes(out.data), tuple(out.fixups))


class _Emitter:
    """One member's text and data as :func:`emit` writes them, and its fix-ups so far."""

    def __init__(self, member: Member, layouts: Sequence[Layout]) -> None:
        self.member = member
        self.layouts = layouts
        self.own = layouts[member.index]
        self.text, self.data = bytearray(self.own.text), bytearray(self.own.data)
        self.fixups: list[PlacedFixup] = []

    def keep(self, fixup: Fixup) -> None:
        """Adds a fix-up whose TEXT/DATA base is this member's."""
        self.fixups.append(PlacedFixup(fixup, self.member.index))

    def add(
        self, where: FixupSection, ftype: FixupType, tgt: Target, pos: int, addend: int
    ) -> None:
        """Adds the fix-up of the field at ``pos`` of ``where`` that reaches ``tgt``."""
        if tgt.kind in (TargetKind.COPY, TargetKind.MEMBER):
            owner = self.member.index if tgt.kind is TargetKind.COPY else tgt.member
            area, off = self.layouts[owner].placement[tgt.section]
            base = FixupBase.TEXT if area == FixupSection.TEXT else FixupBase.DATA
            self.fixups.append(
                PlacedFixup(Fixup(where, ftype, base, pos, off + tgt.value + addend), owner)
            )
        elif tgt.kind is TargetKind.EXE:
            self.keep(Fixup(where, ftype, FixupBase.EXE, pos, tgt.value + addend))
        elif tgt.kind is TargetKind.ABS:
            self.keep(Fixup(where, ftype, FixupBase.ABS, pos, tgt.value + addend))
        else:
            self.keep(Fixup(where, ftype, FixupBase.IMPORT, pos, tgt.value + addend, tgt.symbol))

    def import_stubs(self, closure: Closure) -> dict[str, int]:
        """Appends a stub for each import called or reached PC-relatively; returns {import
        symbol: stub offset in text}."""
        stubs: dict[str, int] = {}
        for b in closure.bindings:
            if b.target.kind is TargetKind.IMPORT and b.rtype.recipe in (
                Recipe.CALL,
                Recipe.PCREL,
                Recipe.LO12,
            ):
                obj = self.member.obj
                _check_call(obj.arch, obj.get_section(b.section), b.reloc, b.rtype)
                stubs.setdefault(b.target.symbol, -1)
        if stubs:
            text = self.text
            arch = self.member.obj.arch
            br = arch.branches
            align(text, 16, arch.entry.fill)
            for name in list(stubs):
                stubs[name] = len(text)
                stub = br.stub + bytes(br.stub_slot + 8 - len(br.stub))
                text += stub
                align(text, br.stub_size, arch.entry.fill)
                slot = Target(TargetKind.IMPORT, symbol=name)
                at = stubs[name] + br.stub_slot
                self.add(FixupSection.TEXT, FixupType.ABS64, slot, at, 0)
        return stubs

    def got_slots(self, closure: Closure) -> dict[Target, int]:
        """Appends a GOT slot for each target reached through the GOT; returns {target:
        slot offset in text}."""
        got: dict[Target, int] = {}
        targets = dict.fromkeys(b.target for b in closure.bindings if _via_own_slot(b))
        if targets:
            align(self.text, GOT_SLOT)
            for tgt in targets:
                got[tgt] = len(self.text)
                self.text += bytes(GOT_SLOT)
                self.add(FixupSection.TEXT, FixupType.ABS64, tgt, got[tgt], 0)
        return got

    def fix_bindings(self, closure: Closure, stubs: dict[str, int], got: dict[Target, int]) -> None:
        """Clears every relocated field of the copied sections and adds its fix-up."""
        for b in closure.bindings:
            where_, off = self.own.placement[b.section]
            pos = off + b.reloc.offset
            buf = self.text if where_ == FixupSection.TEXT else self.data
            ftype = b.rtype.field_fixup
            if b.rtype.encode is not None:  # an instruction's field: the rest of it stays
                word = int.from_bytes(buf[pos : pos + 4], "little")
                buf[pos : pos + 4] = b.rtype.encode(word, 0).to_bytes(4, "little")
            else:
                buf[pos : pos + b.rtype.size] = bytes(b.rtype.size)
            addend = b.reloc.addend
            if b.rtype.recipe is Recipe.ABS64:
                self.add(where_, ftype, b.target, pos, addend)
            elif _via_own_slot(b):
                self.keep(Fixup(where_, ftype, FixupBase.TEXT, pos, got[b.target] + addend))
            elif b.rtype.recipe in (Recipe.TLS_LE, Recipe.TLS_DTPOFF):
                sec = self.member.obj.get_section(b.section)
                buf[pos : pos + 4] = _tls_constant(
                    b.target.value + addend, sec, b, bytes(buf[pos : pos + 4])
                )
            elif b.target.kind is TargetKind.IMPORT:
                stub = stubs[b.target.symbol]
                self.keep(Fixup(where_, ftype, FixupBase.TEXT, pos, stub + addend))
            else:
                self.add(where_, ftype, b.target, pos, addend)

    def fix_bound_branches(self, closure: Closure) -> None:
        """Clears the rel32 of every branch bound to the program and adds its fix-up."""
        arch = self.member.obj.arch
        ftype = arch.branches.fixup
        for bound in closure.bound_branches:
            _area, off = self.own.placement[bound.section]
            at = off + bound.field
            if ftype is FixupType.PC32:  # a data word: cleared (an instruction's field: masked)
                self.text[at : at + 4] = bytes(4)
            # S + A - P, A = -pcrel_bias: the field counts from the instruction's end
            self.keep(
                Fixup(FixupSection.TEXT, ftype, FixupBase.EXE, at, bound.address - arch.pcrel_bias)
            )


def new_symbols(member: Member, closure: Closure) -> dict[str, str]:
    """Returns the ``new:<symbol>`` meta entries of ``member``'s copied sections."""
    obj = member.obj
    replaced = {r.section.index for r in member.replaced}
    replaced_names = {r.symbol.name for r in member.replaced}
    meta = {}
    for i, kind in closure.copied:
        if i in replaced and i not in closure.live:
            continue
        sec = obj.get_section(i)
        named = [s.name for s in obj.get_section_symbols(sec) if closure.is_live(i, s.value)]
        names = named or [sec.name]
        if i in closure.live:  # a shared section: its live functions, not the replaced ones
            names = [n for n in names if n not in replaced_names]
        for n in names:
            meta[f"new:{n}"] = "text" if kind in (SectionKind.FUNC, SectionKind.RODATA) else "data"
    return meta


def _via_own_slot(b: Binding) -> bool:
    """Returns True if ``b`` reads an 8-byte slot the patch carries in its text: a GOT
    reference, or an initial-exec access whose TP offset is a constant (a variable of
    the executable) rather than the binary's own slot (base EXE)."""
    return b.rtype.recipe is Recipe.GOT or (
        b.rtype.recipe is Recipe.TLS_IE and b.target.kind is not TargetKind.EXE
    )


def _tls_constant(value: int, sec: Section, b: Binding, old: bytes) -> bytes:
    """Returns the 4 bytes of the field ``old`` holding the constant thread-local offset
    ``value``: an int32, or an instruction's field (the relocation's encoder); raises if
    it does not fit the field."""
    if b.rtype.encode is not None:
        try:
            word = b.rtype.encode(int.from_bytes(old, "little"), value)
        except UnsupportedRelocation as err:
            raise UnsupportedRelocation(
                f"{b.rtype.name} in {where(sec, b.reloc)}: thread-local offset {value} of "
                f"{b.reloc.symbol.name!r}: {err}"
            ) from err
        return word.to_bytes(4, "little")
    if not -(2**31) <= value < 2**31:
        raise UnsupportedRelocation(
            f"{b.rtype.name} in {where(sec, b.reloc)}: thread-local offset {value} of "
            f"{b.reloc.symbol.name!r} does not fit 32 bits"
        )
    return value.to_bytes(4, "little", signed=True)


def _check_call(arch: Arch, sec: Section, rel: Relocation, rtype: RelocType) -> None:
    """Raises unless an import reached PC-relatively is the operand of a call/jmp."""
    if rtype.recipe is Recipe.CALL and sec.is_exec:
        return
    if not is_branch(arch, sec, rel):
        raise UnsupportedRelocation(
            f"{rtype.name} in {where(sec, rel)}: PC-relative data reference to "
            f"{rel.symbol.name!r}, which the program does not define (a shared-library "
            f"variable); it can only be reached through the GOT: compile the patch with "
            f"-fPIC, or reference it from the program itself"
        )
