"""`patchbox info`: the agent's facts about the running process.

Scripts run it in loops: :mod:`patchbox.cli.fast` answers the command lines it takes in
full without importing click (or this module); this command answers the rest."""

from __future__ import annotations

import click

from patchbox.cli.common import emit_json, json_option, open_client, target_options
from patchbox.cli.render import info_lines

__all__ = ["info_command"]


@click.command("info")
@target_options
@json_option
def info_command(pid: int | None, socket_path: str | None, as_json: bool) -> None:
    """Print what the agent knows: executable, build-id, versions, sandbox use."""
    with open_client(pid, socket_path) as client:
        facts = client.info()
    if as_json:
        emit_json(facts)
        return
    for line in info_lines(facts):
        click.echo(line)
