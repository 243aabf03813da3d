"""`patchbox info`: the agent's facts about the running process."""

from __future__ import annotations

import click

from patchbox.cli.common import emit_json, json_option, open_client, target_options

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
    width = max((len(key) for key in facts), default=0)
    for key, value in facts.items():
        click.echo(f"{key:<{width}}  {value}")
