"""A process of the build sandboxed before its agent could bind (tier 2: `-m process`;
docs/host.md, "Every process on a host"): OpenSSH's pre-authentication child is forked
from a connection's process, chroots, sets RLIMIT_NOFILE to 1 and installs a seccomp
filter before its agent's thread binds, so its agent never listens and it cannot be
patched. `apply --all` and `remove --all` wait for such a process to end (up to
PATCHBOX_SANDBOX_WAIT_S): one that exits is `skipped` (it runs nothing any more, and
ran the code it was forked with until then); one still running is `unreachable`, exit 1.

tests/e2e/sandboxed.c forks such children without sshd. Each program has a random
build-id (``unique_build_id``): no other test's processes are reached.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live import HERE, Target

from helpers import BIN, compile_c, run_tool, unique_build_id

pytestmark = pytest.mark.process

BEFORE, AFTER = "41", "42"  # answer(4) unpatched, patched


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, agent_dir: Path) -> dict[str, Path]:
    """The sandboxing server with the agent and a random build-id, and its patch."""
    base = tmp_path_factory.mktemp("sandboxed")
    (base / "fixed").mkdir()
    src = (HERE / "sandboxed.c").read_text()
    exe = compile_c(
        src.replace("@ADD@", "1"), base / "server", agent=True, extra=[unique_build_id()]
    )
    obj = compile_c(src.replace("@ADD@", "2"), base / "fixed" / "server.o", obj=True)
    pbx = base / "answer.pbx"
    run_tool("extract-patch", "--function", "answer", "--name", "answer", "-o", pbx, obj, exe)
    return {"exe": exe, "patch": pbx}


@pytest.fixture()
def server(build: dict[str, Path]) -> Iterator[Target]:
    t = Target(build["exe"])
    yield t
    t.stop()


def fork_sandboxed(t: Target, ms: int) -> int:
    """Returns the pid of a child of ``t`` sandboxed at once, which ends after ``ms``."""
    pid = int(t.call("fork", ms).removeprefix("forked "))
    deadline = time.monotonic() + 5
    while "Seccomp:\t2" not in Path(f"/proc/{pid}/status").read_text():
        assert time.monotonic() < deadline, f"child {pid} never sandboxed itself"
        time.sleep(0.01)
    return pid


def patchbox(*args: object, wait: float | None = None) -> tuple[int, dict[int, dict[str, Any]]]:
    """Returns (exit status, rows by pid) of `patchbox ARGS --json`."""
    env = dict(os.environ)
    if wait is not None:
        env["PATCHBOX_SANDBOX_WAIT_S"] = str(wait)
    proc = subprocess.run(
        [str(BIN / "patchbox"), *map(str, args), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=env,
        check=False,
    )
    return proc.returncode, {r["pid"]: r for r in json.loads(proc.stdout or "[]")}


def test_a_sandboxed_child_that_exits_is_waited_for(build: dict[str, Path], server: Target) -> None:
    """A sandboxed child older than the wait for starting processes (3 s), ending 3 s
    later: `apply --all` patches the server, waits for the child and reports it skipped
    (it exited, having run the old code: it prints 41), exit 0. `remove --all` then
    does the same for a child forked from the patched server (it prints 42: it held
    the patch until it ended)."""
    child = fork_sandboxed(server, 6500)
    time.sleep(3.5)
    t0 = time.monotonic()
    rc, rows = patchbox("apply", "--all", "--exe", build["exe"], build["patch"])
    assert rc == 0, rows
    assert time.monotonic() - t0 >= 2, "the child's end was not waited for"
    assert rows[server.pid]["result"] == "applied"
    assert rows[child]["result"] == "skipped", rows[child]
    assert rows[child]["reason"].startswith("exited; not patchable"), rows[child]
    assert rows[child]["exe"] == str(build["exe"])
    assert server._readline() == f"child {child} {BEFORE}"
    assert server.call("answer", 4) == AFTER

    child = fork_sandboxed(server, 1500)
    rc, rows = patchbox("remove", "--all", "--exe", build["exe"], "answer")
    assert rc == 0, (child, server.pid, json.dumps(rows, indent=1))
    assert rows[server.pid]["result"] == "removed"
    assert rows[child]["result"] == "skipped", rows[child]
    assert server._readline() == f"child {child} {AFTER}"
    assert server.call("answer", 4) == BEFORE


def test_a_sandboxed_child_still_running_is_unreachable(
    build: dict[str, Path], server: Target
) -> None:
    """A sandboxed child that outlives the wait (1 s here): `apply --all` patches the
    server and reports the child unreachable, not patchable, with how long it waited,
    and exits 1."""
    child = fork_sandboxed(server, 60_000)
    try:
        rc, rows = patchbox("apply", "--all", "--exe", build["exe"], build["patch"], wait=1)
        assert rc == 1, rows
        assert rows[server.pid]["result"] == "applied"
        r = rows[child]
        assert r["result"] == "unreachable", r
        assert "seccomp filter (Seccomp: 2)" in r["reason"] and "not patchable" in r["reason"]
        assert "still running after the 1 s waited" in r["reason"], r
    finally:
        os.kill(child, 9)
