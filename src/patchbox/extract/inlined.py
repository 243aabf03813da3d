"""The inlined-copies check of a patch: no replaced function may keep old copies inlined
into functions the patch leaves alone.

A live patch redirects the out-of-line copy of a function; copies the compiler inlined
into other functions keep the old code. With DWARF in the reference binary,
:func:`check_inlined` finds them (:func:`patchbox.elf.dwarf.find_inlined`) and refuses the
patch, unless ``allow_inlined`` (then it warns). A caller that the patch replaces too is
fine: its replacement carries the fixed inline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from patchbox.elf import dwarf
from patchbox.elf.binary import Binary, debuglink
from patchbox.elf.dwarf import InlineSite
from patchbox.errors import ElfError, ExtractError
from patchbox.extract.model import Member

__all__ = ["check_inlined"]


@dataclass(frozen=True)
class _Replaced:
    name: str
    # a static function's file: its compile unit's full path where the binary's DWARF
    # places it (two files of one basename), else the basename; None: a global
    source: str | None


def _file_of(binary: Binary, m: Member) -> str | None:
    """Returns the file ``m``'s statics come from: the full path of the binary's compile
    unit they are in, else the basename (None: no source file)."""
    units = m.statics.units if m.statics is not None else ()
    path = binary.unit_paths(units).get(units[0]) if len(units) == 1 else None
    return path or (os.path.basename(m.source) if m.source else None)


def _replaced(binary: Binary, members: Sequence[Member]) -> list[_Replaced]:
    """Returns the replaced functions of every member."""
    out: list[_Replaced] = []
    for m in members:
        src = _file_of(binary, m)
        for fn in m.names:
            sym = m.obj.get_function(fn)
            local = sym is not None and sym.is_local
            out.append(_Replaced(fn, src if local else None))
    return out


def _homes(members: Sequence[Member], replaced: list[_Replaced]) -> dict[str, str]:
    """Returns the single-``.c``-file homes of the replaced global functions (so the DWARF
    walk can skip other compile units): those declared only in their own ``.c`` file."""
    homes: dict[str, str] = {}
    global_names = {r.name for r in replaced if r.source is None}
    for m in members:
        src = os.path.basename(m.source) if m.source else None
        globals_ = [fn for fn in m.names if fn in global_names]
        if globals_ and src:
            try:
                found = dwarf.read_object_decls(m.obj.path).homes(globals_)
            except ElfError:
                found = {}  # no shortcut: the full walk decides
            homes.update({fn: h for fn, h in found.items() if h == src})
    return homes


def _where(sites: list[InlineSite], counted: bool = False) -> str:
    return ", ".join(
        f"{s.caller.name} ({s.caller.source or 'unknown file'})"
        + (f" at {s.count} site(s)" if counted else "")
        for s in sites
    )


def check_inlined(
    binary: Binary,
    shown: str,
    members: Sequence[Member],
    *,
    allow_inlined: bool,
    warnings: list[str],
    for_build: bool = False,
) -> dict[str, str]:
    """Refuses (or warns, with ``allow_inlined``) when the reference binary's DWARF shows
    inlined copies of the replaced functions of ``members`` in functions the patch does
    not replace; returns the meta entries ``inlined_check`` (``dwarf``, ``partial`` or
    ``unavailable``) and, when allowed, ``inlined:<fn>`` = the callers.

    The refusal's advice names what to add: ``--function CALLER`` for extract-patch,
    or (``for_build``) that the diff does not change those callers.

    ``for_build`` (`patchbox build`): every object whose code the diff can change was
    compiled twice and compared, so a caller holding an inlined copy of a changed
    function either differs (and is in the patch) or is byte-identical (the copy there
    did not change). Without LTO no other compile unit can hold a copy, so the DWARF walk
    over the binary is skipped (``inlined_check`` = ``objects``); it runs only when the
    binary was linked with LTO, whose compile units may inline across files.
    """
    replaced = _replaced(binary, members)
    if not replaced:
        return {}
    if for_build and not dwarf.has_lto_units(binary.dwarf):
        return {"inlined_check": "objects"}
    homes = _homes(members, replaced)
    names = " or ".join(dict.fromkeys(r.name for r in replaced))
    if not dwarf.has_debug_info(binary.dwarf):
        link = debuglink(binary.elf)
        extra = (
            f" (its separate debug file {link[0]} named by .gnu_debuglink was not found)"
            if link
            else ""
        )
        warnings.append(
            f"{shown} has no debug info (.debug_info){extra}: cannot check whether "
            f"{names} is inlined elsewhere; build with -g"
        )
        return {"inlined_check": "unavailable"}
    targets = {r.name: r.source for r in replaced}
    try:
        sites, found = dwarf.find_inlined(binary.dwarf, targets, shown, homes)
    except ElfError as err:
        warnings.append(f"{err}: cannot check whether {names} is inlined elsewhere")
        return {"inlined_check": "unavailable"}
    meta = {"inlined_check": "dwarf"}
    missing = [r.name for r in replaced if r.name not in found]
    if missing:
        warnings.append(
            f"{shown} has no debug info for {' or '.join(missing)} (built without "
            f"-g?): cannot check whether it is inlined elsewhere"
        )
        meta["inlined_check"] = "partial"
    kept_by_fn = _kept(sites, replaced)
    if not kept_by_fn:
        return meta
    if not allow_inlined:
        _refuse(binary, kept_by_fn, members, for_build=for_build)
    for fn, kept in kept_by_fn.items():
        warnings.append(
            f"{fn} is inlined into {_where(kept, counted=True)}: calls there "
            f"keep the old code (--allow-inlined)"
        )
        meta[f"inlined:{fn}"] = ",".join(dict.fromkeys(s.caller.name for s in kept))
    return meta


def _kept(
    sites: dict[str, list[InlineSite]], replaced: list[_Replaced]
) -> dict[str, list[InlineSite]]:
    """Returns {function: its inline sites in callers the patch does not replace}, for
    the functions that have such sites."""
    kept_by_fn: dict[str, list[InlineSite]] = {}
    for fn, fsites in sites.items():
        kept = [
            s
            for s in fsites
            if _Replaced(s.caller.name, None) not in replaced
            and _Replaced(s.caller.name, s.caller.source) not in replaced
            and _Replaced(s.caller.name, s.caller.path) not in replaced
        ]
        if kept:
            kept_by_fn[fn] = kept
    return kept_by_fn


def _refuse(
    binary: Binary,
    kept_by_fn: dict[str, list[InlineSite]],
    members: Sequence[Member],
    *,
    for_build: bool,
) -> NoReturn:
    """Raises the ExtractError refusing inlined copies the patch leaves alone, with what
    to add: ``--function CALLER`` (a caller in a patched file), patching another file, or
    (``for_build``) nothing but --allow-inlined: the diff does not change those callers."""
    if for_build:
        refusals = [
            f"{fn} is inlined into {_where(kept)}, which the diff does not change"
            for fn, kept in kept_by_fn.items()
        ]
        raise ExtractError(
            "; ".join(refusals) + ": calls there would keep the old code; "
            "pass --allow-inlined to accept"
        )
    sources = {_file_of(binary, m) for m in members}
    same: list[str] = []
    other: list[str] = []
    for kept in kept_by_fn.values():
        for s in kept:
            if s.caller.source in sources or s.caller.path in sources:
                same.append(s.caller.name)
            else:
                other.append(f"{s.caller.name} ({s.caller.source or 'unknown file'})")
    hints = []
    if same:
        hints.append("add " + " ".join(f"--function {c}" for c in dict.fromkeys(same)))
    if other:
        hints.append("patch " + ", ".join(dict.fromkeys(other)) + " too")
    n = len(set(same) | set(other))
    refusal = "; ".join(f"{fn} is inlined into {_where(kept)}" for fn, kept in kept_by_fn.items())
    raise ExtractError(
        f"{refusal}: calls there would keep the old code; "
        f"{' and '.join(hints)} if {'it' if n == 1 else 'they'} can be "
        f"replaced, or pass --allow-inlined to accept"
    )
