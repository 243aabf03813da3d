"""`patchbox install` / `uninstall`: the store of patches for processes started later."""

from __future__ import annotations

import click

from patchbox import signing, store
from patchbox.cli.common import emit_json, json_option, trust_dir_option
from patchbox.cli.fleet import report
from patchbox.host.ops import apply_all

__all__ = ["install_command", "uninstall_command"]

_STORE_HELP = f"Patch store [$PATCHBOX_STORE, default {store.DEFAULT_STORE}]."


@click.command("install")
@json_option
@click.option("--store", "root", metavar="DIR", help=_STORE_HELP)
@trust_dir_option
@click.option(
    "--apply",
    "also_apply",
    is_flag=True,
    help="Also apply it now to every running process of its build (apply --all).",
)
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_context
def install_command(
    ctx: click.Context,
    *,
    as_json: bool,
    root: str | None,
    trust_dir: str | None,
    also_apply: bool,
    file: str,
) -> None:
    """Check the patch FILE once and store it under its build-id: every process of that
    build started later applies it before main() runs."""
    entry, pf = store.install(file, root=store.store_root(root), trust=signing.trust_dir(trust_dir))
    if not also_apply:
        if as_json:
            emit_json({"name": entry.name, "build_id": entry.build_id, "path": str(entry.path)})
        else:
            click.echo(f"installed {entry.name} for build-id {entry.build_id} ({entry.path})")
        return
    if not as_json:
        click.echo(f"installed {entry.name} for build-id {entry.build_id} ({entry.path})", err=True)
    timeout = ctx.find_root().params.get("timeout") or 10.0
    report(apply_all(pf, timeout=timeout), as_json, f"apply {pf.patch.name}")


@click.command("uninstall")
@json_option
@click.option("--store", "root", metavar="DIR", help=_STORE_HELP)
@click.option("--build-id", "build_id", metavar="ID", help="Only for this build-id.")
@click.argument("name")
def uninstall_command(as_json: bool, root: str | None, build_id: str | None, name: str) -> None:
    """Take patch NAME out of the store (running processes keep it until `remove`)."""
    gone = store.uninstall(name, root=store.store_root(root), build_id=build_id)
    if as_json:
        emit_json([{"name": e.name, "build_id": e.build_id, "path": str(e.path)} for e in gone])
        return
    if not gone:
        raise store.StoreError(f"no patch named {name} is installed in {store.store_root(root)}")
    for e in gone:
        click.echo(f"uninstalled {e.name} for build-id {e.build_id}")
