"""One patched object's share of a live patch: replaced functions, copies, fix-ups.

An :class:`Extractor` takes the replacement functions out of a ``.o`` compiled with
``patchbox config --cflags`` and turns every relocation they need into a patch fix-up
(docs/patch-format.md, "How extract-patch fills it"):

- another replaced function, or something the object defines and the running program
  lacks (a new static helper, string literals, read-only data such as jump tables, new
  writable variables) → copied into the patch and reached with base TEXT / DATA;
- a function or variable of the running program (globals by name, statics by name and
  source file) → base EXE with the link-time address; variables are never copied, so
  statics keep pointing at the running program's copies;
- a shared-library symbol → base IMPORT, calls through a stub, data through a GOT slot;
- a global that another object of the same patch defines and the program lacks (a new
  function in another file) → copied from that object (its *member* of the group).

A plain object (compiled without ``-ffunction-sections``) holds several functions in one
``.text``. Only the replaced function's range of it is *live*: every reference from it to
another function of that section — by symbol, by section offset, or a call or jump the
assembler resolved without a relocation (found with capstone) — binds to the running
program's function like any other (globals by name, statics by name and file); a function
is copied (its range made live) only where the program lacks it, and refused, naming it
and the remedy, where the program's cannot be told. Nothing that was not asked for runs.

Text layout of one object: replaced functions (each its whole section with its own 6+2
NOP entry, 16-aligned), other copied functions, copied read-only data (16-aligned),
import stubs (16 bytes each: ``ff 25 00000000`` + 8-byte slot + 2 × int3), GOT slots
(8 bytes each). Data: copied writable data, then bss (only its size is stored).
:mod:`patchbox.extract.combine` puts the objects of one patch one after the other.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass

from capstone import CS_ARCH_X86, CS_GRP_CALL, CS_GRP_JUMP, CS_MODE_64, Cs
from capstone.x86 import X86_OP_IMM

from patchbox import wire as C
from patchbox.elf.binary import Binary, Symbol
from patchbox.elf.objfile import ObjectFile, ObjSymbol, Relocation, Section
from patchbox.elf.reloc import Recipe, RelocType, get_reloc_type
from patchbox.errors import ElfError, ExtractError, UnsupportedRelocation
from patchbox.extract.entry import analyse_entry
from patchbox.format.model import Fixup
from patchbox.wire import FixupBase, FixupSection, FixupType, HookKind, RedirectKind

__all__ = ["Extractor", "Replaced", "PlacedFixup", "ENTRY", "INT3", "align"]

NOP = 0x90
INT3 = 0xCC
ENTRY = bytes([NOP] * (C.ENTRY_PAD + C.ENTRY_NOPS))
STUB_SIZE = 16  # ff 25 00000000 (jmp *slot(%rip)), 8-byte slot, 2 x int3 padding
STUB_SLOT = 6
GOT_SLOT = 8
ORIGINAL_PREFIX = "patchbox_original_"  # PATCHBOX_ORIGINAL(fn), agent/include/patchbox/patch.h
HOOK_SECTION = ".patchbox_hooks."  # PATCHBOX_HOOK(when, fn), the same header
_STATIC_LOCAL = re.compile(r"^(?P<base>.+)\.(?P<n>\d+)$")  # GCC's `counter.0`


class Kind(enum.Enum):
    """What a relocation's target is, before layout."""

    COPY = "copy"  # a section of this object, copied into the patch
    EXE = "exe"  # a link-time address in the running program
    IMPORT = "import"  # a shared-library symbol
    ABS = "abs"  # an absolute value
    MEMBER = "member"  # a section of another object of the same patch, copied there


@dataclass(frozen=True)
class Target:
    """Where a relocation points: ``value`` is an address (EXE, ABS) or an offset in
    ``section`` (COPY, MEMBER: of the object ``member`` of the group)."""

    kind: Kind
    value: int = 0
    section: int = -1
    symbol: str = ""  # IMPORT only
    member: int = -1  # MEMBER only: index of the defining object in the group


@dataclass(frozen=True)
class Replaced:
    """One replaced function: its symbol and section in the object, the original's
    link-time address and the bytes the agent expects there."""

    symbol: ObjSymbol
    section: Section
    address: int
    expected: bytes
    kind: RedirectKind
    skip: int
    held: bool = False  # an entry jump written while the threads are held (HOLD)


@dataclass(frozen=True)
class PlacedFixup:
    """A fix-up of one object, and the object whose text or data its TEXT/DATA base
    means (itself, or another member for a cross-object reference)."""

    fixup: Fixup
    into: int


class Extractor:
    """One object's extraction: the closure of copied sections, their layout, the fix-ups.

    ``group`` holds every extractor of one patch (this one at ``index``); a global that
    the program lacks is looked for in the other members' objects.
    """

    def __init__(
        self,
        obj: ObjectFile,
        binary: Binary,
        functions: list[str],
        *,
        index: int = 0,
        group: list[Extractor] | None = None,
        force_copy: set[str] | None = None,
        warnings: list[str] | None = None,
    ) -> None:
        self.obj = obj
        self.bin = binary
        self.names = list(dict.fromkeys(functions))
        self.index = index
        self.group = group if group is not None else [self]
        self.force_copy = force_copy or set()  # changed GCC clones: copy, never link
        self.warnings = warnings if warnings is not None else []
        self.source = obj.source_file
        # Copied sections in discovery order: section index -> "func" | "rodata" | "data" | "bss"
        self.copied: dict[int, str] = {}
        self.worklist: list[int] = []
        self.exe_base: dict[int, int] = {}  # section index -> link-time address of its start
        self.placement: dict[int, tuple[FixupSection, int]] = {}
        self.stubs: dict[str, int] = {}  # import symbol -> stub offset in text
        self.got: dict[Target, int] = {}  # target -> slot offset in text
        self.fixups: list[PlacedFixup] = []
        self.entries: dict[int, tuple[int, int]] = {}  # replaced section -> (entry, original)
        self.replaced: list[Replaced] = []
        self.hooks: list[tuple[HookKind, int, int]] = []  # (when, section, offset in it)
        self.defines = {
            s.name: s
            for s in obj.symbols
            if s.defined and not s.is_local and s.name and s.type in ("FUNC", "OBJECT", "NOTYPE")
        }
        # Shared code sections (several functions, a plain object): the function ranges
        # of each that the patch needs; sections absent here are live whole.
        self.live: dict[int, set[tuple[int, int]]] = {}
        self.scanned: set[tuple[int, int, int]] = set()  # (section, start, end) discovered
        # Branches the assembler resolved inside a shared section, bound to the program:
        # (section, offset of the rel32 field, link-time address of the target).
        self.bound_branches: list[tuple[int, int, int]] = []

    # -- step 1 and 2: the replaced functions -----------------------------------------

    def find_replaced(self) -> list[Replaced]:
        """Returns (and keeps) the replaced functions, each with its original and the
        expected bytes; raises ExtractError if one cannot be redirected."""
        out = []
        for name in self.names:
            sym = self.obj.get_function(name)
            if sym is None:
                raise ExtractError(
                    f"{self.obj.path}: no function {name!r} (is it spelled right, "
                    f"or was it inlined away?)"
                )
            sec = self.obj.get_symbol_section(sym)
            if sym.value != C.ENTRY_PAD or sec.data[: len(ENTRY)] != ENTRY:
                # Valid (its entry is the symbol), but nothing can be stacked on it later.
                self.warnings.append(
                    f"{name} in {self.obj.path} has no patchable entry (not compiled with "
                    f"`patchbox config --cflags`): a later patch of {name} cannot be "
                    f"stacked on this one"
                )
            orig = self._find_original(sym)
            if name == "main" and not sym.is_local:
                # Found in OpenSSH's and dnsmasq's fixes: the event loop lives in main.
                self.warnings.append(
                    "main is replaced, but the running process entered main once and usually "
                    "never returns from it: its loop keeps the old code; only functions it "
                    "calls again (and processes started later) run the new code"
                )
            held = False
            padded = self._has_padding(orig)
            # The publishing 2-byte store at the entry must be aligned (the agent refuses
            # an odd entry). GCC aligns functions only from -O2 on: at -O0, -O1 and -Os an
            # entry with the padding is odd about half the time (found by the
            # differential test), and takes the entry jump over its two NOPs instead.
            if padded and orig.address % 2 == 0:
                # EXTRACT_MAX_EXPECTED bytes tell another build; the agent takes up to
                # MAX_EXPECTED (both from wire/constants.toml).
                n = max(C.MIN_EXPECTED, min(C.EXTRACT_MAX_EXPECTED, orig.size + C.ENTRY_PAD))
                expected = self.bin.read(orig.address - C.ENTRY_PAD, n)
                kind, skip = RedirectKind.PATCHABLE_ENTRY, 0
            elif padded:
                try:
                    expected, kind, skip, held = self._entry_jump(name, orig)
                except ExtractError as err:
                    raise ExtractError(
                        f"{err} ({name}'s entry {orig.address:#x} is odd: the binary was built "
                        f"without function alignment, as at -O0/-O1/-Os; -falign-functions=2 "
                        f"or more in its CFLAGS gives every entry the 2-byte publish)"
                    ) from err
            else:
                expected, kind, skip, held = self._entry_jump(name, orig)
            out.append(Replaced(sym, sec, orig.address, expected, kind, skip, held))
        self.replaced = out
        for r in out:
            self.copy_function(r.section, r.symbol.value)
            self.entries[r.section.index] = (r.symbol.value, r.address)
        return out

    def find_hooks(self) -> None:
        """Finds the patch's hooks (PATCHBOX_HOOK: function pointers in sections named
        ``.patchbox_hooks.<when>``) and copies the functions they name."""
        for sec in self.obj.sections:
            if not sec.name.startswith(HOOK_SECTION):
                continue
            when_name = sec.name[len(HOOK_SECTION) :].upper()
            if when_name not in HookKind.__members__:
                raise ExtractError(
                    f"{self.obj.path}: unknown hook section {sec.name} (one of "
                    f"{', '.join(k.lower() for k in HookKind.__members__)})"
                )
            for rel in self.obj.get_relocations(sec):
                sym = rel.symbol
                target = self.obj.get_symbol_section(sym) if sym.defined else None
                if rel.type != 1 or target is None or not target.is_exec:
                    raise ExtractError(
                        f"{self.obj.path}: {sec.name}+{rel.offset:#x} does not name "
                        f"a function of this object"
                    )
                value = (sym.value if sym.type != "SECTION" else 0) + rel.addend
                self.copy_function(target, value)
                self.hooks.append((HookKind[when_name], target.index, value))
        if len(self.hooks) > C.MAX_HOOKS:
            raise ExtractError(f"{len(self.hooks)} hooks in {self.obj.path} (max {C.MAX_HOOKS})")

    def hook_offsets(self) -> list[tuple[HookKind, int]]:
        """Returns (when, offset in this object's text) of each hook, after layout."""
        return [(when, self.placement[sec][1] + value) for when, sec, value in self.hooks]

    def _has_padding(self, orig: Symbol) -> bool:
        try:
            return self.bin.read(orig.address - C.ENTRY_PAD, len(ENTRY)) == ENTRY
        except ElfError:
            return False

    def _entry_jump(self, name: str, orig: Symbol) -> tuple[bytes, RedirectKind, int, bool]:
        """Returns (expected bytes, kind, skip, held) of an entry-jump record for ``orig``
        (no padding): [P, P+n), n >= 8; raises ExtractError naming the rule that fails."""
        code = self.bin.read(orig.address, orig.size)
        pieces = [
            (s.name, s.address, self.bin.read(s.address, s.size))
            for s in self.bin.iter_symbols()
            if s.defined
            and s.type == "FUNC"
            and s.size
            and s.name.startswith(name + ".")
            and s.address != orig.address
        ]
        jump = analyse_entry(name, orig.address, code, pieces=pieces)
        n = max(C.MIN_EXPECTED, min(C.EXTRACT_MAX_EXPECTED, orig.size - jump.skip))
        return self.bin.read(jump.point, n), RedirectKind.ENTRY_JUMP, jump.skip, jump.held

    def _find_original(self, sym: ObjSymbol) -> Symbol:
        if sym.is_local:
            if self.source is None:
                raise ExtractError(
                    f"{self.obj.path}: static function {sym.name!r} but the "
                    f"object names no source file (STT_FILE)"
                )
            orig = self.bin.find_local(sym.name, self.source)
            where = f"static {sym.name!r} from {os.path.basename(self.source)}"
        else:
            orig = self.bin.find_global(sym.name)
            where = f"global function {sym.name!r}"
        if (
            orig is None
            and not sym.is_local
            and any(s.name == sym.name and not s.defined for s in self.bin.iter_symbols())
        ):
            raise ExtractError(
                f"{sym.name} is in a shared library, not in {self.bin.path}: build the patch "
                f"against that library (extract-patch ... /usr/lib/.../libNAME.so.N)"
            )
        if orig is None or orig.type != "FUNC":
            raise ExtractError(
                f"{self.bin.path}: no {where} to replace (inlined everywhere, "
                f"renamed, or not the binary this object was patched from?)"
            )
        return orig

    # -- step 3: the closure ----------------------------------------------------------

    def copy(self, index: int, kind: str) -> None:
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
            self.copy(sec.index, "func")
            return
        rng = (fn.value, fn.value + max(fn.size, 1))
        ranges = self.live.setdefault(sec.index, set())
        if rng not in ranges:
            ranges.add(rng)
            self.copied.setdefault(sec.index, "func")
            self.worklist.append(sec.index)

    def _shared(self, sec: Section) -> bool:
        """Returns True if code section ``sec`` holds more than one function (a plain
        object), other than a replaced function's own GCC clones."""
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

    def discover(self) -> None:
        """Resolves every relocation of every copied section (of a shared code section,
        of its live functions, and their branches the assembler resolved), copying what
        is new."""
        while self.worklist:
            sec = self.obj.get_section(self.worklist.pop(0))
            for a, b in sorted(self.live.get(sec.index, ())):
                if (sec.index, a, b) not in self.scanned:
                    self.scanned.add((sec.index, a, b))
                    self._bind_internal_branches(sec, a, b)
            for rel in self._live_relocations(sec):
                rtype = get_reloc_type(rel.type, _where(sec, rel), _target_name(rel.symbol))
                if rtype.recipe is not Recipe.NONE:
                    self.resolve(sec, rel)

    def _bind_internal_branches(self, sec: Section, start: int, end: int) -> None:
        """Binds every call and jump of [start, end) of shared section ``sec`` that the
        assembler resolved to another function of the section (no relocation: a static
        function, a local label) to the program's function, or copies that function where
        the program lacks it."""
        fields = {r.offset for r in self.obj.get_relocations(sec)}
        md = Cs(CS_ARCH_X86, CS_MODE_64)
        md.detail = True
        for insn in md.disasm(sec.data[start:end], start):
            if not (insn.group(CS_GRP_JUMP) or insn.group(CS_GRP_CALL)) or not insn.operands:
                continue
            op = insn.operands[0]
            if op.type != X86_OP_IMM or start <= op.imm < end:
                continue  # indirect, or inside the function itself
            field = insn.address + insn.size - 4
            if field in fields:
                continue  # a relocation says where it goes: resolve() binds it
            fn = self._function_at(sec, op.imm)
            where = f"{sec.name}+{insn.address:#x}"
            if fn is None:
                raise ExtractError(
                    f"{self.obj.path}: the {insn.mnemonic} at {where} goes to {op.imm:#x} of "
                    f"{sec.name}, outside any function: compile with -ffunction-sections "
                    f"(`patchbox config --cflags`)"
                )
            orig = self._program_function(sec, fn, where)
            if orig is None:
                self.copy_function(sec, fn.value)  # new: the relative branch stays right
            elif insn.size < 5:  # jmp/jcc rel8: no room for the program's address
                raise ExtractError(
                    f"{self.obj.path}: the short {insn.mnemonic} at {where} goes to {fn.name}, "
                    f"which the running program has and the patch must reach there: a short "
                    f"branch cannot; compile with -ffunction-sections (`patchbox config --cflags`)"
                )
            else:
                self.bound_branches.append((sec.index, field, orig.address + op.imm - fn.value))

    def _program_function(self, sec: Section, fn: ObjSymbol, where: str) -> Symbol | None:
        """Returns the running program's ``fn`` (a function sharing a replaced function's
        section), None if the program lacks it (new: copied); raises ExtractError if the
        program's cannot be told (its static symbols of this file unknown)."""
        if any(r.symbol is fn for r in self.replaced) or self._is_clone_of_replaced(fn):
            return None
        orig = self._find_in_binary(fn)
        if orig is not None and orig.type == "FUNC":
            return orig
        if fn.is_local and not (self.source and self.bin.has_source_file(self.source)):
            raise ExtractError(
                f"{self.obj.path}: {where} reaches static {fn.name}, which shares "
                f"{sec.name} with the replaced function; {self.bin.path} has no static "
                f"symbols of {os.path.basename(self.source or '?')}, so its {fn.name} cannot "
                f"be found and copying it would run code nobody selected: compile with "
                f"-ffunction-sections (`patchbox config --cflags`)"
            )
        return None

    def resolve(self, sec: Section, rel: Relocation) -> Target:
        """Returns the target of ``rel``; copies sections that the program lacks."""
        sym = rel.symbol
        if sym.is_abs:
            return Target(Kind.ABS, sym.value)
        if not sym.defined:
            if not sym.is_undef:
                where = "SHN_COMMON" if sym.is_common else f"section index {sym.shndx:#x}"
                raise ExtractError(
                    f"{_where(sec, rel)}: symbol {sym.name!r} in {where} (compile with -fno-common)"
                )
            original = self._original_body(sym.name)
            if original is not None:
                return original
            orig = self.bin.find_global(sym.name)
            if orig is not None:
                if orig.type == "TLS":
                    raise UnsupportedRelocation(
                        f"thread-local variable {sym.name!r} referenced in {_where(sec, rel)}"
                    )
                return Target(Kind.EXE, orig.address)
            member = self._member_defining(sym.name)
            if member is not None:
                return member
            return Target(Kind.IMPORT, 0, symbol=sym.name)
        target_sec = self.obj.get_symbol_section(sym)
        value = sym.value if sym.type != "SECTION" else 0
        if self._shared(target_sec):
            return self._resolve_shared(sec, rel, target_sec, value)
        if target_sec.index in self.copied:
            return Target(Kind.COPY, value, section=target_sec.index)
        base = self._exe_section_base(target_sec, sym, sec, rel)
        if base is not None:
            return Target(Kind.EXE, base + value)
        if target_sec.is_write and self.source and not self.bin.has_source_file(self.source):
            # Copying would give the patch a fresh variable instead of the program's.
            raise ExtractError(
                f"variable in {target_sec.name} is not in {self.bin.path}, which has "
                f"no static symbols from {os.path.basename(self.source)}: compile the patched "
                f"file under its original name"
            )
        self.copy(target_sec.index, _kind(target_sec))
        return Target(Kind.COPY, value, section=target_sec.index)

    def _resolve_shared(
        self, sec: Section, rel: Relocation, target_sec: Section, value: int
    ) -> Target:
        """Returns the target of ``rel`` into shared code section ``target_sec``: within a
        live function, the copy; another function, the program's (copied if it lacks it)."""
        pointed = value + rel.addend
        rtype = get_reloc_type(rel.type, _where(sec, rel), _target_name(rel.symbol))
        if rel.symbol.type == "FUNC":
            pointed = value  # the symbol names the function; the addend is the field's
        elif rtype.pcrel:
            pointed += 4  # a call, jmp or lea: the displacement ends the instruction
        fn = self._function_at(target_sec, pointed)
        if fn is None:
            raise ExtractError(
                f"{_where(sec, rel)} refers to {target_sec.name}+{pointed:#x}, outside any "
                f"function of that shared section: compile with -ffunction-sections "
                f"(`patchbox config --cflags`)"
            )
        orig = self._program_function(target_sec, fn, _where(sec, rel))
        if orig is None:
            self.copy_function(target_sec, fn.value)
            return Target(Kind.COPY, value, section=target_sec.index)
        return Target(Kind.EXE, orig.address - fn.value + value)

    def _member_defining(self, name: str) -> Target | None:
        """Returns the copy of global ``name`` that another object of the patch defines
        (a new function or variable of another file), or None."""
        if name.startswith(ORIGINAL_PREFIX):
            return None
        for other in self.group:
            odef = other.defines.get(name)
            if other is not self and odef is not None:
                tsec = other.obj.get_symbol_section(odef)
                other.copy(tsec.index, _kind(tsec))
                return Target(Kind.MEMBER, odef.value, section=tsec.index, member=other.index)
        return None

    def _original_body(self, name: str) -> Target | None:
        """Returns the program's own ``fn`` past its entry NOPs for ``patchbox_original_<fn>``
        (PATCHBOX_ORIGINAL, docs/redirect.md "Calling the original"); None for other names.

        Entry + 2 is the original body: the redirect is published at the entry, so a call
        there is never redirected, whatever patch is applied or removed later.
        """
        if not name.startswith(ORIGINAL_PREFIX):
            return None
        fn = name[len(ORIGINAL_PREFIX) :]
        orig = self.bin.find_local(fn, self.source) if self.source else None
        if orig is None:
            orig = self.bin.find_global(fn)
        if orig is None or orig.type != "FUNC":
            raise ExtractError(
                f"{name}: {self.bin.path} has no function {fn!r} (global, or "
                f"static in the patched file) for PATCHBOX_ORIGINAL"
            )
        if self.bin.read(orig.address - C.ENTRY_PAD, len(ENTRY)) != ENTRY:
            raise ExtractError(
                f"{name}: {fn} at {orig.address:#x} has no patchable entry "
                f"(6+2 NOPs), so its body does not start at entry+2"
            )
        return Target(Kind.EXE, orig.address + C.ENTRY_NOPS)

    def _exe_section_base(
        self, target: Section, sym: ObjSymbol, sec: Section, rel: Relocation
    ) -> int | None:
        """Returns where ``target`` starts in the running program, or None to copy it."""
        if target.index in self.exe_base:
            return self.exe_base[target.index]
        if target.is_tls:
            raise UnsupportedRelocation(
                f"thread-local variable {_target_name(sym)!r} referenced in {_where(sec, rel)}"
            )
        if not target.is_alloc:
            raise ExtractError(f"{_where(sec, rel)} refers to non-loaded section {target.name}")
        if not target.is_exec and not target.is_write:
            return None  # read-only data: immutable, always copied (see combine.extract_patch)
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
        # it; so do the changed clones `patchbox build` found (force_copy).
        return sym.name in self.force_copy or (
            sym.is_local and any(sym.name.startswith(n + ".") for n in self.names)
        )

    def _find_in_binary(self, sym: ObjSymbol) -> Symbol | None:
        if not sym.is_local:
            return self.bin.find_global(sym.name)
        if self.source is None:
            return None
        orig = self.bin.find_local(sym.name, self.source)
        if orig is not None or sym.type != "OBJECT":
            return orig
        m = _STATIC_LOCAL.match(sym.name)
        if m is None:
            return None
        # Static locals are numbered per translation unit (`counter.0`, `counter.1`); the
        # numbers may shift between builds, so fall back to the only `counter.*` of the file.
        pat = re.compile(re.escape(m["base"]) + r"\.\d+$")
        cands = [
            s for s in self.bin.iter_locals(self.source) if s.type == "OBJECT" and pat.match(s.name)
        ]
        if len(cands) > 1:
            raise ExtractError(
                f"static variable {sym.name!r} of {self.source} is not in {self.bin.path} and "
                f"several candidates are: {', '.join(s.name for s in cands)}"
            )
        return cands[0] if cands else None

    # -- step 4: layout and fix-ups ---------------------------------------------------

    def layout(self) -> tuple[bytearray, bytearray, int]:
        """Returns (text, data, bss size) with every copied section placed."""
        text, data = bytearray(), bytearray()
        first = [r.section.index for r in self.replaced]
        funcs = first + [i for i, k in self.copied.items() if k == "func" and i not in first]
        for i in funcs:
            sec = self.obj.get_section(i)
            align(text, max(16, sec.align), INT3)
            self.placement[i] = (FixupSection.TEXT, len(text))
            text += sec.data
        align(text, 16, INT3)
        for i, kind in self.copied.items():
            if kind == "rodata":
                sec = self.obj.get_section(i)
                align(text, sec.align, 0)
                self.placement[i] = (FixupSection.TEXT, len(text))
                text += sec.data
        for i, kind in self.copied.items():
            if kind == "data":
                sec = self.obj.get_section(i)
                align(data, sec.align, 0)
                self.placement[i] = (FixupSection.DATA, len(data))
                data += sec.data
        end = len(data)
        for i, kind in self.copied.items():
            if kind == "bss":
                sec = self.obj.get_section(i)
                end = -(-end // sec.align) * sec.align
                self.placement[i] = (FixupSection.DATA, end)
                end += sec.size
        return text, data, end - len(data)

    def emit(self, text: bytearray, data: bytearray) -> None:
        """Appends stubs and GOT slots to ``text`` and fills ``self.fixups``."""
        pending: list[tuple[Section, Relocation, RelocType, Target]] = []
        for i in self.copied:
            sec = self.obj.get_section(i)
            for rel in self._live_relocations(sec):
                rtype = get_reloc_type(rel.type, _where(sec, rel), _target_name(rel.symbol))
                if rtype.recipe is not Recipe.NONE:
                    tgt = self._entry_address(sec, rel, rtype, self.resolve(sec, rel))
                    pending.append((sec, rel, rtype, tgt))
        # Stubs and GOT slots go after everything copied, so their offsets are known now.
        for sec, rel, rtype, tgt in pending:
            if tgt.kind is Kind.IMPORT and rtype.recipe in (Recipe.CALL, Recipe.PCREL):
                self._check_call(sec, rel, rtype)
                if tgt.symbol not in self.stubs:
                    self.stubs[tgt.symbol] = -1
        if self.stubs:
            align(text, 16, INT3)
            for name in self.stubs:
                self.stubs[name] = len(text)
                text += b"\xff\x25\x00\x00\x00\x00" + bytes(8) + bytes([INT3, INT3])
                self._add(
                    FixupSection.TEXT,
                    FixupType.ABS64,
                    Target(Kind.IMPORT, symbol=name),
                    len(text) - STUB_SIZE + STUB_SLOT,
                    0,
                )
        got_targets = list(dict.fromkeys(t for _s, _r, rt, t in pending if rt.recipe is Recipe.GOT))
        if got_targets:
            align(text, GOT_SLOT, 0)
            for tgt in got_targets:
                self.got[tgt] = len(text)
                text += bytes(GOT_SLOT)
                self._add(FixupSection.TEXT, FixupType.ABS64, tgt, self.got[tgt], 0)
        for sec, rel, rtype, tgt in pending:
            where, off = self.placement[sec.index]
            pos = off + rel.offset
            buf = text if where == FixupSection.TEXT else data
            buf[pos : pos + rtype.size] = bytes(rtype.size)
            if rtype.recipe is Recipe.ABS64:
                self._add(where, FixupType.ABS64, tgt, pos, rel.addend)
            elif rtype.recipe is Recipe.GOT:
                self._own(
                    Fixup(where, FixupType.PC32, FixupBase.TEXT, pos, self.got[tgt] + rel.addend)
                )
            elif tgt.kind is Kind.IMPORT:
                self._own(
                    Fixup(
                        where,
                        FixupType.PC32,
                        FixupBase.TEXT,
                        pos,
                        self.stubs[tgt.symbol] + rel.addend,
                    )
                )
            else:
                self._add(where, FixupType.PC32, tgt, pos, rel.addend)
        for index, field, address in self.bound_branches:
            _area, off = self.placement[index]
            text[off + field : off + field + 4] = bytes(4)
            # rel32 = target - (field + 4): S + A - P with A = -4
            self._own(
                Fixup(FixupSection.TEXT, FixupType.PC32, FixupBase.EXE, off + field, address - 4)
            )

    def _entry_address(
        self, sec: Section, rel: Relocation, rtype: RelocType, tgt: Target
    ) -> Target:
        """Returns ``tgt``, or the original's address if it takes a replaced function's address.

        A function pointer to a replaced function may be stored by the program; it must
        stay valid after the patch is removed, so it gets the original entry (which the
        redirect sends to the replacement while the patch is applied). Calls and jumps
        keep going straight to the replacement.
        """
        if tgt.kind is not Kind.COPY or tgt.section not in self.entries:
            return tgt
        entry, orig = self.entries[tgt.section]
        if rtype.recipe is Recipe.GOT:
            pointed = tgt.value
        elif rtype.recipe is Recipe.ABS64:
            pointed = tgt.value + rel.addend
        elif rtype.recipe is Recipe.PCREL and not _is_branch(sec, rel):
            pointed = tgt.value + rel.addend + 4
        else:
            return tgt
        return Target(Kind.EXE, orig - entry + tgt.value) if pointed == entry else tgt

    def _check_call(self, sec: Section, rel: Relocation, rtype: RelocType) -> None:
        """Raises unless an import reached PC-relatively is the operand of a call/jmp."""
        if rtype.recipe is Recipe.CALL and sec.is_exec:
            return
        if not _is_branch(sec, rel):
            raise UnsupportedRelocation(
                f"{rtype.name} in {_where(sec, rel)}: PC-relative data reference to "
                f"{rel.symbol.name!r}, which the program does not define (a shared-library "
                f"variable); it can only be reached through the GOT: compile the patch with "
                f"-fPIC, or reference it from the program itself"
            )

    def _own(self, fixup: Fixup) -> None:
        """Keeps a fix-up whose TEXT/DATA base is this object's."""
        self.fixups.append(PlacedFixup(fixup, self.index))

    def _add(
        self, where: FixupSection, ftype: FixupType, tgt: Target, pos: int, addend: int
    ) -> None:
        if tgt.kind in (Kind.COPY, Kind.MEMBER):
            owner = self if tgt.kind is Kind.COPY else self.group[tgt.member]
            area, off = owner.placement[tgt.section]
            base = FixupBase.TEXT if area == FixupSection.TEXT else FixupBase.DATA
            self.fixups.append(
                PlacedFixup(Fixup(where, ftype, base, pos, off + tgt.value + addend), owner.index)
            )
        elif tgt.kind is Kind.EXE:
            self._own(Fixup(where, ftype, FixupBase.EXE, pos, tgt.value + addend))
        elif tgt.kind is Kind.ABS:
            self._own(Fixup(where, ftype, FixupBase.ABS, pos, tgt.value + addend))
        else:
            self._own(Fixup(where, ftype, FixupBase.IMPORT, pos, tgt.value + addend, tgt.symbol))

    def new_symbols(self) -> dict[str, str]:
        """Returns the ``new:<symbol>`` meta entries for copied sections."""
        replaced = {r.section.index for r in self.replaced}
        meta = {}
        for i, kind in self.copied.items():
            if i in replaced and i not in self.live:
                continue
            sec = self.obj.get_section(i)
            names = [
                s.name for s in self.obj.get_section_symbols(sec) if self._is_live(sec, s.value)
            ] or [sec.name]
            if i in self.live:  # a shared section: its live functions, not the replaced ones
                names = [n for n in names if n not in {r.symbol.name for r in self.replaced}]
            for n in names:
                meta[f"new:{n}"] = "text" if kind in ("func", "rodata") else "data"
        return meta


def _is_branch(sec: Section, rel: Relocation) -> bool:
    """Returns True if ``rel`` is the rel32 of a call, jmp or jcc."""
    code, o = sec.data, rel.offset
    return (
        sec.is_exec
        and o >= 1
        and (
            code[o - 1] in (0xE8, 0xE9)
            or (o >= 2 and code[o - 2] == 0x0F and 0x80 <= code[o - 1] <= 0x8F)
        )
    )


def _kind(sec: Section) -> str:
    if sec.is_exec:
        return "func"
    if not sec.is_write:
        return "rodata"
    return "bss" if sec.is_nobits else "data"


def _where(sec: Section, rel: Relocation) -> str:
    return f"{sec.name}+{rel.offset:#x}"


def _target_name(sym: ObjSymbol) -> str:
    return sym.name or f"symbol #{sym.index}"


def align(buf: bytearray, alignment: int, fill: int) -> None:
    """Pads ``buf`` with ``fill`` bytes to a multiple of ``alignment``."""
    pad = -len(buf) % max(1, alignment)
    buf += bytes([fill]) * pad
