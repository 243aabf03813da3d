"""Reproduces the corpus of real security fixes (docs/corpus.md).

    scripts/corpus/run.sh [PROGRAM...] [--fix ID...] [--ci]      (run.sh installs what it needs)
    PYTHONPATH=scripts .venv/bin/python -m corpus --list

For each program (dnsmasq, memcached, openssh, qemu): the Debian bookworm source package
is fetched (``apt-get source``), one tree per fix is made at the level before the fix
(the package's patch series applied up to it; QEMU: the fix's hunks reverted from the
latest release) and built with patchbox's flags and agent. Then per fix: the daemon at that
level is started, ``patchbox build --source --diff --binary`` (``--qemu`` for QEMU, nothing
else) builds the patch from the fix's own diff, the patch is applied while a load generator
talks to the daemon, the fix's regression probe runs against the live process (before,
after the apply, after the remove), and the patch is removed again.

Results: ``$CACHE/results/<program>.json`` (one object per fix) and
``$CACHE/results/summary.json``; the table of docs/corpus.md is printed (``--table``).
Cache: ``$PATCHBOX_CORPUS_CACHE`` (default /var/cache/patchbox/corpus): source packages,
level trees and builds; a level is rebuilt when patchbox's flags, the agent or its recipe
change.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import dnsmasq, memcached, openssh, qemu
from .fixes import PACKAGES, Fix, Package, key
from .harness import CACHE
from .report import summarize, table, verdict

# Each program's module runs its fixes: (package, fixes chosen, results dir) -> rows.
PROGRAMS: dict[str, Callable[[Package, list[Fix], Path], list[dict[str, Any]]]] = {
    "dnsmasq": dnsmasq.run_fixes,
    "memcached": memcached.run_fixes,
    "openssh": openssh.run_fixes,
    "qemu": qemu.run_fixes,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("programs", nargs="*", help=f"default: all ({', '.join(PACKAGES)})")
    ap.add_argument("--fix", action="append", default=[], help="only this fix (key or CVE id)")
    ap.add_argument("--ci", action="store_true", help="only the CI subset (Fix.ci)")
    ap.add_argument("--list", action="store_true", help="list the corpus and exit")
    ap.add_argument("--table", action="store_true", help="print the table of every result")
    ap.add_argument(
        "--report", action="store_true", help="run nothing: summary and table from the results"
    )
    ap.add_argument("--results", default=str(CACHE / "results"), help="results directory")
    a = ap.parse_intermixed_args(argv)
    progs = a.programs or list(PACKAGES)
    results = Path(a.results)
    if a.list:
        for p in progs:
            for f in PACKAGES[p].fixes:
                print(f"{p:10} {key(f):45} {f.shape:9} {'ci' if f.ci else '  '} {f.what}")
        return 0
    results.mkdir(parents=True, exist_ok=True)
    for p in [] if a.report else progs:
        pkg = PACKAGES[p]
        chosen = [
            f
            for f in pkg.fixes
            if (not a.fix or key(f) in a.fix or any(i in a.fix for i in f.ident.split()))
            and (not a.ci or f.ci)
        ]
        if not chosen:
            continue
        rows = PROGRAMS[p](pkg, chosen, results)
        path = results / f"{p}.json"
        old = json.loads(path.read_text()) if path.exists() else []
        done = {r["fix"] for r in rows}
        merged = [r for r in old if r["fix"] not in done] + rows
        order = {key(f): i for i, f in enumerate(pkg.fixes)}
        merged.sort(key=lambda r: (order.get(r["fix"].removesuffix("-adapted"), 99), r["fix"]))
        path.write_text(json.dumps(merged, indent=1) + "\n")
        for r in rows:
            print(json.dumps({k: r.get(k) for k in ("program", "fix", "verdict")}), flush=True)
    every = []
    for p in PACKAGES:
        path = results / f"{p}.json"
        if path.exists():
            rows = json.loads(path.read_text())
            for r in rows:  # the rule may have changed since a row was written
                if "error" not in r and r["verdict"] != "not-tried":
                    r["verdict"] = verdict(r["shape"], r)
            path.write_text(json.dumps(rows, indent=1) + "\n")
            every += rows
    summary = summarize(every)
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (results / "table.md").write_text(table(every))
    if a.table:
        print(table(every))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
