"""The fault matrix (tier 2: ``-m process``; docs/robustness.md, "Fault matrix"): every
multi-step command killed at each of its steps, and what must hold afterwards.

A *step* is a system call of the command that talks to a target or changes a file:
``connect``, ``sendto``/``recvfrom``, ``write``, ``link``/``rename``/``unlink``, ``flock``,
``fsync``. ``strace -e inject=SET:signal=KILL:when=N`` kills the command on entering its
N-th such call, for every N from 1 to one past the last. After each kill:

- the target is alive and serving;
- its code is either exactly as before (the same bytes) or the patch is whole: listed,
  and its new behaviour observed; ``patchbox list`` says which, truthfully;
- the store holds the complete entry or none, and no temporary that the next command
  does not sweep;
- running the command again completes it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from live import Target

from helpers import BIN, compile_c, render, run_tool, unique_build_id
from patchbox.protocol.client import Client

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(shutil.which("strace") is None, reason="strace (scripts/bootstrap.sh)"),
]

STEPS = (
    "connect,sendto,sendmsg,recvfrom,recvmsg,write,link,linkat,"
    "rename,renameat,renameat2,unlink,unlinkat,flock,fsync"
)
BEFORE, AFTER = "41", "49"  # use_helper(4), unpatched and patched


def run_killed(
    n: int | None, *args: object, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Returns the run of ``patchbox ARGS`` killed (SIGKILL) on entering its ``n``-th
    step; with ``n`` None nothing is killed and strace writes every step to ``log``."""
    inject = [] if n is None else ["-e", f"inject={STEPS}:signal=KILL:when={n}"]
    return subprocess.run(
        [
            "strace",
            "-qq",
            "-e",
            f"trace={STEPS}",
            *inject,
            "-o",
            str(log or os.devnull),
            str(BIN / "patchbox"),
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        check=False,
    )


def steps_of(*args: object, env: dict[str, str] | None = None) -> int:
    """Returns how many steps ``patchbox ARGS`` takes when nothing kills it."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as log:
        proc = run_killed(None, *args, env=env, log=Path(log.name))
        assert proc.returncode == 0, proc.stderr[-2000:]
        calls = [line for line in log.read().splitlines() if not line.startswith(("+++", "---"))]
    assert calls, "strace saw no step"
    return len(calls)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The target (a build of its own: install --apply reaches every process of it) and
    a patch of its use_helper."""
    d = tmp_path_factory.mktemp("matrix")
    (d / "bin").mkdir()
    (d / "fix").mkdir()
    exe = compile_c(render(), d / "bin" / "target", agent=True, extra=[unique_build_id()])
    obj = compile_c(render(USE_HELPER="scale(x) + 9"), d / "fix" / "target.o", obj=True)
    pbx = d / "helper.pbx"
    run_tool("extract-patch", "--function", "use_helper", "--name", "helper", "-o", pbx, obj, exe)
    return {"exe": exe, "patch": pbx}


@pytest.fixture()
def target(built: dict[str, Path]) -> Iterator[Target]:
    t = Target(built["exe"])
    yield t
    alive = t.alive()
    t.stop()
    assert alive, f"the target died: {t.stderr_text}"


def observed(t: Target) -> bool:
    """Returns whether the patch is in, after checking that ``list`` and the target's own
    behaviour agree and that the code is whole either way."""
    # The agent answers one request at a time: an apply or remove a killed command left
    # in flight ends before this list is answered, so the call below sees its outcome.
    with Client(t.socket) as c:
        c.list()
    answer = t.call("use_helper", 4)
    assert answer in (BEFORE, AFTER), answer
    with Client(t.socket) as c:
        listed = [p.name for p in c.list()]
    assert listed in ([], ["helper"]), listed
    assert (answer == AFTER) == (listed == ["helper"]), (answer, listed)
    return answer == AFTER


def program_text(t: Target) -> dict[int, bytes]:
    """Returns the target's executable code page by page, the sandbox blanked: the
    program's own code, which an apply changes and a remove restores (the sandbox keeps
    retired copies; mprotect splits mappings, so pages, not mappings, are compared)."""
    with Client(t.socket) as c:
        info = c.info()
    lo = int(info["sandbox_addr"], 16)
    hi = lo + int(info["sandbox_size"])
    pages = {}
    for start, data in t.code_snapshot().items():
        for off in range(0, len(data), 4096):
            page = start + off
            if not (lo <= page < hi):
                pages[page] = data[off : off + 4096]
    return pages


def each_step(total: int, one: Callable[[int], None]) -> None:
    """Runs ``one(n)`` for every step n, and once past the last."""
    for n in range(1, total + 2):
        one(n)


def test_apply_killed_at_each_step(target: Target, built: dict[str, Path]) -> None:
    before = program_text(target)
    total = steps_of("apply", "-p", target.pid, built["patch"])
    run_tool("patchbox", "remove", "-p", target.pid, "helper")

    def one(n: int) -> None:
        proc = run_killed(n, "apply", "-p", target.pid, built["patch"])
        if observed(target):
            run_tool("patchbox", "remove", "-p", target.pid, "helper")
        else:
            assert proc.returncode != 0  # killed before the agent had the request
        assert program_text(target) == before
        run_tool("patchbox", "apply", "-p", target.pid, built["patch"])  # completes again
        assert observed(target)
        run_tool("patchbox", "remove", "-p", target.pid, "helper")

    each_step(total, one)


def test_remove_killed_at_each_step(target: Target, built: dict[str, Path]) -> None:
    before = program_text(target)
    run_tool("patchbox", "apply", "-p", target.pid, built["patch"])
    total = steps_of("remove", "-p", target.pid, "helper")

    def one(n: int) -> None:
        run_tool("patchbox", "apply", "-p", target.pid, built["patch"])
        run_killed(n, "remove", "-p", target.pid, "helper")
        if observed(target):
            run_tool("patchbox", "remove", "-p", target.pid, "helper")  # completes again
        assert not observed(target)
        assert program_text(target) == before

    each_step(total, one)


def store_state(store: Path, exe: Path) -> list[str]:
    """Returns the names in the store's directory of ``exe``'s build."""
    bid = load_patch_build_id(exe)
    d = store / bid
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def load_patch_build_id(exe: Path) -> str:
    from patchbox.elf.buildid import read_build_id

    bid = read_build_id(exe)
    assert bid is not None
    return bid.hex()


@pytest.mark.parametrize("apply_now", [False, True])
def test_install_killed_at_each_step(
    apply_now: bool, built: dict[str, Path], tmp_path: Path
) -> None:
    """`install` (and `install --apply`, with a running process of the build): the
    store's entry is whole or absent, a temporary left between `link` and `rename` is
    swept by the next install, a running process is patched whole or not at all, and
    a process started afterwards applies exactly what the store holds."""
    store = tmp_path / "store"
    env = {"PATCHBOX_STORE": str(store)}
    extra = ["--apply"] if apply_now else []
    t = Target(built["exe"], env=env)
    try:
        total = steps_of("install", *extra, built["patch"], env=env)
        run_tool("patchbox", "uninstall", "helper", "--store", store)
        if apply_now:
            run_tool("patchbox", "remove", "-p", t.pid, "helper")

        def one(n: int) -> None:
            run_killed(n, "install", *extra, built["patch"], env=env)
            names = [x for x in store_state(store, built["exe"]) if not x.startswith(".")]
            assert len(names) <= 1 and all(x.endswith("-helper.pbx") for x in names), names
            if names:  # whole: the same bytes
                data = (store / load_patch_build_id(built["exe"]) / names[0]).read_bytes()
                assert data == built["patch"].read_bytes()
            fresh = Target(built["exe"], env=env)  # a process started now takes the store
            try:
                assert observed(fresh) == bool(names)
            finally:
                fresh.stop()
            if observed(t):
                run_tool("patchbox", "remove", "-p", t.pid, "helper")
            # Again, to the end: completes, and no temporary is left.
            run_tool("patchbox", "install", *extra, built["patch"], "--store", store)
            assert [x for x in store_state(store, built["exe"]) if x.startswith(".")] == []
            assert observed(t) == apply_now
            run_tool("patchbox", "uninstall", "helper", "--store", store)
            if apply_now:
                run_tool("patchbox", "remove", "-p", t.pid, "helper")
            assert store_state(store, built["exe"]) == []

        each_step(total, one)
    finally:
        t.stop()


def test_uninstall_killed_at_each_step(built: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = {"PATCHBOX_STORE": str(store)}
    run_tool("patchbox", "install", built["patch"], "--store", store)
    total = steps_of("uninstall", "helper", env=env)

    def one(n: int) -> None:
        run_tool("patchbox", "install", built["patch"], "--store", store)
        run_killed(n, "uninstall", "helper", env=env)
        names = store_state(store, built["exe"])
        assert names == [] or (len(names) == 1 and names[0].endswith("-helper.pbx")), names
        again = run_tool("patchbox", "uninstall", "helper", "--store", store, check=False)
        assert again.returncode == 0 or (not names and "no patch named helper" in again.stderr)
        assert store_state(store, built["exe"]) == []

    each_step(total, one)


def test_store_on_a_full_filesystem(built: dict[str, Path], tmp_path: Path) -> None:
    """`install` into a store on a full filesystem fails naming the cause, and leaves
    neither an entry nor a temporary; on a read-only one likewise."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=False
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # every block taken
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        store = mnt / "store"
        proc = run_tool("patchbox", "install", built["patch"], "--store", store, check=False)
        assert proc.returncode != 0
        assert "No space left on device" in proc.stderr, proc.stderr
        assert store_state(store, built["exe"]) == []
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        proc = run_tool("patchbox", "install", built["patch"], "--store", store, check=False)
        assert proc.returncode != 0 and "Read-only file system" in proc.stderr, proc.stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


SLOW_FIX = r"""
@BODY@
#include <patchbox/patch.h>
static int slow(void) { usleep(800000); return 0; }
PATCHBOX_HOOK(pre_apply, slow);
"""


def test_target_killed_mid_apply(built: dict[str, Path], tmp_path: Path) -> None:
    """The target dies while its agent applies (a pre-apply hook sleeps, the test kills
    the process meanwhile): the client says the process went away, promptly, naming
    it; the next command on the host finds nothing of it (its socket file swept)."""
    src = render(USE_HELPER="scale(x) + 9")
    (tmp_path / "fix").mkdir()
    cflags = run_tool("patchbox", "config", "--cflags").stdout.split()  # <patchbox/patch.h>
    out = tmp_path / "fix" / "target.o"
    obj = compile_c(SLOW_FIX.replace("@BODY@", src), out, obj=True, extra=cflags)
    pbx = tmp_path / "slow.pbx"
    run_tool(
        "extract-patch", "--function", "use_helper", "--name", "slow", "-o", pbx, obj, built["exe"]
    )
    t = Target(built["exe"])
    try:
        client = subprocess.Popen(
            [str(BIN / "patchbox"), "apply", "-p", str(t.pid), str(pbx)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # The agent is in the pre-apply hook once the code is in its sandbox: wait for
        # that thread to sleep (the hook's usleep), then kill the process.
        deadline = time.monotonic() + 10
        while not _agent_sleeping(t.pid):
            assert time.monotonic() < deadline, "the agent never reached the hook"
            time.sleep(0.01)
        os.kill(t.pid, signal.SIGKILL)
        said, err = client.communicate(timeout=30)
    finally:
        t.stop()
    assert client.returncode == 1, (said, err)
    assert f"pid {t.pid} exited while its agent was serving the request" in err, err
    assert not t.socket.exists()  # the client swept it: nothing listens there


def _agent_sleeping(pid: int) -> bool:
    """Returns True if pid's agent thread sleeps in clock_nanosleep (the slow hook)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() != "patchbox-agent":
                continue
            return (task / "syscall").read_text().split()[0] == "230"  # clock_nanosleep
        except OSError:
            return False
    return False


def test_two_operators_race(built: dict[str, Path], tmp_path: Path) -> None:
    """Two operators run `apply --all` and `remove --all` of the same patch on the same
    processes at once, many times: every process ends whole (patched, or not), `list`
    says which truthfully, and a last `remove --all` leaves every one as it was."""
    targets = [Target(built["exe"]) for _ in range(3)]
    try:
        befores = {t.pid: program_text(t) for t in targets}
        exe = str(built["exe"])
        for _ in range(10):
            a = subprocess.Popen(
                [str(BIN / "patchbox"), "apply", "--all", "--exe", exe, str(built["patch"])],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            r = subprocess.Popen(
                [str(BIN / "patchbox"), "remove", "--all", "--exe", exe, "helper"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for p in (a, r):
                _out, err = p.communicate(timeout=60)
                # Each says what happened per process; none crashes.
                assert p.returncode in (0, 1, 2), err
                assert "Traceback" not in err, err
            for t in targets:
                observed(t)  # whole either way, and list agrees
        run_tool("patchbox", "remove", "--all", "--exe", exe, "helper", check=False)
        for t in targets:
            assert not observed(t)
            assert program_text(t) == befores[t.pid]
    finally:
        for t in targets:
            t.stop()


@pytest.mark.parametrize(
    "command",
    [["apply", "--all"], ["apply", "--all", "--rollback-on-failure"], ["remove", "--all"]],
    ids=["apply-all", "apply-all-rollback", "remove-all"],
)
def test_fleet_command_killed_at_each_step(command: list[str], built: dict[str, Path]) -> None:
    """`apply --all` (with and without --rollback-on-failure) and `remove --all` over
    three processes, killed at each step: every process whole, patched or not, as `list`
    says; `ps` lists each truthfully; running the command again completes it."""
    targets = [Target(built["exe"]) for _ in range(3)]
    exe = str(built["exe"])
    applying = command[0] == "apply"
    args = [*command, "--exe", exe, built["patch"] if applying else "helper"]
    try:
        befores = {t.pid: program_text(t) for t in targets}

        def reset() -> None:
            verb = "remove" if applying else "apply"
            what = "helper" if applying else built["patch"]
            run_tool("patchbox", verb, "--all", "--exe", exe, what, check=False)
            assert all(observed(t) != applying for t in targets)

        reset()
        total = steps_of(*args)

        def one(n: int) -> None:
            reset()
            run_killed(n, *args)
            states = {t.pid: observed(t) for t in targets}  # whole, and list agrees
            listed = json.loads(run_tool("patchbox", "ps", "--json").stdout)
            rows = {r["pid"]: r for r in listed}
            for t in targets:
                names = list(rows[t.pid]["patches"])
                assert (names == ["helper"]) == states[t.pid], (rows[t.pid], states)
            again = run_tool("patchbox", *args, check=False)
            assert again.returncode in (0, 1), again.stderr
            assert all(observed(t) == applying for t in targets)

        each_step(total, one)
        run_tool("patchbox", "remove", "--all", "--exe", exe, "helper", check=False)
        for t in targets:
            assert program_text(t) == befores[t.pid]
    finally:
        for t in targets:
            t.stop()
