"""Objects → one live patch: the extraction passes in order.

:func:`extract_objects` runs them over the objects of one patch (``patchbox build``
hands it its plan; :func:`extract_patch`, ``extract-patch``, one object and the
functions named)::

    find_replaced, find_hooks   per object: what it replaces, its hooks   (replaced.py)
    check_inlined               no old copy stays inlined elsewhere        (inlined.py)
    close                       every copy and target, to a fixed point    (closure.py)
    layout, emit                per object: bytes placed, fix-ups written  (emit.py)
    combine                     the objects one after the other            (here)

Each object's statics are resolved against its own source file, so two ``static``
functions of the same name in two files are told apart. The objects are concatenated:

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
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import patchbox
from patchbox import wire as C
from patchbox.arch import Machine
from patchbox.elf.binary import Binary
from patchbox.elf.exports import program_libraries
from patchbox.elf.fastread import load_object
from patchbox.errors import ExtractError
from patchbox.extract.closure import close
from patchbox.extract.emit import emit, layout, new_symbols
from patchbox.extract.inlined import check_inlined
from patchbox.extract.model import (
    Closure,
    Contribution,
    Emitted,
    Layout,
    Member,
    align,
)
from patchbox.extract.replaced import find_hooks, find_replaced
from patchbox.format.layout import check_name
from patchbox.format.model import Fixup, Function, Hook, Patch
from patchbox.profiles import Profile, get_profile
from patchbox.wire import ApplyFlag, FixupBase, FixupSection

__all__ = ["extract_patch", "extract_objects", "check_request", "now"]


def now() -> str:
    """Returns the current time as the ``created`` meta entry spells it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_request(name: str | None, total: int, none: str) -> str:
    """Returns the patch name (default ``patch``) after checking it and the number of
    functions to replace (``none``: the message when there is none)."""
    name = name or "patch"
    check_name(name)
    if total == 0:
        raise ExtractError(none)
    if total > C.MAX_FUNCS:
        raise ExtractError(f"{total} functions in one patch (max {C.MAX_FUNCS})")
    return name


def extract_objects(
    contributions: Sequence[Contribution],
    binary: Binary,
    *,
    name: str,
    profile: Profile,
    meta: dict[str, str],
    warnings: list[str],
    allow_inlined: bool = False,
    for_build: bool = False,
    shown: str | None = None,
) -> Patch:
    """Returns the patch of ``contributions`` against the reference ``binary``.

    ``meta`` starts the patch's meta (a copy is extended). Warnings are appended to
    ``warnings`` as they are found, before an error too. ``for_build``: the objects come
    from `patchbox build`, whose comparison already covers inlined copies without LTO
    (:func:`patchbox.extract.inlined.check_inlined`). ``shown`` names the binary in
    messages (default: its path). Raises ExtractError (UnsupportedRelocation) when no
    correct patch can be built.
    """
    meta = dict(meta)
    meta.update(binary.symbols_match.meta())
    members = []
    for index, part in enumerate(contributions):
        obj = load_object(part.object)
        original = load_object(part.original) if part.original is not None else None
        statics = binary.match_source(obj, original)
        names = tuple(dict.fromkeys(part.functions))
        replaced = find_replaced(obj, binary, names, warnings, statics)
        members.append(Member(index, obj, names, replaced, find_hooks(obj), part.copies, statics))
    meta.update(
        check_inlined(
            binary,
            shown if shown is not None else str(binary.path),
            members,
            allow_inlined=allow_inlined,
            warnings=warnings,
            for_build=for_build,
        )
    )
    closures = close(members, binary)
    layouts = [layout(m, c) for m, c in zip(members, closures, strict=True)]
    emitted = [emit(m, c, layouts) for m, c in zip(members, closures, strict=True)]
    _check_imports(binary, emitted, warnings)
    return _combine(
        members, closures, layouts, emitted, binary=binary, name=name, profile=profile, meta=meta
    )


def _combine(
    members: Sequence[Member],
    closures: Sequence[Closure],
    layouts: Sequence[Layout],
    emitted: Sequence[Emitted],
    *,
    binary: Binary,
    name: str,
    profile: Profile,
    meta: dict[str, str],
) -> Patch:
    """Returns the patch of the members one after the other."""
    text, data = bytearray(), bytearray()
    tbase, dbase = [], []
    bss_size = 0
    for k, (out, lay) in enumerate(zip(emitted, layouts, strict=True)):
        align(text, 16, binary.arch.entry.fill)
        tbase.append(len(text))
        text += out.text
        align(data, 16)
        dbase.append(len(data))
        data += out.data
        if k == len(members) - 1:
            bss_size = lay.bss_size
        else:
            data += bytes(lay.bss_size)
    hooks = [
        Hook(h.when, tbase[m.index] + lay.placement[h.section][1] + h.offset)
        for m, lay in zip(members, layouts, strict=True)
        for h in m.hooks
    ]
    if len(hooks) > C.MAX_HOOKS:
        raise ExtractError(f"{len(hooks)} hooks in one patch (max {C.MAX_HOOKS})")
    fixups: list[Fixup] = []
    funcs: list[Function] = []
    for m, closure, lay, out in zip(members, closures, layouts, emitted, strict=True):
        for placed in out.fixups:
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
                    new_offset=tbase[m.index] + lay.placement[r.section.index][1] + r.symbol.value,
                    new_size=r.symbol.size,
                    expected=r.expected,
                    kind=r.kind,
                    skip=r.skip,
                )
            )
            first = key = f"source:{r.symbol.name}"
            if key in meta:  # static functions of one name in several files
                key += f"@{os.path.basename(m.source or str(m.index))}"
                if key in meta or meta[first] == m.source:  # of one name: net/, hw/virtio/
                    key = f"{first}@{_unit_name(binary, m)}"
            meta[key] = m.source or "unknown"
        meta.update(new_symbols(m, closure))
        meta.update({f"tls:{name}": how for name, how in closure.tls})
    fixups.sort(key=lambda f: (f.section, f.offset))
    # The program's build facts, when the binary sits in its build directory (QEMU).
    meta.update(profile.build_facts(binary.path.parent))
    # QEMU code may be suspended in coroutines on stacks the agent cannot scan: never
    # reuse such a patch's memory after remove (docs/qemu.md, "Coroutines").
    flags = ApplyFlag.RETAIN if profile.retain else 0
    # Entry jumps that one atomic store cannot publish safely: written while the client
    # holds the threads (docs/reach.md, "Entry jumps in stock code").
    if any(r.held for m in members for r in m.replaced):
        flags |= ApplyFlag.HOLD
    return Patch(
        name=name,
        build_id=binary.build_id(),  # always the running binary's own
        text=bytes(text),
        functions=funcs,
        fixups=fixups,
        data=bytes(data),
        bss_size=bss_size,
        flags=flags,
        meta=meta,
        hooks=hooks,
        machine=Machine(binary.arch.e_machine),  # the agent refuses another
    )


def _unit_name(binary: Binary, m: Member) -> str:
    """Returns the full path of the compile unit ``m``'s statics are in the binary (its
    DWARF), else the object's source file basename and its place in the patch."""
    units = m.statics.units if m.statics is not None else ()
    path = binary.unit_paths(units).get(units[0]) if len(units) == 1 else None
    return path or f"{os.path.basename(m.source or '?')}#{m.index}"


def _check_imports(binary: Binary, emitted: Sequence[Emitted], warnings: list[str]) -> None:
    """Refuses a patch whose code imports a name that neither the program nor a library it
    loads defines: the agent would refuse it at apply time (SYMBOL_NOT_FOUND); found on
    QEMU, a new trace point whose generated code the build did not regenerate."""
    names = sorted(
        {
            pf.fixup.symbol
            for out in emitted
            for pf in out.fixups
            if pf.fixup.base == FixupBase.IMPORT and not pf.fixup.symbol.startswith("patchbox_")
        }
    )  # the agent's own API
    if not names or binary.is_shared_library:
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
    name = check_request(
        name, len(functions), "no function to extract: give at least one --function"
    )
    obj, reference = Path(obj_path).absolute(), Path(binary_path).absolute()
    meta = {
        "tool": "extract-patch",
        "tool_version": patchbox.__version__,
        "created": now(),
        "reference": str(reference),
        "object": str(obj),
        "profile": prof.name,
    }
    with Binary(reference, symbols) as binary:
        return extract_objects(
            [Contribution(obj, tuple(functions))],
            binary,
            name=name,
            profile=prof,
            meta=meta,
            warnings=warnings if warnings is not None else [],
            allow_inlined=allow_inlined,
            shown=str(binary_path),
        )
