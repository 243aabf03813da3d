"""Helpers of the corpus tests: scripts/corpus/run.sh into a results directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import ROOT

RUN = ROOT / "scripts" / "corpus" / "run.sh"


def run_corpus(results: Path, *args: str) -> dict[str, dict[str, Any]]:
    """Returns {fix: result row} after scripts/corpus/run.sh ARGS --results RESULTS."""
    proc = subprocess.run(
        [str(RUN), *args, "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=5400,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    sys.stderr.write(proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows: dict[str, dict[str, Any]] = {}
    for f in sorted(results.glob("*.json")):
        if f.name != "summary.json":
            rows.update({f"{r['program']}/{r['fix']}": r for r in json.loads(f.read_text())})
    return rows
