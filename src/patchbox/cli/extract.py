"""``extract-patch`` (also ``patchbox extract``): build a .pbx patch from a patched object."""

from __future__ import annotations

from pathlib import Path

import click

from patchbox.errors import PatchboxError
from patchbox.extract import extract_patch
from patchbox.format.layout import save_patch

__all__ = ["extract_command", "main"]


@click.command("extract")
@click.option(
    "--function",
    "-f",
    "functions",
    multiple=True,
    required=True,
    metavar="NAME",
    help="Function to replace (repeat for several).",
)
@click.option("--qemu", is_flag=True, help="Use the QEMU profile.")
@click.option("--name", default=None, help="Patch name (default: output file stem, or 'patch').")
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(dir_okay=False),
    help="Output file (default: NAME.pbx in the current directory).",
)
@click.option(
    "--allow-inlined",
    is_flag=True,
    help="Accept replaced functions that are also inlined into functions the patch "
    "does not replace (those calls keep the old code); warn instead of refusing.",
)
@click.option(
    "--force",
    is_flag=True,
    hidden=True,
    help="Deprecated, no effect: entry jumps over a short first instruction are now "
    "written while patchbox apply holds the threads (docs/reach.md).",
)
@click.option(
    "--symbols",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    metavar="UNSTRIPPED",
    help="Symbols of a stripped REFERENCE from this unstripped build of it (same build-id, "
    "or a rebuild whose loaded sections are byte-identical); default: its separate debug "
    "file (.gnu_debuglink, /usr/lib/debug/.build-id).",
)
@click.argument("patched_o", type=click.Path(dir_okay=False))
@click.argument("reference", type=click.Path(dir_okay=False))
@click.pass_context
def extract_command(
    ctx: click.Context,
    *,
    functions: tuple[str, ...],
    qemu: bool,
    name: str | None,
    output: str | None,
    allow_inlined: bool,
    force: bool,
    symbols: str | None,
    patched_o: str,
    reference: str,
) -> None:
    """Build a live patch replacing NAME... of REFERENCE (the binary the running process
    was started from) with their versions in PATCHED_O (compiled with
    `patchbox config --cflags`)."""
    if name is None:
        name = Path(output).stem if output else "patch"
    out = Path(output) if output else Path.cwd() / f"{name}.pbx"
    warnings: list[str] = []
    if force:
        warnings.append(
            "--force is deprecated and has no effect: such entry jumps are held (docs/reach.md)"
        )
    try:
        try:
            patch = extract_patch(
                patched_o,
                reference,
                list(functions),
                name=name,
                profile="qemu" if qemu else "generic",
                allow_inlined=allow_inlined,
                warnings=warnings,
                force=force,
                symbols=symbols,
            )
        finally:
            for warning in warnings:
                click.echo(f"extract-patch: warning: {warning}", err=True)
        try:
            save_patch(patch, out)
        except OSError as err:
            raise PatchboxError(f"cannot write {out}: {err.strerror}") from err
    except PatchboxError as err:
        click.echo(f"extract-patch: error: {err}", err=True)
        ctx.exit(1)
    click.echo(
        f"wrote {out}: {len(patch.functions)} function(s), {len(patch.text)} bytes text, "
        f"{len(patch.data) + patch.bss_size} bytes data, {len(patch.fixups)} fix-ups"
    )


def main() -> None:
    """Entry point of the standalone ``extract-patch`` console script."""
    extract_command.main(prog_name="extract-patch")
