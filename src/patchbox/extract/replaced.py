"""The first extraction passes: which functions of an object are replaced, and its hooks.

:func:`find_replaced` pairs every function asked for with the running program's
original (statics by name and source file: :meth:`Binary.find_symbol`) and decides how
the agent redirects it: the patchable entry of ``patchbox config --cflags`` (an even
entry), else an entry jump (:mod:`patchbox.extract.entry`). :func:`find_hooks` reads the
``PATCHBOX_HOOK`` sections. Both only read; they return values (and warnings).
"""

from __future__ import annotations

import os

from patchbox import wire as C
from patchbox.arch import Recipe
from patchbox.elf.binary import Binary, SourceMatch, Symbol
from patchbox.elf.objfile import ObjectFile, ObjSymbol
from patchbox.errors import ElfError, ExtractError
from patchbox.extract.entry import analyse_entry
from patchbox.extract.model import HookSite, Replaced
from patchbox.wire import HookKind, RedirectKind

__all__ = ["HOOK_SECTION", "find_replaced", "find_hooks", "has_padding"]

HOOK_SECTION = ".patchbox_hooks."  # PATCHBOX_HOOK(when, fn), agent/include/patchbox/patch.h


def find_replaced(
    obj: ObjectFile,
    binary: Binary,
    names: tuple[str, ...],
    warnings: list[str],
    statics: SourceMatch | None = None,
) -> tuple[Replaced, ...]:
    """Returns the replaced functions ``names`` of ``obj``, each with its original in
    ``binary`` and the expected bytes; raises ExtractError if one cannot be redirected.
    What the user should know is appended to ``warnings`` as it is found (before an
    error, too). ``statics``: the binary's unit(s) the object's statics are (default:
    :meth:`Binary.match_source` of ``obj`` alone)."""
    if statics is None:
        statics = binary.match_source(obj)
    out = []
    for name in names:
        sym = obj.get_function(name)
        if sym is None:
            raise ExtractError(
                f"{obj.path}: no function {name!r} (is it spelled right, or was it inlined away?)"
            )
        sec = obj.get_symbol_section(sym)
        entry = obj.arch.entry
        if sym.value != entry.pad or entry.padded_skip(sec.data) is None:
            # Valid (its entry is the symbol), but nothing can be stacked on it later.
            warnings.append(
                f"{name} in {obj.path} has no patchable entry (not compiled with "
                f"`patchbox config --cflags`): a later patch of {name} cannot be "
                f"stacked on this one"
            )
        orig = _find_original(obj, binary, sym, statics)
        if name == "main" and not sym.is_local:
            # Found in OpenSSH's and dnsmasq's fixes: the event loop lives in main.
            warnings.append(
                "main is replaced, but the running process entered main once and usually "
                "never returns from it: its loop keeps the old code; only functions it "
                "calls again (and processes started later) run the new code"
            )
        held = False
        padded_skip = _padded_skip(binary, orig.address)
        padded = padded_skip is not None
        # The publishing store at the entry must be aligned (the agent refuses an odd
        # entry). GCC aligns functions only from -O2 on: at -O0, -O1 and -Os an entry
        # with the padding is odd about half the time where the store is 2 bytes (found
        # by the differential test), and takes the entry jump over its NOPs instead.
        if padded_skip is not None and orig.address % binary.arch.entry.publish == 0:
            # EXTRACT_MAX_EXPECTED bytes tell another build; the agent takes up to
            # MAX_EXPECTED (both from wire/constants.toml).
            pad = binary.arch.entry.pad
            n = max(C.MIN_EXPECTED, min(C.EXTRACT_MAX_EXPECTED, orig.size + pad))
            skip = padded_skip
            expected = binary.read(orig.address - pad, max(n, pad + skip + entry.at))
            kind = RedirectKind.PATCHABLE_ENTRY
        elif padded:
            try:
                expected, kind, skip, held = _entry_jump(binary, name, orig)
            except ExtractError as err:
                raise ExtractError(
                    f"{err} ({name}'s entry {orig.address:#x} is odd: the binary was built "
                    f"without function alignment, as at -O0/-O1/-Os; -falign-functions=2 "
                    f"or more in its CFLAGS gives every entry the 2-byte publish)"
                ) from err
        else:
            expected, kind, skip, held = _entry_jump(binary, name, orig)
        out.append(Replaced(sym, sec, orig.address, expected, kind, skip, held))
    return tuple(out)


def find_hooks(obj: ObjectFile) -> tuple[HookSite, ...]:
    """Returns the hooks of ``obj`` (PATCHBOX_HOOK: function pointers in sections named
    ``.patchbox_hooks.<when>``); raises ExtractError for one that names no function."""
    hooks = []
    for sec in obj.sections:
        if not sec.name.startswith(HOOK_SECTION):
            continue
        when_name = sec.name[len(HOOK_SECTION) :].upper()
        if when_name not in HookKind.__members__:
            raise ExtractError(
                f"{obj.path}: unknown hook section {sec.name} (one of "
                f"{', '.join(k.lower() for k in HookKind.__members__)})"
            )
        for rel in obj.get_relocations(sec):
            sym = rel.symbol
            target = obj.get_symbol_section(sym) if sym.defined else None
            rtype = obj.arch.relocs.get(rel.type)
            abs64 = rtype is not None and rtype.recipe is Recipe.ABS64
            if not abs64 or target is None or not target.is_exec:
                raise ExtractError(
                    f"{obj.path}: {sec.name}+{rel.offset:#x} does not name "
                    f"a function of this object"
                )
            value = (sym.value if sym.type != "SECTION" else 0) + rel.addend
            hooks.append(HookSite(HookKind[when_name], target.index, value))
    if len(hooks) > C.MAX_HOOKS:
        raise ExtractError(f"{len(hooks)} hooks in {obj.path} (max {C.MAX_HOOKS})")
    return tuple(hooks)


def has_padding(binary: Binary, address: int) -> bool:
    """Returns True if the function at ``address`` of ``binary`` has the patchable entry."""
    return _padded_skip(binary, address) is not None


def _padded_skip(binary: Binary, address: int) -> int | None:
    """Returns the skip of the patchable entry of the function at ``address`` of
    ``binary`` (0, or past a landing pad the compiler put at the symbol), None if it has
    none."""
    try:
        entry = binary.arch.entry
        return entry.padded_skip(binary.read(address - entry.pad, len(entry.nops) + entry.skip))
    except ElfError:
        return None


def _entry_jump(binary: Binary, name: str, orig: Symbol) -> tuple[bytes, RedirectKind, int, bool]:
    """Returns (expected bytes, kind, skip, held) of an entry-jump record for ``orig``
    (no padding): [P, P+n), n >= 8; raises ExtractError naming the rule that fails."""
    code = binary.read(orig.address, orig.size)
    pieces = [
        (s.name, s.address, binary.read(s.address, s.size))
        for s in binary.iter_symbols()
        if s.defined
        and s.type == "FUNC"
        and s.size
        and s.name.startswith(name + ".")
        and s.address != orig.address
    ]
    jump = analyse_entry(name, orig.address, code, arch=binary.arch, pieces=pieces)
    n = max(C.MIN_EXPECTED, min(C.EXTRACT_MAX_EXPECTED, orig.size - jump.skip))
    return binary.read(jump.point, n), RedirectKind.ENTRY_JUMP, jump.skip, jump.held


def _find_original(
    obj: ObjectFile, binary: Binary, sym: ObjSymbol, statics: SourceMatch | None
) -> Symbol:
    """Returns the running program's function that ``sym`` replaces."""
    if sym.is_local and obj.source_file is None:
        raise ExtractError(
            f"{obj.path}: static function {sym.name!r} but the "
            f"object names no source file (STT_FILE)"
        )
    orig = binary.find_symbol(sym.name, statics, local=sym.is_local)
    if sym.is_local:
        where = f"static {sym.name!r} from {os.path.basename(obj.source_file or '')}"
    else:
        where = f"global function {sym.name!r}"
    if (
        orig is None
        and not sym.is_local
        and any(s.name == sym.name and not s.defined for s in binary.iter_symbols())
    ):
        raise ExtractError(
            f"{sym.name} is in a shared library, not in {binary.path}: build the patch "
            f"against that library (extract-patch ... /usr/lib/.../libNAME.so.N)"
        )
    if orig is None or orig.type != "FUNC":
        raise ExtractError(
            f"{binary.path}: no {where} to replace (inlined everywhere, "
            f"renamed, or not the binary this object was patched from?)"
        )
    return orig
