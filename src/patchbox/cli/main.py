"""The `patchbox` (alias `raxlpxs`) command: one group, one module per subcommand.

Every PatchboxError is turned into one stderr line ``patchbox: error: <cause>`` and exit
status 1 here, at one choke point; usage errors keep click's exit status 2.
"""

from __future__ import annotations

from typing import Any

import click

from patchbox import __version__
from patchbox.cli.apply import apply_command
from patchbox.cli.attach import attach_command
from patchbox.cli.completion import completion_command
from patchbox.cli.config import config_command
from patchbox.cli.debug import debug_command
from patchbox.cli.info import info_command
from patchbox.cli.keys import keygen_command, sign_command
from patchbox.cli.list import list_command
from patchbox.cli.ps import ps_command
from patchbox.cli.remove import remove_command
from patchbox.cli.show import show_command
from patchbox.cli.store import install_command, uninstall_command
from patchbox.cli.test import test_command
from patchbox.errors import ConfigError, PatchboxError
from patchbox.protocol.client import DEFAULT_TIMEOUT

__all__ = ["cli", "main"]

# Subcommands defined elsewhere and imported only when used: name -> (module, attribute).
LAZY_COMMANDS = {
    "extract": ("patchbox.cli.extract", "extract_command"),
    "build": ("patchbox.cli.build", "build_command"),
}


def _unavailable(name: str, reason: str) -> click.Command:
    """Returns a stand-in command that reports why ``name`` cannot be loaded."""

    @click.command(
        name,
        help=f"(unavailable: {reason})",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    def stub() -> None:
        raise ConfigError(f"`patchbox {name}` is unavailable: {reason}")

    return stub


class PatchboxGroup(click.Group):
    """A group that loads lazy subcommands and reports PatchboxError as one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS and name not in self.commands:
            module_name, attr = LAZY_COMMANDS[name]
            try:
                module = __import__(module_name, fromlist=[attr])
                command = getattr(module, attr)
            except (ImportError, AttributeError) as err:
                return _unavailable(name, f"{module_name}.{attr} cannot be loaded ({err})")
            return command
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PatchboxError as err:
            message = " ".join(str(err).split("\n"))
            click.echo(f"patchbox: error: {message}", err=True)
            ctx.exit(1)


@click.group(cls=PatchboxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="patchbox")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    envvar="PATCHBOX_TIMEOUT",
    metavar="SECONDS",
    help="Limit on connecting to the agent and on each reply [$PATCHBOX_TIMEOUT].",
)
def cli(timeout: float) -> None:
    """Live-patch running processes linked with the patchbox agent."""


for _command in (
    info_command,
    list_command,
    apply_command,
    attach_command,
    remove_command,
    test_command,
    debug_command,
    show_command,
    config_command,
    keygen_command,
    sign_command,
    completion_command,
    ps_command,
    install_command,
    uninstall_command,
):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point (`patchbox`, `raxlpxs`)."""
    cli(prog_name="patchbox")
