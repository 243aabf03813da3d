"""Every process counts (tier 2: `-m process`; docs/host.md, "Every process counts"):
`apply --all`, `remove --all` and `ps` enumerate the processes running the patch's build
from /proc, not only those whose agent answers. A process of the build whose agent cannot
be reached — none loaded, present but without a socket, or refusing this client — is a
row `unreachable` with the reason, and the exit status is 1.

Every program here has a random build-id (``unique_build_id``): host-wide operations of
these tests reach no process of another test run on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from live import Target, wait_for_agent

from helpers import (
    AS_NOBODY,
    BIN,
    NOBODY_UID,
    compile_c,
    info_json,
    nobody_dir,
    nobody_python,
    render,
    run_tool,
    unique_build_id,
)

pytestmark = pytest.mark.process

BEFORE, AFTER = "41", "42"  # use_helper(4) unpatched, patched


def patchbox_json(*args: object, expect: int) -> list[dict[str, Any]]:
    """Returns the JSON rows of `patchbox ARGS --json`, asserting its exit status."""
    proc = subprocess.run(
        [str(BIN / "patchbox"), *map(str, args), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == expect, f"{args}: rc {proc.returncode}: {proc.stdout}{proc.stderr}"
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    return rows


def mine(rows: list[dict[str, Any]], *targets: Target) -> dict[int, dict[str, Any]]:
    return mine_pids(rows, [t.pid for t in targets])


def mine_pids(rows: list[dict[str, Any]], pids: Iterable[int]) -> dict[int, dict[str, Any]]:
    return {r["pid"]: r for r in rows if r["pid"] in set(pids)}


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, agent_dir: Path) -> dict[str, Path]:
    """The e2e target with the agent and a random build-id, and its `helper` patch."""
    base = tmp_path_factory.mktemp("every")
    (base / "fixed").mkdir()
    exe = compile_c(render(), base / "target", agent=True, extra=[unique_build_id()])
    obj = compile_c(render(USE_HELPER="scale(x) + 2"), base / "fixed" / "target.o", obj=True)
    pbx = base / "helper.pbx"
    run_tool("extract-patch", "--function", "use_helper", "--name", "helper", "-o", pbx, obj, exe)
    return {"exe": exe, "patch": pbx}


@pytest.fixture()
def started() -> Iterator[list[Target]]:
    procs: list[Target] = []
    yield procs
    for t in procs:
        t.stop()


def test_a_process_without_socket_is_unreachable(
    build: dict[str, Path], started: list[Target]
) -> None:
    """Three processes of one build, one started with PATCHBOX_DISABLE=1 (the agent
    linked but never started): `apply --all` patches two, reports the third
    `unreachable` (agent present, no socket) and exits 1; `ps` lists it with the
    reason; `remove --all` takes the patch out of the two and reports it again."""
    exe = build["exe"]
    a, b = Target(exe), Target(exe)
    dark = Target(exe, env={"PATCHBOX_DISABLE": "1"}, agent=False)
    started += [a, b, dark]

    rows = mine(patchbox_json("apply", "--all", "--exe", exe, build["patch"], expect=1), a, b, dark)
    assert set(rows) == {a.pid, b.pid, dark.pid}
    assert rows[a.pid]["result"] == rows[b.pid]["result"] == "applied"
    r = rows[dark.pid]
    assert r["result"] == "unreachable", r
    assert r["reason"].startswith("agent present but no socket"), r
    assert f"sandbox-sock{dark.pid}" in r["reason"]
    assert (r["exe"], r["build_id"]) == (str(exe), rows[a.pid]["build_id"])
    assert (a.call("use_helper", 4), b.call("use_helper", 4)) == (AFTER, AFTER)
    assert dark.call("use_helper", 4) == BEFORE

    text = run_tool("patchbox", "apply", "--all", "--exe", exe, build["patch"], check=False)
    assert text.returncode == 1
    assert f"pid {dark.pid:<8} unreachable" in text.stdout
    assert "1 unreachable" in text.stderr and "2 skipped" in text.stderr

    ps = mine(patchbox_json("ps", expect=0), a, b, dark)
    assert ps[a.pid]["patches"] == ["helper"] and not ps[a.pid]["error"]
    assert ps[dark.pid]["error"].startswith("agent present but no socket"), ps[dark.pid]
    assert ps[dark.pid]["exe"] == str(exe) and ps[dark.pid]["patches"] == []
    assert "unreachable: agent present but no socket" in run_tool("patchbox", "ps").stdout

    rows = mine(patchbox_json("remove", "--all", "--exe", exe, "helper", expect=1), a, b, dark)
    assert rows[a.pid]["result"] == rows[b.pid]["result"] == "removed"
    assert rows[dark.pid]["result"] == "unreachable"
    assert (a.call("use_helper", 4), b.call("use_helper", 4)) == (BEFORE, BEFORE)

    # All or nothing: with --rollback-on-failure an unreachable process undoes the rest.
    rows = mine(
        patchbox_json(
            "apply", "--all", "--exe", exe, "--rollback-on-failure", build["patch"], expect=1
        ),
        a,
        b,
        dark,
    )
    assert rows[a.pid]["result"] == rows[b.pid]["result"] == "removed"
    assert rows[a.pid]["reason"] == f"rolled back: pid {dark.pid} unreachable"
    assert (a.call("use_helper", 4), b.call("use_helper", 4)) == (BEFORE, BEFORE)


def test_a_busy_agent_stays_worth_a_retry_but_unreachable_is_not(
    build: dict[str, Path], started: list[Target]
) -> None:
    """A stopped agent is `failed` and worth a retry (2); with an unreachable process
    of the build besides, the status is 1."""
    exe = build["exe"]
    a, stopped = Target(exe), Target(exe)
    started += [a, stopped]
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        args = ("--timeout", "1", "apply", "--all", "--exe", exe, build["patch"])
        rows = mine(patchbox_json(*args, expect=2), a, stopped)
        assert rows[stopped.pid]["result"] == "failed"
        dark = Target(exe, env={"PATCHBOX_DISABLE": "1"}, agent=False)
        started.append(dark)
        rows = mine(patchbox_json(*args, expect=1), a, stopped, dark)
        assert rows[dark.pid]["result"] == "unreachable"
        assert rows[stopped.pid]["result"] == "failed"
    finally:
        os.kill(stopped.pid, signal.SIGCONT)


LIB = "__attribute__((noinline)) int lib_answer(int x) { return x * 10 + @ADD@; }\n"
USER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int lib_answer(int x);
int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    while (fgets(line, sizeof line, stdin))
        printf("%d\n", lib_answer(atoi(line + 11)));
    return 0;
}
"""


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, agent_dir: Path) -> dict[str, Path]:
    """A library built with the patchable flags (random build-id), two programs with the
    agent that use it, one without the agent that uses it too, and the library's patch."""
    d = tmp_path_factory.mktemp("lib")
    flags = run_tool("patchbox", "config", "--cflags").stdout.split()
    libs = run_tool("patchbox", "config", "--libs").stdout.split()

    def gcc(out: Path, src: str, *args: str) -> Path:
        out.with_suffix(".c").write_text(src)
        subprocess.run(
            ["gcc", "-O2", *flags, str(out.with_suffix(".c")), "-o", str(out), *args],
            check=True,
            capture_output=True,
        )
        return out

    lib = gcc(d / "libanswer.so", LIB.replace("@ADD@", "1"), "-fPIC", "-shared", unique_build_id())
    use = ("-L", str(d), "-lanswer", f"-Wl,-rpath,{d}")
    with_agent = [
        gcc(d / name, USER, *use, *libs[:-2], unique_build_id(), "-pthread")
        for name in ("one", "two")
    ]
    plain = gcc(d / "plain", USER, *use, unique_build_id())
    (d / "fix").mkdir()
    obj = gcc(d / "fix" / "libanswer.o", LIB.replace("@ADD@", "2"), "-fPIC", "-c")
    pbx = d / "lib.pbx"
    run_tool("extract-patch", "--function", "lib_answer", "--name", "libfix", "-o", pbx, obj, lib)
    return {"lib": lib, "one": with_agent[0], "two": with_agent[1], "plain": plain, "patch": pbx}


def lib_build_id(lib: Path) -> str:
    out = subprocess.run(
        ["readelf", "-n", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    return out.split("Build ID:")[1].split()[0]


def test_library_patch_reaches_every_process_mapping_it(
    library: dict[str, Path], started: list[Target]
) -> None:
    """A library patch goes to every process that maps the library, whatever its
    executable: two programs with the agent are patched, a program without one that
    maps it too is `unreachable` (no agent loaded). `remove --all --build-id` of the
    library's build-id takes it out of both programs (it used to filter by the
    executable's build-id and leave them patched) and skips the one with no agent."""
    one = Target(library["one"])
    two = Target(library["two"])
    plain = Target(library["plain"], agent=False)
    started += [one, two, plain]
    ask = "lib_answer 4"
    assert [t.call(ask) for t in (one, two, plain)] == ["41"] * 3

    lib_id = lib_build_id(library["lib"])
    rows = mine(patchbox_json("apply", "--all", library["patch"], expect=1), one, two, plain)
    assert rows[one.pid]["result"] == rows[two.pid]["result"] == "applied"
    r = rows[plain.pid]
    assert r["result"] == "unreachable" and r["reason"].startswith("no agent loaded"), r
    assert "--attach" in r["reason"] and r["exe"] == str(library["plain"])
    assert [t.call(ask) for t in (one, two, plain)] == ["42", "42", "41"]

    rows = mine(
        patchbox_json("remove", "--all", "--build-id", lib_id, "libfix", expect=0), one, two, plain
    )
    assert rows[one.pid]["result"] == rows[two.pid]["result"] == "removed"
    assert rows[plain.pid]["result"] == "skipped"
    assert rows[plain.pid]["reason"] == "no agent loaded: it cannot hold libfix"
    assert [t.call(ask) for t in (one, two, plain)] == ["41"] * 3
    assert info_json(one.pid)["patches"] == "0"


def test_an_agent_that_refuses_the_client_is_unreachable(
    build: dict[str, Path], world_dir: Path, started: list[Target]
) -> None:
    """A process of the build run by nobody turns itself non-dumpable; nobody's own
    `apply_all` reaches its socket but the agent refuses (PERMISSION, the kernel's
    ptrace rule): the row is `unreachable` with the agent's text, the process keeps
    its code."""
    app = nobody_dir(world_dir, "app")
    exe = Path(app / "target")
    exe.write_bytes(build["exe"].read_bytes())
    exe.chmod(0o755)
    pbx = Path(app / "helper.pbx")
    pbx.write_bytes(build["patch"].read_bytes())
    pbx.chmod(0o644)
    t = Target(exe, argv=[*AS_NOBODY, str(exe)])
    started.append(t)
    assert t.call("nodump", 0) == "nodump"  # prctl(PR_SET_DUMPABLE, 0)
    code = (
        "import json, sys\n"
        "from patchbox.format.layout import read_patch_file\n"
        "from patchbox.host.ops import apply_all, exit_status\n"
        "out = apply_all(read_patch_file(sys.argv[1]), pids={int(sys.argv[2])})\n"
        "print(json.dumps({'rows': [o.to_json() for o in out], 'status': exit_status(out)}))\n"
    )
    got = json.loads(nobody_python(code, pbx, t.pid).stdout)
    assert got["status"] == 1
    (row,) = got["rows"]
    assert (row["pid"], row["result"]) == (t.pid, "unreachable"), row
    assert "[PERMISSION]" in row["reason"] and "dumpable" in row["reason"], row
    assert t.call("use_helper", 4) == BEFORE


# -- a master that keeps root, workers that change to nobody right after fork ------------

PREFORK = (Path(__file__).parent / "prefork.c").read_text()


class Prefork:
    """A running prefork daemon (prefork.c): the master and its two workers, asked over
    their own sockets."""

    def __init__(self, exe: Path, rundir: Path, mode: str = "") -> None:
        self.rundir = rundir
        self.proc = subprocess.Popen(
            [str(exe), str(rundir), *([mode] if mode else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline().split()
        assert ready and ready[0] == "ready", ready
        self.master, self.worker1, self.worker2 = (int(p) for p in ready[1:])
        self.pids = (self.master, self.worker1, self.worker2)
        deadline = time.monotonic() + 10
        while any(ids(w)[0] != NOBODY_UID for w in (self.worker1, self.worker2)):
            assert time.monotonic() < deadline, "the workers never changed to nobody"
            time.sleep(0.01)

    def ask(self, who: str, n: int = 4) -> str:
        """Returns the answer of ``who`` (master, worker1, worker2) to request N, checking
        that the process that answered is that one."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.rundir / f"{who}.sock"))
            s.sendall(f"{n}\n".encode())
            pid, answer = s.makefile().readline().split()
        assert int(pid) == getattr(self, who)
        return answer

    def answers(self) -> list[str]:
        return [self.ask(who) for who in ("master", "worker1", "worker2")]

    def stop(self) -> None:
        for pid in (self.worker1, self.worker2):  # they would follow (PR_SET_PDEATHSIG)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module")
def prefork(tmp_path_factory: pytest.TempPathFactory, agent_dir: Path) -> dict[str, Path]:
    """The prefork daemon (random build-id) in a root-owned 0700 directory, where the
    workers, once nobody, cannot bind their agents' sockets; and its `answer` patch."""
    d = tmp_path_factory.mktemp("prefork")
    d.chmod(0o700)
    (d / "fix").mkdir()
    exe = compile_c(
        PREFORK.replace("@ANSWER@", "x + 1"), d / "prefork", agent=True, extra=[unique_build_id()]
    )
    obj = compile_c(PREFORK.replace("@ANSWER@", "x + 100"), d / "fix" / "prefork.o", obj=True)
    pbx = d / "answer.pbx"
    run_tool("extract-patch", "--function", "answer", "--name", "answer", "-o", pbx, obj, exe)
    run = d / "run"
    run.mkdir()
    return {"exe": exe, "patch": pbx, "run": run}


@pytest.fixture()
def daemons() -> Iterator[list[Prefork]]:
    started: list[Prefork] = []
    yield started
    for p in started:
        p.stop()


def ids(pid: int) -> tuple[int, int]:
    """Returns (effective uid, dumpable-owner uid of /proc/PID/status) of ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        uid = next(int(line.split()[2]) for line in f if line.startswith("Uid:"))
    return uid, os.stat(f"/proc/{pid}/status").st_uid


def test_workers_that_dropped_root_are_patched_too(
    prefork: dict[str, Path], daemons: list[Prefork]
) -> None:
    """The master keeps root, the workers change to nobody right after fork and cannot
    bind beside the executable: their agents listen on @patchbox/sandbox-sock<pid>.
    `apply --all --exe` patches all three (the workers' answers change), `ps` lists
    them, `remove --all --exe` takes the patch out of all three."""
    d = Prefork(prefork["exe"], prefork["run"])
    daemons.append(d)
    for w in (d.worker1, d.worker2):
        assert ids(w) == (NOBODY_UID, 0)  # nobody, not dumpable: only root may patch it
        assert wait_for_agent(w).path == f"@patchbox/sandbox-sock{w}"
    assert d.answers() == ["5", "5", "5"]

    rows = mine_pids(
        patchbox_json("apply", "--all", "--exe", prefork["exe"], prefork["patch"], expect=0), d.pids
    )
    assert {p: r["result"] for p, r in rows.items()} == dict.fromkeys(d.pids, "applied"), rows
    assert d.answers() == ["104", "104", "104"]

    ps = mine_pids(patchbox_json("ps", expect=0), d.pids)
    assert all(ps[p]["patches"] == ["answer"] and not ps[p]["error"] for p in d.pids), ps
    assert ps[d.worker1]["socket"] == f"@patchbox/sandbox-sock{d.worker1}"

    rows = mine_pids(
        patchbox_json("remove", "--all", "--exe", prefork["exe"], "answer", expect=0), d.pids
    )
    assert {p: r["result"] for p, r in rows.items()} == dict.fromkeys(d.pids, "removed"), rows
    assert d.answers() == ["5", "5", "5"]


def test_a_worker_without_agent_is_reported_and_fails_the_run(
    prefork: dict[str, Path], daemons: list[Prefork]
) -> None:
    """The same daemon, worker 2 with its agent stopped before it drops root: `apply
    --all --exe` patches the master and worker 1, reports worker 2 `unreachable` (agent
    present but no socket) and exits 1 — not "applied 2/2" while worker 2 serves the old
    code; `ps` lists it; `remove --all` reports it again and exits 1."""
    d = Prefork(prefork["exe"], prefork["run"], "w2-stopped")
    daemons.append(d)
    wait_for_agent(d.worker1)
    exe, pbx = prefork["exe"], prefork["patch"]
    rows = mine_pids(patchbox_json("apply", "--all", "--exe", exe, pbx, expect=1), d.pids)
    assert rows[d.master]["result"] == rows[d.worker1]["result"] == "applied"
    r = rows[d.worker2]
    assert r["result"] == "unreachable" and r["reason"].startswith("agent present but no socket")
    assert (r["exe"], r["build_id"]) == (str(exe), rows[d.master]["build_id"])
    assert d.answers() == ["104", "104", "5"]
    text = run_tool("patchbox", "apply", "--all", "--exe", exe, pbx, check=False)
    assert text.returncode == 1 and f"pid {d.worker2:<8} unreachable" in text.stdout

    ps = mine_pids(patchbox_json("ps", expect=0), d.pids)
    assert ps[d.worker2]["error"].startswith("agent present but no socket")

    rows = mine_pids(patchbox_json("remove", "--all", "--exe", exe, "answer", expect=1), d.pids)
    assert rows[d.master]["result"] == rows[d.worker1]["result"] == "removed"
    assert rows[d.worker2]["result"] == "unreachable"
    assert d.answers() == ["5", "5", "5"]


def test_an_agent_of_another_network_namespace_is_unreachable_with_the_way_there(
    build: dict[str, Path], world_dir: Path, started: list[Target]
) -> None:
    """A process of the build in a network namespace of its own, whose socket directory
    it may not trust (nobody's), listens on @patchbox/sandbox-sock<pid> there: that name
    means nothing (or another socket) here. `apply --all` reports it `unreachable` with
    the `nsenter --net` to use, sends it nothing, and exits 1."""
    theirs = nobody_dir(world_dir, "theirs")
    t = Target(
        build["exe"],
        env={"PATCHBOX_SOCK_DIR": str(theirs)},
        argv=["unshare", "--net", str(build["exe"])],
        agent=False,
    )
    started.append(t)
    name = f"@patchbox/sandbox-sock{t.pid}"
    deadline = time.monotonic() + 10
    while name not in Path(f"/proc/{t.pid}/net/unix").read_text():
        assert time.monotonic() < deadline, "the agent never listened"
        time.sleep(0.02)
    rows = mine(patchbox_json("apply", "--all", "--exe", build["exe"], build["patch"], expect=1), t)
    r = rows[t.pid]
    assert r["result"] == "unreachable", r
    assert name in r["reason"] and f"nsenter --net=/proc/{t.pid}/ns/net" in r["reason"]
    assert t.call("use_helper", 4) == BEFORE
    ps = mine(patchbox_json("ps", expect=0), t)
    assert name in ps[t.pid]["error"]


SECCOMPED = r"""
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>
int main(void)
{
	/* A filter that allows everything: enough for the kernel to say Seccomp: 2. */
	struct sock_filter allow[] = { BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW) };
	struct sock_fprog prog = { 1, allow };
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
		return 1;
	puts("filtered");
	fflush(stdout);
	pause();
	return 0;
}
"""


def test_an_unreachable_process_under_seccomp_says_so(tmp_path: Path) -> None:
    """A process whose agent has no socket and which runs under a seccomp filter (as
    OpenSSH's pre-authentication child does) is unreachable with that named; a second
    process of the build, whose agent listens, makes `ps` list the build."""
    exe = compile_c(SECCOMPED, tmp_path / "seccomped", agent=True)
    procs = [
        subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True, env=env)
        for env in (dict(os.environ), {**os.environ, "PATCHBOX_DISABLE": "1"})
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "filtered"
        wait_for_agent(procs[0].pid)
        rows = {r["pid"]: r for r in patchbox_json("ps", expect=0)}
        assert not rows[procs[0].pid]["error"]
        assert "seccomp filter (Seccomp: 2)" in rows[procs[1].pid]["error"], rows[procs[1].pid]
    finally:
        for p in procs:
            p.kill()
            p.wait()
