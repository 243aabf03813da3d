"""Reach costs (docs/reach.md); prints two tables.

    .venv/bin/python -m benchmarks.bench_reach [--repeat N] [--calls N]

1. Stop time of one thread: a plain ptrace stop (PTRACE_SEIZE + PTRACE_INTERRUPT, wait,
   PTRACE_DETACH) against `patchbox attach` (the same stop, plus the dlopen of
   libsandbox.so in that thread: the agent's constructor, its socket, its thread), each
   on a fresh process blocked in read().
2. Per-call cost of a library function: a loop calling `answer` of a shared library
   built without flags, as shipped, then redirected by a held entry jump to an identical
   replacement (one extra `jmp rel32` per call), and with the padded entry for
   comparison (`eb f8` + `e9 rel32`).
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from patchbox.config import preload
from patchbox.reach import ptrace
from patchbox.reach.attach import attach

from .common import print_table

BIN = Path(sys.executable).parent
IDLE = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { char b[64]; printf("ready\n"); fflush(stdout); return read(0, b, sizeof b) < 0; }
"""
LIB = "__attribute__((noipa)) int answer(int x) { return x * 7 + 3; }\n"
LOOP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int answer(int);
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    char line[16];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        struct timespec a, b;
        volatile int sink = 0;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (long i = 0; i < n; i++)
            sink += answer((int)i);
        clock_gettime(CLOCK_MONOTONIC, &b);
        printf("%.3f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    }
    return 0;
}
"""


def sh(*cmd: object, cwd: Path | None = None) -> str:
    return subprocess.run(
        [str(c) for c in cmd], check=True, capture_output=True, text=True, cwd=cwd
    ).stdout


def idle_process(exe: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    time.sleep(0.02)  # in read()
    return p


def plain_stop(pid: int) -> int:
    t0 = time.monotonic_ns()
    ptrace.seize(pid)
    ptrace.interrupt(pid)
    ptrace.wait_stop(pid, 1.0)
    ptrace.get_regs(pid)
    ptrace.detach(pid)
    return time.monotonic_ns() - t0


def stops(d: Path, repeat: int) -> list[tuple[str, ...]]:
    exe = d / "idle"
    (d / "idle.c").write_text(IDLE)
    sh("gcc", "-O2", d / "idle.c", "-o", exe)
    lib = str(preload())
    plain, attached = [], []
    for _ in range(repeat):
        p = idle_process(exe)
        plain.append(plain_stop(p.pid))
        p.kill()
        p.wait()
        p = idle_process(exe)
        attached.append(attach(p.pid, lib, wait_socket=0).stopped_ns)
        p.kill()
        p.wait()
    rows: list[tuple[str, ...]] = []
    for name, xs in (("plain ptrace stop", plain), ("patchbox attach", attached)):
        xs.sort()
        rows.append(
            (
                name,
                f"{statistics.median(xs) / 1e3:.0f}",
                f"{xs[int(len(xs) * 0.9) - 1] / 1e3:.0f}",
                f"{xs[-1] / 1e3:.0f}",
            )
        )
    return rows


def per_call(d: Path, calls: int, repeat: int) -> list[tuple[str, ...]]:
    (d / "answer.c").write_text(LIB)
    sh("gcc", "-O2", "-fPIC", "-shared", "-Wl,--build-id", d / "answer.c", "-o", d / "libanswer.so")
    (d / "loop.c").write_text(LOOP)
    sh(
        "gcc", "-O2", d / "loop.c", "-o", d / "loop",
        f"-L{d}", "-lanswer", f"-Wl,-rpath,{d}",
    )  # fmt: skip
    cflags = sh(BIN / "patchbox", "config", "--cflags").split()
    sh("gcc", "-O2", "-fPIC", *cflags, "-c", d / "answer.c", "-o", d / "fix.o")
    sh(BIN / "extract-patch", "-f", "answer", "--name", "same", "-o", d / "same.pbx",
       d / "fix.o", d / "libanswer.so")  # fmt: skip
    p = subprocess.Popen(
        [str(d / "loop"), str(calls)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    stdin, stdout = p.stdin, p.stdout
    assert stdin is not None and stdout is not None  # pipes
    assert stdout.readline().strip() == "ready"

    def measure() -> float:
        out = []
        for _ in range(repeat):
            stdin.write("go\n")
            stdin.flush()
            out.append(float(stdout.readline()))
        return statistics.median(out)

    base = measure()
    attach(p.pid, str(preload()))
    sh(BIN / "patchbox", "apply", "-p", p.pid, d / "same.pbx")
    jumped = measure()
    sh(BIN / "patchbox", "remove", "-p", p.pid, "same")
    again = measure()
    p.kill()
    p.wait()
    return [
        ("as shipped (no patch)", f"{base:.2f}", ""),
        ("entry jump (held) to a copy", f"{jumped:.2f}", f"{jumped - base:+.2f}"),
        ("removed again", f"{again:.2f}", f"{again - base:+.2f}"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--calls", type=int, default=20_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        print("Stop time of one thread blocked in read(), µs")
        print_table(("what", "median", "p90", "max"), stops(d, args.repeat))
        print()
        print(f"Per call of a library function, ns (median of {args.repeat} x {args.calls} calls)")
        print_table(("answer()", "ns/call", "vs shipped"), per_call(d, args.calls, 5))


if __name__ == "__main__":
    main()
