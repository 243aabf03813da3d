"""The thread-local counters program of tests/e2e/tlstree, driven from outside: its
workers' reports and one apply/remove cycle checked against them (test_tls_live.py for
x86-64, test_aarch64_tls.py under qemu-aarch64)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from live import Target

from helpers import run_with_tools as run

__all__ = [
    "EXE",
    "EXE_FIX",
    "LIB",
    "LIB_FIX",
    "TREE",
    "Counts",
    "Side",
    "check_exact",
    "live_cycle",
    "report",
]

TREE = Path(__file__).resolve().parent / "tlstree"
THREADS = 4
# The fixes: one more thread-local counter, touched only by the patched code.
EXE_FIX = ("\text_count += 1;\n}", "\text_count += 1;\n\tseen += 1;\n}")
LIB_FIX = ("\tlib_s += 1;\n}", "\tlib_s += 1;\n\tlib_seen += 1;\n}")


@dataclass(frozen=True)
class Counts:
    """One worker's report: the executable's counters and calls, the library's."""

    le: int
    ie: int
    st: int
    ext: int
    seen: int
    calls: int
    lib_g: int
    lib_s: int
    lib_seen: int
    lib_calls: int


@dataclass(frozen=True)
class Side:
    """The counters of one binary: those every call bumps, the fix's, the calls."""

    counters: tuple[str, ...]
    marker: str
    calls: str


EXE = Side(("le", "ie", "st", "ext"), "seen", "calls")
LIB = Side(("lib_g", "lib_s"), "lib_seen", "lib_calls")


def report(t: Target) -> list[Counts]:
    """Returns every worker's counters, as it copied them between two calls."""
    line = t.call("report")
    rows = [Counts(*map(int, part.split(","))) for part in line.split()]
    assert len(rows) == THREADS and len(fields(Counts)) == 10, line
    return rows


def check_exact(rows: list[Counts], side: Side) -> None:
    """Every counter of every thread equals that thread's own calls."""
    for i, r in enumerate(rows):
        calls = getattr(r, side.calls)
        assert calls > 0, (i, r)
        assert all(getattr(r, c) == calls for c in side.counters), (i, r)


def report_when(
    t: Target, ready: Callable[[list[Counts]], bool], timeout: float = 10
) -> list[Counts]:
    """Returns the first report (one every 0.1 s) that satisfies ``ready``, so a loaded
    machine only makes the test slower."""
    deadline = time.monotonic() + timeout
    while True:
        rows = report(t)
        if ready(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def live_cycle(target: Target, patch: Path, name: str, side: Side) -> None:
    """Applies and removes ``patch`` while the workers run; checks the counts."""
    before = report_when(target, lambda rows: all(getattr(r, side.calls) for r in rows))
    check_exact(before, side)
    assert all(getattr(r, side.marker) == 0 for r in before)

    run("patchbox", "apply", "-p", target.pid, patch)
    during = report_when(target, lambda rows: all(getattr(r, side.marker) for r in rows))
    check_exact(during, side)  # the same per-thread variables: nothing reset or lost
    for b, d in zip(before, during):
        ran = getattr(d, side.calls) - getattr(b, side.calls)
        assert ran > 0
        # Every thread ran the fix, only since it was applied.
        assert 0 < getattr(d, side.marker) <= ran, (b, d)

    run("patchbox", "remove", "-p", target.pid, name)
    removed = report(target)
    later = report_when(
        target,
        lambda rows: all(
            getattr(lt, side.calls) > getattr(r, side.calls) for r, lt in zip(removed, rows)
        ),
    )
    check_exact(removed, side)
    check_exact(later, side)
    for r, lt in zip(removed, later):
        assert getattr(lt, side.calls) > getattr(r, side.calls)
        assert getattr(lt, side.marker) == getattr(r, side.marker)  # the old code again
