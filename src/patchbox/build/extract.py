"""Building a live patch from a patched object file and the reference binary.

:func:`extract_patch` takes the replacement functions out of a ``.o`` compiled with
``patchbox config --cflags`` and turns every relocation they need into a patch fix-up
(docs/patch-format.md, "How extract-patch fills it"):

- another replaced function, or something the object defines and the running program
  lacks (a new static helper, string literals, read-only data such as jump tables, new
  writable variables) → copied into the patch and reached with base TEXT / DATA;
- a function or variable of the running program (globals by name, statics by name and
  source file) → base EXE with the link-time address; variables are never copied, so
  statics keep pointing at the running program's copies;
- a shared-library symbol → base IMPORT, calls through a stub, data through a GOT slot.

Text layout: replaced functions (each its whole section with its own 6+2 NOP entry,
16-aligned), other copied functions, copied read-only data (16-aligned), import stubs
(16 bytes each: ``ff 25 00000000`` + 8-byte slot + 2 × int3), GOT slots (8 bytes each).
Data layout: copied writable data, then bss (only its size is stored).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import patchbox
from patchbox.build.fallback import analyse_entry
from patchbox.build.qemu import build_info as qemu_build_info
from patchbox.elf import dwarf
from patchbox.elf.binary import Binary, Symbol
from patchbox.elf.objfile import ObjectFile, ObjSymbol, Relocation, Section
from patchbox.elf.reloc import Recipe, RelocType, get_reloc_type
from patchbox.errors import ElfError, ExtractError, UnsupportedRelocation
from patchbox.format.layout import check_name
from patchbox.format.model import Fixup, Function, Patch
from patchbox.protocol import constants as C
from patchbox.protocol.constants import (ApplyFlag, FixupBase, FixupSection, FixupType,
                                         RedirectKind)

__all__ = ["PROFILES", "extract_patch"]

PROFILES = ("generic", "qemu")
NOP = 0x90
INT3 = 0xCC
ENTRY = bytes([NOP] * (C.ENTRY_PAD + C.ENTRY_NOPS))
EXPECTED_MAX = 32
STUB_SIZE = 16  # ff 25 00000000 (jmp *slot(%rip)), 8-byte slot, 2 x int3 padding
STUB_SLOT = 6
GOT_SLOT = 8
ORIGINAL_PREFIX = "patchbox_original_"  # PATCHBOX_ORIGINAL(fn), agent/include/patchbox/patch.h
_STATIC_LOCAL = re.compile(r"^(?P<base>.+)\.(?P<n>\d+)$")  # GCC's `counter.0`


@dataclass(frozen=True)
class _Target:
    """Where a relocation points, before layout.

    kind "copy": ``section`` of the object (copied into the patch) + ``value``;
    "exe": link-time address ``value`` in the running program; "import": shared-library
    ``symbol`` + ``value``; "abs": absolute ``value``.
    """

    kind: str
    value: int = 0
    section: int = -1
    symbol: str = ""


class _Extractor:
    """One extraction: the closure of copied sections, their layout, the fix-ups."""

    def __init__(self, obj: ObjectFile, binary: Binary, functions: list[str], *,
                 force: bool = False, warnings: list[str] | None = None) -> None:
        self.obj = obj
        self.bin = binary
        self.names = functions
        self.force = force
        self.warnings = warnings if warnings is not None else []
        self.redirect: dict[str, tuple[RedirectKind, int]] = {}  # name -> (kind, skip)
        self.source = obj.source_file
        # Copied sections in discovery order: section index -> "func" | "rodata" | "data" | "bss"
        self.copied: dict[int, str] = {}
        self.worklist: list[int] = []
        self.exe_base: dict[int, int] = {}  # section index -> link-time address of its start
        self.placement: dict[int, tuple[FixupSection, int]] = {}
        self.stubs: dict[str, int] = {}  # import symbol -> stub offset in text
        self.got: dict[_Target, int] = {}  # target -> slot offset in text
        self.fixups: list[Fixup] = []
        self.entries: dict[int, tuple[int, int]] = {}  # replaced section -> (entry, original)

    # -- step 1 and 2: the replaced functions -----------------------------------------

    def replaced(self) -> list[tuple[ObjSymbol, Section, int, bytes]]:
        """Returns (object symbol, section, original address, expected bytes) per function."""
        out = []
        for name in self.names:
            sym = self.obj.get_function(name)
            if sym is None:
                raise ExtractError(f"{self.obj.path}: no function {name!r} (is it spelled right, "
                                   f"or was it inlined away?)")
            sec = self.obj.get_section(sym.shndx)  # type: ignore[arg-type]
            data = sec.data
            if (sym.value != C.ENTRY_PAD or data[:C.ENTRY_PAD + C.ENTRY_NOPS] != ENTRY):
                # Valid (its entry is the symbol), but nothing can be stacked on it later.
                self.warnings.append(
                    f"{name} in {self.obj.path} has no patchable entry (not compiled with "
                    f"`patchbox config --cflags`): a later patch of {name} cannot be "
                    f"stacked on this one")
            orig = self._find_original(sym)
            if self._has_padding(orig):
                n = max(C.MIN_EXPECTED, min(EXPECTED_MAX, orig.size + C.ENTRY_PAD))
                expected = self.bin.read(orig.address - C.ENTRY_PAD, n)
                self.redirect[name] = (RedirectKind.PATCHABLE_ENTRY, 0)
            else:
                expected = self._entry_jump(name, orig)
            out.append((sym, sec, orig.address, expected))
        return out

    def _has_padding(self, orig: Symbol) -> bool:
        try:
            return self.bin.read(orig.address - C.ENTRY_PAD, len(ENTRY)) == ENTRY
        except ElfError:
            return False

    def _entry_jump(self, name: str, orig: Symbol) -> bytes:
        """Returns the expected bytes of an entry-jump record for ``orig`` (no padding):
        [P, P+n), n >= 8; raises ExtractError naming the fallback rule that fails."""
        if _is_shared_library(self.bin):
            raise ExtractError(
                f"{name} has no patchable entry and cannot use an entry jump (rule 5, shared "
                f"library): {self.bin.path} is a shared library, not the executable; the "
                f"sandbox lies near the executable and is not within rel32 reach of it")
        code = self.bin.read(orig.address, orig.size)
        pieces = [(s.name, s.address, self.bin.read(s.address, s.size))
                  for s in self.bin.iter_symbols()
                  if s.defined and s.type == "FUNC" and s.size
                  and s.name.startswith(name + ".") and s.address != orig.address]
        jump = analyse_entry(name, orig.address, code, force=self.force, pieces=pieces,
                             warnings=self.warnings)
        self.redirect[name] = (RedirectKind.ENTRY_JUMP, jump.skip)
        n = max(C.MIN_EXPECTED, min(EXPECTED_MAX, orig.size - jump.skip))
        return self.bin.read(jump.point, n)

    def _find_original(self, sym: ObjSymbol) -> Symbol:
        if sym.is_local:
            if self.source is None:
                raise ExtractError(f"{self.obj.path}: static function {sym.name!r} but the "
                                   f"object names no source file (STT_FILE)")
            orig = self.bin.find_local(sym.name, self.source)
            where = f"static {sym.name!r} from {os.path.basename(self.source)}"
        else:
            orig = self.bin.find_global(sym.name)
            where = f"global function {sym.name!r}"
        if orig is None and not sym.is_local and any(
                s.name == sym.name and not s.defined for s in self.bin.iter_symbols()):
            raise ExtractError(
                f"{sym.name} is in a shared library, not in {self.bin.path}: cannot patch it "
                f"(rule 5, shared library): the sandbox lies near the executable and is not "
                f"within rel32 reach of shared libraries")
        if orig is None or orig.type != "FUNC":
            raise ExtractError(f"{self.bin.path}: no {where} to replace (inlined everywhere, "
                               f"renamed, or not the binary this object was patched from?)")
        return orig

    # -- step 3: the closure ----------------------------------------------------------

    def copy(self, index: int, kind: str) -> None:
        """Adds section ``index`` to the patch (once) and queues its relocations."""
        if index not in self.copied:
            self.copied[index] = kind
            self.worklist.append(index)

    def discover(self) -> None:
        """Resolves every relocation of every copied section, copying what is new."""
        while self.worklist:
            sec = self.obj.get_section(self.worklist.pop(0))
            for rel in self.obj.get_relocations(sec):
                rtype = get_reloc_type(rel.type, _where(sec, rel), _target_name(rel.symbol))
                if rtype.recipe is not Recipe.NONE:
                    self.resolve(sec, rel, rtype)

    def resolve(self, sec: Section, rel: Relocation, rtype: RelocType) -> _Target:
        """Returns the target of ``rel``; copies sections that the program lacks."""
        sym = rel.symbol
        if sym.shndx == "SHN_ABS":
            return _Target("abs", sym.value)
        if not sym.defined:
            if sym.shndx != "SHN_UNDEF":
                raise ExtractError(f"{_where(sec, rel)}: symbol {sym.name!r} in {sym.shndx} "
                                   f"(compile with -fno-common)")
            original = self._original_body(sym.name)
            if original is not None:
                return original
            orig = self.bin.find_global(sym.name)
            if orig is not None:
                if orig.type == "TLS":
                    raise UnsupportedRelocation(
                        f"thread-local variable {sym.name!r} referenced in {_where(sec, rel)}")
                return _Target("exe", orig.address)
            return _Target("import", 0, symbol=sym.name)
        target_sec = self.obj.get_section(sym.shndx)  # type: ignore[arg-type]
        value = sym.value if sym.type != "SECTION" else 0
        if sym.shndx in self.copied:
            return _Target("copy", value, section=sym.shndx)  # type: ignore[arg-type]
        base = self._exe_section_base(target_sec, sym, sec, rel)
        if base is not None:
            return _Target("exe", base + value)
        if target_sec.is_write and self.source and not self.bin.has_source_file(self.source):
            # Copying would give the patch a fresh variable instead of the program's.
            raise ExtractError(
                f"variable in {target_sec.name} is not in {self.bin.path}, which has "
                f"no static symbols from {os.path.basename(self.source)}: compile the patched "
                f"file under its original name")
        self.copy(target_sec.index, _kind(target_sec))
        return _Target("copy", value, section=target_sec.index)

    def _original_body(self, name: str) -> _Target | None:
        """Returns the program's own ``fn`` past its entry NOPs for ``patchbox_original_<fn>``
        (PATCHBOX_ORIGINAL, docs/redirect.md "Calling the original"); None for other names.

        Entry + 2 is the original body: the redirect is published at the entry, so a call
        there is never redirected, whatever patch is applied or removed later.
        """
        if not name.startswith(ORIGINAL_PREFIX):
            return None
        fn = name[len(ORIGINAL_PREFIX):]
        orig = self.bin.find_local(fn, self.source) if self.source else None
        if orig is None:
            orig = self.bin.find_global(fn)
        if orig is None or orig.type != "FUNC":
            raise ExtractError(f"{name}: {self.bin.path} has no function {fn!r} (global, or "
                               f"static in the patched file) for PATCHBOX_ORIGINAL")
        if self.bin.read(orig.address - C.ENTRY_PAD, len(ENTRY)) != ENTRY:
            raise ExtractError(f"{name}: {fn} at {orig.address:#x} has no patchable entry "
                               f"(6+2 NOPs), so its body does not start at entry+2")
        return _Target("exe", orig.address + C.ENTRY_NOPS)

    def _exe_section_base(self, target: Section, sym: ObjSymbol, sec: Section,
                          rel: Relocation) -> int | None:
        """Returns where ``target`` starts in the running program, or None to copy it."""
        if target.index in self.exe_base:
            return self.exe_base[target.index]
        if target.is_tls:
            raise UnsupportedRelocation(
                f"thread-local variable {_target_name(sym)!r} referenced in {_where(sec, rel)}")
        if not target.is_alloc:
            raise ExtractError(f"{_where(sec, rel)} refers to non-loaded section {target.name}")
        if not target.is_exec and not target.is_write:
            return None  # read-only data: immutable, always copied (see docs of extract_patch)
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
        # GCC's NAME.cold / NAME.part.N / NAME.constprop.N of a replaced function belong to it.
        return sym.is_local and any(sym.name.startswith(n + ".") for n in self.names)

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
        cands = [s for s in self.bin.iter_locals(self.source)
                 if s.type == "OBJECT" and pat.match(s.name)]
        if len(cands) > 1:
            raise ExtractError(
                f"static variable {sym.name!r} of {self.source} is not in {self.bin.path} and "
                f"several candidates are: {', '.join(s.name for s in cands)}")
        return cands[0] if cands else None

    # -- step 4: layout and fix-ups ---------------------------------------------------

    def layout(self, first: list[int]) -> tuple[bytearray, bytearray, int]:
        """Returns (text, data, bss size) with every copied section placed."""
        text, data = bytearray(), bytearray()
        funcs = first + [i for i, k in self.copied.items() if k == "func" and i not in first]
        for i in funcs:
            sec = self.obj.get_section(i)
            _align(text, max(16, sec.align), INT3)
            self.placement[i] = (FixupSection.TEXT, len(text))
            text += sec.data
        _align(text, 16, INT3)
        for i, kind in self.copied.items():
            if kind == "rodata":
                sec = self.obj.get_section(i)
                _align(text, sec.align, 0)
                self.placement[i] = (FixupSection.TEXT, len(text))
                text += sec.data
        for i, kind in self.copied.items():
            if kind == "data":
                sec = self.obj.get_section(i)
                _align(data, sec.align, 0)
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
        pending: list[tuple[Section, Relocation, RelocType, _Target]] = []
        for i in self.copied:
            sec = self.obj.get_section(i)
            for rel in self.obj.get_relocations(sec):
                rtype = get_reloc_type(rel.type, _where(sec, rel), _target_name(rel.symbol))
                if rtype.recipe is not Recipe.NONE:
                    tgt = self._entry_address(sec, rel, rtype, self.resolve(sec, rel, rtype))
                    pending.append((sec, rel, rtype, tgt))
        # Stubs and GOT slots go after everything copied, so their offsets are known now.
        for sec, rel, rtype, tgt in pending:
            if tgt.kind == "import" and rtype.recipe in (Recipe.CALL, Recipe.PCREL):
                self._check_call(sec, rel, rtype)
                if tgt.symbol not in self.stubs:
                    self.stubs[tgt.symbol] = -1
        if self.stubs:
            _align(text, 16, INT3)
            for name in self.stubs:
                self.stubs[name] = len(text)
                text += b"\xff\x25\x00\x00\x00\x00" + bytes(8) + bytes([INT3, INT3])
                self._add(FixupSection.TEXT, FixupType.ABS64, _Target("import", 0, symbol=name),
                          len(text) - STUB_SIZE + STUB_SLOT, 0)
        got_targets = list(dict.fromkeys(t for _s, _r, rt, t in pending if rt.recipe is Recipe.GOT))
        if got_targets:
            _align(text, GOT_SLOT, 0)
            for tgt in got_targets:
                self.got[tgt] = len(text)
                text += bytes(GOT_SLOT)
                self._add(FixupSection.TEXT, FixupType.ABS64, tgt, self.got[tgt], 0)
        for sec, rel, rtype, tgt in pending:
            where, off = self.placement[sec.index]
            pos = off + rel.offset
            buf = text if where == FixupSection.TEXT else data
            buf[pos:pos + rtype.size] = bytes(rtype.size)
            if rtype.recipe is Recipe.ABS64:
                self._add(where, FixupType.ABS64, tgt, pos, rel.addend)
            elif rtype.recipe is Recipe.GOT:
                self.fixups.append(Fixup(where, FixupType.PC32, FixupBase.TEXT, pos,
                                         self.got[tgt] + rel.addend))
            elif tgt.kind == "import":
                self.fixups.append(Fixup(where, FixupType.PC32, FixupBase.TEXT, pos,
                                         self.stubs[tgt.symbol] + rel.addend))
            else:
                self._add(where, FixupType.PC32, tgt, pos, rel.addend)
        self.fixups.sort(key=lambda f: (f.section, f.offset))

    def _entry_address(self, sec: Section, rel: Relocation, rtype: RelocType,
                       tgt: _Target) -> _Target:
        """Returns ``tgt``, or the original's address if it takes a replaced function's address.

        A function pointer to a replaced function may be stored by the program; it must
        stay valid after the patch is removed, so it gets the original entry (which the
        redirect sends to the replacement while the patch is applied). Calls and jumps
        keep going straight to the replacement.
        """
        if tgt.kind != "copy" or tgt.section not in self.entries:
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
        return _Target("exe", orig - entry + tgt.value) if pointed == entry else tgt

    def _check_call(self, sec: Section, rel: Relocation, rtype: RelocType) -> None:
        """Raises unless an import reached PC-relatively is the operand of a call/jmp."""
        if rtype.recipe is Recipe.CALL and sec.is_exec:
            return
        if not _is_branch(sec, rel):
            raise UnsupportedRelocation(
                f"{rtype.name} in {_where(sec, rel)}: PC-relative data reference to "
                f"{rel.symbol.name!r}, which the program does not define (a shared-library "
                f"variable); it can only be reached through the GOT: compile the patch with "
                f"-fPIC, or reference it from the program itself")

    def _add(self, where: FixupSection, ftype: FixupType, tgt: _Target, pos: int,
             addend: int) -> None:
        if tgt.kind == "copy":
            area, off = self.placement[tgt.section]
            base = FixupBase.TEXT if area == FixupSection.TEXT else FixupBase.DATA
            self.fixups.append(Fixup(where, ftype, base, pos, off + tgt.value + addend))
        elif tgt.kind == "exe":
            self.fixups.append(Fixup(where, ftype, FixupBase.EXE, pos, tgt.value + addend))
        elif tgt.kind == "abs":
            self.fixups.append(Fixup(where, ftype, FixupBase.ABS, pos, tgt.value + addend))
        else:
            self.fixups.append(Fixup(where, ftype, FixupBase.IMPORT, pos, tgt.value + addend,
                                     tgt.symbol))

    def new_symbols(self, replaced: set[int]) -> dict[str, str]:
        """Returns the ``new:<symbol>`` meta entries for copied sections."""
        meta = {}
        for i, kind in self.copied.items():
            if i in replaced:
                continue
            sec = self.obj.get_section(i)
            names = [s.name for s in self.obj.get_section_symbols(sec)] or [sec.name]
            for n in names:
                meta[f"new:{n}"] = "text" if kind in ("func", "rodata") else "data"
        return meta


def _is_branch(sec: Section, rel: Relocation) -> bool:
    """Returns True if ``rel`` is the rel32 of a call, jmp or jcc."""
    code, o = sec.data, rel.offset
    return sec.is_exec and o >= 1 and (
        code[o - 1] in (0xE8, 0xE9)
        or (o >= 2 and code[o - 2] == 0x0F and 0x80 <= code[o - 1] <= 0x8F))


def _is_shared_library(binary: Binary) -> bool:
    """Returns True for an ET_DYN that is not an executable (no PT_INTERP, no DF_1_PIE)."""
    elf = binary.elf
    if elf["e_type"] != "ET_DYN":
        return False
    if any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments()):
        return False
    dyn = elf.get_section_by_name(".dynamic")
    if dyn is None:
        return False  # static-pie
    for tag in dyn.iter_tags():
        if tag.entry.d_tag == "DT_FLAGS_1" and tag.entry.d_val & 0x08000000:  # DF_1_PIE
            return False
    return True


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


def _align(buf: bytearray, align: int, fill: int) -> None:
    pad = -len(buf) % max(1, align)
    buf += bytes([fill]) * pad


def _check_inlined(binary: Binary, shown: str, obj: ObjectFile, functions: list[str],
                   allow_inlined: bool, warnings: list[str]) -> dict[str, str]:
    """Refuses (or warns, with ``allow_inlined``) when the reference binary's DWARF shows
    inlined copies of ``functions`` outside the functions this patch replaces.

    Returns the meta entries ``inlined_check`` and ``inlined:<fn>``.
    """
    source = os.path.basename(obj.source_file) if obj.source_file else None
    targets = {}
    for fn in functions:
        sym = obj.get_function(fn)
        targets[fn] = source if sym is not None and sym.is_local else None
    names = " or ".join(functions)
    if not dwarf.has_debug_info(binary.elf):
        link = dwarf.debuglink(binary.elf)
        extra = (f" (its separate debug file {link} named by .gnu_debuglink is not read)"
                 if link else "")
        warnings.append(f"{shown} has no debug info (.debug_info){extra}: cannot check whether "
                        f"{names} is inlined elsewhere; build with -g")
        return {"inlined_check": "unavailable"}
    try:
        sites, found = dwarf.find_inlined(binary.elf, targets, shown)
    except ElfError as err:
        warnings.append(f"{err}: cannot check whether {names} is inlined elsewhere")
        return {"inlined_check": "unavailable"}
    meta = {"inlined_check": "dwarf"}
    missing = [fn for fn in functions if fn not in found]
    if missing:
        warnings.append(f"{shown} has no debug info for {' or '.join(missing)} (built without "
                        f"-g?): cannot check whether it is inlined elsewhere")
        meta["inlined_check"] = "partial"

    def replaced(caller: dwarf.Function) -> bool:  # its replacement carries the fixed inline
        return caller.name in functions and (caller.external or caller.source == source)

    refusals: list[str] = []
    same: list[str] = []
    other: list[str] = []
    for fn in functions:
        kept = [s for s in sites.get(fn, []) if not replaced(s.caller)]
        if not kept:
            continue
        where = ", ".join(f"{s.caller.name} ({s.caller.source or 'unknown file'})" for s in kept)
        if allow_inlined:
            counted = ", ".join(f"{s.caller.name} ({s.caller.source or 'unknown file'}) at "
                                f"{s.count} site(s)" for s in kept)
            warnings.append(f"{fn} is inlined into {counted}: calls there keep the old code "
                            f"(--allow-inlined)")
            meta[f"inlined:{fn}"] = ",".join(dict.fromkeys(s.caller.name for s in kept))
            continue
        refusals.append(f"{fn} is inlined into {where}")
        for s in kept:
            label = s.caller.name if s.caller.source == source else \
                f"{s.caller.name} ({s.caller.source or 'unknown file'})"
            (same if s.caller.source == source else other).append(label)
    if refusals:
        hints = []
        if same:
            hints.append("add " + " ".join(f"--function {c}" for c in dict.fromkeys(same)))
        if other:
            hints.append("patch " + ", ".join(dict.fromkeys(other)) + " too")
        n = len(set(same) | set(other))
        raise ExtractError(f"{'; '.join(refusals)}: calls there would keep the old code; "
                           f"{' and '.join(hints)} if {'it' if n == 1 else 'they'} can be "
                           f"replaced, or pass --allow-inlined to accept")
    return meta


def extract_patch(obj_path: str | Path, binary_path: str | Path, functions: list[str], *,
                  name: str | None = None, profile: str = "generic",
                  allow_inlined: bool = False, warnings: list[str] | None = None,
                  force: bool = False) -> Patch:
    """Returns the live patch replacing ``functions`` of ``binary_path`` with their
    versions in the patched object ``obj_path``.

    ``obj_path`` must be compiled with ``patchbox config --cflags`` (patchable entry,
    one section per function and object); ``binary_path`` is the reference binary the
    running process was started from (unstripped, with a GNU build-id). ``name``
    defaults to ``"patch"``.

    ``profile`` is ``"generic"`` or ``"qemu"``; it is recorded in the meta, and ``"qemu"``
    sets the RETAIN apply flag (the patch's memory is never reused after remove).

    Decisions: read-only data the patch reaches (string literals, jump tables,
    ``const`` tables) is always copied into the patch text, since it cannot change and
    the copy is what the new code was compiled against (pointer identity of ``const``
    objects is not kept); writable variables the program has are never copied.

    Inlined copies: with DWARF in ``binary_path``, a replaced function that the compiler
    also inlined into functions this patch does not replace is refused (those callers
    would keep the old code), unless ``allow_inlined``; the meta records
    ``inlined_check`` (``dwarf``, ``partial`` or ``unavailable``) and, when allowed,
    ``inlined:<fn>`` = the callers. Nothing is printed: warnings (inlined copies allowed,
    no debug info to check) are appended to ``warnings`` when a list is given.

    Originals without the patchable entry: redirected by an entry jump (kind
    ENTRY_JUMP) if :func:`patchbox.build.fallback.analyse_entry` accepts them, else
    refused naming the rule; ``force`` accepts a first instruction shorter than the jump
    (rule 2) with the risk as a warning. A replacement in ``obj_path`` without its own
    patchable entry is accepted with a warning (nothing can be stacked on it).

    Raises ElfError for unreadable inputs, ExtractError (UnsupportedRelocation for
    relocations that cannot be carried) when no correct patch can be built.
    """
    if warnings is None:
        warnings = []
    if profile not in PROFILES:
        raise ExtractError(f"unknown profile {profile!r} (one of {', '.join(PROFILES)})")
    name = name or "patch"
    check_name(name)
    functions = list(dict.fromkeys(functions))
    if not functions:
        raise ExtractError("no function to extract: give at least one --function")
    if len(functions) > C.MAX_FUNCS:
        raise ExtractError(f"{len(functions)} functions in one patch (max {C.MAX_FUNCS})")
    shown = str(binary_path)
    obj_path, binary_path = Path(obj_path).absolute(), Path(binary_path).absolute()
    obj = ObjectFile.load(obj_path)
    with Binary(binary_path) as binary:
        build_id = binary.build_id()
        ex = _Extractor(obj, binary, functions, force=force, warnings=warnings)
        replaced = ex.replaced()
        inline_meta = _check_inlined(binary, shown, obj, functions, allow_inlined, warnings)
        for sym, sec, addr, _exp in replaced:
            ex.copy(sec.index, "func")
            ex.entries[sec.index] = (sym.value, addr)
        ex.discover()
        first = [sec.index for _sym, sec, _a, _e in replaced]
        text, data, bss_size = ex.layout(first)
        ex.emit(text, data)
    funcs = [Function(symbol=sym.name, target=addr,
                      new_offset=ex.placement[sec.index][1] + sym.value,
                      new_size=sym.size, expected=expected, kind=ex.redirect[sym.name][0],
                      skip=ex.redirect[sym.name][1])
             for sym, sec, addr, expected in replaced]
    meta = {
        "tool": "extract-patch",
        "tool_version": patchbox.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference": str(binary_path),
        "object": str(obj_path),
        "profile": profile,
    }
    for fn in functions:
        meta[f"source:{fn}"] = obj.source_file or "unknown"
    meta.update(ex.new_symbols({sec.index for _s, sec, _a, _e in replaced}))
    meta.update(inline_meta)
    if profile == "qemu":  # the QEMU build's own version facts, when binary is in it
        meta.update(qemu_build_info(Path(binary_path).parent))
    # QEMU code may be suspended in coroutines on stacks the agent cannot scan: never
    # reuse such a patch's memory after remove (docs/qemu.md, "Coroutines").
    flags = ApplyFlag.RETAIN if profile == "qemu" else 0
    return Patch(name=name, build_id=build_id, text=bytes(text), functions=funcs,
                 fixups=ex.fixups, data=bytes(data), bss_size=bss_size, flags=flags, meta=meta)
