"""Differential test of the whole pipeline on Csmith programs (tiers `diff` and
`diff_full`; scripts/difftest, docs/differential.md).

Each (seed, kind): a Csmith program and a mutant of that kind, both built as make trees
with the agent; ``patchbox build`` turns the mutant's diff into a patch; the running
original, held before the program's first line, is patched: a forked run must print what
the fresh mutant prints, after removal what the fresh original prints, and iterations in
the process itself, switched by apply and remove, what the two-version oracle prints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from difftest import DEFAULT_CACHE, TESTED, run_many, summary, table
from mutate import KINDS

# The CI handful: every kind, most of them on a mutant that prints otherwise than the
# original (the patched process must then change what it prints), at -O2 and -O3.
HANDFUL = [
    (101, "constant"),
    (103, "helper"),
    (104, "string"),
    (106, "stmt_add"),
    (107, "stmt_remove"),
    (108, "data"),
    (109, "operator"),
    (113, "helper"),
    (114, "global"),
    (119, "inline"),
    (124, "stmt_add"),
    (131, "stmt_remove"),
]


def _diverged(rows: list[dict[str, Any]]) -> str:
    return json.dumps([r for r in rows if r["status"] in ("diverged", "error")], indent=1)[:20000]


@pytest.mark.diff
def test_handful(tmp_path: Path) -> None:
    rows = run_many(HANDFUL, 2, tmp_path)
    print(table(summary(rows)))
    assert not [r for r in rows if r["status"] in ("diverged", "error")], _diverged(rows)
    # Not a test that cannot fail: the handful patched processes whose output changed.
    live = [r for r in rows if r["status"] == "patched" and r["observable"]]
    assert len(live) >= 6, json.dumps(rows, indent=1)
    assert all(r["mid_run"] == "same" for r in live)
    assert {r["kind"] for r in rows if r["status"] in TESTED} == set(KINDS)
    # Changed data is refused, naming why.
    [data] = [r for r in rows if r["kind"] == "data"]
    assert data["status"] == "refused" and "initial value" in data["reason"], data


@pytest.mark.diff_full
def test_full() -> None:
    """>= 1,000 programs (PATCHBOX_DIFF_PROGRAMS), both cores, cached per (seed, kind)
    in PATCHBOX_DIFF_CACHE (default /var/cache/patchbox/diff): a second run resumes."""
    programs = int(os.environ.get("PATCHBOX_DIFF_PROGRAMS", "1000"))
    cache = Path(os.environ.get("PATCHBOX_DIFF_CACHE", DEFAULT_CACHE))
    rows = run_many([], os.cpu_count() or 2, cache, programs=programs)
    s = summary(rows)
    print(table(s))
    assert s["programs"] >= programs
    assert not s["diverged"], _diverged(rows)
    for kind in KINDS:
        assert s["per_kind"][kind].get("patched", 0) + s["per_kind"][kind].get("refused", 0) > 0
