"""`patchbox build --qemu` on QEMU 7.2 for a one-function fix; prints a table.

    .venv/bin/python -m benchmarks.bench_qemu_build [--repeat N]

Needs the cached QEMU build of `scripts/qemu/build-qemu.sh` ($PATCHBOX_QEMU_CACHE,
default /var/cache/patchbox/qemu). The fix changes the format string of
`hmp_info_version` (monitor/hmp-cmds.c). Measured, interleaved in one run:
- `patchbox build --qemu` wall time (the CLI, as an operator runs it) and the steps it
  reports (mirror, recompile, compare+extract), against the goals of issue 11
  (<= 10 s wall, compare+extract <= 1 s);
- the lazy mirror of the source tree against the whole mirror (a symlink per file,
  what the build made before);
- compare+extract of `build` (the objects decide about inlining: no DWARF walk without
  LTO) against `extract-patch --qemu` of the same function from the same object (the
  inline check walks the binary's DWARF).
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from patchbox.rebuild.incremental import IncrementalBuild

from .common import print_table

BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("PATCHBOX_QEMU_CACHE", "/var/cache/patchbox/qemu"))
REL = "monitor/hmp-cmds.c"
OLD = 'monitor_printf(mon, "%" PRId64 ".%" PRId64 ".%" PRId64 "%s\\n",'
NEW = 'monitor_printf(mon, "QEMU %" PRId64 ".%" PRId64 ".%" PRId64 "%s (fixed)\\n",'


def make_diff(src: Path, out: Path) -> Path:
    text = (src / REL).read_text()
    if text.count(OLD) != 1:
        sys.exit(f"{src / REL}: the line to change is not there once (not QEMU 7.2?)")
    new = text.replace(OLD, NEW).splitlines(True)
    out.write_text(
        "".join(difflib.unified_diff(text.splitlines(True), new, f"a/{REL}", f"b/{REL}"))
    )
    return out


def build_once(src: Path, exe: Path, diff: Path, out: Path) -> dict[str, float]:
    """Runs `patchbox build --qemu`; returns its wall time and reported steps."""
    t0 = time.perf_counter()
    cmd: list[str | Path] = [BIN / "patchbox", "build", "--qemu", "--source", src, "--diff", diff]
    proc = subprocess.run(
        [*cmd, "--binary", exe, "-o", out],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"patchbox build failed:\n{proc.stderr}")
    m = re.search(
        r"copy ([\d.]+) s, \d+ object\(s\) recompiled ([\d.]+) s, compare\+extract ([\d.]+) s",
        proc.stdout,
    )
    if m is None:
        sys.exit(f"unexpected output: {proc.stdout}")
    copy, compile_, extract = (float(g) for g in m.groups())
    return {"wall": wall, "copy": copy, "compile": compile_, "extract": extract}


def mirrors(src: Path, exe: Path, work: Path, diff: Path) -> tuple[float, float, int]:
    """Returns the seconds of the lazy mirror (+ diff applied), of making it whole, and the
    number of symlinks the whole one holds."""
    with IncrementalBuild(src, exe.parent, exe, work) as ws:
        t0 = time.perf_counter()
        ws.copy_source()
        ws.apply_diff(diff)
        lazy = time.perf_counter() - t0
        t0 = time.perf_counter()
        ws.make_whole()
        whole = time.perf_counter() - t0
        links = sum(
            1
            for top, dirs, files in os.walk(ws.tree)
            for n in dirs + files
            if os.path.islink(os.path.join(top, n))
        )
    return lazy, whole, links


def extract_walk(exe: Path, obj: Path, out: Path) -> float:
    """Returns the wall time of `extract-patch --qemu` (with the binary's DWARF walk)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [BIN / "extract-patch", "--qemu", "-f", "hmp_info_version", "-o", out, obj, exe],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"extract-patch failed:\n{proc.stderr}")
    return time.perf_counter() - t0


def fmt(values: list[float]) -> tuple[str, str]:
    return f"{statistics.median(values):.2f} s", f"max {max(values):.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    exe = CACHE / "build" / "qemu-system-x86_64"
    src = CACHE / "src"
    if not exe.is_file():
        sys.exit(f"{exe} missing: run scripts/qemu/build-qemu.sh first")
    runs: list[dict[str, float]] = []
    lazy, whole, walk = [], [], []
    links = 0
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        diff = make_diff(src, tmp / "fix.patch")
        for i in range(args.repeat):
            runs.append(build_once(src, exe, diff, tmp / "fix.pbx"))
            lz, wh, links = mirrors(src, exe, tmp / f"m{i}", diff)
            lazy.append(lz)
            whole.append(wh + lz)
            # The patched object of the build, kept in a workspace of our own.
            if i == 0:
                work = tmp / "w"
                cmd: list[str | Path] = [BIN / "patchbox", "build", "--qemu", "--source", src]
                subprocess.run(
                    [*cmd, "--diff", diff, "--binary", exe, "--work", work, "-o", tmp / "k.pbx"],
                    check=True,
                    capture_output=True,
                )
                obj = next((work / "obj").rglob("*hmp-cmds.c.o"))
            walk.append(extract_walk(exe, obj, tmp / "x.pbx"))
    col = {k: [r[k] for r in runs] for k in runs[0]}
    med = {k: statistics.median(v) for k, v in col.items()}
    rows = [
        (
            "`patchbox build --qemu` wall",
            *fmt(col["wall"]),
            f"x{med['wall'] / 10:.2f} of the 10 s goal",
        ),
        ("  mirror + diff (as reported)", *fmt(col["copy"]), ""),
        ("  find + recompile 1 object", *fmt(col["compile"]), "ninja -t deps/inputs, gcc"),
        (
            "  compare + extract + write",
            *fmt(col["extract"]),
            f"x{med['extract']:.2f} of the 1 s goal",
        ),
        (
            "lazy mirror + diff",
            *fmt(lazy),
            f"x{statistics.median(lazy) / statistics.median(whole):.3f} of whole",
        ),
        ("whole mirror + diff", *fmt(whole), f"{links} symlinks"),
        (
            "`extract-patch --qemu` (DWARF walk)",
            *fmt(walk),
            f"build's step x{med['extract'] / statistics.median(walk):.2f} of it",
        ),
    ]
    print_table(("what", "median", "spread", "note"), rows)
    print(f"\n{args.repeat} runs, one-function fix of {REL}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
