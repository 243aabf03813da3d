"""A whole live patch from one or several patched objects.

:func:`extract_patch` (``extract-patch``: one object, the functions named) and
:func:`extract_multi` / :func:`patch_from_diffs` (``patchbox build``: every object a diff
changed) run one :class:`~patchbox.extract.extractor.Extractor` per object — each
object's statics are resolved against its own source file, so two ``static`` functions
of the same name in two files are told apart — and concatenate the results:

- text: each object's text (its functions, copied code and read-only data, its stubs and
  GOT slots), 16-aligned, one after the other;
- data: each object's data followed by its bss as zeros, except the last object's bss,
  which stays bss;
- fix-ups are shifted by the text/data offset of the object they are written in, their
  TEXT/DATA addends by the offset of the object they point into.

Decisions: read-only data the patch reaches (string literals, jump tables, ``const``
tables) is always copied into the patch text, since it cannot change and the copy is what
the new code was compiled against (pointer identity of ``const`` objects is not kept);
writable variables the program has are never copied.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import patchbox
from patchbox import wire as C
from patchbox.compare.objects import ObjectDiff
from patchbox.elf.binary import Binary
from patchbox.elf.exports import program_libraries
from patchbox.elf.fastread import load_object
from patchbox.errors import ExtractError
from patchbox.extract.entry import is_shared_library
from patchbox.extract.extractor import INT3, Extractor, align
from patchbox.extract.inlined import check_inlined
from patchbox.format.layout import check_name
from patchbox.format.model import Fixup, Function, Hook, Patch
from patchbox.profiles import Profile, get_profile
from patchbox.wire import ApplyFlag, FixupBase, FixupSection

__all__ = ["extract_patch", "extract_multi", "patch_from_diffs", "check_reference"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _extract(
    pairs: list[tuple[Path, list[str]]],
    binary_path: Path,
    shown: str,
    *,
    name: str,
    profile: Profile,
    allow_inlined: bool,
    warnings: list[str],
    force_copy: dict[str, set[str]],
    for_build: bool,
    meta: dict[str, str],
    symbols: str | Path | None = None,
) -> Patch:
    """Returns the patch of every (object, functions) pair of ``pairs``."""
    members: list[Extractor] = []
    with Binary(binary_path, symbols) as binary:
        build_id = binary.build_id()  # always the running binary's own
        meta.update(binary.symbols_match.meta())
        for i, (obj_path, functions) in enumerate(pairs):
            members.append(
                Extractor(
                    load_object(obj_path),
                    binary,
                    functions,
                    index=i,
                    group=members,
                    force_copy=force_copy.get(str(obj_path)),
                    warnings=warnings,
                )
            )
        for m in members:
            m.find_replaced()
            m.find_hooks()
        meta.update(
            check_inlined(
                binary,
                shown,
                members,
                allow_inlined=allow_inlined,
                warnings=warnings,
                for_build=for_build,
            )
        )
        while any(m.worklist for m in members):
            for m in members:
                m.discover()
        blobs = [m.layout() for m in members]
        for m, (text, data, _bss) in zip(members, blobs, strict=True):
            m.emit(text, data)
        _check_imports(binary, members, warnings)
    text, data = bytearray(), bytearray()
    tbase, dbase = [], []
    bss_size = 0
    for k, (mtext, mdata, mbss) in enumerate(blobs):
        align(text, 16, INT3)
        tbase.append(len(text))
        text += mtext
        align(data, 16, 0)
        dbase.append(len(data))
        data += mdata
        if k == len(members) - 1:
            bss_size = mbss
        else:
            data += bytes(mbss)
    fixups: list[Fixup] = []
    funcs: list[Function] = []
    hooks = [Hook(when, tbase[m.index] + off) for m in members for when, off in m.hook_offsets()]
    if len(hooks) > C.MAX_HOOKS:
        raise ExtractError(f"{len(hooks)} hooks in one patch (max {C.MAX_HOOKS})")
    for m in members:
        for placed in m.fixups:
            fx = placed.fixup
            at = tbase[m.index] if fx.section == FixupSection.TEXT else dbase[m.index]
            addend = fx.addend
            if fx.base == FixupBase.TEXT:
                addend += tbase[placed.into]
            elif fx.base == FixupBase.DATA:
                addend += dbase[placed.into]
            fixups.append(Fixup(fx.section, fx.type, fx.base, fx.offset + at, addend, fx.symbol))
        for r in m.replaced:
            funcs.append(
                Function(
                    symbol=r.symbol.name,
                    target=r.address,
                    new_offset=tbase[m.index] + m.placement[r.section.index][1] + r.symbol.value,
                    new_size=r.symbol.size,
                    expected=r.expected,
                    kind=r.kind,
                    skip=r.skip,
                )
            )
            key = f"source:{r.symbol.name}"
            if key in meta:  # static functions of one name in several files
                key += f"@{os.path.basename(m.obj.source_file or str(m.index))}"
            meta[key] = m.obj.source_file or "unknown"
        meta.update(m.new_symbols())
    fixups.sort(key=lambda f: (f.section, f.offset))
    # The program's build facts, when the binary sits in its build directory (QEMU).
    meta.update(profile.build_facts(binary_path.parent))
    # QEMU code may be suspended in coroutines on stacks the agent cannot scan: never
    # reuse such a patch's memory after remove (docs/qemu.md, "Coroutines").
    flags = ApplyFlag.RETAIN if profile.retain else 0
    # Entry jumps that one atomic store cannot publish safely: written while the client
    # holds the threads (docs/reach.md, "Entry jumps in stock code").
    if any(r.held for m in members for r in m.replaced):
        flags |= ApplyFlag.HOLD
    return Patch(
        name=name,
        build_id=build_id,
        text=bytes(text),
        functions=funcs,
        fixups=fixups,
        data=bytes(data),
        bss_size=bss_size,
        flags=flags,
        meta=meta,
        hooks=hooks,
    )


def _check_imports(binary: Binary, members: list[Extractor], warnings: list[str]) -> None:
    """Refuses a patch whose code imports a name that neither the program nor a library it
    loads defines: the agent would refuse it at apply time (SYMBOL_NOT_FOUND); found on
    QEMU, a new trace point whose generated code the build did not regenerate."""
    names = sorted(
        {
            pf.fixup.symbol
            for m in members
            for pf in m.fixups
            if pf.fixup.base == FixupBase.IMPORT and not pf.fixup.symbol.startswith("patchbox_")
        }
    )  # the agent's own API
    if not names or is_shared_library(binary):
        return
    libs = program_libraries(binary.path)
    unknown = [n for n in names if not libs.exports(n)]
    if not unknown:
        return
    if libs.missing:
        warnings.append(
            f"cannot check that {', '.join(unknown)} exist at run time: "
            f"{', '.join(libs.missing)} (needed by {binary.path}) not found here"
        )
        return
    raise ExtractError(
        f"the new code uses {', '.join(unknown)}, which neither {binary.path} nor the libraries "
        f"it loads define: code generated from a changed input (a new trace point?) that the "
        f"build did not regenerate, or a library the program does not link"
    )


def _check_request(name: str | None, total: int, none: str) -> str:
    name = name or "patch"
    check_name(name)
    if total == 0:
        raise ExtractError(none)
    if total > C.MAX_FUNCS:
        raise ExtractError(f"{total} functions in one patch (max {C.MAX_FUNCS})")
    return name


def extract_patch(
    obj_path: str | Path,
    binary_path: str | Path,
    functions: list[str],
    *,
    name: str | None = None,
    profile: str | Profile = "generic",
    allow_inlined: bool = False,
    warnings: list[str] | None = None,
    force: bool = False,
    symbols: str | Path | None = None,
) -> Patch:
    """Returns the live patch replacing ``functions`` of ``binary_path`` with their
    versions in the patched object ``obj_path``.

    ``obj_path`` must be compiled with ``patchbox config --cflags`` (patchable entry,
    one section per function and object); ``binary_path`` is the reference binary the
    running process was started from (with a GNU build-id; its symbols from itself, its
    separate debug file, or ``symbols``, an unstripped build of it). ``name``
    defaults to ``"patch"``. ``profile`` (``generic``, ``qemu``) is recorded in the meta;
    its RETAIN rule and build facts apply.

    Inlined copies: with DWARF in ``binary_path``, a replaced function that the compiler
    also inlined into functions this patch does not replace is refused (those callers
    would keep the old code), unless ``allow_inlined`` (:mod:`patchbox.extract.inlined`).
    Nothing is printed: warnings are appended to ``warnings`` when a list is given.

    Originals without the patchable entry: redirected by an entry jump (kind
    ENTRY_JUMP) if :func:`patchbox.extract.entry.analyse_entry` accepts them, else
    refused naming the rule; one that one atomic store cannot publish (a first
    instruction shorter than the jump, or the jump across two words) is *held*: the
    patch carries the HOLD flag and ``patchbox apply`` holds the threads while the agent
    writes it. ``force`` is accepted and ignored (it was needed for such functions
    before; deprecated). Shared libraries are references like executables.
    A replacement in ``obj_path`` without its own
    patchable entry is accepted with a warning (nothing can be stacked on it).

    Raises ElfError for unreadable inputs, ExtractError (UnsupportedRelocation for
    relocations that cannot be carried) when no correct patch can be built.
    """
    prof = get_profile(profile)
    functions = list(dict.fromkeys(functions))
    name = _check_request(
        name, len(functions), "no function to extract: give at least one --function"
    )
    obj_path, binary = Path(obj_path).absolute(), Path(binary_path).absolute()
    meta = {
        "tool": "extract-patch",
        "tool_version": patchbox.__version__,
        "created": _now(),
        "reference": str(binary),
        "object": str(obj_path),
        "profile": prof.name,
    }
    return _extract(
        [(obj_path, functions)],
        binary,
        str(binary_path),
        name=name,
        profile=prof,
        allow_inlined=allow_inlined,
        warnings=warnings if warnings is not None else [],
        force_copy={},
        for_build=False,
        meta=meta,
        symbols=symbols,
    )


def extract_multi(
    pairs: list[tuple[Path | str, list[str]]],
    binary_path: str | Path,
    *,
    name: str | None = None,
    profile: str | Profile = "generic",
    force_copy: dict[str, set[str]] | None = None,
    allow_inlined: bool = False,
    warnings: list[str] | None = None,
    meta: dict[str, str] | None = None,
    symbols: str | Path | None = None,
) -> Patch:
    """Returns one patch replacing, for each (patched object, function names) pair, those
    functions of ``binary_path`` by their versions in the object.

    Objects with no function to replace may be given: they only supply new globals that
    the others reference. ``force_copy`` maps an object path (as given) to names of local
    functions (changed GCC clones) that must be copied rather than linked to the
    program's. Everything else is as in :func:`extract_patch`.
    """
    prof = get_profile(profile)
    name = _check_request(name, sum(len(set(f)) for _o, f in pairs), "no function to replace")
    binary = Path(binary_path).absolute()
    objects = [(Path(o).absolute(), list(f)) for o, f in pairs]
    copies = {str(Path(k).absolute()): v for k, v in (force_copy or {}).items()}
    out_meta = {
        "tool": "patchbox-build",
        "tool_version": patchbox.__version__,
        "created": _now(),
        "reference": str(binary),
        "profile": prof.name,
        "objects": ",".join(str(o) for o, _f in objects),
    }
    patch = _extract(
        objects,
        binary,
        str(binary_path),
        name=name,
        profile=prof,
        allow_inlined=allow_inlined,
        warnings=warnings if warnings is not None else [],
        force_copy=copies,
        for_build=True,
        meta=out_meta,
        symbols=symbols,
    )
    patch.meta.update(meta or {})
    return patch


def patch_from_diffs(
    diffs: list[ObjectDiff],
    binary_path: str | Path,
    *,
    name: str | None = None,
    profile: str | Profile = "generic",
    allow_inlined: bool = False,
    warnings: list[str] | None = None,
    meta: dict[str, str] | None = None,
    symbols: str | Path | None = None,
) -> Patch:
    """Returns the patch for the object comparisons ``diffs`` (:mod:`patchbox.compare`);
    raises ExtractError listing every refusal, or if no function changed."""
    refusals = [f"{d.rel}: {r}" for d in diffs for r in d.refusals]
    if refusals:
        # Name every data item the diff touches, not only the refused ones.
        others = [
            f"{x.symbol} ({x.reason.split(':')[0]})"
            for d in diffs
            for x in d.decisions
            if x.what == "variable" and x.verdict in ("carried", "out")
        ]
        tail = f"; other data changes: {', '.join(others)}" if others else ""
        raise ExtractError("refused: " + "; ".join(refusals) + tail)
    pairs: list[tuple[Path | str, list[str]]] = [
        (d.patched, d.functions) for d in diffs if d.functions or d.new_globals
    ]
    if not any(f for _p, f in pairs):
        raise ExtractError("the diff changes no function of the program (see --explain)")
    check_reference(diffs, binary_path, symbols)
    pairs = [(d.patched, d.functions) for d in diffs if d.functions or d.new_globals]  # again
    if not any(f for _p, f in pairs):
        raise ExtractError(
            "the diff changes no function that the running program has out of line (see --explain)"
        )
    force = {str(d.patched): d.force_copy for d in diffs if d.force_copy}
    out_meta = {"objects": ",".join(d.rel for d in diffs if d.functions or d.new_globals)}
    out_meta.update(meta or {})
    return extract_multi(
        pairs,
        binary_path,
        name=name,
        profile=profile,
        force_copy=force,
        allow_inlined=allow_inlined,
        warnings=warnings,
        meta=out_meta,
        symbols=symbols,
    )


def check_reference(
    diffs: list[ObjectDiff], binary_path: str | Path, symbols: str | Path | None = None
) -> None:
    """Matches the changed functions with the reference binary, in place.

    Refuses when a replaced function of the original build has another size than in the
    reference binary: the tree did not rebuild the running program (other sources or
    flags), so the diff of the two builds says nothing reliable about it.

    A changed function with no out-of-line copy in the binary (inlined into every caller,
    or dropped by the linker) is not a redirect target: it becomes *carried* (copied if
    the new code calls it), and its callers, whose code changed with it, are replaced.
    """
    with Binary(Path(binary_path), symbols) as binary:
        for d in diffs:
            if not d.functions or d.orig is None:
                continue
            orig = load_object(d.orig)
            for fn in list(d.functions):
                sym = orig.get_function(fn)
                if sym is None:
                    continue
                if sym.is_local:
                    ref = binary.find_local(fn, orig.source_file) if orig.source_file else None
                else:
                    ref = binary.find_global(fn)
                if ref is None or ref.type != "FUNC":
                    d.functions.remove(fn)
                    d.force_copy.add(fn)
                    for dec in d.decisions:
                        if dec.symbol == fn and dec.verdict == "in":
                            dec.verdict = "carried"
                            dec.reason += (
                                "; no out-of-line copy in the running binary (inlined into "
                                "its callers, which are in the patch where their code changed)"
                            )
                    continue
                if ref.size != sym.size:
                    raise ExtractError(
                        f"{fn} ({d.rel}) is {sym.size} bytes in the original build but "
                        f"{ref.size} bytes in {binary_path}: the tree does not rebuild the "
                        f"running binary (other sources, compiler or flags?)"
                    )
