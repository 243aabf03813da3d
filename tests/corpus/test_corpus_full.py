"""The whole corpus (tier `-m corpus_full`, not part of a default run: selected with
`-m corpus_full` or PATCHBOX_CORPUS_FULL=1). Builds dnsmasq, memcached, OpenSSH levels and
a QEMU level (cached), then runs every fix: 13.5 min on 2 cores with the cache warm.

What must hold for every fix, by the shape read from the fix (scripts/corpus/fixes.py):
function-only fixes become working live patches (0 failed requests, probe passing);
data changes are refused; fixes of other programs change no function of the daemon.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from corpusutil import run_corpus

pytestmark = pytest.mark.corpus_full

EXPECTED = {
    "function": {"live"},
    # Function-only, but nothing in the run calls the fixed code (a QEMU device only a
    # guest drives; the fix says why): applied and removed cleanly is all it can show.
    "function, unexercised": {"unexercised"},
    "data": {"refused", "not-tried"},
    # Another program's fix: nothing to do, or code linked into the daemon that it never
    # calls (OpenSSH's misc.c), which applies and changes nothing.
    "elsewhere": {"no-function", "applied"},
    # Init-time code: applying is useless but harmless, refusing is safe; neither counts.
    # (QEMU CVE-2024-3446 was refused for its thread-local `current_cpu` until issue 21;
    # it applies now, and a port hot-plugged after the apply gets the fix: its probe.)
    "init": {"applied", "refused"},
}


def expected_of(r: dict[str, Any]) -> set[str]:
    """Returns the verdicts a result row may have, by its shape (and whether the fix says
    nothing in the run calls its code)."""
    shape = r["shape"] + (", unexercised" if r.get("unexercised") else "")
    return EXPECTED.get(shape, {r["verdict"]})


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("the corpus installs packages and starts daemons as root")
    results: Path = tmp_path_factory.mktemp("corpus")
    return run_corpus(results)


def test_every_fix_as_its_shape_says(rows: dict[str, dict[str, Any]]) -> None:
    wrong = {
        name: f"{r['shape']}: {r['verdict']}"
        for name, r in rows.items()
        if not r.get("adapted") and r["verdict"] not in expected_of(r)
    }
    assert not wrong, json.dumps(wrong, indent=1)


def test_no_request_failed_during_an_apply(rows: dict[str, dict[str, Any]]) -> None:
    for name, r in rows.items():
        for phase in ("load_apply", "load_remove"):
            load = r.get("apply", {}).get(phase)
            if load:
                assert load["failed"] == 0, (name, phase, load)
