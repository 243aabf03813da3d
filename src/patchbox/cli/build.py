"""``patchbox build``: a live patch from a source tree and a diff (docs/build.md)."""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import click

from patchbox.compare.explain import annotate_inlined, format_explain
from patchbox.compare.objects import compare_trees, other_programs, refuse_folded_statics
from patchbox.elf.binary import Binary
from patchbox.elf.buildid import read_build_id
from patchbox.errors import BuildError, PatchboxError
from patchbox.extract import check_reference, patch_from_diffs
from patchbox.format.layout import check_name, save_patch
from patchbox.profiles import GENERIC, QEMU
from patchbox.rebuild.incremental import IncrementalBuild
from patchbox.rebuild.workspace import Workspace, check_diff
from patchbox.sourcediff import FileChange, line_maps, parse_diff

__all__ = ["build_command"]


@click.command("build")
@click.option(
    "--source",
    "source",
    required=True,
    type=click.Path(file_okay=False, exists=True),
    help="Source tree that built the running binary (never modified).",
)
@click.option(
    "--diff",
    "diff",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="The fix, as a unified diff.",
)
@click.option(
    "--binary",
    "binary",
    required=True,
    metavar="PATH",
    help="The running program's binary: a path in the source tree (or absolute).",
)
@click.option(
    "--build-cmd",
    default=None,
    help="Command building the tree (run with sh in the copy; default make).",
)
@click.option(
    "--build-dir",
    default=None,
    type=click.Path(file_okay=False, exists=True),
    help="Configured meson/ninja build directory (compile_commands.json) that "
    "built the binary: recompile only the objects the diff affects "
    "(default with --qemu: the binary's directory).",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Parallel build jobs (adds -jN to MAKEFLAGS; compilers at once with a build "
    "directory, default: the number of CPUs).",
)
@click.option(
    "--strip",
    type=click.IntRange(min=0),
    default=None,
    help="patch -pN level (default: try 1, then 0, 2, 3).",
)
@click.option("--qemu", is_flag=True, help="QEMU profile (its reporting functions).")
@click.option(
    "--reporter",
    "reporters",
    multiple=True,
    metavar="FN",
    help="Another reporting function whose __LINE__ argument is not a change.",
)
@click.option(
    "--symbols",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    metavar="UNSTRIPPED",
    help="Symbols of a stripped --binary from this unstripped build of it (same build-id, "
    "or a rebuild whose loaded sections are byte-identical); default: its separate debug file.",
)
@click.option("--name", default=None, help="Patch name (default: output file stem).")
@click.option("--explain", is_flag=True, help="Print per function why it is in or out.")
@click.option("--dry-run", is_flag=True, help="Compare and explain; write no patch.")
@click.option(
    "--allow-inlined",
    is_flag=True,
    help="Accept replaced functions inlined into functions the diff does not change.",
)
@click.option(
    "--work",
    default=None,
    type=click.Path(file_okay=False),
    help="Workspace directory (kept; default: a temporary one, removed).",
)
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(dir_okay=False),
    help="Output patch file (default: NAME.pbx).",
)
def build_command(
    source: str,
    diff: str,
    binary: str,
    build_cmd: str | None,
    build_dir: str | None,
    jobs: int | None,
    strip: int | None,
    qemu: bool,
    reporters: tuple[str, ...],
    symbols: str | None,
    name: str | None,
    explain: bool,
    dry_run: bool,
    allow_inlined: bool,
    work: str | None,
    output: str | None,
) -> None:
    """Build the tree as it is and with the diff applied (in copies, with the flags of
    `patchbox config --cflags`), compare every object file at function level and write
    one patch with every function that really changed."""
    t0 = time.monotonic()
    diff_text = Path(diff).read_text(errors="replace")
    check_diff(diff_text)
    reference = _reference(source, binary)
    if name is None:
        name = Path(output).stem if output else "patch"
    out = Path(output) if output else Path.cwd() / f"{name}.pbx"
    # What can be checked before minutes of building is checked first.
    check_name(name)
    if read_build_id(reference) is None:
        raise BuildError(
            f"{reference} has no GNU build-id: a patch could not name its target "
            f"(link with -Wl,--build-id, as `patchbox config --libs` does)"
        )
    if not os.access(out.parent if str(out.parent) else ".", os.W_OK):
        raise BuildError(f"cannot write the patch into {out.parent}")
    profile = (QEMU if qemu else GENERIC).with_reporters(reporters)
    warnings: list[str] = []
    if build_dir is None and build_cmd is None:
        default = profile.default_build_dir(reference)
        build_dir = str(default) if default is not None else None
    if build_dir is not None:
        if build_cmd is not None:
            raise BuildError(
                "--build-cmd and --build-dir exclude each other: with a build "
                "directory, the affected objects are recompiled with the "
                "commands it recorded"
            )
        ws: Workspace = IncrementalBuild(source, build_dir, reference, work)
    else:
        ws = Workspace(source, work)
    with ws:
        if isinstance(ws, IncrementalBuild):
            ws.copy_source()
            t_copy = time.monotonic()
            level = ws.apply_diff(diff, strip)
            entries = ws.affected(ws.changed_files(diff_text, level))
            for o in ws.stale(entries):
                ws.warnings.append(
                    f"{o} is out of date in {ws.build_dir} (ninja would rebuild "
                    f"it): the build directory may not be what built the "
                    f"running binary"
                )
            orig, patched = ws.compile(entries, jobs)
            t_built = time.monotonic()
            warnings += ws.warnings
            built = (
                f"copy {t_copy - t0:.1f} s, {len(entries)} object(s) recompiled "
                f"{t_built - t_copy:.1f} s"
            )
            if explain or dry_run:
                click.echo(
                    f"{len(entries)} object(s) of {ws.build_dir} affected by the diff, "
                    f"recompiled from the patched copy"
                )
                for note in ws.notes:
                    click.echo(note)
        else:
            cmd = build_cmd or "make"
            ws.copy_source()
            ws.build(cmd, jobs, "original")
            orig = ws.stash_objects()
            if not orig:
                raise BuildError(f"`{cmd}` produced no object file (*.o) in the tree")
            level = ws.apply_diff(diff, strip)
            ws.build(cmd, jobs, "patched")
            patched = ws.objects()
            t_built = time.monotonic()
            built = f"builds {t_built - t0:.1f} s"
        # A tree may build several programs (OpenSSH: sshd, ssh-agent, ssh...): only the
        # objects of compile units linked into the running binary are compared, and of a
        # source compiled twice (memcached and memcached-debug) only the binary's object.
        with Binary(reference, symbols) as ref:
            linked = ref.source_files()
            others = other_programs(orig, ref)
        patched = {rel: path for rel, path in patched.items() if rel not in others}
        diffs, same = compare_trees(
            orig, patched, profile.reporters, line_maps(diff_text), linked=linked or None
        )
        refuse_folded_statics(diffs, parse_diff(diff_text), partial(_original_text, Path(source)))
        check_reference(diffs, reference, symbols)
        if explain or dry_run:
            annotate_inlined(diffs, diff_text)
            click.echo(format_explain(diffs, same))
        if dry_run:
            for w in warnings:
                click.echo(f"patchbox build: warning: {w}", err=True)
            refusals = [f"{d.rel}: {r}" for d in diffs for r in d.refusals]
            if refusals:
                raise BuildError("refused: " + "; ".join(refusals))
            return
        try:
            patch = patch_from_diffs(
                diffs,
                reference,
                name=name,
                profile=profile,
                allow_inlined=allow_inlined,
                warnings=warnings,
                symbols=symbols,
                meta={"diff": os.path.basename(diff), "strip": str(level)},
            )
        finally:
            for w in warnings:
                click.echo(f"patchbox build: warning: {w}", err=True)
        try:
            save_patch(patch, out)
        except OSError as err:
            raise PatchboxError(f"cannot write {out}: {err.strerror}") from err
        t_end = time.monotonic()  # before the workspace is removed
    fns = ", ".join(f.symbol for f in patch.functions)
    click.echo(
        f"wrote {out}: {len(patch.functions)} function(s) ({fns}) from "
        f"{sum(1 for d in diffs if d.functions)} object file(s), {len(patch.text)} bytes "
        f"text, {len(patch.data) + patch.bss_size} bytes data, {len(patch.fixups)} "
        f"fix-ups; {built}, compare+extract {t_end - t_built:.2f} s"
    )


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


def _reference(source: str, binary: str) -> Path:
    """Returns the reference binary: absolute, else inside the source tree, else relative
    to the current directory."""
    candidates = [Path(binary)] if os.path.isabs(binary) else [Path(source) / binary, Path(binary)]
    for c in candidates:
        if c.is_file():
            return c
    raise BuildError(
        f"binary {candidates[0]} not found (give its path inside the source tree "
        f"or an absolute path)"
    )
