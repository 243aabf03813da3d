"""The longest stall a running thread sees: patchbox apply/remove against a ptrace stop.

    .venv/bin/python -m benchmarks.bench_stall [--cycles N]

One program (with the agent linked) runs a caller thread that calls work() through a
pointer in a tight loop and timestamps every call (CLOCK_MONOTONIC); it records every gap
of more than 5 us between two consecutive calls, with its time. Measured in the same run,
interleaved:
  - idle: nothing happens to the process (the loop's own noise: timer ticks, preemption);
  - apply/remove: patchbox apply+remove cycles of work() through the socket;
  - ptrace stop: the conventional method's minimum: PTRACE_SEIZE +
    PTRACE_INTERRUPT of every thread, wait for each to stop, PTRACE_DETACH (no code is
    even written while stopped).
Also: per-call cost of the patched function against the unpatched one, and the cost of
malloc(64)+free of the same program with and without the agent (interleaved rounds).
The caller thread is pinned alone to the last CPU, everything else (the agent thread,
this script) to the others: the gaps then show what each method does to a thread
running on its own core (IPIs, stops), not competition for CPU time; as root it also runs
SCHED_FIFO so that other processes of the machine do not preempt it (the kernel's RT
throttling still takes 5 % of each second: those gaps hit every kind of interval alike).
Each apply+remove cycle, each ptrace stop and each idle interval of the same length
(nothing done) is a span of time; its stall is the caller's longest gap overlapping it
(gaps under 5 us are not recorded: 0). The table gives the median / p90 / max over spans.
Not a test: numbers depend on the machine; ratios are what to compare.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from patchbox.extract import extract_patch
from patchbox.format.layout import encode_apply_body
from patchbox.protocol.client import Client

from .common import Proc, build_program, print_table

STALL_C = r"""
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) int work(int x) { return x * @K@ + 1; }
int (*volatile work_ptr)(int) = work;
static atomic_int spinning;
static atomic_ulong spin_calls;
#define NGAPS 65536
static long long gap_end[NGAPS], gap_len[NGAPS];	/* gaps over 5 us: end time, length */
static atomic_long ngaps;

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

static void *spin(void *arg)
{
	(void)arg;
	long long last = now_ns();
	unsigned long n = 0;
	while (atomic_load_explicit(&spinning, memory_order_relaxed)) {
		work_ptr((int)n++);
		long long t = now_ns();
		if (t - last > 5000) {
			long i = atomic_load_explicit(&ngaps, memory_order_relaxed);
			gap_end[i % NGAPS] = t;
			gap_len[i % NGAPS] = t - last;
			atomic_store_explicit(&ngaps, i + 1, memory_order_release);
		}
		last = t;
	}
	atomic_store(&spin_calls, n);
	return NULL;
}

int main(void)
{
	char line[64];
	long n;
	pthread_t th;
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	while (fgets(line, sizeof line, stdin)) {
		if (strncmp(line, "spin", 4) == 0) {
			atomic_store(&spinning, 1);
			pthread_create(&th, NULL, spin, NULL);
			printf("ok\n");
		} else if (strncmp(line, "halt", 4) == 0) {
			atomic_store(&spinning, 0);
			pthread_join(th, NULL);
			printf("%lu\n", (unsigned long)atomic_load(&spin_calls));
		} else if (strncmp(line, "gaps", 4) == 0) {	/* after halt */
			long m = atomic_load(&ngaps);
			for (long i = m > NGAPS ? m - NGAPS : 0; i < m; i++)
				printf("%lld %lld ", gap_end[i % NGAPS], gap_len[i % NGAPS]);
			printf("\n");
		} else if (sscanf(line, "calls %ld", &n) == 1) {
			int (*f)(int) = work_ptr;
			unsigned acc = 0;
			long long t0 = now_ns();
			for (long i = 0; i < n; i++)
				acc += (unsigned)f((int)i);
			printf("%lld %u\n", now_ns() - t0, acc);
		} else if (sscanf(line, "malloc %ld", &n) == 1) {
			void *volatile keep;
			long long t0 = now_ns();
			for (long i = 0; i < n; i++) {
				keep = malloc(64 + (i & 63));
				free(keep);
			}
			printf("%lld 0\n", now_ns() - t0);
		}
	}
	return 0;
}
"""

PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 17, 0x4206, 0x4207
WALL = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


def ptrace(req: int, tid: int) -> None:
    if libc.ptrace(req, tid, None, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"ptrace({req:#x}, {tid}): {os.strerror(e)}")


def ptrace_stop_all(pid: int) -> None:
    """Stops every thread of pid (seize + interrupt, wait for each stop) and detaches."""
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    for tid in tids:
        ptrace(PTRACE_SEIZE, tid)
    for tid in tids:
        ptrace(PTRACE_INTERRUPT, tid)
    for tid in tids:
        os.waitpid(tid, WALL)
    for tid in tids:
        ptrace(PTRACE_DETACH, tid)


def pin(pid: int) -> str:
    """The caller thread alone on the last CPU; the target's other threads and this
    script on the others, so the caller's gaps show the method, not CPU contention."""
    last = (os.cpu_count() or 1) - 1
    rest = set(range(last)) or {0}
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    spinner = max(
        t
        for t in tids
        if t != pid and Path(f"/proc/{pid}/task/{t}/comm").read_text().strip() != "patchbox-agent"
    )
    for tid in tids:
        os.sched_setaffinity(tid, {last} if tid == spinner else rest)
    os.sched_setaffinity(0, rest)
    try:  # other processes on the machine must not preempt it either (root only)
        os.sched_setscheduler(spinner, os.SCHED_FIFO, os.sched_param(1))
        return "SCHED_FIFO"
    except PermissionError:
        return "SCHED_OTHER"


def stall(gaps: list[tuple[int, int]], t0: int, t1: int) -> int:
    """The longest gap of the caller overlapping [t0, t1] (0: none over 5 us)."""
    return max((n for end, n in gaps if end >= t0 and end - n <= t1), default=0)


def build(tmp: Path, name: str, k: int, agent: bool, obj: bool = False) -> Path:
    return build_program(
        tmp, name, STALL_C.replace("@K@", str(k)), agent=agent, obj=obj, stem="stall"
    )


def per_op(proc: Proc, cmd: str, n: int) -> float:
    """Returns the ns per operation that ``cmd n`` reports."""
    return int(proc.ask(f"{cmd} {n}").split()[0]) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=300, help="apply+remove cycles and ptrace stops")
    ap.add_argument("--calls", type=int, default=20_000_000)
    ap.add_argument("--mallocs", type=int, default=5_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        m = measure(Path(tmpdir), args)
    header = ("what", "value", "ratio", "note")
    print_table(header, stall_rows(m) + cost_rows(m, args))


@dataclass(frozen=True)
class Measured:
    """What :func:`measure` saw."""

    spans: dict[str, list[tuple[int, int]]]  # idle, apply and ptrace: (start, end) ns
    stalls: dict[str, list[int]]  # the caller's longest gap in each span
    spin_calls: int  # timestamped calls of the caller thread
    policy: str  # how the caller thread was pinned
    base: list[float]  # ns per call, unpatched, per round
    patched: list[float]  # ns per call, patched
    with_agent: list[float]  # ns per malloc+free, agent linked
    without: list[float]  # ns per malloc+free, no agent


def measure(tmp: Path, args: argparse.Namespace) -> Measured:
    """Returns the stalls of apply+remove cycles and ptrace stops beside idle spans of
    the same length, and the cost of a patched call and of the linked agent."""
    exe = build(tmp, "agent", 3, agent=True)
    plain = build(tmp, "plain", 3, agent=False)
    obj = build(tmp, "patched", 3, agent=False, obj=True)  # same results, new code
    body = encode_apply_body(extract_patch(obj, exe, ["work"], name="stall"))
    proc, plain_proc = Proc(exe), Proc(plain)
    spans: dict[str, list[tuple[int, int]]] = {"idle": [], "apply": [], "ptrace": []}
    try:
        with Client(pid=proc.pid) as client:
            client.apply(body)  # warm: first-touch page faults are not the method's
            client.remove("stall")
            assert proc.ask("spin") == "ok"
            time.sleep(0.2)
            policy = pin(proc.pid)
            for _ in range(args.cycles):
                t0 = time.monotonic_ns()
                client.apply(body)
                client.remove("stall")
                t1 = time.monotonic_ns()
                spans["apply"].append((t0, t1))
                time.sleep(0.002)
                t2 = time.monotonic_ns()  # idle: nothing happens, same length
                time.sleep((t1 - t0) / 1e9)
                spans["idle"].append((t2, t2 + t1 - t0))
                time.sleep(0.002)
                t0 = time.monotonic_ns()
                ptrace_stop_all(proc.pid)
                spans["ptrace"].append((t0, time.monotonic_ns()))
                time.sleep(0.002)
            spin_calls = int(proc.ask("halt"))
            nums = [int(v) for v in proc.ask("gaps").split()]
            gaps = list(zip(nums[0::2], nums[1::2]))
            stalls = {k: [stall(gaps, a, b) for a, b in v] for k, v in spans.items()}

            base, patched = [], []
            for _ in range(args.rounds):
                base.append(per_op(proc, "calls", args.calls))
                client.apply(body)
                patched.append(per_op(proc, "calls", args.calls))
                client.remove("stall")
        with_agent, without = [], []
        for _ in range(args.rounds):
            with_agent.append(per_op(proc, "malloc", args.mallocs))
            without.append(per_op(plain_proc, "malloc", args.mallocs))
    finally:
        proc.stop()
        plain_proc.stop()
    return Measured(spans, stalls, spin_calls, policy, base, patched, with_agent, without)


def us(ns: float) -> str:
    """Returns ``ns`` in microseconds, for a table."""
    return f"{ns / 1e3:.1f} us"


def quantile(values: list[int], f: float) -> int:
    """Returns the value at fraction ``f`` of the sorted ``values``."""
    return sorted(values)[min(len(values) - 1, int(len(values) * f))]


def stall_rows(m: Measured) -> list[tuple[str, str, str, str]]:
    """Returns the table rows of the caller's longest gaps and of the wall times."""
    rows = []
    for k, what in (
        ("idle", "idle (same length, nothing done)"),
        ("apply", "apply+remove cycle"),
        ("ptrace", "ptrace stop of all threads"),
    ):
        v = m.stalls[k]
        rows.append(
            (
                f"caller's longest gap: {what}",
                us(quantile(v, 0.5)),
                f"p90 {us(quantile(v, 0.9))}",
                f"max {us(max(v))}; n={len(v)}",
            )
        )
    apply_, ptr = (quantile(m.stalls[k], 0.5) for k in ("apply", "ptrace"))
    p90 = quantile(m.stalls["ptrace"], 0.9) / max(quantile(m.stalls["apply"], 0.9), 1)
    rows.append(
        (
            "ptrace stall / apply stall",
            f"x{ptr / max(apply_, 1):.1f} median",
            f"x{p90:.1f} p90",
            f"{m.spin_calls:,} timestamped calls, caller {m.policy}",
        )
    )
    durations = {k: [b - a for a, b in v] for k, v in m.spans.items()}
    med = statistics.median
    rows.append(
        (
            "apply+remove cycle, wall",
            us(med(durations["apply"])),
            "",
            "through the socket, Python client",
        )
    )
    rows.append(
        ("ptrace stop+detach, wall", us(med(durations["ptrace"])), "", "all 3 threads, ctypes")
    )
    return rows


def cost_rows(m: Measured, args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """Returns the table rows of a patched call's and the linked agent's costs."""
    med = statistics.median
    base, patched, with_agent, without = m.base, m.patched, m.with_agent, m.without
    return [
        ("call, unpatched", f"{med(base):.2f} ns", "x1.00", f"{args.calls:,} calls x{args.rounds}"),
        (
            "call, patched",
            f"{med(patched):.2f} ns",
            f"x{med(patched) / med(base):.2f}",
            f"+{med(patched) - med(base):.2f} ns/call",
        ),
        (
            "malloc+free, no agent",
            f"{med(without):.2f} ns",
            "x1.00",
            f"{args.mallocs:,} x{args.rounds}",
        ),
        (
            "malloc+free, agent linked",
            f"{med(with_agent):.2f} ns",
            f"x{med(with_agent) / med(without):.2f}",
            "",
        ),
    ]


if __name__ == "__main__":
    main()
