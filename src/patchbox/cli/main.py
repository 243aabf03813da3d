"""The `patchbox` (alias `raxlpxs`) command: one group, one module per subcommand.

Every PatchboxError is turned into one stderr line ``patchbox: error: <cause>`` and exit
status 1 here, at one choke point; usage errors keep click's exit status 2.
"""

from __future__ import annotations

from typing import Any

import click

from patchbox import __version__
from patchbox.cli.render import error_line
from patchbox.errors import ConfigError, PatchboxError

__all__ = ["cli", "main"]

# Every subcommand is imported only when it runs (or help lists them): a command pays
# for its own imports only (`patchbox --version` imports none). name -> (module, attribute).
COMMANDS = {
    "info": ("patchbox.cli.info", "info_command"),
    "list": ("patchbox.cli.list", "list_command"),
    "apply": ("patchbox.cli.apply", "apply_command"),
    "attach": ("patchbox.cli.attach", "attach_command"),
    "remove": ("patchbox.cli.remove", "remove_command"),
    "test": ("patchbox.cli.test", "test_command"),
    "debug": ("patchbox.cli.debug", "debug_command"),
    "show": ("patchbox.cli.show", "show_command"),
    "config": ("patchbox.cli.config", "config_command"),
    "keygen": ("patchbox.cli.keys", "keygen_command"),
    "sign": ("patchbox.cli.keys", "sign_command"),
    "completion": ("patchbox.cli.completion", "completion_command"),
    "ps": ("patchbox.cli.ps", "ps_command"),
    "install": ("patchbox.cli.store", "install_command"),
    "uninstall": ("patchbox.cli.store", "uninstall_command"),
    "extract": ("patchbox.cli.extract", "extract_command"),
    "build": ("patchbox.cli.build", "build_command"),
}
# protocol.client.DEFAULT_TIMEOUT, without importing the client (tests check they agree).
DEFAULT_TIMEOUT = 10.0
VERSION_LINE = f"patchbox, version {__version__}"  # what click's version_option prints


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
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS and name not in self.commands:
            module_name, attr = COMMANDS[name]
            try:
                module = __import__(module_name, fromlist=[attr])
                command: click.Command = getattr(module, attr)
            except (ImportError, AttributeError) as err:
                return _unavailable(name, f"{module_name}.{attr} cannot be loaded ({err})")
            return command
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PatchboxError as err:
            click.echo(error_line(err), err=True)
            ctx.exit(1)


@click.group(cls=PatchboxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", message=VERSION_LINE)
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


def main() -> None:
    """Runs the click group (:func:`patchbox.cli.main` answers --version before it)."""
    cli(prog_name="patchbox")
