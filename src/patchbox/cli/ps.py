"""`patchbox ps`: every process with an agent, and every process of their builds (or of
a build the store holds patches for) whose agent cannot be reached."""

from __future__ import annotations

import click

from patchbox.cli.common import emit_json, json_option
from patchbox.host.ops import list_processes

__all__ = ["ps_command"]


@click.command("ps")
@json_option
@click.pass_context
def ps_command(ctx: click.Context, as_json: bool) -> None:
    """List the processes with an agent: pid, executable, build-id, applied and installed
    patches (NAME(unloaded): its library was unloaded since), sandbox use; and the
    processes of the same builds whose agent cannot be reached (none loaded, no socket,
    refused), with the reason."""
    timeout = ctx.find_root().params.get("timeout") or 10.0
    rows = list_processes(timeout=timeout)
    if as_json:
        emit_json([r.to_json() for r in rows])
        return
    if not rows:
        click.echo("no process with a patchbox agent")
        return
    click.echo(f"{'PID':>7}  {'BUILD-ID':<12}  {'SANDBOX':>15}  {'PATCHES':<24}  EXE")
    for r in rows:
        if r.error:
            click.echo(
                f"{r.pid:>7}  {r.build_id[:12]:<12}  {'-':>15}  {'?':<24}  {r.exe}"
                f"  (unreachable: {r.error})"
            )
            continue
        patches = ",".join(n + ("(unloaded)" if n in r.unloaded else "") for n in r.patches) or "-"
        pending = [n for n in r.installed if n not in r.patches]
        if pending:
            patches += f" (+installed: {','.join(pending)})"
        use = f"{r.sandbox_used}/{r.sandbox_size}"
        click.echo(f"{r.pid:>7}  {r.build_id[:12]:<12}  {use:>15}  {patches:<24}  {r.exe}")
