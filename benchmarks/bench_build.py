#!/usr/bin/env python3
"""`patchbox build` costs on a program with tens of thousands of symbols; prints a table.

    .venv/bin/python benchmarks/bench_build.py [--functions N] [--files N] [--repeat N]

Generates a C program of N small functions (each with a string literal or a static
variable, so every function carries relocations) across several files, builds it once
with `make`, and measures:
- comparison + patch writing, without compiling: `compare_trees` + `patch_from_diffs` +
  `save_patch` on the two object sets of a diff touching 3 functions in 2 files;
- the comparison of every function of every object (as after a header change that
  recompiles everything; the byte-equality shortcut is bypassed);
- `patchbox build` overall (CLI, subprocess) on the built tree: copy, no-op original build,
  diff applied, 2 files recompiled, comparison, patch written;
- `patchbox build` overall on a tree without objects (the original build from scratch).
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_table  # also puts src/ on sys.path
from patchbox.compare.objects import compare_objects, compare_trees  # noqa: E402
from patchbox.extract import patch_from_diffs  # noqa: E402
from patchbox.format.layout import save_patch  # noqa: E402
from patchbox.rebuild.workspace import Workspace  # noqa: E402

BIN = Path(sys.executable).parent
MAKEFILE = """\
CFLAGS += -O2 -fPIE $(shell patchbox config --cflags)
SRCS := $(wildcard *.c)
OBJS := $(SRCS:.c=.o)
prog: $(OBJS)
\t$(CC) -pie $(OBJS) -Wl,--build-id=sha1 -o $@
%.o: %.c
\t$(CC) $(CFLAGS) -c $< -o $@
"""


def generate(tree: Path, functions: int, files: int) -> None:
    tree.mkdir(parents=True)
    per = functions // files
    decls = []
    for f in range(files):
        lines = [f"/* unit {f} */", "#include <stdio.h>", ""]
        for i in range(per):
            n = f * per + i
            decls.append(f"int fn{n}(int);")
            if i % 2:
                lines.append(
                    f"__attribute__((noinline)) int fn{n}(int x) "
                    f'{{ if (x < 0) puts("fn{n}: negative"); '
                    f"return x * {n % 97 + 2} + {n}; }}"
                )
            else:
                lines.append(f"static int st{n};")
                lines.append(
                    f"__attribute__((noinline)) int fn{n}(int x) "
                    f"{{ st{n} += x; return st{n} ^ {n}; }}"
                )
        (tree / f"unit{f}.c").write_text("\n".join(lines) + "\n")
    calls = " + ".join(f"fn{f * per}(argc)" for f in range(files))
    (tree / "main.c").write_text(
        "\n".join(decls) + f"\nint main(int argc, char **argv) {{ (void)argv; return {calls}; }}\n"
    )
    (tree / "Makefile").write_text(MAKEFILE)


def make_diff(tree: Path, out: Path, files: int, per: int) -> None:
    """A -p1 diff changing fn1 and fn3 in unit0.c and one function of the last unit."""
    work = out.parent / "difftmp"
    shutil.rmtree(work, ignore_errors=True)
    (work / "a").mkdir(parents=True), (work / "b").mkdir()
    last = (files - 1) * per + 1
    for name, changes in {
        "unit0.c": [
            ("return x * 3 + 1;", "return x * 3 + 2;"),
            ("return x * 5 + 3;", "return x * 5 + 4;"),
        ],
        f"unit{files - 1}.c": [(f"fn{last}: negative", f"fn{last}: below zero")],
    }.items():
        text = (tree / name).read_text()
        (work / "a" / name).write_text(text)
        for old, new in changes:
            assert old in text, (name, old)
            text = text.replace(old, new, 1)
        (work / "b" / name).write_text(text)
    proc = subprocess.run(["diff", "-ru", "a", "b"], cwd=work, capture_output=True, text=True)
    out.write_text(proc.stdout)


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def timed(fn, repeat: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--functions", type=int, default=20000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-clean", action="store_true", help="skip the clean-tree build")
    args = ap.parse_args()
    per = args.functions // args.files
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        tmpd = Path(tmp)
        src = tmpd / "src"
        generate(src, args.functions, args.files)
        t = time.perf_counter()
        subprocess.run(["make", "-s", "-j2"], cwd=src, check=True, env=env(), capture_output=True)
        t_make = time.perf_counter() - t
        diff = tmpd / "fix.patch"
        make_diff(src, diff, args.files, per)
        nsym = int(
            subprocess.run(
                f"nm {src}/prog | wc -l", shell=True, capture_output=True, text=True
            ).stdout
        )

        ws = Workspace(src, tmpd / "ws")
        ws.copy_source()
        os.environ["PATH"] = env()["PATH"]
        ws.build("make -s", 2, "original")
        orig = ws.stash_objects()
        ws.apply_diff(diff)
        ws.build("make -s", 2, "patched")
        patched = ws.objects()

        def compare_and_write() -> None:
            diffs, _same = compare_trees(orig, patched)
            patch = patch_from_diffs(diffs, src / "prog", name="bench")
            save_patch(patch, tmpd / "bench.pbx")
            assert len(patch.functions) == 3, [f.symbol for f in patch.functions]

        med, worst = timed(compare_and_write, args.repeat)
        rows.append(
            (
                "compare + write patch (3 fns, 2 files)",
                f"{med * 1000:.0f} ms",
                f"max {worst * 1000:.0f} ms",
                f"{len(orig)} objects, {nsym} symbols",
            )
        )

        def compare_all() -> None:
            for rel, path in patched.items():
                compare_objects(orig[rel], path, rel=rel)

        med, worst = timed(compare_all, args.repeat)
        rows.append(
            (
                "compare every function of every object",
                f"{med * 1000:.0f} ms",
                f"max {worst * 1000:.0f} ms",
                f"{args.functions} functions, {med / args.functions * 1e6:.1f} us/function",
            )
        )

        def cli(tree: Path) -> float:
            t = time.perf_counter()
            subprocess.run(
                [
                    str(BIN / "patchbox"),
                    "build",
                    "--source",
                    str(tree),
                    "--diff",
                    str(diff),
                    "--binary",
                    "prog",
                    "-j",
                    "2",
                    "--build-cmd",
                    "make -s",
                    "-o",
                    str(tmpd / "cli.pbx"),
                ],
                check=True,
                env=env(),
                capture_output=True,
                text=True,
            )
            return time.perf_counter() - t

        t_cli = [cli(src) for _ in range(args.repeat)]
        rows.append(
            (
                "`patchbox build`, tree already built",
                f"{statistics.median(t_cli):.1f} s",
                f"max {max(t_cli):.1f} s",
                "copy, no-op make, 2 files rebuilt",
            )
        )
        if not args.no_clean:
            clean = tmpd / "clean"
            shutil.copytree(src, clean)
            for p in clean.glob("*.o"):  # objects gone, the running binary stays
                p.unlink()
            t = cli(clean)
            rows.append(
                (
                    "`patchbox build`, tree without objects",
                    f"{t:.1f} s",
                    "1 run",
                    f"original built from scratch; first `make -j2`: {t_make:.1f} s",
                )
            )
        shutil.rmtree(ws.root, ignore_errors=True)
    print_table(("what", "value", "spread", "note"), rows)


if __name__ == "__main__":
    main()
