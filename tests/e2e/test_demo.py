"""The README demo runs and shows the bug, the fix and the revert (tier 2)."""

from __future__ import annotations

import subprocess

import pytest

from helpers import ROOT

pytestmark = pytest.mark.process


def test_demo_output() -> None:
    proc = subprocess.run(
        [str(ROOT / "examples" / "demo.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    bug, rest = out.split("== Apply it", 1)
    applied, removed = rest.split("== Remove it", 1)
    assert "service> [" in bug and "1900 is a leap year" in bug
    assert "1900 is not a leap year" in applied and "-> fixed, without a restart" in applied
    assert "1900 is a leap year" in removed.split("== What the agent")[0]
    assert "self-test passed" in out and "demo done" in out
