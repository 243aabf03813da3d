"""The pause a running guest sees: a patchbox apply/remove against a same-host live migration.

    PYTHONPATH=scripts .venv/bin/python -m benchmarks.bench_guest_pause [--cycles K]   # as root

One test guest (scripts/guest: Debian's kernel under TCG, its checked I/O loop on a
virtio-blk disk, an AHCI disk and virtio-net) on the project's QEMU
(scripts/qemu/build-qemu.sh: Debian's device set, the agent linked in). In one run,
interleaved, K rounds of:
  - for each data-path patch (scripts/guest/datapath.py: ``blk`` virtio-blk request
    completion, ``net`` virtio-net receive and transmit, ``ata`` AHCI completion), made
    from its diff with ``patchbox build --qemu``: ``patchbox apply -p PID --json``, the
    guest's loop left to run through the patched code, ``patchbox remove -p PID --json``;
  - ``patchbox list -p PID --json``, a control: asks the agent, changes nothing;
  - one same-host live migration (``Guest.migrate_local``: QEMU's default migration
    settings, over a unix socket), what operators do today to get a VM off a QEMU;
  - after each operation, an idle window of the same length (nothing done).
The guest prints a PROGRESS line every 100 ms of its own clock, which stops while its VM
is stopped; the harness stamps every line with the host's clock as it reads it. An
operation's guest-visible pause is the longest host-clock interval between consecutive
PROGRESS lines overlapping the operation's wall time (from the command's start to its
end, the destination's start to the source's exit for a migration); the idle windows
give the same measure with nothing done. Beside it: QEMU's own ``downtime`` of each
migration, the agent's own time for each apply and remove (``elapsed_ns`` of its reply)
and the threads patchbox held (``held_threads``: 0 means no thread, vCPU or other, was
stopped). The run fails unless the guest ends with 0 errors and 0 lost datagrams (but
those QEMU drops as a migration's source stops, counted apart: Guest.switchover_losses)
and each patch's report lines appeared while it was applied and stopped once it was
removed. docs/benchmarks.md has a run's table.
Not a test: numbers depend on the machine; ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:  # the test guest's harness, scripts/guest, as `python -m guest` finds it
    from guest.datapath import CHANGES, build, count_hits
    from guest.harness import Guest, GuestConfig, Migration
    from guest.image import ensure_image
    from guest.serial import GuestLog, analyze, host_gaps
except ModuleNotFoundError as e:
    raise SystemExit(
        "bench_guest_pause: run with scripts/ on the path:"
        " PYTHONPATH=scripts .venv/bin/python -m benchmarks.bench_guest_pause"
    ) from e

from .common import ROOT, print_table

PATCHES = ("blk", "net", "ata")
# A patchbox command that asks the agent and changes nothing: what the CLI's own start-up
# and exchange cost the guest, beside apply and remove.
CONTROL = "list (control)"
HEADER = (
    "operation",
    "n",
    "pause (host)",
    "max",
    "idle, same length",
    "ratio",
    "added",
    "guest clock",
    "reported",
    "held threads",
    "wall",
    "CLI CPU",
)
PATCHBOX = str(Path(sys.executable).parent / "patchbox")


@dataclass(frozen=True)
class Op:
    """One operation (or idle window): its kind (``apply blk``, ``migrate``, ``idle
    migrate``: the idle window after a migration), its host-time span, and what the
    tool reported: the agent's time and the threads held (patchbox), QEMU's downtime and
    the source's STOP to the destination's RESUME (migration)."""

    kind: str
    start: float
    end: float
    agent_ms: float | None = None
    held_threads: int | None = None
    downtime_ms: float | None = None
    stop_to_resume_ms: float | None = None
    cli_cpu_ms: float | None = None


@dataclass
class Run:
    """What :func:`measure` saw."""

    ops: list[Op] = field(default_factory=list)
    log: GuestLog = field(default_factory=GuestLog)
    hits: dict[str, list[int]] = field(default_factory=dict)  # per patch, per applied span
    hits_after_remove: dict[str, int] = field(default_factory=dict)
    migrations: list[Migration] = field(default_factory=list)
    qemu: str = ""
    build_s: dict[str, float] = field(default_factory=dict)
    boot_s: float = 0.0
    peer: str = ""
    progress_ms: int = 0
    # The guest's lost datagrams: those QEMU dropped as the source stopped (seq ->
    # migration number, Guest.switchover_losses), and any other.
    lost_at_switchover: dict[int, int] = field(default_factory=dict)
    other_losses: list[int] = field(default_factory=list)


def project_qemu() -> Path:
    """Returns the project's QEMU (built on first use: tens of minutes)."""
    proc = subprocess.run(
        [str(ROOT / "scripts" / "qemu" / "build-qemu.sh")],
        env={**os.environ, "PATCHBOX": PATCHBOX},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"build-qemu.sh failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def patchbox_json(*args: str) -> tuple[object, float]:
    """Returns the JSON a patchbox command printed, and the CPU time it used (s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [PATCHBOX, *args, "--json"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"patchbox {' '.join(args)}: {proc.stderr.strip()}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    out: object = json.loads(proc.stdout)
    return out, cpu


def number(value: object) -> float:
    assert isinstance(value, int | float)
    return float(value)


def timed_patchbox(kind: str, *args: str) -> Op:
    """Returns the operation ``patchbox ARGS --json`` as it ran."""
    t0 = time.monotonic()
    out, cpu = patchbox_json(*args)
    t1 = time.monotonic()
    if not isinstance(out, dict):  # list: rows, no times
        return Op(kind, t0, t1, cli_cpu_ms=1e3 * cpu)
    held = out.get("held_threads")
    return Op(
        kind,
        t0,
        t1,
        agent_ms=number(out["elapsed_ns"]) / 1e6,
        held_threads=int(number(held)) if held is not None else None,
        cli_cpu_ms=1e3 * cpu,
    )


def idle(kind: str, seconds: float) -> Op:
    """Returns an idle window of ``seconds`` (nothing done), after it passed."""
    t0 = time.monotonic()
    time.sleep(seconds)
    return Op(f"idle {kind}", t0, time.monotonic())


def measure(work: Path, cycles: int, progress_ms: int) -> Run:
    """Returns the operations of ``cycles`` rounds on one guest, and its log."""
    run = Run(progress_ms=progress_ms)
    cached = project_qemu()
    # A copy: a rebuild of the cache (another user relinking the agent) must not change
    # the binary the patches are built for under the running guest.
    exe = work / "qemu-system-x86_64"
    shutil.copy2(cached, exe)
    src, build_dir = cached.parent.parent / "src", cached.parent
    run.qemu = f"{cached} (copied to {exe})"
    pbx = {}
    for name in PATCHES:
        t0 = time.monotonic()
        pbx[name] = build(
            src, exe, CHANGES[name], work / "patches", patchbox=PATCHBOX, build_dir=build_dir
        )
        run.build_s[name] = time.monotonic() - t0
    run.hits = {name: [] for name in PATCHES}
    config = GuestConfig(qemu=str(exe), progress_ms=progress_ms)
    with Guest(ensure_image(), work / "guest", config) as g:
        g.wait_ready()
        run.boot_s = g.boot_seconds or 0.0
        g.wait_progress(3)
        for _ in range(cycles):
            for name in PATCHES:
                assert g.proc is not None
                pid = str(g.proc.pid)
                before = count_hits(g.qemu_log.read_text(errors="replace"))[name]
                op = timed_patchbox(f"apply {name}", "apply", "-p", pid, str(pbx[name]))
                run.ops += [op, idle(op.kind, op.end - op.start)]
                g.wait_progress(0.5)  # the loop through the patched code
                op = timed_patchbox(f"remove {name}", "remove", "-p", pid, f"pbx-{name}")
                after = count_hits(g.qemu_log.read_text(errors="replace"))[name]
                run.hits[name].append(after - before)
                run.ops += [op, idle(op.kind, op.end - op.start)]
                g.wait_progress(0.3)
            assert g.proc is not None
            op = timed_patchbox(CONTROL, "list", "-p", str(g.proc.pid))
            run.ops += [op, idle(op.kind, op.end - op.start)]
            g.wait_progress(0.3)
            m = g.migrate_local()
            run.migrations.append(m)
            op = Op(
                "migrate",
                m.began,
                m.ended,
                downtime_ms=m.downtime_ms,
                stop_to_resume_ms=1e3 * m.event_pause_s,
            )
            g.wait_progress(0.3)
            run.ops += [op, idle(op.kind, op.end - op.start)]
            g.wait_progress(0.3)
        settled = count_hits(g.qemu_log.read_text(errors="replace"))
        g.wait_progress(1)
        now = count_hits(g.qemu_log.read_text(errors="replace"))
        run.hits_after_remove = {n: now[n] - settled[n] for n in PATCHES}
        run.log = g.stop()
        run.peer = str(g.peer.counts if g.peer else None)
        explained, run.other_losses = g.switchover_losses(run.log)
        run.lost_at_switchover = {seq: m.number for seq, m in explained.items()}
    return run


def pause(log: GuestLog, op: Op) -> tuple[float, float]:
    """Returns the longest interval between consecutive PROGRESS lines overlapping
    ``op``: on the host's clock and on the guest's (seconds)."""
    prog = [(r.host_t, r.num("t")) for r in log.progress() if r.host_t is not None]
    spans = [
        (b[0] - a[0], b[1] - a[1])
        for a, b in zip(prog, prog[1:])
        if b[0] >= op.start and a[0] <= op.end
    ]
    if not spans:
        raise SystemExit(f"no PROGRESS line around {op.kind} at {op.start:.3f}")
    return max(s[0] for s in spans), max(s[1] for s in spans)


@dataclass(frozen=True)
class Switchover:
    """The PROGRESS interval holding a migration's VM stop, in three parts on the
    host's clock (seconds): from its first line to the source's STOP, STOP to the
    destination's RESUME, RESUME to its second line; its length on the guest's clock;
    and the longest other interval overlapping the migration."""

    before: float
    stopped: float
    after: float
    guest: float
    others: float

    @property
    def host(self) -> float:
        return self.before + self.stopped + self.after


def split_migration(log: GuestLog, m: Migration) -> Switchover:
    """Returns migration ``m``'s switchover interval, taken apart."""
    prog = [(r.host_t, r.num("t")) for r in log.progress() if r.host_t is not None]
    pairs = list(zip(prog, prog[1:]))
    found = [(a, b) for a, b in pairs if a[0] <= m.stopped and b[0] >= m.resumed]
    others = [
        b[0] - a[0] for a, b in pairs if b[0] >= m.began and a[0] <= m.ended and (a, b) not in found
    ]
    if not found:
        raise SystemExit(f"no PROGRESS interval holds migration {m.number}'s stop")
    a, b = found[0]
    return Switchover(
        before=m.stopped - a[0],
        stopped=m.resumed - m.stopped,
        after=b[0] - m.resumed,
        guest=b[1] - a[1],
        others=max(others, default=0.0),
    )


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.0f} ms"


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def rows(run: Run) -> list[tuple[str, ...]]:
    """Returns the table's rows: per kind of operation, its pauses beside its idle
    windows', and what the tools reported."""
    kinds = [f"apply {n}" for n in PATCHES] + [f"remove {n}" for n in PATCHES]
    kinds += [CONTROL, "migrate"]
    out: list[tuple[str, ...]] = []
    pauses: dict[str, list[float]] = {}
    for kind in kinds:
        ops = [o for o in run.ops if o.kind == kind]
        quiet = [o for o in run.ops if o.kind == f"idle {kind}"]
        host = [pause(run.log, o)[0] for o in ops]
        guest = [pause(run.log, o)[1] for o in ops]
        calm = [pause(run.log, o)[0] for o in quiet]
        pauses[kind] = host
        if kind == "migrate":
            reported = f"downtime {med([o.downtime_ms or 0 for o in ops]):.0f} ms"
            reported += f" (max {max(o.downtime_ms or 0 for o in ops):.0f})"
            held = "VM stopped"
        elif kind == CONTROL:
            reported, held = "", ""
        else:
            agent = [o.agent_ms or 0 for o in ops]
            reported = f"agent {med(agent):.2f} ms (max {max(agent):.2f})"
            held = str(max(o.held_threads or 0 for o in ops))
        out.append(
            (
                kind,
                str(len(ops)),
                ms(med(host)),
                ms(max(host)),
                ms(med(calm)),
                f"x{med(host) / med(calm):.2f}",
                f"{1e3 * (med(host) - med(calm)):+.0f} ms",
                ms(med(guest)),
                reported,
                held,
                ms(med([o.end - o.start for o in ops])),
                ms(med([o.cli_cpu_ms or 0 for o in ops]) / 1e3) if kind != "migrate" else "",
            )
        )
    patched = [p for k, v in pauses.items() if k not in ("migrate", CONTROL) for p in v]
    mig = pauses["migrate"]
    ratio: tuple[str, ...] = ("migrate / apply+remove", "", f"x{med(mig) / med(patched):.2f}")
    ratio += (f"x{max(mig) / max(patched):.2f}",)
    out.append(ratio + ("",) * (len(HEADER) - len(ratio)))
    return out


def summary(run: Run) -> list[str]:
    """Returns the lines said under the table; SystemExit if the guest lost anything."""
    s = analyze(run.log)
    ops = [o for o in run.ops if not o.kind.startswith("idle")]
    free = [
        b - a for a, b in host_gaps(run.log) if not any(b >= o.start and a <= o.end for o in ops)
    ]
    lines = [
        f"guest: {s.iterations} iterations, {s.ops} checked operations in {s.seconds:.0f} s"
        f" of its clock; errors={s.errors} lost={s.lost} late={s.late}"
        f" missing PROGRESS lines={s.missing_seqs}; peer {run.peer}",
        f"longest PROGRESS interval outside every operation: {ms(max(free))}"
        f" (median {ms(med(free))}, n={len(free)}); PROGRESS asked every"
        f" {run.progress_ms} ms",
        "patch report lines while applied, per cycle: "
        + "; ".join(f"{n} {run.hits[n]}" for n in PATCHES)
        + f"; in the 1 s after the last remove: {run.hits_after_remove}",
        f"QEMU: {run.qemu}; boot to READY {run.boot_s:.1f} s; patch builds "
        + ", ".join(f"{n} {t:.1f} s" for n, t in run.build_s.items()),
        "migrations: total-time "
        + ", ".join(f"{m.total_ms:.0f}" for m in run.migrations)
        + " ms; STOP to RESUME "
        + ", ".join(f"{1e3 * m.event_pause_s:.0f}" for m in run.migrations)
        + f" ms; RAM sent {med([m.ram_bytes for m in run.migrations]) / 2**20:.0f} MiB"
        + f"; frames handed over {sum(m.frames_moved for m in run.migrations)}",
        f"load average {os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} CPUs",
    ]
    split = [split_migration(run.log, m) for m in run.migrations]
    lines.append(
        "migrate, the PROGRESS interval holding the VM's stop (median, host clock):"
        f" {ms(med([x.host for x in split]))} = last line to STOP"
        f" {ms(med([x.before for x in split]))} + STOP to RESUME"
        f" {ms(med([x.stopped for x in split]))} + RESUME to next line"
        f" {ms(med([x.after for x in split]))} (max {ms(max(x.after for x in split))});"
        f" {ms(med([x.guest for x in split]))} on the guest's clock; the longest other"
        f" interval of the migration: median {ms(med([x.others for x in split]))},"
        f" max {ms(max(x.others for x in split))}"
    )
    lost = len(run.lost_at_switchover)
    lines.append(
        f"datagrams QEMU dropped as a migration's source stopped its VM: {lost}"
        + (f" (seq: migration {run.lost_at_switchover})" if lost else "")
    )
    kinds = [r.fields.get("kind") for r in run.log.errors()]
    bad = (s.errors - lost, s.lost - lost, s.late, len(run.other_losses), kinds != ["lost"] * lost)
    no_hits = [n for n in PATCHES if min(run.hits[n]) == 0]
    if any(bad) or no_hits or any(run.hits_after_remove.values()):
        lines.append(
            f"FAILED: other errors/lost/late/unexplained losses/other kinds {bad},"
            f" patches never seen {no_hits}"
        )
        for rec in run.log.errors():
            lines.append(rec.text)
        print("\n".join(lines))
        raise SystemExit(1)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=10, help="rounds: 3 apply+remove, 1 migration")
    ap.add_argument("--work", type=Path, help="work directory, kept (default: a temporary one)")
    ap.add_argument(
        "--progress-ms", type=int, default=20, help="the guest's PROGRESS interval (resolution)"
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_guest_pause: needs root (the guest's network namespace)")
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        run = measure(args.work, args.cycles, args.progress_ms)
    else:
        with tempfile.TemporaryDirectory(prefix="pbx-guest-pause-") as tmp:
            run = measure(Path(tmp), args.cycles, args.progress_ms)
    print_table(HEADER, rows(run))
    print()
    print("\n".join(summary(run)))


if __name__ == "__main__":
    main()
