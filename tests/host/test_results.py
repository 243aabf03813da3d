"""A process's result (`apply --all --json`, `remove --all --json`, the Ansible modules)
is an enum whose values are the strings the JSON has always carried."""

from __future__ import annotations

import importlib.util
import json

from helpers import ROOT
from patchbox.host.ops import RESULTS, Outcome, Result, exit_status


def test_json_strings_are_unchanged() -> None:
    assert RESULTS == ("applied", "removed", "skipped", "failed", "unreachable")
    out = Outcome(12, Result.APPLIED, exe="/bin/x").to_json()
    assert type(out["result"]) is str and out["result"] == "applied"
    assert json.loads(json.dumps(out)) == {
        "pid": 12,
        "result": "applied",
        "reason": "",
        "exe": "/bin/x",
        "build_id": "",
        "vm": "",
    }
    assert f"{Result.UNREACHABLE:<12}|" == "unreachable |"  # as `apply --all` prints it


def test_exit_status_from_results() -> None:
    assert exit_status([Outcome(1, Result.APPLIED), Outcome(2, Result.SKIPPED)]) == 0
    assert exit_status([Outcome(1, Result.FAILED, retry=True)]) == 2
    assert exit_status([Outcome(1, Result.FAILED, retry=True), Outcome(2, Result.UNREACHABLE)]) == 1


def test_ansible_module_utils_take_the_package_results() -> None:
    path = ROOT / "ansible" / "plugins" / "module_utils" / "api.py"
    spec = importlib.util.spec_from_file_location("patchbox_live_api", path)
    assert spec is not None and spec.loader is not None
    api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(api)
    assert api.HAS_PATCHBOX
    assert api.RESULTS == RESULTS and api.FAILURES == ("failed", "unreachable")
    processes = [api.entry(1, "applied"), api.entry(2, "unreachable", "pid 2 unreachable: gone")]
    assert api.summary(processes) == {
        "applied": 1,
        "removed": 0,
        "skipped": 0,
        "failed": 0,
        "unreachable": 1,
    }
    assert api.failure_message(processes) == "pid 2 unreachable: gone"
