#!/usr/bin/env python3
"""Differential testing of the whole pipeline on Csmith programs (docs/differential.md).

For each program seed: Csmith generates a program; a mutant of one kind (mutate.py) is
made from it; both are built as small make trees with the agent (driver.c holds the
process before the program's first line); the mutant's unified diff goes through
``patchbox build --source TREE --diff FIX --binary prog``; then, in the running original:

  apply, fork-run   must print what the mutant prints when started fresh
  remove, fork-run  must print what the original prints
  iter o, apply, iter m, iter m, remove, iter o
                    (in the process itself, globals carried from iteration to iteration)
                    must print what the oracle build prints: one program holding both
                    versions over the same globals, switched at the same iterations

A refusal (by ``patchbox build`` or ``apply``) is allowed and recorded with its reason; a
divergence never is. Results are cached per (seed, kind) under --cache, so a run resumes
where it stopped:

  scripts/difftest/difftest.py --programs 1000 -j 2     # the diff_full tier
  scripts/difftest/difftest.py --seeds 1-50 -j 2        # some seeds, kinds by seed
  scripts/difftest/difftest.py --seed 115 --kind stmt_remove --keep /tmp/s115  # one, kept
  scripts/difftest/difftest.py --report                 # the tables of the cache
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mutate import (  # noqa: E402 (needs HERE on sys.path, set above)
    KINDS,
    Mutation,
    mutate,
    oracle_source,
    parse,
)

# Bump when programs, mutations or checks change: results of another version are not
# reused.
VERSION = "6"
DEFAULT_CACHE = Path(os.environ.get("PATCHBOX_DIFF_CACHE", "/var/cache/patchbox/diff"))
BIN = Path(sys.executable).parent
# Small programs (a tenth of a second to compile): few functions, shallow blocks, small
# arrays; no bit-fields or packed structs (their code is Csmith's, not ours to test).
CSMITH_OPTS = [
    "--concise",
    "--max-funcs",
    "5",
    "--max-block-depth",
    "3",
    "--max-block-size",
    "4",
    "--max-array-dim",
    "2",
    "--max-array-len-per-dim",
    "4",
    "--max-expr-complexity",
    "5",
    "--max-struct-fields",
    "4",
    "--max-union-fields",
    "3",
    "--no-bitfields",
    "--no-packed-struct",
]
# Optimisation levels cycled through by seed: -O1 keeps more functions out of line, -O3
# and -Os make other clones (.constprop, .isra, .part) and inline differently.
OPT_LEVELS = ("-O2", "-O3", "-O1", "-O2", "-Os", "-O3")
CANDIDATES = 4  # mutants tried per (seed, kind) until one prints something else
RUN_TIMEOUT = 10.0  # seconds one run of a program may take once it is known to be quick
FRESH_TIMEOUT = 2.0  # seconds a fresh original or mutant may take (most take ~10 ms)
MAKEFILE = """\
# A differential-test program (scripts/difftest): Csmith's program and the driver that
# holds it, built with the agent.
CFLAGS += {opt} -fPIE -w -I/usr/include/csmith {cflags}
LDLIBS := {libs}

prog: driver.o prog.o
\t$(CC) -pie driver.o prog.o $(LDLIBS) -o $@

# Csmith's main becomes csmith_main, which the driver calls.
prog.o: prog.c
\t$(CC) $(CFLAGS) -Dmain=csmith_main -c prog.c -o prog.o

driver.o: driver.c
\t$(CC) $(CFLAGS) -c driver.c -o driver.o
"""


@dataclass
class Result:
    """One (seed, kind): what was done and how it ended.

    status: ``patched`` (every check passed), ``refused`` (build or apply refused, with
    ``reason``), ``diverged`` (a check failed: a bug), ``error`` (patchbox failed
    without a refusal, e.g. a traceback: a bug too), ``invalid`` (no usable mutant: it
    did not build, crashed or ran too long), ``n/a`` (the program has no place for the
    kind), ``slow`` (the original itself runs too long)."""

    seed: int
    kind: str
    opt: str = ""
    status: str = ""
    reason: str = ""
    what: str = ""
    observable: bool = False  # the mutant prints something other than the original
    mid_run: str = ""  # "same", "diverged", "skipped (...)"
    candidates: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    entry_jumps: int = 0  # replaced functions redirected by an entry jump (odd entries)
    private: list[str] = field(default_factory=list)  # globals the patch carries as copies
    seconds: float = 0.0


class Failed(Exception):
    """A step failed; the message says which and why."""


def sh(
    args: list[str | Path],
    cwd: Path | None = None,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Returns the finished process (not checked)."""
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})},
        check=False,
    )


_FLAGS: list[tuple[str, str]] = []


def patchbox_flags() -> tuple[str, str]:
    """Returns (cflags, libs) of ``patchbox config``, as a user's build gets them (asked
    once per process)."""
    if _FLAGS:
        return _FLAGS[0]
    cflags = sh([BIN / "patchbox", "config", "--cflags"]).stdout.strip()
    libs = sh([BIN / "patchbox", "config", "--libs", "--app-version", "difftest"]).stdout.strip()
    if not cflags or not libs:
        raise Failed("patchbox config printed no flags")
    _FLAGS.append((cflags, libs))
    return cflags, libs


def write_tree(tree: Path, source: str, opt: str, flags: tuple[str, str]) -> None:
    """Writes a make tree of one program: prog.c, driver.c, Makefile."""
    tree.mkdir(parents=True, exist_ok=True)
    (tree / "prog.c").write_text(source)
    shutil.copy(HERE / "driver.c", tree / "driver.c")
    (tree / "Makefile").write_text(MAKEFILE.format(opt=opt, cflags=flags[0], libs=flags[1]))


def make(tree: Path) -> str | None:
    """Returns None once ``make`` built prog in ``tree``, else the compiler's complaint."""
    proc = sh(["make", "-s"], cwd=tree)
    return None if proc.returncode == 0 else (proc.stderr or proc.stdout)[-2000:]


class Held:
    """A running program held by its driver: commands in, each run's output back."""

    def __init__(self, exe: Path, sock_dir: Path) -> None:
        sock_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PATCHBOX_SOCK_DIR": str(sock_dir), "PATCHBOX_LOG": "0"}
        self.proc = subprocess.Popen(
            [str(exe)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            # Its own process group: stop() ends the forked runs too (a run that loops
            # for minutes would go on after its driver, as an orphan).
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.buf = b""
        self.socket = sock_dir / f"sandbox-sock{self.pid}"
        if self._until(b"ready\n", 10) != b"":
            raise Failed("driver printed something before 'ready'")

    def wait_agent(self) -> None:
        """Returns once the agent's socket exists."""
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline:
                raise Failed("agent socket never appeared")
            time.sleep(0.01)

    def _until(self, marker: bytes, timeout: float) -> bytes:
        """Returns the output before the line starting with ``marker`` (consumed too)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            at = self.buf.find(marker)
            if at >= 0 and (at == 0 or self.buf[at - 1 : at] == b"\n"):
                end = self.buf.index(b"\n", at) + 1 if b"\n" in self.buf[at:] else -1
                if end > 0:
                    out, self.buf = self.buf[:at], self.buf[end:]
                    return out
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed(f"no {marker!r} within {timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise Failed(f"program exited (status {self.proc.wait()}) before {marker!r}")
                self.buf += chunk

    def run(self, command: str, timeout: float = RUN_TIMEOUT) -> str:
        """Returns the output of one run (``fork`` or ``iter X``), its end marker's status
        appended when not 0."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        word = command.split(maxsplit=1)[0]
        out = self._until(f"=== {word} ".encode(), timeout)
        return out.decode(errors="replace")

    def stop(self) -> None:
        """Returns once the process and every run it forked are gone."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
                self.proc.wait(2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()


def fresh(
    exe: Path, commands: list[str], sock_dir: Path, timeout: float = RUN_TIMEOUT
) -> list[str]:
    """Returns the outputs of ``commands`` run by a freshly started ``exe``; a run that
    crashed ends with a line saying so."""
    held = Held(exe, sock_dir)
    try:
        return [held.run(c, timeout) for c in commands]
    finally:
        held.stop()


def run_ok(out: str) -> bool:
    """Returns whether a run's output is a whole Csmith output (a crashed child's is cut
    short of the final checksum line)."""
    return "checksum = " in out


REFUSALS = [
    ("static variable folded", re.compile(r"is gone from the patched object")),
    ("static variable made read-only", re.compile(r"is read-only in the patched object")),
    ("read-only static written", re.compile(r"is read-only in the running program")),
    ("written static folded away", re.compile(r"is not in the original object: the compiler")),
    ("initial value changed", re.compile(r"initial value of existing variable changed")),
    ("variable size changed", re.compile(r"size of existing variable changed")),
    ("layout changed", re.compile(r"layout changed")),
    ("no function changed", re.compile(r"changes no function")),
    ("inlined copies", re.compile(r"is inlined into|--allow-inlined")),
    ("no patchable entry", re.compile(r"patchable entry|no padding|entry jump")),
    ("unsupported relocation", re.compile(r"relocation")),
]


def refusal(text: str) -> tuple[str, str]:
    """Returns (category, message) of a refusal patchbox printed (``--explain`` output,
    then stderr): the message is its error line and the explanation's ``refused`` lines;
    category ``""`` when the output is no refusal (a traceback, or no error line)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if "Traceback (most recent call last)" in text:
        return "", text.strip()[-1500:]
    said = [ln for ln in lines if ln.startswith("refused ") or "error:" in ln]
    if not said:
        return "", text.strip()[-1500:]
    message = " | ".join(said)[:1500]
    for name, pat in REFUSALS:
        if pat.search(message):
            return name, message
    return "other", message


def first_difference(a: str, b: str) -> str:
    """Returns the first differing line of two outputs, as 'line N: A != B'."""
    la, lb = a.splitlines(), b.splitlines()
    for n, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return f"line {n + 1}: {x!r} != {y!r}"
    return f"{len(la)} lines != {len(lb)} lines"


def inlined_functions(obj: Path, source: str) -> frozenset[str]:
    """Returns the func_N of ``source`` that ``obj`` has no code for under any name
    (GCC inlined them into every caller)."""
    defined = {
        line.split()[-1].split(".")[0]
        for line in sh(["nm", obj]).stdout.splitlines()
        if len(line.split()) == 3 and line.split()[1] in "tT"
    }
    return frozenset(set(re.findall(r"\bfunc_\d+\b", source)) - defined)


def executed_lines(work: Path, source: str) -> frozenset[int] | None:
    """Returns the 1-based lines of ``source`` a run executes (gcov of an -O0 build), or
    None if it cannot be built so; raises TimeoutExpired if the run takes too long."""
    cov = work / "cov"
    cov.mkdir(parents=True, exist_ok=True)
    (cov / "prog.c").write_text(source)
    if sh(
        ["gcc", "-O0", "--coverage", "-w", "-I/usr/include/csmith", "prog.c", "-o", "cov"], cwd=cov
    ).returncode:
        return None
    # At -O0 a program takes a few times longer than built as the test builds it; over
    # 3 s it is too slow to test (TimeoutExpired, for the caller).
    sh([cov / "cov", "1"], cwd=cov, timeout=3)
    report = sh(["gcov", "-t", "cov-prog.gcda"], cwd=cov).stdout
    lines = set()
    for row in report.splitlines():
        count, _, rest = row.partition(":")
        count = count.strip().rstrip("*")
        if count.isdigit() and int(count) > 0:
            lines.add(int(rest.partition(":")[0]))
    return frozenset(lines)


def build_oracle(
    work: Path, original: str, mutant: str, opt: str, private: frozenset[str] = frozenset()
) -> Path:
    """Returns the oracle binary: both versions over one set of globals (no agent), but
    for the ``private`` ones the patch carries as its own (``oracle_source``)."""
    odir = work / "oracle"
    odir.mkdir(parents=True, exist_ok=True)
    (odir / "oracle.c").write_text(oracle_source(original, mutant, private))
    exe = odir / "oracle"
    proc = sh(
        [
            "gcc",
            opt,
            "-w",
            "-I/usr/include/csmith",
            "-DPB_ORACLE",
            HERE / "driver.c",
            odir / "oracle.c",
            "-o",
            exe,
        ]
    )
    if proc.returncode:
        raise Failed(f"oracle does not build: {proc.stderr[-1500:]}")
    return exe


def unstable(work: Path, tree: Path, source: str, commands: list[str], expected: list[str]) -> bool:
    """Returns whether ``source`` prints otherwise at -O0 than ``expected``: the program
    (or mutant) depends on undefined behaviour, so a difference says nothing of patchbox."""
    t = work / ("ub-" + tree.name)
    write_tree(t, source, "-O0", patchbox_flags())
    if make(t):
        return True
    return fresh(t / "prog", commands, work / "sock") != expected


def patchbox(*args: str) -> subprocess.CompletedProcess[str]:
    """Returns the finished ``patchbox ARGS``, run through the command's own entry (click
    group ``patchbox.cli.main.cli``) in this process: the same code as the executable
    without an interpreter start per command (a second each on a loaded machine, four
    times per mutant). An exception other than an exit is reported as a traceback."""
    from click.testing import CliRunner

    from patchbox.cli.main import cli

    result = CliRunner(mix_stderr=False).invoke(cli, list(args), prog_name="patchbox")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        assert result.exc_info is not None
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(["patchbox", *args], result.exit_code, result.stdout, stderr)


def apply_cmd(pid: int, patch: Path) -> subprocess.CompletedProcess[str]:
    """Returns the finished ``patchbox apply -p PID PATCH``."""
    return patchbox("apply", "-p", str(pid), str(patch))


def remove_cmd(pid: int) -> subprocess.CompletedProcess[str]:
    """Returns the finished ``patchbox remove -p PID fix``."""
    return patchbox("remove", "-p", str(pid), "fix")


def check(seed: int, kind: str, work: Path, flags: tuple[str, str]) -> Result:
    """Returns the result of one (seed, kind) in the empty directory ``work``."""
    opt = OPT_LEVELS[(seed // len(KINDS)) % len(OPT_LEVELS)]
    res = Result(seed, kind, opt)
    run = _Check(res, work, flags)
    try:
        orig = run.original()
        mutant = run.mutant(orig)
        patch, explained = run.build_fix(orig, mutant)
        expected = run.oracle(orig, mutant, explained)
        run.judge(orig, mutant, run.live(orig, patch, expected), expected)
    except _Stop as stop:
        res.status, res.reason = stop.status, stop.reason
    return res


# The mid-run check: in the running original, switched at the same iterations as the
# oracle switches (apply before the second, remove before the fourth).
MID_CMDS = ("iter o", "iter m", "iter m", "iter o")


class _Stop(Exception):
    """Ends :func:`check` early with the result's status and reason."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class _Original:
    """The original program of one (seed, kind), built and run once."""

    source: str
    live: frozenset[int] | None  # its executed lines (1-based), None if unknown
    tree: Path
    fork: str  # what it prints started fresh
    inlined: frozenset[str]  # functions its object does not define (inlined everywhere)


@dataclass(frozen=True)
class _Mutant:
    """The mutant chosen: the mutation, what it prints started fresh, its tree."""

    mutation: Mutation
    fork: str
    tree: Path


@dataclass(frozen=True)
class _Live:
    """What the running original printed: patched, after the removal, and mid-run."""

    patched: str
    removed: str
    mid: list[str]
    mid_failed: str  # why the mid-run iterations stopped early ("" if they did not)


class _Check:
    """The steps of :func:`check`, each setting what it learns in the result; a step that
    ends the check raises _Stop."""

    def __init__(self, res: Result, work: Path, flags: tuple[str, str]) -> None:
        self.res, self.work, self.flags = res, work, flags
        self.sock = work / "sock"

    def original(self) -> _Original:
        """Returns Csmith's program of the seed, built and run once; stops if it has no
        place for the kind, does not build, crashes or is slow."""
        res, work = self.res, self.work
        # Csmith writes platform.info into its working directory.
        gen = sh(
            ["csmith", "--seed", str(res.seed), *CSMITH_OPTS, "-o", work / "csmith.c"], cwd=work
        )
        if gen.returncode:
            raise Failed(f"csmith: {gen.stderr[-500:]}")
        # The options line names the output file: the same text whatever the directory.
        source = (work / "csmith.c").read_text().replace(str(work / "csmith.c"), "prog.c")
        try:
            live = executed_lines(work, source)
        except subprocess.TimeoutExpired as err:
            raise _Stop("slow", "a run of the original (gcov build) takes over 3 s") from err
        if res.kind != "inline" and mutate(source, res.kind, res.seed, 0, live=live) is None:
            raise _Stop("n/a", "no place for this kind")
        orig = work / "orig"
        write_tree(orig, source, res.opt, self.flags)
        if failure := make(orig):
            raise _Stop("invalid", f"the original does not build: {failure}")
        try:
            [o_fork] = fresh(orig / "prog", ["fork"], self.sock, FRESH_TIMEOUT)
        except Failed as why:
            raise _Stop("slow", str(why)) from why
        if not run_ok(o_fork):
            raise _Stop("invalid", "the original crashes")
        return _Original(source, live, orig, o_fork, inlined_functions(orig / "prog.o", source))

    def mutant(self, orig: _Original) -> _Mutant:
        """Returns a mutant that builds, runs and, if any candidate does, prints something
        else than the original; stops if none builds and runs."""
        res = self.res
        chosen: _Mutant | None = None
        for c in range(CANDIDATES):
            m = mutate(orig.source, res.kind, res.seed, c, inlined=orig.inlined, live=orig.live)
            if m is None:
                break
            mdir = self.work / f"mut{c}"
            write_tree(mdir, m.text, res.opt, self.flags)
            if make(mdir):
                res.candidates.append(f"{m.what}: does not build")
                continue
            try:
                [m_fork] = fresh(mdir / "prog", ["fork"], self.sock, FRESH_TIMEOUT)
            except Failed as why:
                res.candidates.append(f"{m.what}: {why}")
                continue
            if not run_ok(m_fork):
                res.candidates.append(f"{m.what}: crashes")
                continue
            res.candidates.append(
                f"{m.what}: {'prints otherwise' if m_fork != orig.fork else 'prints the same'}"
            )
            if chosen is None or (m_fork != orig.fork and chosen.fork == orig.fork):
                chosen = _Mutant(m, m_fork, mdir)
            if m_fork != orig.fork:
                break
        if chosen is None:
            if not res.candidates:
                raise _Stop("n/a", "no place for this kind")
            raise _Stop("invalid", "no candidate builds and runs")
        res.what, res.observable = chosen.mutation.what, chosen.fork != orig.fork
        return chosen

    def build_fix(self, orig: _Original, mutant: _Mutant) -> tuple[Path, str]:
        """Returns (the patch, the explanation) ``patchbox build`` makes of the mutant's
        diff, the fix as an operator has it; stops if it refuses or fails."""
        res, work = self.res, self.work
        diff = sh(
            [
                "diff",
                "-u",
                "--label",
                "a/prog.c",
                "--label",
                "b/prog.c",
                orig.tree / "prog.c",
                mutant.tree / "prog.c",
            ]
        )
        (work / "fix.patch").write_text(diff.stdout)
        patch = work / "fix.pbx"
        build = sh(
            [
                BIN / "patchbox",
                "build",
                "--source",
                orig.tree,
                "--diff",
                work / "fix.patch",
                "--binary",
                "prog",
                "--name",
                "fix",
                "--explain",
                "-o",
                patch,
            ],
            timeout=600,
        )
        (work / "explain.txt").write_text(build.stdout + build.stderr)
        if build.returncode:
            category, message = refusal(build.stdout + build.stderr)
            if category == "no function changed" and res.observable:
                # A change the comparison missed: the patch would leave the old behaviour.
                raise _Stop(
                    "diverged",
                    f"build found no changed function, but the mutant prints otherwise: {message}",
                )
            if category:
                raise _Stop("refused", f"build: {category}: {message}")
            raise _Stop("error", f"build failed: {message}")
        from patchbox.format.layout import load_patch
        from patchbox.wire import RedirectKind

        functions = load_patch(patch).functions
        res.entry_jumps = sum(f.kind == RedirectKind.ENTRY_JUMP for f in functions)
        res.replaced = sorted(
            m.group(1) for m in re.finditer(r"^\s+in\s+function\s+(\S+)", build.stdout, re.M)
        )
        return patch, build.stdout

    def oracle(self, orig: _Original, mutant: _Mutant, explained: str) -> list[str] | None:
        """Returns what the oracle prints for MID_CMDS, None when there is none to compare
        with. The oracle first: the program run again on the globals its first run left
        can reach what Csmith does not guard against (a pointer to a dead local): then
        there is nothing to compare with, and the mid-run check is skipped."""
        res = self.res
        if res.kind == "data":
            res.mid_run = "skipped (a data change has no oracle)"
            return None
        # A global the original object lacks (folded: nothing stored to it) is carried
        # by the patch as a new variable, a copy of its own from the initial value, which
        # the original's code, constant-folded, never sees (docs/differential.md).
        carried = set(re.findall(r"^\s*carried\s+variable\s+(\S+)\s+new variable", explained, re.M))
        res.private = sorted(carried & {g.name for g in parse(orig.source).globals})
        oracle = build_oracle(
            self.work, orig.source, mutant.mutation.text, res.opt, frozenset(res.private)
        )
        try:
            return fresh(oracle, list(MID_CMDS), self.sock)
        except Failed as err:
            res.mid_run = f"skipped (the oracle: {err})"
            return None

    def live(self, orig: _Original, patch: Path, expected: list[str] | None) -> _Live:
        """Returns what the running original prints patched, after the removal and (with
        an oracle) mid-run; stops if apply or remove fails."""
        held = Held(orig.tree / "prog", self.sock)
        try:
            held.wait_agent()
            applied = apply_cmd(held.pid, patch)
            if applied.returncode:
                category, message = refusal(applied.stdout + applied.stderr)
                if category:
                    raise _Stop("refused", f"apply: {category}: {message}")
                raise _Stop("error", f"apply failed: {message}")
            p_fork = held.run("fork")
            removed = remove_cmd(held.pid)
            if removed.returncode:
                raise _Stop("error", f"remove failed: {removed.stderr.strip()[-800:]}")
            r_fork = held.run("fork")
            mid, mid_failed = _mid_run(held, patch) if expected is not None else ([], "")
        finally:
            held.stop()
        return _Live(p_fork, r_fork, mid, mid_failed)

    def judge(
        self, orig: _Original, mutant: _Mutant, run: _Live, expected: list[str] | None
    ) -> None:
        """Sets the result's status: patched, or diverged with the problems (the outputs
        kept in the work directory); stops if the mutant depends on undefined behaviour."""
        res = self.res
        problems = []
        if run.patched != mutant.fork:
            problems.append(
                f"patched run != fresh mutant: {first_difference(run.patched, mutant.fork)}"
            )
        if run.removed != orig.fork:
            problems.append(
                f"after remove != fresh original: {first_difference(run.removed, orig.fork)}"
            )
        if problems and unstable(
            self.work, mutant.tree, mutant.mutation.text, ["fork"], [mutant.fork]
        ):
            res.mid_run = "skipped"
            raise _Stop("invalid", "mutant depends on undefined behaviour (-O0 prints otherwise)")
        if expected is not None:
            problems += self._mid_run_problems(orig, mutant, run, expected)
        if not problems:
            res.status = "patched"
            return
        res.status, res.reason = "diverged", "; ".join(problems)
        for name, text in (
            ("p_fork", run.patched),
            ("m_fork", mutant.fork),
            ("r_fork", run.removed),
            ("o_fork", orig.fork),
        ):
            (self.work / f"{name}.txt").write_text(text)
        for i, text in enumerate(run.mid):
            (self.work / f"mid{i}.txt").write_text(text)

    def _mid_run_problems(
        self, orig: _Original, mutant: _Mutant, run: _Live, expected: list[str]
    ) -> list[str]:
        """Returns how the mid-run iterations differ from the oracle's (none if they do
        not, or if the oracle itself depends on undefined behaviour); sets ``mid_run``."""
        res = self.res
        if run.mid == expected:
            res.mid_run = "same"
            return []
        if _oracle_unstable(
            self.work,
            orig.source,
            mutant.mutation.text,
            list(MID_CMDS),
            expected,
            private=frozenset(res.private),
        ):
            res.mid_run = (
                "skipped (the oracle depends on undefined behaviour: -O0 prints otherwise)"
            )
            return []
        res.mid_run = "diverged"
        if run.mid_failed:
            return [f"mid-run {run.mid_failed} (the oracle ran all four)"]
        n = next(i for i in range(len(MID_CMDS)) if run.mid[i] != expected[i])
        return [f"mid-run iteration {n} != oracle: {first_difference(run.mid[n], expected[n])}"]


def _mid_run(held: Held, patch: Path) -> tuple[list[str], str]:
    """Returns (the outputs of MID_CMDS in the running original, patched for the middle
    two; why they stopped early, "" if they did not)."""
    mid: list[str] = []
    try:
        mid.append(held.run(MID_CMDS[0]))
        again = apply_cmd(held.pid, patch)
        if again.returncode:
            raise Failed(f"second apply failed: {again.stderr.strip()[-800:]}")
        mid += [held.run(MID_CMDS[1]), held.run(MID_CMDS[2])]
        again = remove_cmd(held.pid)
        if again.returncode:
            raise Failed(f"second remove failed: {again.stderr.strip()[-800:]}")
        mid.append(held.run(MID_CMDS[3]))
    except Failed as err:
        return mid, f"iteration {len(mid)}: {err}"
    return mid, ""


def _oracle_unstable(
    work: Path,
    original: str,
    mutant: str,
    cmds: list[str],
    expected: list[str],
    *,
    private: frozenset[str] = frozenset(),
) -> bool:
    """Returns whether the oracle prints otherwise at -O0, or does not finish there
    (carried state reached undefined behaviour: a second run of Csmith's code is outside
    its guarantees)."""
    try:
        return _oracle_o0(work, original, mutant, cmds, private) != expected
    except Failed:
        return True


def _oracle_o0(
    work: Path, original: str, mutant: str, cmds: list[str], private: frozenset[str]
) -> list[str]:
    """Returns the outputs of the oracle built at -O0."""
    exe = build_oracle(work / "o0", original, mutant, "-O0", private)
    return fresh(exe, cmds, work / "sock")


def kinds_of(seed: int, per_program: int) -> list[str]:
    """Returns the kinds tried on program ``seed``: ``per_program`` of them, cycling so
    every kind meets every optimisation level."""
    return [KINDS[(seed + i * 4) % len(KINDS)] for i in range(per_program)]


def run_one(seed: int, kind: str, cache: Path, keep: Path | None = None) -> dict[str, Any]:
    """Returns the result row of (seed, kind), computing and caching it if needed."""
    out = cache / f"v{VERSION}" / "results" / f"{seed}-{kind}.json"
    if out.exists() and keep is None:
        return dict(json.loads(out.read_text()))
    work = keep or cache / f"v{VERSION}" / "work" / f"{seed}-{kind}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    try:
        res = check(seed, kind, work, patchbox_flags())
    except (Failed, subprocess.TimeoutExpired) as err:
        res = Result(seed, kind, status="error", reason=f"harness: {err}")
    res.seconds = round(time.monotonic() - t0, 2)
    row = asdict(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.rename(out)
    if keep is None and res.status not in ("diverged", "error"):
        shutil.rmtree(work, ignore_errors=True)
    return row


TESTED = ("patched", "refused", "diverged", "error")


def run_many(
    jobs: list[tuple[int, str]], workers: int, cache: Path, programs: int = 0, per_program: int = 1
) -> list[dict[str, Any]]:
    """Returns the rows of ``jobs`` run by ``workers`` processes, or with ``programs``,
    of seeds 1, 2, ... until that many programs went through the pipeline (a program
    that is too slow, or has no place for its kind, does not count)."""
    rows: list[dict[str, Any]] = []
    pending = iter(jobs)
    if programs:
        pending = ((s, k) for s in range(1, 1 << 31) for k in kinds_of(s, per_program))
    tested: set[int] = set()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        running: dict[Future[dict[str, Any]], tuple[int, str]] = {}
        while True:
            while len(running) < 2 * workers and not (programs and len(tested) >= programs):
                job = next(pending, None)
                if job is None:
                    break
                running[pool.submit(run_one, *job, cache)] = job
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                del running[fut]
                row = fut.result()
                rows.append(row)
                if row["status"] in TESTED:
                    tested.add(row["seed"])
                n = len(rows)
                if row["status"] in ("diverged", "error") or n % 50 == 0 or len(jobs) <= 20:
                    print(
                        f"[{n} done, {len(tested)} programs] {row['seed']} {row['kind']} "
                        f"{row['status']} {row['reason'][:300]}",
                        file=sys.stderr,
                        flush=True,
                    )
    return rows


def load_rows(cache: Path) -> list[dict[str, Any]]:
    """Returns every cached result row."""
    return [
        json.loads(p.read_text())
        for p in sorted((cache / f"v{VERSION}" / "results").glob("*.json"))
    ]


def _category(row: dict[str, Any]) -> str:
    """Returns the column of a row: its status, ``no change`` for a build that found no
    changed function (the mutation compiled to the same code), ``refused`` otherwise."""
    if row["status"] == "refused" and "no function changed" in row["reason"]:
        return "no change"
    return str(row["status"])


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Returns counts per kind, per optimisation level and per refusal reason, and the
    divergences."""
    per_kind: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
    per_opt: dict[str, Counter[str]] = {}
    tested = {r["seed"] for r in rows if r["status"] in TESTED}
    reasons: Counter[str] = Counter()
    for r in rows:
        col = _category(r)
        for c in (per_kind[r["kind"]], per_opt.setdefault(r["opt"] or "-", Counter())):
            c[col] += 1
            c["observable"] += r["status"] == "patched" and r["observable"]
            c["mid_same"] += r.get("mid_run") == "same"
        if col == "refused":
            # Filed again from the stored message: the categories may have been refined.
            step, category, message = (r["reason"].split(": ", 2) + ["", ""])[:3]
            category = refusal(message)[0] or category
            reasons[f"{step}: {category}"] += 1
    return {
        "programs": len(tested),
        "seeds": len({r["seed"] for r in rows}),
        "mutants": len(rows),
        "per_kind": {k: dict(v) for k, v in per_kind.items()},
        "per_opt": {k: dict(v) for k, v in sorted(per_opt.items())},
        "refusals": dict(reasons.most_common()),
        "diverged": [r for r in rows if r["status"] in ("diverged", "error")],
    }


COLUMNS = ["patched", "refused", "no change", "diverged", "error", "invalid", "n/a", "slow"]


def table(s: dict[str, Any]) -> str:
    """Returns the summary as markdown tables: per kind, per optimisation level, and
    the refusals by reason. ``patchable`` is patched / (patched + refused): mutants the
    compiler turned into the same code (``no change``) are not in it."""
    out = [
        f"{s['seeds']} seeds, {s['programs']} programs through the pipeline, "
        f"{s['mutants']} mutants",
    ]
    for title, groups in (("kind", s["per_kind"]), ("level", s.get("per_opt", {}))):
        out += [
            "",
            f"| {title} | mutants | "
            + " | ".join(COLUMNS)
            + " | patchable | observable patched | mid-run same |",
            "|---" * (len(COLUMNS) + 5) + "|",
        ]
        total: Counter[str] = Counter()
        for name, c in groups.items():
            total.update(c)
            out.append(_row(name, c))
        out.append(_row("all", total))
    out += ["", "| refused at: reason | mutants |", "|---|---|"]
    out += [f"| {reason} | {n} |" for reason, n in s["refusals"].items()]
    return "\n".join(out)


def _row(name: str, c: Any) -> str:
    n = sum(c.get(x, 0) for x in COLUMNS)
    tried = c.get("patched", 0) + c.get("refused", 0) + c.get("diverged", 0) + c.get("error", 0)
    frac = f"{100 * c.get('patched', 0) / tried:.0f} %" if tried else "-"
    return (
        f"| {name} | {n} | "
        + " | ".join(str(c.get(x, 0)) for x in COLUMNS)
        + f" | {frac} | {c.get('observable', 0)} | {c.get('mid_same', 0)} |"
    )


def parse_seeds(spec: str) -> list[int]:
    """Returns the seeds of '1-100,200,300-310'."""
    seeds: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        seeds += range(int(a), int(b or a) + 1)
    return seeds


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0 when no (seed, kind) diverged or errored."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", default="", help="program seeds, e.g. 1-1000")
    ap.add_argument("--seed", type=int, help="one program seed")
    ap.add_argument(
        "--kind", choices=KINDS, action="append", help="mutation kind(s) (default: by seed)"
    )
    ap.add_argument(
        "--programs",
        type=int,
        default=0,
        help="go through seeds from 1 until this many programs went through the pipeline",
    )
    ap.add_argument(
        "--per-program", type=int, default=1, help="kinds tried per program (default 1)"
    )
    ap.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--keep", type=Path, help="work directory kept (one seed and kind; not cached)")
    ap.add_argument("--report", action="store_true", help="print the table of the cache")
    ap.add_argument("--json", type=Path, help="write the summary there")
    args = ap.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else parse_seeds(args.seeds) if args.seeds else []
    jobs = [(s, k) for s in seeds for k in (args.kind or kinds_of(s, args.per_program))]
    rows: list[dict[str, Any]] = []
    if args.keep and len(jobs) == 1:
        rows.append(run_one(*jobs[0], args.cache, keep=args.keep))
        print(json.dumps(rows[0], indent=1))
    elif jobs or args.programs:
        rows = run_many(jobs, args.jobs, args.cache, args.programs, args.per_program)
    if args.report or args.json:
        rows = load_rows(args.cache) if args.report else rows
    s = summary(rows)
    if args.json:
        args.json.write_text(json.dumps(s, indent=1))
    if args.report or len(jobs) > 1:
        print(table(s))
    return 1 if s["diverged"] else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
