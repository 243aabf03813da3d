"""`patchbox attach -p PID`: load the agent into a running process started without it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from patchbox.cli.common import emit_json, json_option
from patchbox.config import preload
from patchbox.reach.attach import AttachError, AttachResult, attach

__all__ = ["attach_command", "attach_and_report", "include_privileged_option"]

F = TypeVar("F", bound=Callable[..., Any])


def include_privileged_option(func: F) -> F:
    """Adds ``--include-privileged``: attach to setuid, setgid, file-capability and
    non-dumpable processes too."""
    return click.option(
        "--include-privileged",
        "include_privileged",
        is_flag=True,
        help="Attach also to processes the kernel keeps same-uid tracers away from "
        "(setuid, setgid, file capabilities, not dumpable); skipped otherwise.",
    )(func)


def attach_and_report(
    pid: int, as_json: bool = False, include_privileged: bool = False
) -> AttachResult:
    """Attaches to ``pid`` and prints what it cost (one line, or JSON with ``as_json``)."""
    res = attach(pid, str(preload()), include_privileged=include_privileged)
    if as_json:
        emit_json(
            {
                "pid": res.pid,
                "tid": res.tid,
                "interrupted": res.syscall,
                "stopped_ns": res.stopped_ns,
                "socket": res.socket,
            }
        )
    else:
        click.echo(
            f"attached to pid {res.pid}: libsandbox.so loaded by thread {res.tid} "
            f"(interrupted in {res.syscall}), stopped {res.stopped_ns / 1e6:.3f} ms; "
            f"agent {res.socket or 'not listening yet'}"
        )
    return res


@click.command("attach")
@click.option("-p", "--pid", required=True, type=click.IntRange(min=1), metavar="PID")
@json_option
@include_privileged_option
def attach_command(pid: int, as_json: bool, include_privileged: bool) -> None:
    """Load the agent (libsandbox.so) into running process PID, which was started without
    it: one thread idle in a system call is borrowed for a call to dlopen, which returns
    through a signal frame that puts the thread back as it was, whether or not this
    client is still there (Ctrl-C and kill are deferred until the thread is back). Exit
    1 when refused (with the reason; the process untouched; a privileged process unless
    --include-privileged) or when the call was left to finish alone, 2 when worth a
    retry."""
    try:
        attach_and_report(pid, as_json, include_privileged)
    except AttachError as err:
        click.echo(f"patchbox: error: {err}", err=True)
        click.get_current_context().exit(2 if err.retry else 1)
