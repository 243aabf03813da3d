"""`patchbox ps`: every process with an agent, and every process of their builds (or of
a build the store holds patches for) whose agent cannot be reached."""

from __future__ import annotations

import click

from patchbox.cli.common import emit_json, json_option, vm_option
from patchbox.cli.render import printable
from patchbox.host.ops import list_processes

__all__ = ["ps_command"]

VM_WIDTH = 24  # the VM column's width at most (a longer name pushes the rest of its line)


@click.command("ps")
@json_option
@vm_option
@click.pass_context
def ps_command(ctx: click.Context, as_json: bool, vms: tuple[str, ...]) -> None:
    """List the processes with an agent: pid, VM name (QEMU's -name guest=...),
    executable, build-id, applied and installed patches (NAME(unloaded): its library was
    unloaded since), sandbox use; and the processes of the same builds whose agent
    cannot be reached (none loaded, no socket, refused), with the reason."""
    timeout = ctx.find_root().params.get("timeout") or 10.0
    rows = list_processes(timeout=timeout, vms=vms or None)
    if as_json:
        emit_json([r.to_json() for r in rows])
        return
    if not rows:
        click.echo("no process with a patchbox agent" + (" of those VMs" if vms else ""))
        return
    names = {r.pid: printable(r.vm) or "-" for r in rows}
    w = min(max(len(n) for n in names.values()), VM_WIDTH)
    click.echo(f"{'PID':>7}  {'VM':<{w}}  {'BUILD-ID':<12}  {'SANDBOX':>15}  {'PATCHES':<24}  EXE")
    for r in rows:
        head = f"{r.pid:>7}  {names[r.pid]:<{w}}  {r.build_id[:12]:<12}"
        if r.error:
            click.echo(f"{head}  {'-':>15}  {'?':<24}  {r.exe}  (unreachable: {r.error})")
            continue
        patches = ",".join(n + ("(unloaded)" if n in r.unloaded else "") for n in r.patches) or "-"
        pending = [n for n in r.installed if n not in r.patches]
        if pending:
            patches += f" (+installed: {','.join(pending)})"
        use = f"{r.sandbox_used}/{r.sandbox_size}"
        click.echo(f"{head}  {use:>15}  {patches:<24}  {r.exe}")
