"""`patchbox keygen` and `patchbox sign`: Ed25519 keys and signed patch files."""

from __future__ import annotations

import os
import stat

import click

from patchbox import safefs, signing
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
    # Written beside the file through its directory's descriptor: a new file of a random
    # name renamed over it, so a link planted in that directory is never written through.
    head, name = os.path.split(file)
    try:
        dirfd = os.open(head or ".", safefs.DIR_FLAGS)
        try:
            mode = stat.S_IMODE(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
            safefs.replace_file(dirfd, name, signed, mode)
        finally:
            os.close(dirfd)
    except OSError as err:
        raise PatchFormatError(f"cannot write {file}: {err.strerror}") from err
    kid = signing.key_id(private.public_key()).hex()
    if as_json:
        emit_json({"file": file, "key_id": kid})
        return
    click.echo(f"signed {file} with key {kid}")
