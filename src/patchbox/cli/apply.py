"""`patchbox apply FILE`: apply a patch file to a running process."""

from __future__ import annotations

import click

from patchbox import policy, signing
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
@click.argument("file", type=click.Path(dir_okay=False))
def apply_command(
    pid: int | None,
    socket_path: str | None,
    as_json: bool,
    trust_dir: str | None,
    every: bool,
    exe: str | None,
    build_id: str | None,
    rollback: bool,
    file: str,
) -> None:
    """Apply the patch FILE (its body is sent unchanged, after the trust and policy checks)
    to one process (-p/-s) or to every process of its build (--all)."""
    # One read: the bytes checked (hash, signature) are the bytes sent.
    pf = read_patch_file(file)
    signing.check_trust(pf.data, file, signing.trust_dir(trust_dir))
    if every or exe or build_id or rollback:
        if not every or pid is not None or socket_path is not None:
            raise click.UsageError(
                "--exe, --build-id and --rollback-on-failure go with --all, "
                "which excludes -p and -s"
            )
        timeout = click.get_current_context().find_root().params.get("timeout") or 10.0
        report(
            apply_all(pf, exe=exe, build_id=build_id, rollback=rollback, timeout=timeout),
            as_json,
            f"apply {pf.patch.name}",
        )
        return
    patch, body = pf.patch, pf.body
    with open_client(pid, socket_path) as client:
        info = client.info()
        target = str(pid) if pid is not None else info.get("pid", "?")
        policy.check_apply(patch, info, client.list(), target)
        result = client.apply(body)
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
            }
        )
        return
    click.echo(f"applied {patch.name} (id {result.id}) to pid {target}: {', '.join(symbols)}")
