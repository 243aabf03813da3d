"""Options and output shared by the host-wide commands (`apply --all`, `remove --all`,
`install --apply`): narrowing by executable, build-id or VM name, one line (or JSON object) per
process, and the exit status rule of :func:`patchbox.host.ops.exit_status`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from patchbox.cli.common import VM_HELP, emit_json
from patchbox.cli.render import printable
from patchbox.host.ops import Outcome, exit_status

__all__ = ["all_options", "report"]

F = TypeVar("F", bound=Callable[..., Any])


def all_options(func: F) -> F:
    """Adds ``--all``, ``--exe PATH``, ``--build-id ID`` and ``--vm NAME``."""
    func = click.option(
        "--vm", "vms", metavar="NAME", multiple=True, help=f"With --all: {VM_HELP}"
    )(func)
    func = click.option(
        "--build-id", "build_id", metavar="ID", help="With --all: only processes of this build-id."
    )(func)
    func = click.option(
        "--exe",
        "exe",
        metavar="PATH",
        type=click.Path(dir_okay=False),
        help="With --all: only processes running this executable.",
    )(func)
    func = click.option(
        "--all",
        "every",
        is_flag=True,
        help="Every process of the host running the patch's build (agents of other "
        "builds are skipped; one whose agent cannot be reached is unreachable); exit 1 "
        "if one failed or was unreachable, 2 if every failure may be retried.",
    )(func)
    return func


def report(outcomes: list[Outcome], as_json: bool, what: str) -> None:
    """Prints one line (or a JSON array) per process and exits with the status rule."""
    if as_json:
        emit_json([o.to_json() for o in outcomes])
    else:
        for o in outcomes:
            vm = f" (vm {printable(o.vm)})" if o.vm else ""
            tail = f": {o.reason}" if o.reason else ""
            click.echo(f"pid {o.pid:<8} {o.result:<8} {o.exe}{vm}{tail}")
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.result] = counts.get(o.result, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no process"
        click.echo(f"{what}: {summary}", err=True)
    code = exit_status(outcomes)
    if code:
        click.get_current_context().exit(code)
