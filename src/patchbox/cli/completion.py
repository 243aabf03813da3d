"""`patchbox completion bash|zsh|fish`: the shell completion script (click provides it)."""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

__all__ = ["completion_command"]

SHELLS = ("bash", "zsh", "fish")


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion_command(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL.

    \b
      eval "$(patchbox completion bash)"      # in ~/.bashrc
      eval "$(patchbox completion zsh)"       # in ~/.zshrc
    """
    root = ctx.find_root()
    cls = get_completion_class(shell)
    assert cls is not None  # every name of SHELLS is one of click's
    prog = root.info_name or "patchbox"
    var = f"_{prog.replace('-', '_').upper()}_COMPLETE"
    click.echo(cls(root.command, {}, prog, var).source())
