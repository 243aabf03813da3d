"""`patchbox apply FILE`: apply a patch file to a running process."""

from __future__ import annotations

import click

from patchbox import policy, signing
from patchbox.cli.common import emit_json, json_option, open_client, target_options
from patchbox.format.layout import read_patch_file

__all__ = ["apply_command"]


@click.command("apply")
@target_options
@json_option
@click.option(
    "--trust-dir",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Directory of trusted public keys (*.pub) [$PATCHBOX_TRUST_DIR, default "
    f"{signing.DEFAULT_TRUST_DIR}]; when it exists, only patches signed by one "
    "of them are applied.",
)
@click.argument("file", type=click.Path(dir_okay=False))
def apply_command(
    pid: int | None, socket_path: str | None, as_json: bool, trust_dir: str | None, file: str
) -> None:
    """Apply the patch FILE (its body is sent unchanged, after the trust and policy checks)."""
    # One read: the bytes checked (hash, signature) are the bytes sent.
    pf = read_patch_file(file)
    signing.check_trust(pf.data, file, signing.trust_dir(trust_dir))
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
