"""The hold cannot harm either (issue 19; docs/reach.md, "Entry jumps in stock code"):
the client that holds a process's threads while the agent writes a held entry jump is
killed (SIGKILL, SIGTERM, SIGINT) at random instants between its request and the
release. Afterwards the target is alive, untraced, and the bytes at the entry are whole:
the original ones with the patch not listed, or the jump into the listed patch's code;
its worker threads, calling the patched function all along, never got a wrong answer
(they abort on one: a thread that ran a torn jump crashes or computes garbage).

The target is built with plain gcc, no flag: ``answer`` starts with ``push %rbp`` (1
byte), so its entry jump is held. Two workers call it in bursts, so a thread is often
inside its first bytes when the client stops them. PATCHBOX_HOLD_FAULTS sets how many
kills (default 60); docs/robustness.md records the counts.
"""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers import run_tool
from patchbox.config import preload
from patchbox.errors import AgentError
from patchbox.format.layout import load_patch, read_patch_file
from patchbox.procfs import task_ids
from patchbox.protocol.client import Client
from patchbox.wire import ApplyFlag, ErrorCode

pytestmark = pytest.mark.process

PROGRAM = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
__attribute__((noipa)) int answer(int x) { return x * 7 + 3; }
static void *worker(void *arg)
{
	(void)arg;
	struct timespec pause = { 0, 300 * 1000 };
	for (;;) {
		for (int i = 0; i < 20000; i++) {
			int v = answer(2);
			if (v != 17 && v != 19) {
				fprintf(stderr, "wrong answer %d\n", v);
				abort();
			}
		}
		nanosleep(&pause, NULL);
	}
	return NULL;
}
int main(void)
{
	char line[64];
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (int i = 0; i < 2; i++) {
		pthread_t t;
		pthread_create(&t, NULL, worker, NULL);
	}
	printf("ready %d\n", getpid());
	while (fgets(line, sizeof line, stdin))
		printf("%d\n", answer(atoi(line)));
	return 0;
}
"""
FIX = "__attribute__((noipa)) int answer(int x) { return x * 8 + 3; }\n"
# A client of its own: the hold of `patchbox apply`, printing each step with a
# CLOCK_MONOTONIC timestamp; "ready" once connected, then it waits for "go".
CLIENT = r"""
import sys, time
from patchbox.format.layout import read_patch_file
from patchbox.protocol.client import Client
from patchbox.reach.hold import apply_held
pid, sock, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
pf = read_patch_file(path)
with Client(sock) as client:
    info = client.info()
    print("ready", time.monotonic_ns(), flush=True)
    sys.stdin.readline()
    phase = lambda name: print(name, time.monotonic_ns(), flush=True)
    try:
        apply_held(client, pid, pf.patch, pf.body, info, on_phase=phase)
        print("applied", time.monotonic_ns(), flush=True)
    except Exception as err:
        print("error", time.monotonic_ns(), type(err).__name__, flush=True)
"""
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
PHASES = ("send", "held", "released", "applied", "error")


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"pid {proc.pid}: nothing within {timeout} s"
    line = proc.stdout.readline()
    assert line, f"pid {proc.pid} closed its output ({proc.poll()})"
    return line.strip()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("holdfaults")
    (d / "prog.c").write_text(PROGRAM)
    subprocess.run(["gcc", "-O0", "-pthread", "-o", str(d / "prog"), str(d / "prog.c")], check=True)
    (d / "fix.c").write_text(FIX)
    cflags = run_tool("patchbox", "config", "--cflags").stdout.split()
    subprocess.run(
        ["gcc", "-O0", *cflags, "-c", str(d / "fix.c"), "-o", str(d / "fix.o")], check=True
    )
    pbx = d / "held.pbx"
    run_tool(
        "extract-patch",
        "--function",
        "answer",
        "--name",
        "held",
        "-o",
        pbx,
        d / "fix.o",
        d / "prog",
    )
    assert load_patch(pbx).flags & ApplyFlag.HOLD  # push %rbp: 1 byte
    (d / "client.py").write_text(CLIENT)
    return {"exe": d / "prog", "patch": pbx, "client": d / "client.py"}


class Program:
    """The running target, preloaded with the agent."""

    def __init__(self, exe: Path) -> None:
        self.proc = subprocess.Popen(
            [str(exe)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "LD_PRELOAD": str(preload())},
        )
        self.pid = self.proc.pid
        assert _readline(self.proc, 10) == f"ready {self.pid}"
        self.socket = exe.parent / f"sandbox-sock{self.pid}"
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            assert time.monotonic() < deadline, "the agent never listened"
            time.sleep(0.01)
        with Client(self.socket) as c:
            info = c.info()
        # P, the entry of answer: the address the patch redirects (its 5 bytes).
        self.bias = int(info["load_bias"], 16)

    def ask(self, x: int) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{x}\n")
        self.proc.stdin.flush()
        return int(_readline(self.proc, 10))

    def read(self, addr: int, n: int) -> bytes:
        with open(f"/proc/{self.pid}/mem", "rb") as mem:
            mem.seek(addr)
            return mem.read(n)

    def stop(self) -> str:
        alive = self.proc.poll() is None
        self.proc.kill()
        self.proc.wait(10)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        return "" if alive else err or f"exit {self.proc.returncode}"


def client_for(built: dict[str, Path], t: Program) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(built["client"]), str(t.pid), str(t.socket), str(built["patch"])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert _readline(proc, 30).startswith("ready")
    return proc


def parse_steps(text: str) -> list[tuple[str, int]]:
    """Returns the (step, timestamp) lines of a client's output; a line cut short by
    the kill is left out."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[1].isdigit():
            out.append((words[0], int(words[1])))
    return out


def tracers(pid: int) -> set[int]:
    """Returns the TracerPid of every thread of ``pid``."""
    return {
        int(Path(f"/proc/{pid}/task/{tid}/status").read_text().split("TracerPid:")[1].split()[0])
        for tid in task_ids(pid)
    }


def check_whole(t: Program, entry: int, original: bytes) -> bool:
    """Returns whether the patch is in (listed, the jump into its code at ``entry``);
    fails the test when the bytes and the listing disagree or anything is torn."""
    assert t.proc.poll() is None, f"pid {t.pid} died"
    assert tracers(t.pid) == {0}, "threads still traced"
    deadline = time.monotonic() + 10
    while True:  # the agent may still be busy with the dead client's request
        try:
            with Client(t.socket, timeout=2) as c:
                listed = [p for p in c.list() if p.name == "held"]
            break
        except Exception:
            assert time.monotonic() < deadline, "the agent does not answer"
            time.sleep(0.05)
    now = t.read(entry, 5)
    if not listed:
        assert now == original, f"not listed, yet the entry is {now.hex()} (was {original.hex()})"
        assert t.ask(2) == 17
        return False
    p = listed[0]
    assert now[0] == 0xE9, f"listed, yet the entry is {now.hex()}"
    dest = entry + 5 + int.from_bytes(now[1:], "little", signed=True)
    assert p.text_addr <= dest < p.text_addr + p.text_size, "the jump leads outside the patch"
    assert t.ask(2) == 19
    return True


def test_client_killed_while_it_holds_the_threads(built: dict[str, Path]) -> None:
    n = int(os.environ.get("PATCHBOX_HOLD_FAULTS", "60"))
    rng = random.Random(int(os.environ.get("PATCHBOX_FAULT_SEED", "19")))
    t = Program(built["exe"])
    tally: Counter[tuple[str, str, str]] = Counter()
    try:
        patch = load_patch(built["patch"])
        entry = t.bias + patch.functions[0].patch_point
        original = t.read(entry, 5)
        # The window, unkilled: from the request to the release.
        client = client_for(built, t)
        assert client.stdin is not None
        client.stdin.write("go\n")
        client.stdin.close()
        client.wait(30)
        assert client.stdout is not None
        got = dict(parse_steps(client.stdout.read()))
        assert "applied" in got, got
        window = got["released"] - got["send"]
        held_window = got["released"] - got["held"]
        assert check_whole(t, entry, original)
        with Client(t.socket) as c:
            c.remove("held")
        nxt: subprocess.Popen[str] | None = client_for(built, t)
        for i in range(n):
            assert nxt is not None  # made after each round but the last
            client, sig = nxt, SIGNALS[(i // 2) % len(SIGNALS)]
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
            line = _readline(client, 10)
            assert line.startswith("send"), line
            sent = int(line.split()[1])
            if i % 2:  # anywhere from the request to a little after the release
                at = sent + int(rng.uniform(0, 1.25) * window)
            else:  # once every thread is held: while the agent checks and writes
                line = _readline(client, 10)
                assert line.startswith("held"), line
                at = int(line.split()[1]) + int(rng.uniform(0, 1.25) * held_window)
            time.sleep(max(0, at - time.monotonic_ns() - 1_000_000) / 1e9)
            while time.monotonic_ns() < at:
                pass
            killed = time.monotonic_ns()
            client.send_signal(sig)
            client.wait(30)
            assert client.stdout is not None
            steps = (
                [("send", sent)]
                + ([("held", int(line.split()[1]))] if i % 2 == 0 else [])
                + parse_steps(client.stdout.read())
            )
            client.stdout.close()
            landed = [name for name, ns in steps if ns <= killed][-1]
            applied = check_whole(t, entry, original)
            tally[(landed, signal.Signals(sig).name, "applied" if applied else "not applied")] += 1
            if sig != signal.SIGKILL and landed in ("send", "held"):
                # Deferred: the hold ran to its end, the threads went after the reply.
                assert [s for s, _ in steps][-1] in ("released", "applied", "error"), steps
            if applied:
                with Client(t.socket) as c:
                    c.remove("held")
            nxt = client_for(built, t) if i + 1 < n else None
    finally:
        died = t.stop()
    assert not died, f"the target died: {died}"
    print(f"\n{n} held applies, client killed at random instants:")
    for (landed, sig_name, outcome), count in sorted(tally.items()):
        print(f"{landed:9} {sig_name:8} {outcome:12} {count}")


# The fact the agent's last check rests on: a client that dies has its connections
# closed before the kernel lets its tracees go (do_exit: exit_files, then exit_notify's
# exit_ptrace). Here a program watches a thread a client holds; the moment it sees the
# thread running again, the client's connection must read as hung up already.
WATCHER = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
static volatile int tid;
static void *sleeper(void *arg) { (void)arg; tid = gettid(); for (;;) pause(); return NULL; }
static char state(const char *path)
{
	char buf[512];
	int fd = open(path, O_RDONLY);
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	buf[n > 0 ? n : 0] = 0;
	char *rp = strrchr(buf, ')');
	return rp ? rp[2] : '?';
}
int main(int argc, char **argv)
{
	(void)argc;
	pthread_t t;
	pthread_create(&t, NULL, sleeper, NULL);
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", argv[1]);
	bind(s, (struct sockaddr *)&a, sizeof(a));
	listen(s, 1);
	while (!tid)
		usleep(100);
	printf("ready %d\n", tid);
	fflush(stdout);
	int c = accept(s, NULL, NULL);
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/task/%d/stat", tid);
	while (state(path) != 't')
		;
	printf("held\n");
	fflush(stdout);
	while (state(path) == 't')
		;
	struct pollfd p = { .fd = c, .events = POLLRDHUP };
	int hup = poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLRDHUP));
	printf("released, connection %s\n", hup ? "closed" : "open");
	return 0;
}
"""
HOLDER = r"""
import socket, sys, time
from patchbox.reach import ptrace
tid, path = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.connect(path)
ptrace.seize(tid)
ptrace.interrupt(tid)
ptrace.wait_stop(tid, 5)
time.sleep(60)
"""


def test_a_dead_clients_connection_closes_before_its_threads_go(tmp_path: Path) -> None:
    (tmp_path / "w.c").write_text(WATCHER)
    subprocess.run(
        ["gcc", "-O2", "-pthread", "-o", str(tmp_path / "w"), str(tmp_path / "w.c")], check=True
    )
    seen: Counter[str] = Counter()
    for i in range(int(os.environ.get("PATCHBOX_ORDER_RUNS", "40"))):
        sock = tmp_path / f"s{i}"
        watcher = subprocess.Popen(
            [str(tmp_path / "w"), str(sock)], stdout=subprocess.PIPE, text=True
        )
        tid = int(_readline(watcher, 10).split()[1])
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tid), str(sock)])
        try:
            assert _readline(watcher, 10) == "held"
            holder.kill()
            seen[_readline(watcher, 10)] += 1
        finally:
            holder.kill()
            holder.wait()
            watcher.kill()
            watcher.wait()
            assert watcher.stdout is not None
            watcher.stdout.close()
    assert set(seen) == {"released, connection closed"}, seen


def test_a_holder_that_hangs_up_is_not_waited_for(built: dict[str, Path]) -> None:
    """The client shuts its side of the connection right after the request, holding
    nothing: the agent refuses (NOT_HELD, "hung up") without waiting out its second,
    and nothing is written."""
    t = Program(built["exe"])
    try:
        pf = read_patch_file(built["patch"])
        entry = t.bias + pf.patch.functions[0].patch_point
        original = t.read(entry, 5)
        with Client(t.socket) as c:

            def hang_up() -> None:
                assert c.sock is not None
                c.sock.shutdown(socket.SHUT_WR)

            with pytest.raises(AgentError, match="hung up") as err:
                c.apply(pf.body, after_send=hang_up)
            assert err.value.code == ErrorCode.NOT_HELD
        assert not check_whole(t, entry, original)
    finally:
        died = t.stop()
    assert not died, died
