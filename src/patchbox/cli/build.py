"""``patchbox build``: a live patch from a source tree and a diff (docs/build.md)."""

from __future__ import annotations

from pathlib import Path

import click

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
@click.option(
    "--explain", "explain_flag", is_flag=True, help="Print per function why it is in or out."
)
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
    *,
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
    explain_flag: bool,
    dry_run: bool,
    allow_inlined: bool,
    work: str | None,
    output: str | None,
) -> None:
    """Build the tree as it is and with the diff applied (in copies, with the flags of
    `patchbox config --cflags`), compare every object file at function level and write
    one patch with every function that really changed."""
    # The pipeline is imported here: `patchbox build --help` does not load it.
    from patchbox.pipeline import BuildRequest, Checked, Plan, build_patch, explain
    from patchbox.profiles import GENERIC, QEMU
    from patchbox.rebuild.workspace import Rebuilt

    request = BuildRequest(
        source=Path(source),
        diff=Path(diff),
        binary=Path(binary),
        output=Path(output) if output else None,
        name=name,
        build_cmd=build_cmd,
        build_dir=Path(build_dir) if build_dir else None,
        jobs=jobs,
        strip=strip,
        profile=(QEMU if qemu else GENERIC).with_reporters(reporters),
        symbols=Path(symbols) if symbols else None,
        allow_inlined=allow_inlined,
        work=Path(work) if work else None,
        dry_run=dry_run,
    )
    checked: list[Checked] = []

    def show(_name: str, value: object) -> None:
        """Prints what --explain shows as soon as the pass that makes it is done: the
        explanation comes before a refusal of a later pass."""
        if isinstance(value, Checked):
            checked.append(value)
        elif not (explain_flag or dry_run):
            return
        elif isinstance(value, Rebuilt):
            for note in value.notes:
                click.echo(note)
        elif isinstance(value, Plan):
            click.echo(explain(value, checked[0].diff_text))

    warnings: list[str] = []
    try:
        result = build_patch(request, warnings=warnings, on_pass=show)
    finally:
        for w in warnings:
            click.echo(f"patchbox build: warning: {w}", err=True)
    patch = result.patch
    if patch is None:  # a dry run
        return
    rebuilt = result.rebuilt
    steps = dict(rebuilt.steps)
    if rebuilt.recompiled is None:
        built = f"builds {steps['builds']:.1f} s"
    else:
        built = (
            f"copy {steps['copy']:.1f} s, {rebuilt.recompiled} object(s) recompiled "
            f"{steps['recompile']:.1f} s"
        )
    fns = ", ".join(f.symbol for f in patch.functions)
    objects = sum(1 for p in result.plan.objects if p.replace)
    click.echo(
        f"wrote {result.written}: {len(patch.functions)} function(s) ({fns}) from "
        f"{objects} object file(s), {len(patch.text)} bytes text, "
        f"{len(patch.data) + patch.bss_size} bytes data, {len(patch.fixups)} fix-ups; "
        f"{built}, compare+extract {result.seconds('compare', 'plan', 'extract', 'write'):.2f} s"
    )
