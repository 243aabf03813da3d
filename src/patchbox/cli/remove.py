"""`patchbox remove NAME`: take an applied patch back out of a running process."""

from __future__ import annotations

import click

from patchbox import policy
from patchbox.cli.common import client_pid, emit_json, json_option, open_client, target_options

__all__ = ["remove_command"]


@click.command("remove")
@target_options
@json_option
@click.argument("name")
def remove_command(pid: int | None, socket_path: str | None, as_json: bool, name: str) -> None:
    """Remove the applied patch NAME (patches stacked on it must be removed first)."""
    with open_client(pid, socket_path) as client:
        target = client_pid(client)
        policy.check_remove(name, client.list(), target)
        client.remove(name)
    if as_json:
        emit_json(
            {"name": name, "pid": int(target) if target.isdigit() else target, "removed": True}
        )
        return
    click.echo(f"removed {name} from pid {target}")
