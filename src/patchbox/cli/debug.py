"""`patchbox debug on|off`: the agent's verbose debug output (on the target's stderr)."""

from __future__ import annotations

import click

from patchbox.cli.common import client_pid, emit_json, json_option, open_client, target_options

__all__ = ["debug_command"]


@click.command("debug")
@target_options
@json_option
@click.argument("state", type=click.Choice(["on", "off"]))
def debug_command(pid: int | None, socket_path: str | None, as_json: bool, state: str) -> None:
    """Turn the agent's debug output on or off."""
    with open_client(pid, socket_path) as client:
        target = client_pid(client)
        client.debug(state == "on")
    if as_json:
        emit_json({"pid": int(target) if target.isdigit() else target, "debug": state == "on"})
        return
    click.echo(f"debug output {state} in pid {target}")
