"""One live patch from several patched object files (`patchbox build`).

:func:`extract_multi` runs :mod:`patchbox.build.extract`'s extractor once per object —
each object's statics are resolved against its own source file, so two ``static``
functions of the same name in two files are told apart — and concatenates the results:

- text: each object's text (its functions, copied code and read-only data, its stubs and
  GOT slots), 16-aligned, one after the other;
- data: each object's data followed by its bss as zeros, except the last object's bss,
  which stays bss;
- fix-ups are shifted by the text/data offset of the object they are written in, their
  TEXT/DATA addends by the offset of the object they point into.

A global that one object references and another object of the set defines, while the
running program lacks it (a new function or variable in another file), is copied from
the defining object and reached directly (kind ``xref``).
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import patchbox
from patchbox.build import extract as _ex
from patchbox.build.fastobj import load_object
from patchbox.build.inlines import global_homes
from patchbox.build.qemu import build_info as qemu_build_info
from patchbox.elf import dwarf
from patchbox.elf.binary import Binary
from patchbox.elf.objfile import ObjectFile, ObjSymbol, Relocation, Section
from patchbox.elf.reloc import RelocType
from patchbox.errors import ElfError, ExtractError
from patchbox.format.layout import check_name
from patchbox.format.model import Fixup, Function, Patch
from patchbox import wire as C
from patchbox.wire import FixupBase, FixupSection, FixupType

__all__ = ["extract_multi"]


class _Member(_ex._Extractor):
    """The extractor of one object of a multi-object patch."""

    def __init__(self, obj: ObjectFile, binary: Binary, functions: list[str], index: int,
                 group: list[_Member], force_copy: set[str]) -> None:
        super().__init__(obj, binary, functions)
        self.index = index
        self.group = group
        self.force_copy = force_copy
        self.xfix: dict[int, int] = {}  # id(Fixup) -> index of the member it points into
        self.defines = {s.name: s for s in obj.symbols
                        if s.defined and not s.is_local and s.name
                        and s.type in ("FUNC", "OBJECT", "NOTYPE")}

    def _is_clone_of_replaced(self, sym: ObjSymbol) -> bool:
        return sym.name in self.force_copy or super()._is_clone_of_replaced(sym)

    def resolve(self, sec: Section, rel: Relocation, rtype: RelocType) -> _ex._Target:
        sym = rel.symbol
        if (not sym.defined and sym.shndx == "SHN_UNDEF" and sym.name
                and not sym.name.startswith(getattr(_ex, "ORIGINAL_PREFIX", "\0"))
                and self.bin.find_global(sym.name) is None):
            for other in self.group:
                odef = other.defines.get(sym.name)
                if other is not self and odef is not None:
                    tsec = other.obj.get_section(odef.shndx)  # type: ignore[arg-type]
                    other.copy(tsec.index, _ex._kind(tsec))
                    return _ex._Target("xref", odef.value, section=tsec.index,
                                       symbol=str(other.index))
        return super().resolve(sec, rel, rtype)

    def _add(self, where: FixupSection, ftype: FixupType, tgt: _ex._Target, pos: int,
             addend: int) -> None:
        if tgt.kind != "xref":
            super()._add(where, ftype, tgt, pos, addend)
            return
        other = self.group[int(tgt.symbol)]
        area, off = other.placement[tgt.section]
        base = FixupBase.TEXT if area == FixupSection.TEXT else FixupBase.DATA
        fx = Fixup(where, ftype, base, pos, off + tgt.value + addend)
        self.xfix[id(fx)] = other.index
        self.fixups.append(fx)


def _check_inlined(binary: Binary, shown: str, members: list[_Member],
                   allow_inlined: bool, warnings: list[str]) -> dict[str, str]:
    """Like extract's check, over every replaced function of every object: a caller that
    inlines a replaced function is fine if the patch replaces that caller too."""
    targets: dict[str, str | None] = {}
    replaced: set[tuple[str, str | None]] = set()
    homes: dict[str, str] = {}
    for m in members:
        src = os.path.basename(m.source) if m.source else None
        glob = []
        for fn in m.names:
            sym = m.obj.get_function(fn)
            local = sym is not None and sym.is_local
            targets[fn] = src if local else None
            replaced.add((fn, src if local else None))
            if not local:
                glob.append(fn)
        if glob and src:
            homes.update({fn: h for fn, h in global_homes(m.obj.path, glob).items()
                          if h == src})
    if not targets:
        return {}
    if not dwarf.has_debug_info(binary.elf):
        warnings.append(f"{shown} has no debug info (.debug_info): cannot check whether the "
                        f"replaced functions are inlined elsewhere; build with -g")
        return {"inlined_check": "unavailable"}
    try:
        sites, _found = dwarf.find_inlined(binary.elf, targets, shown, homes)
    except ElfError as err:
        warnings.append(f"{err}: cannot check for inlined copies")
        return {"inlined_check": "unavailable"}
    meta = {"inlined_check": "dwarf"}
    refusals = []
    for fn, fsites in sites.items():
        kept = [s for s in fsites
                if (s.caller.name, None) not in replaced
                and (s.caller.name, s.caller.source) not in replaced]
        if not kept:
            continue
        where = ", ".join(f"{s.caller.name} ({s.caller.source or 'unknown file'})" for s in kept)
        if allow_inlined:
            warnings.append(f"{fn} is inlined into {where}: calls there keep the old code "
                            f"(--allow-inlined)")
            meta[f"inlined:{fn}"] = ",".join(dict.fromkeys(s.caller.name for s in kept))
        else:
            refusals.append(f"{fn} is inlined into {where}, which the diff does not change")
    if refusals:
        raise ExtractError("; ".join(refusals) + ": calls there would keep the old code; "
                           "pass --allow-inlined to accept")
    return meta


def extract_multi(pairs: list[tuple[Path | str, list[str]]], binary_path: str | Path, *,
                  name: str | None = None, profile: str = "generic",
                  force_copy: dict[str, set[str]] | None = None, allow_inlined: bool = False,
                  warnings: list[str] | None = None, meta: dict[str, str] | None = None) -> Patch:
    """Returns one patch replacing, for each (patched object, function names) pair, those
    functions of ``binary_path`` by their versions in the object.

    Objects with no function to replace may be given: they only supply new globals that
    the others reference. ``force_copy`` maps an object path (as given) to names of local
    functions (changed GCC clones) that must be copied rather than linked to the
    program's. Everything else is as in :func:`patchbox.build.extract.extract_patch`.
    """
    if warnings is None:
        warnings = []
    if profile not in _ex.PROFILES:
        raise ExtractError(f"unknown profile {profile!r} (one of {', '.join(_ex.PROFILES)})")
    name = name or "patch"
    check_name(name)
    total = sum(len(set(f)) for _o, f in pairs)
    if total == 0:
        raise ExtractError("no function to replace")
    if total > C.MAX_FUNCS:
        raise ExtractError(f"{total} functions in one patch (max {C.MAX_FUNCS})")
    shown = str(binary_path)
    binary_path = Path(binary_path).absolute()
    force_copy = force_copy or {}
    members: list[_Member] = []
    with Binary(binary_path) as binary:
        build_id = binary.build_id()
        for i, (obj_path, functions) in enumerate(pairs):
            obj = load_object(Path(obj_path).absolute())
            members.append(_Member(obj, binary, list(dict.fromkeys(functions)), i, members,
                                   set(force_copy.get(str(obj_path), set()))))
        replaced = [m.replaced() for m in members]
        inline_meta = _check_inlined(binary, shown, members, allow_inlined, warnings)
        for m, reps in zip(members, replaced):
            for sym, sec, addr, _exp in reps:
                m.copy(sec.index, "func")
                m.entries[sec.index] = (sym.value, addr)
        while any(m.worklist for m in members):
            for m in members:
                m.discover()
        blobs = []
        for m, reps in zip(members, replaced):
            blobs.append(m.layout([sec.index for _s, sec, _a, _e in reps]))
        for m, (text, data, _bss) in zip(members, blobs):
            m.emit(text, data)
    text, data = bytearray(), bytearray()
    tbase, dbase = [], []
    bss_size = 0
    for k, (m, (mtext, mdata, mbss)) in enumerate(zip(members, blobs)):
        _ex._align(text, 16, _ex.INT3)
        tbase.append(len(text))
        text += mtext
        _ex._align(data, 16, 0)
        dbase.append(len(data))
        data += mdata
        if k == len(members) - 1:
            bss_size = mbss
        else:
            data += bytes(mbss)
    fixups: list[Fixup] = []
    funcs: list[Function] = []
    out_meta = {
        "tool": "patchbox-build",
        "tool_version": patchbox.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference": str(binary_path),
        "profile": profile,
        "objects": ",".join(str(m.obj.path) for m in members),
    }
    for m, reps in zip(members, replaced):
        for fx in m.fixups:
            tgt = m.xfix.get(id(fx), m.index)
            at = tbase[m.index] if fx.section == FixupSection.TEXT else dbase[m.index]
            add = fx.addend
            if fx.base == FixupBase.TEXT:
                add += tbase[tgt]
            elif fx.base == FixupBase.DATA:
                add += dbase[tgt]
            fixups.append(Fixup(fx.section, fx.type, fx.base, fx.offset + at, add, fx.symbol))
        for sym, sec, addr, expected in reps:
            kind, skip = m.redirect[sym.name]
            funcs.append(Function(symbol=sym.name, target=addr,
                                  new_offset=tbase[m.index] + m.placement[sec.index][1]
                                  + sym.value, new_size=sym.size, expected=expected,
                                  kind=kind, skip=skip))
            key = f"source:{sym.name}"
            if key in out_meta:  # static functions of one name in several files
                key += f"@{os.path.basename(m.obj.source_file or str(m.index))}"
            out_meta[key] = m.obj.source_file or "unknown"
        out_meta.update(m.new_symbols({sec.index for _s, sec, _a, _e in reps}))
    fixups.sort(key=lambda f: (f.section, f.offset))
    out_meta.update(inline_meta)
    if profile == "qemu":
        out_meta.update(qemu_build_info(Path(binary_path).parent))
    out_meta.update(meta or {})
    # As extract_patch: QEMU code may be suspended in coroutines the agent cannot scan,
    # so a --qemu patch's memory is never reused after remove (docs/qemu.md).
    flags = C.ApplyFlag.RETAIN if profile == "qemu" else 0
    return Patch(name=name, build_id=build_id, text=bytes(text), functions=funcs,
                 fixups=fixups, data=bytes(data), bss_size=bss_size, flags=flags,
                 meta=out_meta)


def patch_from_diffs(diffs: list, binary_path: str | Path,  # type: ignore[type-arg]
                     **kwargs: Any) -> Patch:
    """Returns the patch for the object comparisons ``diffs`` (patchbox.build.diff);
    raises ExtractError listing every refusal, or if no function changed."""
    refusals = [f"{d.rel}: {r}" for d in diffs for r in d.refusals]
    if refusals:
        raise ExtractError("refused: " + "; ".join(refusals))
    pairs = [(d.patched, d.functions) for d in diffs if d.functions or d.new_globals]
    if not any(f for _p, f in pairs):
        raise ExtractError("the diff changes no function of the program (see --explain)")
    _check_reference(diffs, binary_path)
    force = {str(d.patched): d.force_copy for d in diffs if d.force_copy}
    meta = {"objects": ",".join(d.rel for d in diffs if d.functions or d.new_globals)}
    meta.update(kwargs.pop("meta", None) or {})
    return extract_multi(pairs, binary_path, force_copy=force, meta=meta, **kwargs)


def _check_reference(diffs: list, binary_path: str | Path) -> None:
    """Refuses when a replaced function of the original build has another size than in the
    reference binary: the tree did not rebuild the running program (other sources or flags),
    so the diff of the two builds says nothing reliable about it."""
    with Binary(Path(binary_path)) as binary:
        for d in diffs:
            if not d.functions or d.orig is None:
                continue
            orig = load_object(d.orig)
            for fn in d.functions:
                sym = orig.get_function(fn)
                if sym is None:
                    continue
                if sym.is_local:
                    ref = binary.find_local(fn, orig.source_file) if orig.source_file else None
                else:
                    ref = binary.find_global(fn)
                if ref is not None and ref.type == "FUNC" and ref.size != sym.size:
                    raise ExtractError(
                        f"{fn} ({d.rel}) is {sym.size} bytes in the original build but "
                        f"{ref.size} bytes in {binary_path}: the tree does not rebuild the "
                        f"running binary (other sources, compiler or flags?)")
