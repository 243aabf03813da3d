"""Live-patching costs, measured side by side in one run; prints a table.

    .venv/bin/python -m benchmarks.bench_live [--calls N] [--cycles N]

Measures: the agent's own apply/remove time (reported in its replies); wall time of
`patchbox apply` against `patchbox info` (the CLI's fixed cost); per-call cost of a patched
function against the unpatched one in the same process (interleaved rounds); the agent
thread's CPU while idle; RSS of the same program with and without the agent.
Not a test: numbers depend on the machine; ratios are what to compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from patchbox.extract import extract_patch
from patchbox.format.layout import encode_apply_body, save_patch
from patchbox.protocol.client import Client

from .common import Proc, build_program, print_table

BENCH_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) int work(int x) { return x * @K@ + 1; }
int (*volatile work_ptr)(int) = work;

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

int main(void)
{
	char line[64];
	long n;
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	while (fgets(line, sizeof line, stdin)) {
		if (sscanf(line, "calls %ld", &n) == 1) {
			int (*f)(int) = work_ptr;
			unsigned acc = 0;
			long long t0 = now_ns();
			for (long i = 0; i < n; i++)
				acc += (unsigned)f((int)i);
			printf("%lld %u\n", now_ns() - t0, acc);
		}
	}
	return 0;
}
"""


def build(tmp: Path, name: str, k: int, agent: bool, obj: bool = False) -> Path:
    return build_program(tmp, name, BENCH_C.replace("@K@", str(k)), agent=agent, obj=obj)


def calls(proc: Proc, n: int) -> tuple[float, int]:
    """Returns (ns per call, checksum) of ``n`` calls of work() in ``proc``."""
    ns, acc = proc.ask(f"calls {n}").split()
    return int(ns) / n, int(acc)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def agent_thread_ticks(pid: int) -> int:
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip() == "patchbox-agent":
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])  # utime + stime
    raise RuntimeError("agent thread not found")


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def q90(values: list[int]) -> int:
    """Returns the 90th percentile of ``values``."""
    return sorted(values)[int(len(values) * 0.9)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20_000_000)
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    bindir = Path(sys.executable).parent
    rows: list[tuple[str, str, str, str]] = []

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        exe = build(tmp, "agent", 3, agent=True)
        plain = build(tmp, "plain", 3, agent=False)
        # Same semantics, different code object: the patched call returns the same values.
        obj = build(tmp, "patched", 3, agent=False, obj=True)
        patch = extract_patch(obj, exe, ["work"], name="bench")
        pbx = tmp / "bench.pbx"
        save_patch(patch, pbx)
        body = encode_apply_body(patch)

        proc = Proc(exe)
        plain_proc = Proc(plain)
        try:
            # Idle cost first, before anything has talked to the agent.
            time.sleep(0.5)
            ticks0, t0 = agent_thread_ticks(proc.pid), time.monotonic()
            time.sleep(3)
            ticks = agent_thread_ticks(proc.pid) - ticks0
            cpu = ticks / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0) * 100
            rss_agent, rss_plain = rss_kib(proc.pid), rss_kib(plain_proc.pid)

            with Client(pid=proc.pid) as client:
                applies, removes = [], []
                for _ in range(args.cycles):
                    applies.append(client.apply(body).elapsed_ns)
                    removes.append(client.remove("bench").elapsed_ns)

                # Per-call cost, interleaved so drift hits both sides alike.
                base, patched = [], []
                for _ in range(args.rounds):
                    ns, acc0 = calls(proc, args.calls)
                    base.append(ns)
                    client.apply(body)
                    ns, acc1 = calls(proc, args.calls)
                    patched.append(ns)
                    client.remove("bench")
                    assert acc0 == acc1, "patched function computed something else"

            cli = [str(bindir / "patchbox")]
            info_t, apply_t = [], []
            for _ in range(5):
                info_t.append(wall(cli + ["info", "-p", str(proc.pid)]))
                apply_t.append(wall(cli + ["apply", "-p", str(proc.pid), str(pbx)]))
                wall(cli + ["remove", "-p", str(proc.pid), "bench"])
        finally:
            proc.stop()
            plain_proc.stop()

    med = statistics.median
    rows.append(
        (
            "agent apply (1 function)",
            f"{med(applies) / 1e3:.1f} us",
            f"p90 {q90(applies) / 1e3:.1f} us",
            f"{args.cycles} cycles",
        )
    )
    rows.append(
        (
            "agent remove",
            f"{med(removes) / 1e3:.1f} us",
            f"p90 {q90(removes) / 1e3:.1f} us",
            f"{args.cycles} cycles",
        )
    )
    rows.append(
        (
            "`patchbox apply` wall",
            f"{med(apply_t) * 1e3:.0f} ms",
            f"x{med(apply_t) / med(info_t):.2f} of `patchbox info`",
            f"info {med(info_t) * 1e3:.0f} ms",
        )
    )
    rows.append(
        ("call, unpatched", f"{med(base):.2f} ns", "x1.00", f"{args.calls:,} calls x{args.rounds}")
    )
    rows.append(
        (
            "call, patched",
            f"{med(patched):.2f} ns",
            f"x{med(patched) / med(base):.2f}",
            f"+{med(patched) - med(base):.2f} ns/call",
        )
    )
    rows.append(("agent thread CPU, idle", f"{cpu:.3f} %", f"{ticks} ticks in 3 s", ""))
    rows.append(
        (
            "RSS with agent",
            f"{rss_agent} KiB",
            f"x{rss_agent / rss_plain:.2f} of without",
            f"without: {rss_plain} KiB",
        )
    )

    print_table(("what", "value", "ratio / spread", "note"), rows)


if __name__ == "__main__":
    main()
