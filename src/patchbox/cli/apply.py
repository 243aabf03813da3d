"""`patchbox apply FILE`: apply a patch file to a running process."""
from __future__ import annotations

import click

from patchbox import policy
from patchbox.cli.common import emit_json, json_option, open_client, read_patch_file, target_options

__all__ = ["apply_command"]


@click.command("apply")
@target_options
@json_option
@click.argument("file", type=click.Path(dir_okay=False))
def apply_command(pid: int | None, socket_path: str | None, as_json: bool, file: str) -> None:
    """Apply the patch FILE (its body is sent unchanged, after the policy checks)."""
    patch, body = read_patch_file(file)
    with open_client(pid, socket_path) as client:
        info = client.info()
        target = str(pid) if pid is not None else info.get("pid", "?")
        policy.check_apply(patch, info, client.list(), target)
        result = client.apply(body)
    symbols = [f.symbol for f in patch.functions]
    if as_json:
        emit_json({"name": patch.name, "id": result.id, "pid": int(target) if target.isdigit() else target,
                   "text_addr": result.text_addr, "data_addr": result.data_addr,
                   "functions": symbols})
        return
    click.echo(f"applied {patch.name} (id {result.id}) to pid {target}: {', '.join(symbols)}")
