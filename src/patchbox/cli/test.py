"""`patchbox test`: run the agent's self-test inside the target."""

from __future__ import annotations

import click

from patchbox.cli.common import client_pid, emit_json, json_option, open_client, target_options
from patchbox.errors import PatchboxError

__all__ = ["test_command", "SelfTestFailed"]


class SelfTestFailed(PatchboxError):
    """The agent ran its self-test and it failed (exit status 1)."""


@click.command("test")
@target_options
@json_option
def test_command(pid: int | None, socket_path: str | None, as_json: bool) -> None:
    """Apply and remove a patch on a function of the agent itself; exit 1 if it fails."""
    with open_client(pid, socket_path) as client:
        target = client_pid(client)
        passed, detail = client.test()
    if as_json:
        emit_json(
            {"pid": int(target) if target.isdigit() else target, "passed": passed, "detail": detail}
        )
    elif passed:
        click.echo(f"self-test passed in pid {target}" + (f": {detail}" if detail else ""))
    if not passed:
        raise SelfTestFailed(
            f"self-test failed in pid {target}" + (f": {detail}" if detail else "")
        )
