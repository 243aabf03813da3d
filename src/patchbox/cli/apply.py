"""`patchbox apply FILE`: apply a patch file to a running process."""

from __future__ import annotations

import click

from patchbox import policy, signing
from patchbox.cli.attach import attach_and_report, include_privileged_option
from patchbox.cli.common import (
    emit_json,
    json_option,
    open_client,
    target_options,
    trust_dir_option,
)
from patchbox.cli.fleet import all_options, report
from patchbox.format.layout import read_patch_file
from patchbox.host.ops import apply_all
from patchbox.procfs import mapped_objects
from patchbox.reach.attach import AlreadyAttached
from patchbox.reach.hold import apply_held

__all__ = ["apply_command"]


@click.command("apply")
@target_options
@json_option
@trust_dir_option
@all_options
@click.option(
    "--rollback-on-failure",
    "rollback",
    is_flag=True,
    help="With --all: if any process failed, remove the patch again from every "
    "process it was applied to.",
)
@click.option(
    "--attach",
    "attach",
    is_flag=True,
    help="Load the agent first into a process that has none (patchbox attach); with "
    "--all, into every process that runs or maps the patch's build.",
)
@include_privileged_option
@click.argument("file", type=click.Path(dir_okay=False))
def apply_command(
    *,
    pid: int | None,
    socket_path: str | None,
    as_json: bool,
    trust_dir: str | None,
    every: bool,
    exe: str | None,
    build_id: str | None,
    vms: tuple[str, ...],
    rollback: bool,
    attach: bool,
    include_privileged: bool,
    file: str,
) -> None:
    """Apply the patch FILE (its body is sent unchanged, after the trust and policy checks)
    to one process (-p/-s) or to every process of its build (--all)."""
    if include_privileged and not attach:
        raise click.UsageError("--include-privileged goes with --attach")
    # One read: the bytes checked (hash, signature) are the bytes sent.
    pf = read_patch_file(file)
    signing.check_trust(pf.data, file, signing.trust_dir(trust_dir))
    if every or exe or build_id or vms or rollback:
        if not every or pid is not None or socket_path is not None:
            raise click.UsageError(
                "--exe, --build-id, --vm and --rollback-on-failure go with --all, "
                "which excludes -p and -s"
            )
        timeout = click.get_current_context().find_root().params.get("timeout") or 10.0
        report(
            apply_all(
                pf,
                exe=exe,
                build_id=build_id,
                vms=vms or None,
                rollback=rollback,
                timeout=timeout,
                attach=attach,
                include_privileged=include_privileged,
            ),
            as_json,
            f"apply {pf.patch.name}",
        )
        return
    patch, body = pf.patch, pf.body
    if attach:
        if pid is None:
            raise click.UsageError("--attach needs -p PID (or --all)")
        try:
            attach_and_report(pid, include_privileged=include_privileged)
        except AlreadyAttached:
            pass
    with open_client(pid, socket_path) as client:
        info = client.info()
        target = str(pid) if pid is not None else info.get("pid", "?")
        mapped = {o.build_id for o in mapped_objects(int(target))} if target.isdigit() else set()
        policy.check_apply(patch, info, client.list(), target, mapped or None)
        result, hold = apply_held(client, int(info.get("pid", "0") or 0), patch, body, info)
    symbols = [f.symbol for f in patch.functions]
    if as_json:
        emit_json(
            {
                "name": patch.name,
                "id": result.id,
                "pid": int(target) if target.isdigit() else target,
                "text_addr": result.text_addr,
                "data_addr": result.data_addr,
                "functions": symbols,
                "elapsed_ns": result.elapsed_ns,
                "held_threads": hold.threads if hold else 0,
                "held_ns": hold.longest_ns if hold else 0,
            }
        )
        return
    click.echo(f"applied {patch.name} (id {result.id}) to pid {target}: {', '.join(symbols)}")
    if hold is not None:
        click.echo(
            f"held {hold.threads} thread(s) for at most {hold.longest_ns / 1e6:.3f} ms "
            f"({hold.attempts} attempt(s)) while the entry jump was written"
        )
