"""`patchbox keygen` and `patchbox sign`: Ed25519 keys and signed patch files."""

from __future__ import annotations

import os
from pathlib import Path

import click

from patchbox import signing
from patchbox.cli.common import emit_json, json_option
from patchbox.errors import PatchFormatError
from patchbox.format.layout import read_patch_file

__all__ = ["keygen_command", "sign_command"]


@click.command("keygen")
@json_option
@click.option(
    "--out",
    "out",
    required=True,
    metavar="DIR/NAME",
    help="Writes DIR/NAME.key (private, mode 0600) and DIR/NAME.pub.",
)
def keygen_command(as_json: bool, out: str) -> None:
    """Create an Ed25519 key pair for signing patches."""
    key, pub, kid = signing.keygen(out)
    if as_json:
        emit_json({"private": str(key), "public": str(pub), "key_id": kid.hex()})
        return
    click.echo(
        f"wrote {key} (keep private) and {pub} (copy into the trust directory, "
        f"default {signing.DEFAULT_TRUST_DIR})\nkey id {kid.hex()}"
    )


@click.command("sign")
@json_option
@click.option(
    "--key",
    "key_path",
    required=True,
    metavar="PRIVATE.key",
    type=click.Path(dir_okay=False),
    help="Private key from `patchbox keygen`.",
)
@click.argument("file", type=click.Path(dir_okay=False))
def sign_command(as_json: bool, key_path: str, file: str) -> None:
    """Sign the patch FILE in place (an earlier signature is replaced)."""
    private = signing.load_private_key(key_path)
    signed = signing.sign_file_bytes(read_patch_file(file).data, private)
    tmp = Path(f"{file}.sign-tmp")
    try:
        tmp.write_bytes(signed)
        os.replace(tmp, file)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise PatchFormatError(f"cannot write {file}: {err.strerror}") from err
    kid = signing.key_id(private.public_key()).hex()
    if as_json:
        emit_json({"file": file, "key_id": kid})
        return
    click.echo(f"signed {file} with key {kid}")
