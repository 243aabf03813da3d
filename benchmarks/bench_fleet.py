"""`apply --all` on many processes against one `patchbox apply -p` per process; prints a
table (issue 12's goal: 4,000 processes in <= 0.5 s on this machine).

    .venv/bin/python -m benchmarks.bench_fleet [--processes 100,1000,4000] [--sequential 100]

For each N: N copies of a small program with the agent linked are started (they block in
read(), like idle daemons). The first `apply --all` right after every agent has bound is
timed against the first `apply --all` to as many processes whose agents have settled
(asked INFO, then left alone; a batch started and killed just before, whose stale sockets
the next batch's agents meet): starting agents and their stale-socket sweeps must not make
it slow (issue 19: within 2x). Then, on the processes started last, side by side:

- `apply --all`, in process (patchbox.host.ops.apply_all: discovery, build-id filter,
  one APPLY per process over one epoll loop), then `remove --all`;
- the same through the CLI (`patchbox apply --all --exe EXE FILE`: Python start-up
  included), with the client's peak RSS;
- sequential `patchbox apply -p PID` + `patchbox remove -p PID` on the first
  ``--sequential`` processes (each a fresh Python process, as a shell loop does), its
  per-process time extrapolated to N.

Every apply is checked: the patched function's answer changes in a sample of processes.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from patchbox.format.layout import PatchFile, read_patch_file
from patchbox.host.ops import apply_all, list_processes, remove_all

from .common import build_program, print_table

BIN = Path(sys.executable).parent
PROGRAM = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((noipa)) int answer(int x) { return x + @DELTA@; }
int main(void)
{
	char c;
	printf("ready\n");
	fflush(stdout);
	while (read(0, &c, 1) == 1)
		if (c == '?') { printf("%d\n", answer(40)); fflush(stdout); }
	return 0;
}
"""


def start(exe: Path, n: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for _ in range(n):
        procs.append(
            subprocess.Popen(
                [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
        )
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    deadline = time.monotonic() + 60
    for p in procs:
        while not (exe.parent / f"sandbox-sock{p.pid}").exists():
            assert time.monotonic() < deadline, "agent sockets never appeared"
            time.sleep(0.001)
    return procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kills ``procs`` (their sockets stay behind, stale, as after a crash)."""
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


def first_apply(pf: PatchFile, exe: Path, procs: list[subprocess.Popen[bytes]]) -> float:
    """Returns the seconds of the first ``apply --all`` (API) to ``procs``, then removes."""
    mine = {p.pid for p in procs}
    t0 = time.perf_counter()
    out = apply_all(pf, exe=str(exe))
    took = time.perf_counter() - t0
    assert sum(o.result == "applied" for o in out if o.pid in mine) == len(procs)
    remove_all("fix", exe=str(exe))
    return took


def ask(p: subprocess.Popen[bytes]) -> int:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(b"?")
    p.stdin.flush()
    return int(p.stdout.readline())


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGESIZE") // 1024


def cli(*args: object) -> tuple[float, int]:
    """Returns (wall seconds, peak RSS KiB) of one `patchbox` run."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "patchbox"), *map(str, args)], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", default="100,1000,4000")
    ap.add_argument("--sequential", type=int, default=100)
    args = ap.parse_args()
    sizes = [int(x) for x in args.processes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        exe = build_program(work, "app", PROGRAM.replace("@DELTA@", "2"), agent=True, stem="app")
        obj = build_program(
            work, "fix", PROGRAM.replace("@DELTA@", "3"), agent=False, obj=True, stem="app"
        )
        pbx = work / "fix.pbx"
        subprocess.run(
            [
                str(BIN / "extract-patch"),
                "--function",
                "answer",
                "--name",
                "fix",
                "-o",
                str(pbx),
                str(obj),
                str(exe),
            ],
            check=True,
            capture_output=True,
        )
        pf = read_patch_file(pbx)
        rows = []
        for n in sizes:
            # The first apply to processes whose agents have settled (asked INFO, then
            # left alone): each agent's first APPLY (its sandbox, its first membarrier)
            # and the client's cold caches, without start-up sweeps.
            procs = start(exe, n)
            try:
                list_processes(sweep=False)
                time.sleep(1)
                t_settled = first_apply(pf, exe, procs)
            finally:
                stop(procs)
            # The same right after the starts (every socket bound, nothing asked yet),
            # beside as many stale sockets of killed processes as the settled batch had
            # or more: the agents' start-up sweeps must not make it slow (issue 19).
            procs = start(exe, n)
            try:
                t_first = first_apply(pf, exe, procs)
                mine = {p.pid for p in procs}
                list_processes(sweep=False)
                sample = procs[:: max(1, n // 20)]
                t0 = time.perf_counter()
                out = apply_all(pf, exe=str(exe))
                t_api = time.perf_counter() - t0
                assert sum(o.result == "applied" for o in out if o.pid in mine) == n
                assert all(ask(p) == 43 for p in sample)
                t0 = time.perf_counter()
                out = remove_all("fix", exe=str(exe))
                t_rm = time.perf_counter() - t0
                assert sum(o.result == "removed" for o in out if o.pid in mine) == n
                assert all(ask(p) == 42 for p in sample)
                t_cli, cli_rss = cli("apply", "--all", "--exe", exe, pbx, "--json")
                assert all(ask(p) == 43 for p in sample)
                cli("remove", "--all", "--exe", exe, "fix", "--json")
                m = min(n, args.sequential)
                t0 = time.perf_counter()
                for p in procs[:m]:
                    cli("apply", "-p", p.pid, pbx)
                t_seq = (time.perf_counter() - t0) / m
                for p in procs[:m]:
                    cli("remove", "-p", p.pid, "fix")
                target_rss = sum(rss_kb(p.pid) for p in procs) / n
                rows.append(
                    (
                        f"{n}",
                        f"{t_settled * 1000:.0f} ms",
                        f"{t_first * 1000:.0f} ms (x{t_first / t_settled:.1f})",
                        f"{t_api * 1000:.0f} ms ({t_api / n * 1000:.3f} ms/proc)",
                        f"{t_rm * 1000:.0f} ms",
                        f"{t_cli * 1000:.0f} ms, {cli_rss / 1024:.0f} MiB peak "
                        f"({cli_rss / n:.1f} KiB/proc)",
                        f"{t_seq * 1000:.0f} ms/proc -> {t_seq * n:.1f} s"
                        + ("" if m == n else f" (measured on {m})"),
                        f"x{t_seq * n / t_cli:.0f}",
                        f"{target_rss:.0f} KiB",
                    )
                )
            finally:
                stop(procs)
        print_table(
            (
                "processes",
                "first apply, settled",
                "first, right after start (x settled)",
                "apply --all (API)",
                "remove --all (API)",
                "apply --all (CLI)",
                "sequential patchbox apply -p",
                "CLI speed-up",
                "target RSS/proc",
            ),
            rows,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
