"""Pieces shared by the subcommands: target selection, the client, output helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from patchbox.cli.render import json_text
from patchbox.protocol.client import DEFAULT_TIMEOUT, Client

__all__ = [
    "target_options",
    "json_option",
    "trust_dir_option",
    "VM_HELP",
    "vm_option",
    "open_client",
    "client_pid",
    "emit_json",
]

F = TypeVar("F", bound=Callable[..., Any])
# signing.DEFAULT_TRUST_DIR, without importing signing (and cryptography) for every command.
DEFAULT_TRUST_DIR = "/etc/patchbox/trusted-keys"


def target_options(func: F) -> F:
    """Adds ``-p/--pid`` and ``-s/--socket`` (exactly one is required)."""
    func = click.option(
        "-s",
        "--socket",
        "socket_path",
        metavar="SOCKET",
        # readable=False: a socket we may not open is reported by the client
        # (permission denied connecting...), not as a usage error.
        type=click.Path(dir_okay=False, readable=False),
        help="Agent socket path (instead of -p).",
    )(func)
    func = click.option(
        "-p",
        "--pid",
        type=click.IntRange(min=1),
        metavar="PID",
        help="Process id of the target (its socket is found from it).",
    )(func)
    return func


def json_option(func: F) -> F:
    """Adds ``--json`` (machine-readable output on stdout)."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


def trust_dir_option(func: F) -> F:
    """Adds ``--trust-dir DIR``: where the trusted public keys of the trust rule are."""
    return click.option(
        "--trust-dir",
        metavar="DIR",
        type=click.Path(file_okay=False),
        help="Directory of trusted public keys (*.pub) [$PATCHBOX_TRUST_DIR, default "
        f"{DEFAULT_TRUST_DIR}]; when it exists, only patches signed by one "
        "of them are accepted.",
    )(func)


VM_HELP = (
    "only the QEMU processes whose VM name (-name guest=NAME, as libvirt starts them) is "
    "NAME; repeat for several."
)


def vm_option(func: F) -> F:
    """Adds ``--vm NAME`` (repeatable): only QEMU processes of those VM names."""
    return click.option(
        "--vm", "vms", metavar="NAME", multiple=True, help=VM_HELP[0].upper() + VM_HELP[1:]
    )(func)


def open_client(pid: int | None, socket_path: str | None) -> Client:
    """Returns an unconnected Client for ``-p`` or ``-s``; a UsageError unless exactly one."""
    if (pid is None) == (socket_path is None):
        raise click.UsageError("give exactly one of -p PID and -s SOCKET")
    ctx = click.get_current_context()
    timeout = ctx.find_root().params.get("timeout") or DEFAULT_TIMEOUT
    if pid is not None:
        return Client(pid=pid, timeout=timeout)
    return Client(socket_path, timeout=timeout)


def client_pid(client: Client) -> str:
    """Returns the target's pid: the one given, else the agent's INFO ``pid``."""
    if client.pid is not None:
        return str(client.pid)
    return client.info().get("pid", "?")


def emit_json(value: Any) -> None:
    """Prints ``value`` as indented JSON on stdout."""
    click.echo(json_text(value))
