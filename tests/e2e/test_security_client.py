"""Attacks by an unprivileged user on root's tools, with real processes (tier 2:
`-m process`; docs/security.md, "Client, host tools and Ansible").

nobody acts for real (setpriv, in directories under /tmp it can reach); root's
`patchbox` runs after, as an operator would. Each test shows the attack fails, that what
it aimed at is untouched and still serves, and (where it matters) that the same command
works once the attack is gone, so the test can tell the difference.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from live import Target
from plainprog import ANSWER, LOOP, gcc, patch_cflags

from helpers import (
    AS_NOBODY,
    NOBODY_UID,
    NOGROUP_GID,
    nobody_dir,
    nobody_python,
    run_tool,
    unique_build_id,
)
from patchbox.config import preload
from patchbox.procfs import read_maps

pytestmark = pytest.mark.process
run = run_tool

BEFORE, AFTER = "41", "42"  # target.c's use_helper(4), unpatched and patched


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture()
def helper_patch(target_exe: Path, patched_obj: Callable[..., Path]) -> Path:
    """The patch of target.c's use_helper: 41 becomes 42."""
    obj = patched_obj(USE_HELPER="scale(x) + 2")
    out = obj.parent / "helper.pbx"
    run("extract-patch", "--function", "use_helper", "--name", "helper", "-o", out, obj, target_exe)
    return out


def nobody_target(exe: Path, env: dict[str, str] | None = None) -> Target:
    """Starts ``exe`` (target.c with the agent) as nobody; returns it once its agent
    listens."""
    return Target(exe, env=env, argv=[*AS_NOBODY, str(exe)])


# -- discovery: a link where root's client will look ----------------------------------


def test_root_apply_is_not_redirected_by_a_link_nobody_planted(
    target: Target, target_exe: Path, world_dir: Path, helper_patch: Path
) -> None:
    """nobody's process P has its socket in nobody's directory; nobody moves it aside
    and puts there a link to the socket of root's process R (same program). Root's
    `apply -p P` and `apply --all --exe P's program` would reach R: they refuse, naming
    who answered, and R keeps running its code. With the link gone, the same commands
    patch P."""
    app = nobody_dir(world_dir, "app")
    exe = Path(shutil.copy(target_exe, app / "target"))
    p = nobody_target(exe)
    try:
        sock = app / f"sandbox-sock{p.pid}"
        # P stays stopped while the link is there: its agent would otherwise notice within
        # a second that its name is no socket of its own and bind anew (defeating the
        # attack on its own, which is not what this test looks at).
        os.kill(p.pid, signal.SIGSTOP)
        nobody_python(
            "import os, sys; os.rename(sys.argv[1], sys.argv[1] + '.moved');"
            " os.symlink(sys.argv[2], sys.argv[1])",
            sock,
            target.socket,
        )
        proc = run("patchbox", "apply", "-p", p.pid, helper_patch, check=False)
        assert proc.returncode == 1, proc.stdout
        assert f"is answered by pid {target.pid}, not pid {p.pid}" in proc.stderr, proc.stderr
        proc = run("patchbox", "apply", "--all", "--exe", exe, "--json", helper_patch, check=False)
        rows = {r["pid"]: r for r in json.loads(proc.stdout)}
        assert proc.returncode == 1 and set(rows) == {p.pid}, proc.stdout
        assert rows[p.pid]["result"] == "failed"
        assert f"answered by pid {target.pid}, which does not hold" in rows[p.pid]["reason"]
        assert target.call("use_helper", 4) == BEFORE
        assert run("patchbox", "list", "-p", target.pid, "--json").stdout.strip() == "[]"

        nobody_python(
            "import os, sys; os.unlink(sys.argv[1]); os.rename(sys.argv[1] + '.moved', sys.argv[1])",
            sock,
        )
        os.kill(p.pid, signal.SIGCONT)
        assert p.call("use_helper", 4) == BEFORE
        run("patchbox", "apply", "-p", p.pid, helper_patch)
        assert p.call("use_helper", 4) == AFTER and target.call("use_helper", 4) == BEFORE
    finally:
        os.kill(p.pid, signal.SIGCONT)
        p.stop()


# -- the host sweep: a socket directory swapped for a link ----------------------------


def test_host_sweep_does_not_follow_a_directory_nobody_swapped_for_a_link(
    target_exe: Path, world_dir: Path
) -> None:
    """`patchbox ps` (root) sweeps stale sockets in every agent's directory. nobody's
    agent binds in nobody's directory; nobody then replaces that directory by a link to
    a root directory holding a stale socket of root's. Root's sweep must not follow it
    (before, it removed root's file). The same sweep does remove nobody's own stale
    socket while the directory is real."""
    home = nobody_dir(world_dir, "home")
    sockdir = nobody_dir(home, "sock")
    exe = Path(shutil.copy(target_exe, world_dir / "target"))
    rootdir = world_dir / "root"
    rootdir.mkdir(mode=0o700)
    theirs = rootdir / f"sandbox-sock{dead_pid()}"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(theirs))  # root's stale socket: a sweep of rootdir would remove it
    p = nobody_target(exe, env={"PATCHBOX_SOCK_DIR": str(sockdir)})
    try:
        own = sockdir / f"sandbox-sock{dead_pid()}"
        nobody_python("import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])", own)
        run("patchbox", "ps")
        assert not own.exists()  # the sweep does reach nobody's real directory

        nobody_python(
            "import os, sys; os.rename(sys.argv[1], sys.argv[1] + '.real');"
            " os.symlink(sys.argv[2], sys.argv[1])",
            sockdir,
            rootdir,
        )
        run("patchbox", "ps", check=False)  # p is unreachable by its bound path now
        assert theirs.is_socket()
        assert p.call("use_helper", 4) == BEFORE  # still serving
    finally:
        p.stop()


# -- attach: privileged processes -----------------------------------------------------

# plainprog.LOOP, made non-dumpable when started with an argument.
NODUMP_LOOP = LOOP.replace(
    "int main(void) {",
    "#include <sys/prctl.h>\n"
    "int main(int argc, char **argv) {\n"
    "    (void)argv;\n"
    "    if (argc > 1) prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);",
)


def start_as_nobody(exe: Path, *args: str) -> Target:
    """Starts ``exe`` (no agent) as nobody; returns it once it answers."""
    t = Target.__new__(Target)
    t.exe = exe
    t.proc = subprocess.Popen(
        [*AS_NOBODY, str(exe), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    t._keep_pipes()
    t.pid = t.proc.pid  # setpriv execs the program
    assert t._readline(10) == f"ready {t.pid}"
    return t


def maps_and_tracer(pid: int) -> tuple[set[tuple[int, int, str]], str]:
    """Returns what a refused attach must leave alone: the memory map, the tracer."""
    maps = {(m.start, m.end, m.path) for m in read_maps(pid)}
    return maps, Path(f"/proc/{pid}/status").read_text().split("TracerPid:")[1].split()[0]


def has_agent(pid: int) -> bool:
    lib = str(preload().resolve())
    return lib in Path(f"/proc/{pid}/maps").read_text()


@pytest.fixture()
def privileged(world_dir: Path, tmp_path: Path) -> Iterator[tuple[dict[str, Target], Path]]:
    """Starts, as nobody, one program four ways the kernel protects from same-uid
    tracing, and once plainly; yields ({kind: target}, patch of its answer())."""
    app = nobody_dir(world_dir, "app")
    plain = gcc(app / "plain", NODUMP_LOOP + ANSWER.replace("@MUL@", "7"), "-O0", unique_build_id())
    setuid = Path(shutil.copy(plain, app / "setuid"))
    setuid.chmod(0o4755)  # root's file: runs with euid 0
    setgid = Path(shutil.copy(plain, app / "setgid"))
    os.chown(setgid, 0, 1)  # group daemon, which nobody is not in
    setgid.chmod(0o2755)
    programs: dict[str, tuple[Path, *tuple[str, ...]]] = {
        "setuid": (setuid,),
        "setgid": (setgid,),
        "nodump": (plain, "nodump"),
    }
    filecap = Path(shutil.copy(plain, app / "filecap"))
    if (
        shutil.which("setcap")
        and subprocess.run(
            ["setcap", "cap_net_bind_service+ep", str(filecap)], capture_output=True, check=False
        ).returncode
        == 0
    ):
        programs["filecap"] = (filecap,)
    obj = gcc(tmp_path / "fix.o", ANSWER.replace("@MUL@", "7 + 1"), "-O0", *patch_cflags(), "-c")
    pbx = tmp_path / "answer.pbx"
    run("extract-patch", "--function", "answer", "--name", "answer", "-o", pbx, obj, plain)
    started: dict[str, Target] = {}
    try:
        for kind, (exe, *args) in programs.items():
            started[kind] = start_as_nobody(exe, *args)
        started["plain"] = start_as_nobody(plain)
        yield started, pbx
    finally:
        for t in started.values():
            t.stop()


# What privileged_reason says for each, as attach reports it.
REASONS = {
    "setuid": ["AT_SECURE", "uids differ (real, effective, saved, fs: 65534 0 0 0)"],
    "setgid": ["AT_SECURE", "gids differ (real, effective, saved, fs: 65534 1 1 1)"],
    "filecap": ["AT_SECURE", "has capabilities as uid 65534 (CapPrm 400, CapEff 400)"],
    "nodump": ["not dumpable (/proc/", "is owned by uid 0, not its uid 65534)"],
}


def test_attach_skips_privileged_processes_unless_asked(
    privileged: tuple[dict[str, Target], Path],
) -> None:
    """A setuid, a setgid, a file-capability and a non-dumpable program run by nobody:
    `attach` refuses each with the reason and touches nothing; `apply --all --attach`
    reports each as unreachable with the reason and patches only the plain one; with
    --include-privileged, attach loads the agent all the same."""
    targets, pbx = privileged
    for kind, t in targets.items():
        if kind == "plain":
            continue
        before = maps_and_tracer(t.pid)
        proc = run("patchbox", "attach", "-p", t.pid, check=False)
        assert proc.returncode == 1, (kind, proc.stdout)
        assert f"pid {t.pid} is privileged: " in proc.stderr, proc.stderr
        assert "--include-privileged" in proc.stderr
        for why in REASONS[kind]:
            assert why in proc.stderr, (kind, proc.stderr)
        assert maps_and_tracer(t.pid) == before  # untouched

    proc = run("patchbox", "apply", "--all", "--attach", "--json", pbx, check=False)
    rows = {r["pid"]: r for r in json.loads(proc.stdout)}
    # Left without an agent, they still run the build: unreachable, exit 1 (issue 19).
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert rows[targets["plain"].pid]["result"] == "applied"
    assert targets["plain"].call("5") == "39"  # 5 * 7 + 1 + 3: the patch is in
    for kind, t in targets.items():
        if kind == "plain":
            continue
        row = rows[t.pid]
        assert row["result"] == "unreachable", row
        assert row["reason"].startswith("not attached: privileged (")
        assert all(why in row["reason"] for why in REASONS[kind]), row
        assert t.call("5") == "38" and not has_agent(t.pid)  # 5 * 7 + 3, no agent

    for kind, t in targets.items():
        if kind == "plain":
            continue
        run("patchbox", "attach", "--include-privileged", "-p", t.pid)
        assert has_agent(t.pid) and t.call("5") == "38", kind


def test_apply_attach_include_privileged_patches_a_non_dumpable_process(
    world_dir: Path, tmp_path: Path
) -> None:
    """A non-dumpable process gets the agent and a patch with --attach
    --include-privileged. (Built with the patchable entries: a held entry jump needs
    the agent to read its threads' /proc files, which a non-dumpable process cannot.)"""
    app = nobody_dir(world_dir, "app")
    exe = gcc(
        app / "prog",
        NODUMP_LOOP + ANSWER.replace("@MUL@", "7"),
        "-O2",
        "-Wl,--build-id",
        *patch_cflags(),
    )
    obj = gcc(tmp_path / "fix.o", ANSWER.replace("@MUL@", "7 + 1"), "-O2", *patch_cflags(), "-c")
    pbx = tmp_path / "answer.pbx"
    run("extract-patch", "--function", "answer", "--name", "answer", "-o", pbx, obj, exe)
    t = start_as_nobody(exe, "nodump")
    try:
        proc = run("patchbox", "apply", "--attach", "-p", t.pid, pbx, check=False)
        assert proc.returncode == 1 and "not dumpable" in proc.stderr, proc.stderr
        proc = run("patchbox", "apply", "--include-privileged", "-p", t.pid, pbx, check=False)
        assert proc.returncode == 2 and "--include-privileged goes with --attach" in proc.stderr
        assert t.call("5") == "38" and not has_agent(t.pid)
        run("patchbox", "apply", "--attach", "--include-privileged", "-p", t.pid, pbx)
        assert t.call("5") == "39"
    finally:
        t.stop()


# -- the trust directory --------------------------------------------------------------


def test_trust_directory_nobody_can_write_keeps_its_patch_out(
    target: Target, world_dir: Path, helper_patch: Path, tmp_path: Path
) -> None:
    """root trusts the keys of a directory its group nogroup may write to. nobody (group
    nogroup) puts its own key there and hands root a patch signed with it: refused,
    naming the directory, owner and mode; root's process keeps its code. Made 0755
    again, the directory still holds nobody's key file: refused as nobody's. Once root
    owns that key (root decided to trust it), the patch is applied."""
    trust = world_dir / "trusted"
    trust.mkdir()
    os.chown(trust, 0, NOGROUP_GID)
    trust.chmod(0o775)
    keys = nobody_dir(world_dir, "nobody-keys")
    # nobody's key pair and its signature, made by nobody with patchbox itself
    signed = keys / "helper.pbx"
    shutil.copy(helper_patch, signed)
    os.chown(signed, NOBODY_UID, NOGROUP_GID)
    for args in (
        ("keygen", "--out", keys / "mallory"),
        ("sign", "--key", keys / "mallory.key", signed),
    ):
        nobody_python(
            "import sys; from patchbox.cli.main import main; sys.argv = ['patchbox', *sys.argv[1:]]; main()",
            *args,
        )
    nobody_python(
        "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])",
        keys / "mallory.pub",
        trust / "mallory.pub",
    )

    proc = run("patchbox", "apply", "-p", target.pid, "--trust-dir", trust, signed, check=False)
    assert proc.returncode == 1, proc.stdout
    assert f"{trust} is writable by others (owner uid 0, mode 0775)" in proc.stderr, proc.stderr
    assert target.call("use_helper", 4) == BEFORE

    trust.chmod(0o755)  # root's again: nobody's key still there, but not root's
    proc = run("patchbox", "apply", "-p", target.pid, "--trust-dir", trust, signed, check=False)
    assert (
        proc.returncode == 1
        and "trusted key" in proc.stderr
        and "owned by uid 65534" in proc.stderr
    )
    assert target.call("use_helper", 4) == BEFORE
    os.chown(trust / "mallory.pub", 0, 0)  # root decides to trust it
    run("patchbox", "apply", "-p", target.pid, "--trust-dir", trust, signed)
    assert target.call("use_helper", 4) == AFTER
