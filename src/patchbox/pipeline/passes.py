"""The passes of `patchbox build`, each a function from values to a value, and
:func:`build_patch`, which runs them in order (the module docstring of
:mod:`patchbox.pipeline` lists them)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

import patchbox
from patchbox.arch import Arch, get_arch_by_machine
from patchbox.compare.explain import annotate_inlined, format_explain
from patchbox.compare.model import ItemKind, ObjectDiff, Verdict
from patchbox.compare.objects import compare_trees, other_programs, refuse_folded_statics
from patchbox.elf.binary import Binary
from patchbox.elf.buildid import read_build_id
from patchbox.elf.fastread import load_object
from patchbox.elf.records import read_ehdr
from patchbox.errors import BuildError, ExtractError, PatchboxError
from patchbox.extract.combine import check_request, extract_objects, now
from patchbox.format.layout import check_name, save_patch
from patchbox.format.model import Patch
from patchbox.pipeline.model import (
    BuildRequest,
    BuildResult,
    Checked,
    Comparison,
    Extracted,
    ObjectPlan,
    PassTime,
    Plan,
)
from patchbox.profiles import GENERIC, Profile
from patchbox.rebuild.incremental import IncrementalBuild
from patchbox.rebuild.workspace import Rebuilt, TreeBuild, Workspace, check_diff
from patchbox.sourcediff import FileChange, line_maps, parse_diff

__all__ = [
    "NO_FUNCTION",
    "check",
    "workspace",
    "rebuild",
    "compare",
    "plan",
    "refuse",
    "extract",
    "write",
    "explain",
    "build_patch",
    "patch_from_diffs",
]

NO_FUNCTION = "the diff changes no function of the program (see --explain)"

T = TypeVar("T")


def check(request: BuildRequest) -> Checked:
    """Returns the request's diff text and reference binary after checking, before any
    build, what can be: the diff (files named, no assembly), the patch name, the
    reference's build-id, that the patch can be written."""
    diff_text = request.diff.read_text(errors="replace")
    check_diff(diff_text)
    reference = find_reference(request.source, request.binary)
    check_name(request.patch_name)
    if read_build_id(reference) is None:
        raise BuildError(
            f"{reference} has no GNU build-id: a patch could not name its target "
            f"(link with -Wl,--build-id, as `patchbox config --libs` does)"
        )
    out = request.patch_path
    if not os.access(out.parent if str(out.parent) else ".", os.W_OK):
        raise BuildError(f"cannot write the patch into {out.parent}")
    return Checked(diff_text, reference)


def find_reference(source: Path, binary: Path) -> Path:
    """Returns the reference binary: absolute, else inside the source tree, else relative
    to the current directory."""
    candidates = [binary] if binary.is_absolute() else [source / binary, binary]
    for c in candidates:
        if c.is_file():
            return c
    raise BuildError(
        f"binary {candidates[0]} not found (give its path inside the source tree "
        f"or an absolute path)"
    )


def workspace(request: BuildRequest, checked: Checked) -> TreeBuild:
    """Returns the workspace of the request's mode: incremental with a build directory
    (``--build-dir``, or the profile's default: QEMU's beside its binary), else make."""
    build_dir = request.build_dir
    if build_dir is None and request.build_cmd is None:
        build_dir = request.profile.default_build_dir(checked.reference)
    if build_dir is None:
        arch = _arch_of(checked.reference)
        return Workspace(
            request.source, request.work, command=request.build_cmd or "make", arch=arch
        )
    if request.build_cmd is not None:
        raise BuildError(
            "--build-cmd and --build-dir exclude each other: with a build "
            "directory, the affected objects are recompiled with the "
            "commands it recorded"
        )
    return IncrementalBuild(request.source, build_dir, checked.reference, request.work)


def _arch_of(path: Path) -> Arch:
    """Returns the architecture of ELF file ``path`` (its header's ``e_machine``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as err:
        raise BuildError(f"cannot read {path}: {err.strerror}") from err
    return get_arch_by_machine(read_ehdr(head, str(path))["e_machine"], str(path))


def rebuild(request: BuildRequest, tree: TreeBuild) -> Rebuilt:
    """Returns the objects of the tree built without and with the diff (in ``tree``)."""
    return tree.rebuild(request.diff, request.strip, request.jobs)


def compare(
    request: BuildRequest, checked: Checked, rebuilt: Rebuilt, reference: Binary
) -> Comparison:
    """Returns the comparison of every object of the two builds that the running binary
    links, function by function (docs/build.md, "How objects are compared").

    A tree may build several programs (OpenSSH: sshd, ssh-agent, ssh...): only the
    objects of compile units linked into the running binary are compared, and of a source
    compiled twice (memcached and memcached-debug) only the binary's object. A static
    the source writes that the original object lacks is refused (folded away)."""
    linked = reference.source_files()
    others = other_programs(dict(rebuilt.original), reference)
    patched = {rel: path for rel, path in rebuilt.patched.items() if rel not in others}
    diffs, same = compare_trees(
        dict(rebuilt.original),
        patched,
        request.profile.reporters,
        line_maps(checked.diff_text),
        linked=linked or None,
    )
    read = partial(_original_text, request.source)
    diffs = refuse_folded_statics(diffs, parse_diff(checked.diff_text), read)
    return Comparison(tuple(diffs), same)


def plan(comparison: Comparison, reference: Binary, shown: str | None = None) -> Plan:
    """Returns what each compared object contributes to the patch.

    A changed function is replaced where the running binary has it out of line. One it
    has no out-of-line copy of (inlined into every caller, or dropped by the linker) is
    no redirect target: it is carried (copied if the new code calls it), and its
    callers, whose code changed with it, are replaced. Refuses when a replaced function
    of the original build has another size than in the binary: the tree did not rebuild
    the running program, so the diff of the two builds says nothing reliable about it
    (``shown`` names the binary in that message; default its path)."""
    return Plan(
        tuple(_plan_object(d, reference, shown or str(reference.path)) for d in comparison.diffs),
        comparison.identical,
    )


def _plan_object(diff: ObjectDiff, reference: Binary, shown: str) -> ObjectPlan:
    """Returns the plan of one compared object."""
    if not diff.functions or diff.orig is None:
        return ObjectPlan(diff, diff.functions)
    orig = load_object(diff.orig)
    source = reference.match_source(orig, original=orig)
    replace: list[str] = []
    inlined_away: list[str] = []
    for fn in diff.functions:
        sym = orig.get_function(fn)
        if sym is None:
            replace.append(fn)
            continue
        ref = reference.find_symbol(fn, source, local=sym.is_local)
        if ref is None or ref.type != "FUNC":
            inlined_away.append(fn)
            continue
        if ref.size != sym.size:
            raise ExtractError(
                f"{fn} ({diff.rel}) is {sym.size} bytes in the original build but "
                f"{ref.size} bytes in {shown}: the tree does not rebuild the "
                f"running binary (other sources, compiler or flags?)"
            )
        replace.append(fn)
    return ObjectPlan(diff, tuple(replace), tuple(inlined_away))


def refuse(plan: Plan) -> None:
    """Raises ExtractError listing every refusal of ``plan`` (and naming every other
    data item the diff touches), or if it replaces no function."""
    refusals = plan.refusals
    if refusals:
        others = [
            f"{x.symbol} ({x.reason.split(':')[0]})"
            for p in plan.objects
            for x in p.decisions
            if x.what is ItemKind.VARIABLE and x.verdict in (Verdict.CARRIED, Verdict.OUT)
        ]
        tail = f"; other data changes: {', '.join(others)}" if others else ""
        raise ExtractError("refused: " + "; ".join(refusals) + tail)
    if not any(p.replace for p in plan.objects):
        raise ExtractError(NO_FUNCTION)


def extract(
    plan: Plan,
    reference: Binary,
    *,
    name: str | None = None,
    profile: Profile = GENERIC,
    allow_inlined: bool = False,
    shown: str | None = None,
    meta: Mapping[str, str] | None = None,
    warnings: list[str] | None = None,
) -> Extracted:
    """Returns the patch ``name`` of ``plan`` against ``reference`` (opened by its
    absolute path); raises ExtractError for refusals, or if nothing is replaced.

    ``shown`` names the binary in messages (default its path); ``meta`` entries end the
    patch's meta (the diff's name, its -p level). Warnings are appended to ``warnings``
    as they are found."""
    refuse(plan)
    parts = plan.contributing
    name = check_request(name, sum(len(set(p.replace)) for p in parts), "no function to replace")
    out_meta = {
        "tool": "patchbox-build",
        "tool_version": patchbox.__version__,
        "created": now(),
        "reference": str(reference.path),
        "profile": profile.name,
        "objects": ",".join(str(p.diff.patched.absolute()) for p in parts),
    }
    patch = extract_objects(
        [p.contribution() for p in parts],
        reference,
        name=name,
        profile=profile,
        meta=out_meta,
        warnings=warnings if warnings is not None else [],
        allow_inlined=allow_inlined,
        for_build=True,
        shown=shown,
    )
    rels = tuple(p.diff.rel for p in parts)
    patch.meta["objects"] = ",".join(rels)  # relative to the tree: the same on every machine
    patch.meta.update(meta or {})
    return Extracted(patch, rels)


def write(patch: Patch, output: Path) -> Path:
    """Returns ``output`` after writing ``patch`` there."""
    try:
        save_patch(patch, output)
    except OSError as err:
        raise PatchboxError(f"cannot write {output}: {err.strerror}") from err
    return output


def explain(plan: Plan, diff_text: str) -> str:
    """Returns the ``--explain`` text of ``plan``: per object, one line per symbol with
    its verdict (docs/build.md, "Decisions")."""
    return format_explain(annotate_inlined(plan.explained(), diff_text), plan.identical)


def build_patch(
    request: BuildRequest,
    *,
    warnings: list[str] | None = None,
    on_pass: Callable[[str, object], None] | None = None,
) -> BuildResult:
    """Returns the result of `patchbox build` for ``request``: the passes in order
    (check, rebuild, compare, plan, extract, write), each timed.

    Nothing is printed: warnings are appended to ``warnings`` as they are found (before
    an error too), and ``on_pass(name, value)`` is called with each pass's value as soon
    as it is made (the CLI prints the rebuild's notes and the explanation from there,
    before a later pass may refuse). A dry run stops after the plan: refusals raise,
    nothing is extracted or written. Raises PatchboxError (BuildError, ExtractError...)
    naming the cause."""
    sink = warnings if warnings is not None else []
    timings: list[PassTime] = []

    def run(name: str, fn: Callable[[], T]) -> T:
        start = time.monotonic()
        value = fn()
        timings.append(PassTime(name, time.monotonic() - start))
        if on_pass is not None:
            on_pass(name, value)
        return value

    checked = run("check", lambda: check(request))
    with workspace(request, checked) as tree:
        rebuilt = run("rebuild", lambda: rebuild(request, tree))
        sink += rebuilt.warnings
        shown = str(checked.reference)
        with Binary(checked.reference.absolute(), request.symbols) as ref:
            comparison = run("compare", lambda: compare(request, checked, rebuilt, ref))
            planned = run("plan", lambda: plan(comparison, ref, shown))
            if request.dry_run:
                if planned.refusals:
                    raise BuildError("refused: " + "; ".join(planned.refusals))
                extracted = None
            else:
                meta = {"diff": request.diff.name, "strip": str(rebuilt.level)}
                extracted = run(
                    "extract",
                    lambda: extract(
                        planned,
                        ref,
                        name=request.patch_name,
                        profile=request.profile,
                        allow_inlined=request.allow_inlined,
                        shown=shown,
                        meta=meta,
                        warnings=sink,
                    ),
                )
        written = None
        if extracted is not None:
            patch = extracted.patch
            written = run("write", lambda: write(patch, request.patch_path))
    return BuildResult(
        request,
        checked,
        rebuilt,
        comparison,
        planned,
        extracted,
        written,
        tuple(sink),
        tuple(timings),
    )


def patch_from_diffs(
    diffs: Sequence[ObjectDiff],
    binary: str | Path,
    *,
    name: str | None = None,
    profile: Profile = GENERIC,
    symbols: str | Path | None = None,
    warnings: list[str] | None = None,
) -> Patch:
    """Returns the patch of object comparisons made without a tree (tests, benchmarks):
    the plan and extract passes over ``diffs`` against ``binary``. Refusals and "no
    function" are raised before ``binary`` is read."""
    refuse(Plan(tuple(ObjectPlan(d, d.functions) for d in diffs)))
    with Binary(Path(binary).absolute(), symbols) as ref:
        planned = plan(Comparison(tuple(diffs)), ref, str(binary))
        extracted = extract(
            planned, ref, name=name, profile=profile, shown=str(binary), warnings=warnings
        )
    return extracted.patch


def _original_text(source: Path, change: FileChange) -> str | None:
    """Returns the text of the file ``change`` names in the source tree, before the diff
    (the user's tree is never modified), whatever -p level the diff needs; None if none."""
    assert change.old is not None
    parts = change.old.split("/")
    for level in range(min(4, len(parts))):
        path = source.joinpath(*parts[level:])
        if path.is_file():
            return path.read_text(errors="replace")
    return None
