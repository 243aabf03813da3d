"""Attach that cannot harm (issue 19; docs/reach.md, "Attach"): the client is killed
(SIGKILL, SIGTERM, SIGINT) while it holds a thread of the target, at each step and at
random instants, and afterwards every target is alive, running (it answers, with every
register of the borrowed thread as it was), traced by nobody, and either attached (the
agent answers) or untouched (no agent).

The targets (borrowed.c, no agent, no patchbox flag) check every register of their main
thread around each blocking call; most run with an LD_AUDIT library whose la_objopen
sleeps when libsandbox.so is opened, so that the call the thread is borrowed for lasts
long enough for a kill to land inside it. The client is a real process running
patchbox's attach, printing each step it reaches with a CLOCK_MONOTONIC timestamp, so
that the step a kill landed in is known. PATCHBOX_ATTACH_FAULTS sets how many random
kills the long test makes (default 210); docs/robustness.md records the counts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from live import HERE

from patchbox.config import preload
from patchbox.procfs import read_maps, read_status, task_ids
from patchbox.protocol.client import Client
from patchbox.protocol.discovery import discover
from patchbox.reach.attach import AttachError, LeftRunning, attach

pytestmark = pytest.mark.process

SLOW_AUDIT = r"""
#define _GNU_SOURCE
#include <link.h>
#include <string.h>
#include <time.h>
unsigned int la_version(unsigned int v) { (void)v; return LAV_CURRENT; }
unsigned int la_objopen(struct link_map *map, Lmid_t lmid, uintptr_t *cookie)
{
	(void)lmid; (void)cookie;
	if (strstr(map->l_name, "libsandbox")) {
		struct timespec ts = { 0, SLOW_MS * 1000000L };
		nanosleep(&ts, NULL);
	}
	return 0;
}
"""
# A client of its own: patchbox's attach in a process that can be killed. It reads the
# library's facts first (not part of the window), says "ready", waits for "go" (and,
# with a phase name, kills itself with the signal when it reaches it), then attaches.
CLIENT = r"""
import os, sys, time
from patchbox.reach.attach import attach, preflight
pid, lib, sig, at = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
preflight(pid, lib)
print("ready", time.monotonic_ns(), flush=True)
sys.stdin.readline()
def phase(name):
    print(name, time.monotonic_ns(), flush=True)
    if name == at:
        os.kill(os.getpid(), sig)
try:
    attach(pid, lib, on_phase=phase)
    print("done", time.monotonic_ns(), flush=True)
except Exception as err:
    print("error", time.monotonic_ns(), type(err).__name__, str(err).replace(chr(10), " "), flush=True)
"""
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
# Steps of the window, in order; a kill lands in the last one reached before it.
PHASES = ("seize", "seized", "frame", "call", "returned", "detached", "done")


def gcc(out: Path, src: Path | str, *flags: str) -> Path:
    if isinstance(src, str):
        out.with_suffix(".c").write_text(src)
        src = out.with_suffix(".c")
    subprocess.run(["gcc", "-O2", *flags, str(src), "-o", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("attachfaults")
    return {
        "exe": gcc(d / "borrowed", HERE / "borrowed.c", "-pthread"),
        "slow": gcc(d / "slow30.so", SLOW_AUDIT, "-shared", "-fPIC", "-DSLOW_MS=30"),
        "slower": gcc(d / "slow300.so", SLOW_AUDIT, "-shared", "-fPIC", "-DSLOW_MS=300"),
        "client": _write(d / "client.py", CLIENT),
    }


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@dataclass
class Borrowed:
    """A running borrowed.c: its mode and the answers it gives."""

    proc: subprocess.Popen[str]
    mode: str
    pid: int = 0
    asked: int = 0

    def ask(self, timeout: float = 10.0) -> tuple[str, int]:
        """Returns ("ok" or "bad MASK", calls made) for one line sent."""
        self.asked += 1
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{self.asked}\n")
        self.proc.stdin.flush()
        line = _readline(self.proc, timeout)
        words = line.split()
        assert words[0] == str(self.asked), line
        return " ".join(words[1:-1]), int(words[-1])


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"pid {proc.pid}: no answer within {timeout} s"
    line = proc.stdout.readline()
    assert line, f"pid {proc.pid} closed its output: {proc.poll()}"
    return line.strip()


def start(builds: dict[str, Path], mode: str, slow: str | None) -> Borrowed:
    env = {**os.environ}
    if slow:
        env["LD_AUDIT"] = str(builds[slow])
    proc = subprocess.Popen(
        [str(builds["exe"]), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    t = Borrowed(proc, mode)
    first = _readline(proc, 10)
    assert first == f"ready {proc.pid}", first
    t.pid = proc.pid
    return t


def spawn_client(builds: dict[str, Path], t: Borrowed, sig: int, at: str) -> subprocess.Popen[str]:
    """Returns a client for ``t``, starting (importing patchbox, reading libc's facts):
    :func:`ready` waits for it."""
    return subprocess.Popen(
        [sys.executable, str(builds["client"]), str(t.pid), str(preload()), str(sig), at],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def ready(client: subprocess.Popen[str]) -> subprocess.Popen[str]:
    """Returns ``client`` once it waits for "go"."""
    assert _readline(client, 30).startswith("ready")
    return client


def start_client(builds: dict[str, Path], t: Borrowed, sig: int, at: str) -> subprocess.Popen[str]:
    return ready(spawn_client(builds, t, sig, at))


def steps(client: subprocess.Popen[str]) -> list[tuple[str, int, str]]:
    """Returns the steps the (dead) client printed: (name, timestamp, rest); a line cut
    short by the kill is left out."""
    assert client.stdout is not None
    out = []
    for line in client.stdout.read().splitlines():
        name, ns, *rest = [*line.split(" ", 2), ""]
        if ns.isdigit():  # else a line cut short by the kill
            out.append((name, int(ns), " ".join(rest).strip()))
    return out


def tracers(pid: int) -> set[int]:
    """Returns the TracerPid of every thread of ``pid``."""
    return {int(read_status(pid).get("TracerPid", "0") or 0)} | {
        int(Path(f"/proc/{pid}/task/{t}/status").read_text().split("TracerPid:")[1].split()[0])
        for t in task_ids(pid)
    }


def settle(t: Borrowed) -> str:
    """Returns "attached" or "untouched" once target ``t`` has shown it runs on with its
    registers intact; fails the test otherwise."""
    assert t.proc.poll() is None, f"pid {t.pid} died: {t.proc.returncode}"
    regs, calls = t.ask()
    assert regs == "ok", f"pid {t.pid}: the borrowed thread came back with {regs}"
    if t.mode == "sleep":  # the main thread sleeps 50 ms at a time: it must go on
        deadline = time.monotonic() + 10
        while t.ask()[1] <= calls:
            assert time.monotonic() < deadline, f"pid {t.pid}: its main thread is stuck"
            time.sleep(0.06)
    assert tracers(t.pid) == {0}, f"pid {t.pid} is still traced"
    lib = str(preload().resolve())
    if any(m.path == lib for m in read_maps(t.pid)):
        deadline = time.monotonic() + 10
        while True:
            found = [
                c for c in discover(t.pid, environ={}).candidates if c.source.startswith("/proc/")
            ]
            if found:
                break
            assert time.monotonic() < deadline, f"pid {t.pid} maps the agent, which never listens"
            time.sleep(0.01)
        with Client(found[0].path) as c:
            assert int(c.info()["pid"]) == t.pid
        return "attached"
    assert not [c for c in discover(t.pid, environ={}).candidates if c.source.startswith("/proc/")]
    return "untouched"


def stop(t: Borrowed) -> None:
    t.proc.kill()
    t.proc.wait(10)
    for f in (t.proc.stdin, t.proc.stdout):
        if f is not None:
            f.close()


def test_the_borrowed_thread_comes_back_with_every_register(builds: dict[str, Path]) -> None:
    """The three ways an interrupted call goes on: read is made again (-ERESTARTSYS),
    clock_nanosleep too (-ERESTART_RESTARTBLOCK: the sleep is made again, not resumed
    through restart_syscall, whose state rt_sigreturn clears), epoll_wait fails with
    EINTR (as it does for any ptrace stop) and the program loops. Every register the
    main thread had, general, argument, SSE and control, is there when it returns."""
    for mode, syscall in (("read", "read"), ("epoll", "epoll_wait"), ("sleep", "clock_nanosleep")):
        t = start(builds, mode, None)
        try:
            assert t.ask()[0] == "ok"
            out = subprocess.run(
                [
                    str(Path(sys.executable).parent / "patchbox"),
                    "attach",
                    "-p",
                    str(t.pid),
                    "--json",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            res = json.loads(out)
            assert (res["tid"], res["interrupted"]) == (t.pid, syscall), res
            assert settle(t) == "attached"
            assert t.ask()[0] == "ok"
        finally:
            stop(t)


def test_a_call_left_running_comes_back_by_itself(builds: dict[str, Path]) -> None:
    """The client stops waiting while the thread is inside dlopen (here: after 50 ms of a
    300 ms call). It is let go as it is, untraced, and returns through its frame alone:
    the agent starts and the program goes on with its registers intact."""
    t = start(builds, "read", "slower")
    try:
        assert t.ask()[0] == "ok"
        seen: list[str] = []
        with pytest.raises(LeftRunning, match="left running its call"):
            attach(t.pid, str(preload()), call_timeout=0.05, on_phase=seen.append)
        assert seen == ["seize", "seized", "frame", "call", "abandoned"], seen
        assert tracers(t.pid) == {0}
        assert settle(t) == "attached"
    finally:
        stop(t)


def test_a_failed_dlopen_returns_through_the_frame_too(
    builds: dict[str, Path], tmp_path: Path
) -> None:
    """dlopen of a file that is no library returns NULL: the thread comes back the same
    way, the error names the call, the target runs on untouched."""
    bogus = tmp_path / "libbogus.so"
    bogus.write_text("not an ELF file\n")
    t = start(builds, "read", None)
    try:
        assert t.ask()[0] == "ok"
        with pytest.raises(AttachError, match=r"dlopen\(.*libbogus\.so\) failed"):
            attach(t.pid, str(bogus))
        assert settle(t) == "untouched"
    finally:
        stop(t)


# What each kill may leave. SIGKILL cannot be blocked: before the call's registers are
# set the thread was never changed, after it the thread comes back through its frame.
# The others are deferred until the window closes: the call is made.
def allowed(sig: int, phase: str) -> set[str]:
    if sig != signal.SIGKILL:
        return {"attached"}
    if phase in ("seize", "seized"):
        return {"untouched"}
    if phase == "frame":
        return {"untouched", "attached"}  # the registers are set right after "frame"
    return {"attached"}


@pytest.mark.parametrize("phase", PHASES[:-1])
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_client_killed_at_each_step(builds: dict[str, Path], sig: int, phase: str) -> None:
    """The client kills itself with ``sig`` the moment it reaches ``phase``: exactly
    there, every step of the window. The call lasts 300 ms (LD_AUDIT), so "call" is a
    kill in the middle of dlopen, and the thread has to come back by itself."""
    t = start(builds, "read", "slower")
    try:
        assert t.ask()[0] == "ok"
        client = start_client(builds, t, sig, phase)
        assert client.stdin is not None
        client.stdin.write("go\n")
        client.stdin.close()
        client.wait(30)
        got = steps(client)
        assert phase in [s[0] for s in got], got
        if sig == signal.SIGKILL:
            assert got[-1][0] == phase, got  # nothing after: it died there
        else:  # deferred: the window went on (to its end, or the call was left running)
            assert {"detached", "abandoned"} & {s[0] for s in got} or phase == "detached", got
        outcome = settle(t)
        assert outcome in allowed(sig, phase), (outcome, got)
        if sig == signal.SIGKILL and phase == "frame":
            assert outcome == "untouched"  # killed between the frame and the registers
    finally:
        stop(t)


@dataclass
class Tally:
    """Counts of the random run: by landing step, signal and outcome."""

    rows: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def table(self) -> str:
        lines = []
        for phase in PHASES:
            for sig in SIGNALS:
                name = signal.Signals(sig).name
                by = {o: self.rows[(phase, name, o)] for o in ("attached", "untouched")}
                if any(by.values()):
                    lines.append(
                        f"{phase:9} {name:8} attached {by['attached']:4} untouched {by['untouched']:4}"
                    )
        return "\n".join(lines)


def calibrate(builds: dict[str, Path], mode: str, slow: str | None) -> int:
    """Returns how long (ns) the window lasts for this kind of target, unkilled."""
    t = start(builds, mode, slow)
    try:
        client = start_client(builds, t, 0, "")
        assert client.stdin is not None
        client.stdin.write("go\n")
        client.stdin.close()
        client.wait(60)
        got = {name: ns for name, ns, _ in steps(client)}
        assert "detached" in got and settle(t) == "attached", got
        return got["detached"] - got["seize"]
    finally:
        stop(t)


KINDS: tuple[tuple[str, str | None], ...] = (
    ("read", "slow"),
    ("read", None),
    ("epoll", "slow"),
    ("sleep", "slow"),
)


def test_client_killed_at_random_instants(builds: dict[str, Path]) -> None:
    """PATCHBOX_ATTACH_FAULTS attaches (default 210), each client killed with SIGKILL,
    SIGTERM or SIGINT at a uniformly random instant of the window (from the moment it
    is about to trace the thread to 1.25 times the window's calibrated length)."""
    n = int(os.environ.get("PATCHBOX_ATTACH_FAULTS", "210"))
    rng = random.Random(int(os.environ.get("PATCHBOX_FAULT_SEED", "19")))
    window = {kind: calibrate(builds, *kind) for kind in KINDS}
    tally = Tally()

    def prepare(i: int) -> tuple[Borrowed, subprocess.Popen[str], int, tuple[str, str | None]]:
        kind = KINDS[i % len(KINDS)]
        sig = SIGNALS[(i // len(KINDS)) % len(SIGNALS)]
        t = start(builds, *kind)
        return t, spawn_client(builds, t, 0, ""), sig, kind

    # One target and client ahead: the next client imports patchbox while this one runs.
    nxt = prepare(0)
    for i in range(n):
        t, client, sig, kind = nxt
        ready(client)
        nxt = prepare(i + 1)
        try:
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
            line = _readline(client, 10)
            assert line.startswith("seize"), line
            seize = int(line.split()[1])
            at = seize + int(rng.uniform(0, 1.25) * window[kind])
            time.sleep(max(0, at - time.monotonic_ns() - 1_000_000) / 1e9)
            while time.monotonic_ns() < at:  # the last millisecond: on time
                pass
            killed = time.monotonic_ns()
            client.send_signal(sig)
            client.wait(60)
            got = [("seize", seize, ""), *steps(client)]
            landed = [name for name, ns, _ in got if ns <= killed and name in PHASES][-1]
            outcome = settle(t)
            name = signal.Signals(sig).name
            assert outcome in allowed(sig, landed), (i, name, landed, outcome, got)
            tally.rows[(landed, name, outcome)] += 1
        finally:
            stop(t)
            client.kill()
            client.wait()
    stop(nxt[0])
    nxt[1].kill()
    nxt[1].wait()
    print(f"\n{n} attaches, client killed at random instants:\n{tally.table()}")
    landed_in = Counter(phase for phase, _s, _o in tally.rows.elements())
    # The run means something only if many kills landed inside the call.
    assert landed_in["call"] >= n // 4, landed_in
