"""`patchbox build` costs on a program with tens of thousands of symbols; prints a table.

    .venv/bin/python -m benchmarks.bench_build [--functions N] [--files N] [--repeat N]

Generates a C program of N small functions (each with a string literal or a static
variable, so every function carries relocations) across several files, each including
one header, builds it once with `make`, and times the product's own passes
(:func:`patchbox.pipeline.build_patch`, what `patchbox build` runs), each separately:
- a fix changing 3 functions in 2 files: check, rebuild (copy, no-op original build, 2
  files recompiled), compare, plan, extract, write;
- a header change that recompiles every object and changes no function (a new unused
  variable in each): compare then looks at every function of every object (a dry run:
  the plan, nothing to extract);
and `patchbox build` overall as a command (a subprocess: interpreter start included), on
the built tree and on a tree without objects.
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

from patchbox.pipeline import BuildRequest, BuildResult, build_patch

from .common import print_table

BIN = Path(sys.executable).parent
MAKEFILE = """\
CFLAGS += -O2 -fPIE $(shell patchbox config --cflags)
SRCS := $(wildcard *.c)
OBJS := $(SRCS:.c=.o)
prog: $(OBJS)
\t$(CC) -pie $(OBJS) -Wl,--build-id=sha1 -o $@
%.o: %.c unit.h
\t$(CC) $(CFLAGS) -c $< -o $@
"""


def generate(tree: Path, functions: int, files: int) -> None:
    tree.mkdir(parents=True)
    per = functions // files
    decls = []
    for f in range(files):
        lines = [f"/* unit {f} */", "#include <stdio.h>", '#include "unit.h"', ""]
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
    (tree / "unit.h").write_text("/* included by every unit */\n")
    (tree / "Makefile").write_text(MAKEFILE)


def make_diff(tree: Path, out: Path, files: int, per: int) -> None:
    """A -p1 diff changing fn1 and fn3 in unit0.c and one function of the last unit."""
    work = out.parent / "difftmp"
    shutil.rmtree(work, ignore_errors=True)
    (work / "a").mkdir(parents=True)
    (work / "b").mkdir()
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
    proc = subprocess.run(
        ["diff", "-ru", "a", "b"], cwd=work, capture_output=True, text=True, check=False
    )
    out.write_text(proc.stdout)


def header_diff(tree: Path, out: Path) -> None:
    """A -p1 diff adding an unused static variable to unit.h: every object is rebuilt and
    differs (one new variable each), no function changes."""
    old = (tree / "unit.h").read_text()
    new = old + "static int bench_unused __attribute__((used));\n"
    lines = [f"--- a/unit.h\n+++ b/unit.h\n@@ -1 +1,2 @@\n {old}+{new.splitlines()[-1]}\n"]
    out.write_text("".join(lines))


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


PASSES = ("check", "rebuild", "compare", "plan", "extract", "write")


def timed_passes(request: BuildRequest, repeat: int) -> tuple[dict[str, list[float]], BuildResult]:
    """Returns the seconds of each pass over ``repeat`` runs of the product's pipeline,
    and the last run's result."""
    times: dict[str, list[float]] = {p: [] for p in PASSES}
    result = None
    for _ in range(repeat):
        result = build_patch(request)
        for t in result.timings:
            times[t.name].append(t.seconds)
    assert result is not None
    return {k: v for k, v in times.items() if v}, result


def pass_rows(
    what: str, times: dict[str, list[float]], notes: dict[str, str]
) -> list[tuple[str, ...]]:
    """Returns one table row per pass, then their total."""
    rows: list[tuple[str, ...]] = [
        (
            f"{what}: {name}",
            f"{statistics.median(v) * 1000:.0f} ms",
            f"max {max(v) * 1000:.0f} ms",
            notes.get(name, ""),
        )
        for name, v in times.items()
    ]
    total = [sum(run) for run in zip(*times.values())]
    rows.append(
        (f"{what}: all passes", f"{statistics.median(total):.2f} s", f"max {max(total):.2f} s", "")
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--functions", type=int, default=20000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-clean", action="store_true", help="skip the clean-tree build")
    args = ap.parse_args()
    per = args.functions // args.files
    rows: list[tuple[str, ...]] = []
    os.environ["PATH"] = env()["PATH"]  # the generated Makefile runs `patchbox config`
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
                f"nm {src}/prog | wc -l", shell=True, capture_output=True, text=True, check=False
            ).stdout
        )
        fix = BuildRequest(
            source=src,
            diff=diff,
            binary=Path("prog"),
            output=tmpd / "bench.pbx",
            name="bench",
            build_cmd="make -s",
            jobs=2,
        )
        times, result = timed_passes(fix, args.repeat)
        assert result.patch is not None and len(result.patch.functions) == 3
        objects = len(result.rebuilt.original)
        rows += pass_rows(
            "3 fns in 2 files",
            times,
            {
                "rebuild": "copy, no-op make, 2 files recompiled",
                "compare": f"{objects} objects, {nsym} symbols",
                "extract": "2 objects",
            },
        )
        everything = BuildRequest(
            source=src,
            diff=tmpd / "header.patch",
            binary=Path("prog"),
            build_cmd="make -s",
            jobs=2,
            dry_run=True,
        )
        header_diff(src, everything.diff)
        times, result = timed_passes(everything, args.repeat)
        assert not any(p.replace for p in result.plan.objects)
        compared = statistics.median(times["compare"])
        rows += pass_rows(
            "header change",
            times,
            {
                "rebuild": "every object recompiled",
                "compare": f"{args.functions} functions, "
                f"{compared / args.functions * 1e6:.1f} us/function",
            },
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
                "the command: interpreter start and every pass",
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
    print_table(("what", "value", "spread", "note"), rows)


if __name__ == "__main__":
    main()
