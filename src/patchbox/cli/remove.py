"""`patchbox remove NAME`: take an applied patch back out of a running process."""

from __future__ import annotations

import click

from patchbox import policy
from patchbox.cli.common import client_pid, emit_json, json_option, open_client, target_options
from patchbox.cli.fleet import all_options, report
from patchbox.host.ops import remove_all

__all__ = ["remove_command"]


@click.command("remove")
@target_options
@json_option
@all_options
@click.argument("name")
def remove_command(
    *,
    pid: int | None,
    socket_path: str | None,
    as_json: bool,
    every: bool,
    exe: str | None,
    build_id: str | None,
    vms: tuple[str, ...],
    name: str,
) -> None:
    """Remove the applied patch NAME (patches stacked on it must be removed first) from
    one process (-p/-s) or from every process that has it (--all)."""
    if every or exe or build_id or vms:
        if not every or pid is not None or socket_path is not None:
            raise click.UsageError(
                "--exe, --build-id and --vm go with --all, which excludes -p and -s"
            )
        timeout = click.get_current_context().find_root().params.get("timeout") or 10.0
        outcomes = remove_all(name, exe=exe, build_id=build_id, vms=vms or None, timeout=timeout)
        report(outcomes, as_json, f"remove {name}")
        return
    with open_client(pid, socket_path) as client:
        target = client_pid(client)
        policy.check_remove(name, client.list(), target)
        removed = client.remove(name)
    if as_json:
        emit_json(
            {
                "name": name,
                "pid": int(target) if target.isdigit() else target,
                "removed": True,
                "written": removed.written,
                "elapsed_ns": removed.elapsed_ns,
            }
        )
        return
    if not removed.written:
        click.echo(
            f"removed {name} from pid {target}: its library had been unloaded, so nothing was"
            " written (the agent's record only)"
        )
        return
    click.echo(f"removed {name} from pid {target}")
