"""`patchbox list`: the patches applied in a process, in the order applied."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from patchbox.cli.common import client_pid, emit_json, json_option, open_client, target_options

__all__ = ["list_command"]


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@click.command("list")
@target_options
@json_option
def list_command(pid: int | None, socket_path: str | None, as_json: bool) -> None:
    """List applied patches with their functions and addresses; a patch whose library
    the process unloaded is marked UNLOADED (--json: "state")."""
    with open_client(pid, socket_path) as client:
        patches = client.list()
        if as_json:
            emit_json([p.to_json() for p in patches])
            return
        if not patches:
            click.echo(f"no patches applied in pid {client_pid(client)}")
            return
    for p in patches:
        click.echo(
            f"{p.name}  id {p.id}  applied {_when(p.applied_at)}  "
            f"text {p.text_addr:#x}+{p.text_size}  data {p.data_addr:#x}+{p.data_size}"
            + (f"  in {p.object}" if p.object else "")
            + (f"  held {p.hold_ns / 1e6:.3f} ms" if p.hold_ns else "")
        )
        if p.unloaded:
            click.echo(
                "    UNLOADED: its library was unloaded; nothing of it is redirected or written"
                " again (remove drops the record)"
            )
        for f in p.functions:
            click.echo(f"    {f.symbol}  {f.target:#x} -> {f.new:#x} ({f.new_size} bytes)")
