"""The closure pass: every section a patch copies and every relocation's target, found
to a fixed point over all the objects of the patch before anything is laid out.

Starting from the replaced functions and the hooks of each member, every relocation of
copied code or data is resolved (docs/patch-format.md, "How extract-patch fills it"):

- another replaced function, or something the object defines and the running program
  lacks (a new static helper, string literals, read-only data such as jump tables, new
  writable variables) → copied into the patch (COPY);
- a function or variable of the running program (globals by name, statics by name and
  the unit of the binary the object's source file is: :meth:`Binary.match_source`,
  :meth:`Binary.find_symbol`) → its link-time address (EXE); variables are
  never copied, so statics keep pointing at the running program's copies;
- a shared-library symbol → IMPORT (calls through a stub, data through a GOT slot);
- a thread-local variable → the program's own, never copied, reached as the program's
  code reaches it (a TP offset, or the binary's own GOT entry: :mod:`patchbox.extract.tls`);
- a global that another object of the same patch defines and the program lacks (a new
  function in another file) → copied from that object (MEMBER).

What is copied can be reached from other copies, so the search repeats until nothing new
is found, across all members (a MEMBER target copies into another member). Only then are
the targets final: a section that some other reference made the patch copy is reached
as the copy by every reference to it.

A plain object (compiled without ``-ffunction-sections``) holds several functions in one
``.text``. Only the replaced function's range of it is *live*: every reference from it to
another function of that section — by symbol, by section offset, or a call or jump the
assembler resolved without a relocation (found with capstone) — binds to the running
program's function like any other; a function is copied (its range made live) only
where the program lacks it, and refused, naming it and the remedy, where the program's
cannot be told. Nothing that was not asked for runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from patchbox.arch import TLS_MODELS, Arch, Recipe, RelocType
from patchbox.elf.binary import Binary, Symbol
from patchbox.elf.objfile import ObjSymbol, Relocation, Section
from patchbox.elf.tls import TlsImage, read_tls
from patchbox.errors import ExtractError, UnsupportedRelocation
from patchbox.extract.model import (
    Binding,
    BoundBranch,
    Closure,
    Member,
    SectionKind,
    Target,
    TargetKind,
)
from patchbox.extract.tls import TlsVariable, reach_tls

__all__ = ["ORIGINAL_PREFIX", "close", "is_branch", "where", "target_name"]

ORIGINAL_PREFIX = "patchbox_original_"  # PATCHBOX_ORIGINAL(fn), agent/include/patchbox/patch.h
_STATIC_LOCAL = re.compile(r"^(?P<base>.+)\.(?P<n>\d+)$")  # GCC's `counter.0`


def close(members: Sequence[Member], binary: Binary) -> tuple[Closure, ...]:
    """Returns the closure of each of ``members`` (in their order): what each copies and
    where each of its copied relocations goes; raises ExtractError (UnsupportedRelocation)
    for a reference the patch cannot carry."""
    group: list[_Search] = []
    group += [_Search(m, binary, group) for m in members]
    for s in group:
        s.seed()
    # A member's search can queue sections in another member (MEMBER targets).
    while any(s.worklist for s in group):
        for s in group:
            s.discover()
    return tuple(s.closure() for s in group)


def is_branch(arch: Arch, sec: Section, rel: Relocation) -> bool:
    """Returns True if ``rel`` is the field of a direct call or jump of code ``sec``
    (``Branches.is_branch_field`` of ``arch``, the object's)."""
    return sec.is_exec and arch.branches.is_branch_field(sec.data, rel.offset)


def where(sec: Section, rel: Relocation) -> str:
    """Returns ``section+offset`` of a relocation, for messages."""
    return f"{sec.name}+{rel.offset:#x}"


def target_name(sym: ObjSymbol) -> str:
    """Returns a relocation's symbol as messages name it."""
    return sym.name or f"symbol #{sym.index}"


def _key(section: int, rel: Relocation) -> tuple[int, int, int, int, int]:
    """Returns what tells one relocation of a section from every other."""
    return (section, rel.offset, rel.type, rel.symbol.index, rel.addend)


@dataclass(frozen=True)
class _Resolved:
    """A relocation's target as found, and the non-shared section it names (None for
    others): if that section ends up copied, the copy is the final target."""

    target: Target
    section: int | None = None
    value: int = 0


class _Search:
    """One member's state while :func:`close` runs: private to it, gone when it returns."""

    def __init__(self, member: Member, binary: Binary, group: list[_Search]) -> None:
        self.member = member
        self.obj = member.obj
        self.bin = binary
        self.group = group
        self.source = member.source
        # where the binary has this object's statics (a member made without: found now)
        self.statics = member.statics or binary.match_source(member.obj)
        self.copied: dict[int, SectionKind] = {}  # in discovery order: layout keeps it
        self.worklist: list[int] = []
        self.exe_base: dict[int, int] = {}  # section index -> link-time address of its start
        # Shared code sections (several functions, a plain object): the function ranges
        # of each that the patch needs; sections absent here are live whole.
        self.live: dict[int, set[tuple[int, int]]] = {}
        self.scanned: set[tuple[int, int, int]] = set()  # (section, start, end) discovered
        self.bound: list[BoundBranch] = []
        self.resolved: dict[tuple[int, int, int, int, int], _Resolved] = {}
        self.replaced = {r.symbol.index for r in member.replaced}
        # A pointer to a replaced function: section -> (entry offset, original address).
        self.entries = {r.section.index: (r.symbol.value, r.address) for r in member.replaced}
        self.defines = {
            s.name: s
            for s in self.obj.symbols
            if s.defined and not s.is_local and s.name and s.type in ("FUNC", "OBJECT", "NOTYPE")
        }
        self.tls_image: TlsImage | None = None  # read at the first thread-local access
        self.tls_how: dict[str, list[str]] = {}  # variable -> how each of its accesses goes

    # -- the search ---------------------------------------------------------------------

    def seed(self) -> None:
        """Copies the replaced functions, then the functions the hooks name."""
        for r in self.member.replaced:
            self.copy_function(r.section, r.symbol.value)
        for hook in self.member.hooks:
            self.copy_function(self.obj.get_section(hook.section), hook.offset)

    def copy(self, index: int, kind: SectionKind) -> None:
        """Adds section ``index`` to the patch (once) and queues its relocations."""
        if index not in self.copied:
            self.copied[index] = kind
            self.worklist.append(index)

    def copy_function(self, sec: Section, offset: int) -> None:
        """Adds the function at ``offset`` of code section ``sec`` to the patch: its range
        only when the section holds other functions too (a plain object), else the
        section."""
        fn = self._function_at(sec, offset) if self._shared(sec) else None
        if fn is None:
            self.copy(sec.index, SectionKind.FUNC)
            return
        rng = (fn.value, fn.value + max(fn.size, 1))
        ranges = self.live.setdefault(sec.index, set())
        if rng not in ranges:
            ranges.add(rng)
            self.copied.setdefault(sec.index, SectionKind.FUNC)
            self.worklist.append(sec.index)

    def discover(self) -> None:
        """Resolves every relocation of every queued section (of a shared code section,
        of its live functions, and their branches the assembler resolved), copying what
        is new."""
        while self.worklist:
            sec = self.obj.get_section(self.worklist.pop(0))
            for a, b in sorted(self.live.get(sec.index, ())):
                if (sec.index, a, b) not in self.scanned:
                    self.scanned.add((sec.index, a, b))
                    self._bind_internal_branches(sec, a, b)
            for rel in self._live_relocations(sec):
                rtype = self.obj.arch.relocs.get_carried(
                    rel.type, where(sec, rel), target_name(rel.symbol)
                )
                if rtype.recipe in TLS_MODELS:
                    self.resolved[_key(sec.index, rel)] = self._resolve_tls(sec, rel, rtype)
                elif rtype.recipe is not Recipe.NONE:
                    self.resolved[_key(sec.index, rel)] = self._resolve(sec, rel)

    def _shared(self, sec: Section) -> bool:
        """Returns True if code section ``sec`` holds more than one function (a plain
        object)."""
        if not sec.is_exec:
            return False
        funcs = [s for s in self.obj.get_section_symbols(sec) if s.type == "FUNC"]
        return len(funcs) > 1

    def _function_at(self, sec: Section, offset: int) -> ObjSymbol | None:
        """Returns the FUNC symbol of ``sec`` whose range holds ``offset``, or None."""
        for s in self.obj.get_section_symbols(sec):
            if s.type == "FUNC" and s.value <= offset < s.value + max(s.size, 1):
                return s
        return None

    def _is_live(self, sec: Section, offset: int) -> bool:
        ranges = self.live.get(sec.index)
        return ranges is None or any(a <= offset < b for a, b in ranges)

    def _live_relocations(self, sec: Section) -> list[Relocation]:
        return [r for r in self.obj.get_relocations(sec) if self._is_live(sec, r.offset)]

    def _bind_internal_branches(self, sec: Section, start: int, end: int) -> None:
        """Binds every call and jump of [start, end) of shared section ``sec`` that the
        assembler resolved to another function of the section (no relocation: a static
        function, a local label) to the program's function, or copies that function where
        the program lacks it."""
        fields = {r.offset for r in self.obj.get_relocations(sec)}
        arch = self.obj.arch
        dis = arch.disasm
        for insn in dis.disassembler(detail=True).disasm(sec.data[start:end], start):
            to = dis.branch_target(insn)
            if to is None or start <= to < end:
                continue  # not a direct branch, or inside the function itself
            field = insn.address + insn.size - 4  # the 32-bit field ends the instruction
            if field in fields:
                continue  # a relocation says where it goes: _resolve() binds it
            fn = self._function_at(sec, to)
            at = f"{sec.name}+{insn.address:#x}"
            if fn is None:
                raise ExtractError(
                    f"{self.obj.path}: the {insn.mnemonic} at {at} goes to {to:#x} of "
                    f"{sec.name}, outside any function: compile with -ffunction-sections "
                    f"(`patchbox config --cflags`)"
                )
            orig = self._program_function(sec, fn, at)
            if orig is None:
                self.copy_function(sec, fn.value)  # new: the relative branch stays right
            elif insn.size < arch.branches.jump_len or not arch.branches.is_branch_field(
                sec.data, field
            ):  # a short form (or a conditional one): no room for the program's address
                raise ExtractError(
                    f"{self.obj.path}: the short {insn.mnemonic} at {at} goes to {fn.name}, "
                    f"which the running program has and the patch must reach there: a short "
                    f"branch cannot; compile with -ffunction-sections (`patchbox config --cflags`)"
                )
            else:
                self.bound.append(BoundBranch(sec.index, field, orig.address + to - fn.value))

    def _program_function(self, sec: Section, fn: ObjSymbol, at: str) -> Symbol | None:
        """Returns the running program's ``fn`` (a function sharing a replaced function's
        section), None if the program lacks it (new: copied); raises ExtractError if the
        program's cannot be told (its static symbols of this file unknown)."""
        if fn.index in self.replaced or self._is_clone_of_replaced(fn):
            return None
        orig = self._find_in_binary(fn)
        if orig is not None and orig.type == "FUNC":
            return orig
        if fn.is_local and not (self.statics and self.bin.has_source_file(self.statics)):
            raise ExtractError(
                f"{self.obj.path}: {at} reaches static {fn.name}, which shares "
                f"{sec.name} with the replaced function; {self.bin.path} has no static "
                f"symbols of {os.path.basename(self.source or '?')}, so its {fn.name} cannot "
                f"be found and copying it would run code nobody selected: compile with "
                f"-ffunction-sections (`patchbox config --cflags`)"
            )
        return None

    def _resolve(self, sec: Section, rel: Relocation) -> _Resolved:
        """Returns the target of ``rel`` as found now; copies sections that the program
        lacks."""
        sym = rel.symbol
        if sym.is_abs:
            return _Resolved(Target(TargetKind.ABS, sym.value))
        if not sym.defined:
            if not sym.is_undef:
                what = "SHN_COMMON" if sym.is_common else f"section index {sym.shndx:#x}"
                raise ExtractError(
                    f"{where(sec, rel)}: symbol {sym.name!r} in {what} (compile with -fno-common)"
                )
            original = self._original_body(sym.name)
            if original is not None:
                return _Resolved(original)
            orig = self.bin.find_symbol(sym.name, local=False)
            if orig is not None:
                if orig.type == "TLS":
                    raise UnsupportedRelocation(
                        f"thread-local variable {sym.name!r} referenced in {where(sec, rel)}"
                    )
                return _Resolved(Target(TargetKind.EXE, orig.address))
            member = self._member_defining(sym.name)
            if member is not None:
                return _Resolved(member)
            return _Resolved(Target(TargetKind.IMPORT, 0, symbol=sym.name))
        target_sec = self.obj.get_symbol_section(sym)
        value = sym.value if sym.type != "SECTION" else 0
        if self._shared(target_sec):
            return _Resolved(self._resolve_shared(sec, rel, target_sec, value))
        named = _Resolved(Target(TargetKind.COPY, value, section=target_sec.index))
        if target_sec.index in self.copied:
            return named
        base = self._exe_section_base(target_sec, sym, sec, rel)
        if base is not None:
            return _Resolved(Target(TargetKind.EXE, base + value), target_sec.index, value)
        if target_sec.is_write and self.statics and not self.bin.has_source_file(self.statics):
            # Copying would give the patch a fresh variable instead of the program's.
            raise ExtractError(
                f"variable in {target_sec.name} is not in {self.bin.path}, which has "
                f"no static symbols from {os.path.basename(self.statics.name)}: compile the "
                f"patched file under its original name"
            )
        self.copy(target_sec.index, SectionKind.of(target_sec))
        return named

    def _resolve_tls(self, sec: Section, rel: Relocation, rtype: RelocType) -> _Resolved:
        """Returns the target of thread-local access ``rel``: the running program's
        variable, reached as its own code reaches it (:mod:`patchbox.extract.tls`)."""
        if self.tls_image is None:
            self.tls_image = read_tls(self.bin)
        var = self._tls_variable(sec, rel)
        assert rtype.recipe is not None  # in TLS_MODELS
        reached = reach_tls(
            var,
            rtype.recipe,
            self.tls_image,
            shared=self.bin.is_shared_library,
            binary=str(self.bin.path),
            at=f"{where(sec, rel)}, {rtype.name}",
        )
        hows = self.tls_how.setdefault(var.name, [])
        if reached.how not in hows:
            hows.append(reached.how)
        return _Resolved(reached.target)

    def _tls_variable(self, sec: Section, rel: Relocation) -> TlsVariable:
        """Returns the program's thread-local variable that ``rel`` names: a global by
        name, a static by name and source file; raises for a variable the program lacks
        (a patch cannot add one) or one that is not thread-local there."""
        sym = rel.symbol
        if not sym.defined:
            orig = self.bin.find_symbol(sym.name, local=False)
            name = sym.name
        else:
            tsec = self.obj.get_symbol_section(sym)
            named = [sym] if sym.type != "SECTION" else self.obj.get_section_symbols(tsec)
            if not tsec.is_tls or len(named) != 1:
                raise UnsupportedRelocation(
                    f"{where(sec, rel)}: thread-local access to {tsec.name}, which is not "
                    f"one thread-local variable"
                )
            name = named[0].name
            orig = self._find_in_binary(named[0])
            if orig is None:
                raise UnsupportedRelocation(
                    f"new thread-local variable {name!r} (referenced in {where(sec, rel)}): "
                    f"{self.bin.path} has no such variable, and a live patch cannot add one "
                    f"(every running thread's TLS block was laid out when it started); use "
                    f"a variable the program has, or a shadow variable (docs/shadow.md)"
                )
        if orig is not None and orig.type != "TLS":
            raise UnsupportedRelocation(
                f"{name!r} is thread-local in the patch ({where(sec, rel)}) but not in "
                f"{self.bin.path} ({orig.type}): the object is not of the running program's "
                f"source"
            )
        return TlsVariable(name, orig.address if orig is not None else None)

    def _resolve_shared(
        self, sec: Section, rel: Relocation, target_sec: Section, value: int
    ) -> Target:
        """Returns the target of ``rel`` into shared code section ``target_sec``: within a
        live function, the copy; another function, the program's (copied if it lacks it)."""
        pointed = value + rel.addend
        rtype = self.obj.arch.relocs.get_carried(rel.type, where(sec, rel), target_name(rel.symbol))
        if rel.symbol.type == "FUNC":
            pointed = value  # the symbol names the function; the addend is the field's
        elif rtype.pcrel:
            pointed += self.obj.arch.pcrel_bias  # where the field is, against where it counts from
        fn = self._function_at(target_sec, pointed)
        if fn is None:
            raise ExtractError(
                f"{where(sec, rel)} refers to {target_sec.name}+{pointed:#x}, outside any "
                f"function of that shared section: compile with -ffunction-sections "
                f"(`patchbox config --cflags`)"
            )
        orig = self._program_function(target_sec, fn, where(sec, rel))
        if orig is None:
            self.copy_function(target_sec, fn.value)
            return Target(TargetKind.COPY, value, section=target_sec.index)
        return Target(TargetKind.EXE, orig.address - fn.value + value)

    def _member_defining(self, name: str) -> Target | None:
        """Returns the copy of global ``name`` that another object of the patch defines
        (a new function or variable of another file), or None."""
        if name.startswith(ORIGINAL_PREFIX):
            return None
        for other in self.group:
            odef = other.defines.get(name)
            if other is not self and odef is not None:
                tsec = other.obj.get_symbol_section(odef)
                other.copy(tsec.index, SectionKind.of(tsec))
                return Target(
                    TargetKind.MEMBER, odef.value, section=tsec.index, member=other.member.index
                )
        return None

    def _original_body(self, name: str) -> Target | None:
        """Returns the program's own ``fn`` past its entry NOPs for ``patchbox_original_<fn>``
        (PATCHBOX_ORIGINAL, docs/redirect.md "Calling the original"); None for other names.

        Entry + ``EntryLayout.at`` (past the NOPs at the symbol) is the original body: the
        redirect is published at the entry, so a call there is never redirected, whatever
        patch is applied or removed later.
        """
        if not name.startswith(ORIGINAL_PREFIX):
            return None
        fn = name[len(ORIGINAL_PREFIX) :]
        # A name of unknown binding: this file's static, else the global.
        orig = self.bin.find_symbol(fn, self.statics, local=None if self.statics else False)
        if orig is None or orig.type != "FUNC":
            raise ExtractError(
                f"{name}: {self.bin.path} has no function {fn!r} (global, or "
                f"static in the patched file) for PATCHBOX_ORIGINAL"
            )
        entry = self.bin.arch.entry
        skip = entry.padded_skip(
            self.bin.read(orig.address - entry.pad, len(entry.nops) + entry.skip)
        )
        if skip is None:
            raise ExtractError(
                f"{name}: {fn} at {orig.address:#x} has no patchable entry "
                f"({entry.pad // len(entry.nop)}+{entry.at // len(entry.nop)} NOPs), so its "
                f"body does not start at entry+{entry.at}"
            )
        return Target(TargetKind.EXE, orig.address + skip + entry.at)

    def _exe_section_base(
        self, target: Section, sym: ObjSymbol, sec: Section, rel: Relocation
    ) -> int | None:
        """Returns where ``target`` starts in the running program, or None to copy it."""
        if target.index in self.exe_base:
            return self.exe_base[target.index]
        if target.is_tls:
            raise UnsupportedRelocation(
                f"thread-local variable {target_name(sym)!r} referenced in {where(sec, rel)}"
            )
        if not target.is_alloc:
            raise ExtractError(f"{where(sec, rel)} refers to non-loaded section {target.name}")
        if not target.is_exec and not target.is_write:
            return None  # read-only data: immutable, always copied (see combine)
        named = self.obj.get_section_symbols(target)
        if sym.type != "SECTION":
            named = [sym] + [s for s in named if s is not sym]
        if target.is_exec and any(self._is_clone_of_replaced(s) for s in named):
            return None
        for cand in named:
            orig = self._find_in_binary(cand)
            if orig is not None:
                self.exe_base[target.index] = orig.address - cand.value
                return self.exe_base[target.index]
        return None

    def _is_clone_of_replaced(self, sym: ObjSymbol) -> bool:
        # GCC's NAME.cold / NAME.part.N / NAME.constprop.N of a replaced function belong to
        # it; so do the changed clones `patchbox build` found.
        return sym.name in self.member.clones or (
            sym.is_local and any(sym.name.startswith(n + ".") for n in self.member.names)
        )

    def _find_in_binary(self, sym: ObjSymbol) -> Symbol | None:
        """Returns the running program's ``sym`` (its own binding, statics of this
        object's file), or for a static variable GCC renumbered (``counter.0``) the only
        ``counter.N`` of the file."""
        orig = self.bin.find_symbol(sym.name, self.statics, local=sym.is_local)
        if (
            orig is not None
            or not sym.is_local
            or self.statics is None
            or sym.type not in ("OBJECT", "TLS")
        ):
            return orig
        m = _STATIC_LOCAL.match(sym.name)
        if m is None:
            return None
        # Static locals are numbered per translation unit (`counter.0`, `counter.1`); the
        # numbers may shift between builds, so fall back to the only `counter.*` of the file.
        pat = re.compile(re.escape(m["base"]) + r"\.\d+$")
        cands = [
            s
            for s in self.bin.iter_locals(self.statics)
            if s.type == sym.type and pat.match(s.name)
        ]
        if len(cands) > 1:
            raise ExtractError(
                f"static variable {sym.name!r} of {self.source} is not in {self.bin.path} and "
                f"several candidates are: {', '.join(s.name for s in cands)}"
            )
        return cands[0] if cands else None

    # -- the fixed point ----------------------------------------------------------------

    def closure(self) -> Closure:
        """Returns this member's closure: every live relocation of every copied section
        with its final target."""
        bindings = []
        for index in self.copied:
            sec = self.obj.get_section(index)
            for rel in self._live_relocations(sec):
                rtype = self.obj.arch.relocs.get_carried(
                    rel.type, where(sec, rel), target_name(rel.symbol)
                )
                if rtype.recipe is Recipe.NONE:
                    continue
                found = self.resolved[_key(index, rel)]
                target = found.target
                if found.section is not None and found.section in self.copied:
                    # Copied after this reference was bound: every reference goes to the copy.
                    target = Target(TargetKind.COPY, found.value, section=found.section)
                target = self._entry_address(sec, rel, rtype, target)
                bindings.append(Binding(index, rel, rtype, target))
        return Closure(
            copied=tuple(self.copied.items()),
            live={i: frozenset(r) for i, r in self.live.items()},
            bindings=tuple(bindings),
            bound_branches=tuple(self.bound),
            tls=tuple((name, "; ".join(hows)) for name, hows in self.tls_how.items()),
        )

    def _entry_address(
        self, sec: Section, rel: Relocation, rtype: RelocType, tgt: Target
    ) -> Target:
        """Returns ``tgt``, or the original's address if it takes a replaced function's
        address.

        A function pointer to a replaced function may be stored by the program; it must
        stay valid after the patch is removed, so it gets the original entry (which the
        redirect sends to the replacement while the patch is applied). Calls and jumps
        keep going straight to the replacement.
        """
        if tgt.kind is not TargetKind.COPY or tgt.section not in self.entries:
            return tgt
        entry, orig = self.entries[tgt.section]
        if rtype.recipe is Recipe.GOT:
            pointed = tgt.value
        elif rtype.recipe is Recipe.ABS64:
            pointed = tgt.value + rel.addend
        elif rtype.recipe in (Recipe.PCREL, Recipe.LO12) and not is_branch(self.obj.arch, sec, rel):
            pointed = tgt.value + rel.addend + self.obj.arch.pcrel_bias
        else:
            return tgt
        return Target(TargetKind.EXE, orig - entry + tgt.value) if pointed == entry else tgt
