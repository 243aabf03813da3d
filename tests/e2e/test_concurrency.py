"""Safety while the program runs (issue 3), on real processes (`-m process`).

- W^X (prctl PR_SET_MDWE, what systemd's MemoryDenyWriteExecute enforces): a two-function
  apply fails after validation with MPROTECT_FAILED and the target is untouched.
- A thread parked inside a removed patch's code: its sandbox bytes are never reused while
  it is there, however many other patches need the space; once it has left, they are.
- PATCHBOX_ORIGINAL(fn): a replacement that calls the function it replaces as it was.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from live import Target

from helpers import compile_with_small_sandbox, info_json, render, run_tool
from patchbox.config import cflags
from patchbox.extract import extract_patch
from patchbox.format.layout import encode_apply_body
from patchbox.protocol.client import Client
from patchbox.wire import ApplyFlag

pytestmark = pytest.mark.process
SMALL_SANDBOX = 8192


run = run_tool


def info(target: Target) -> dict[str, Any]:
    return info_json(target.pid)


def body(obj: Path, exe: Path, functions: list[str], name: str) -> bytes:
    return encode_apply_body(extract_patch(obj, exe, functions, name=name))


def test_wx_policy_refuses_apply_cleanly(
    target_exe: Path, patched_obj: Callable[..., Path], tmp_path: Path
) -> None:
    """The refusal comes from mprotect itself, after every check passed: both functions
    of the patch stay original, not a single byte of executable memory changed."""
    obj = patched_obj(PAIR_A="1000", PAIR_B="3")
    pbx = tmp_path / "pair.pbx"
    run(
        "extract-patch",
        "--function",
        "pair_a",
        "--function",
        "pair_b",
        "--name",
        "pair",
        "-o",
        pbx,
        obj,
        target_exe,
    )
    t = Target(target_exe, env={"TARGET_MDWE": "1"})
    try:
        snapshot = t.code_snapshot()
        before = info(t)
        proc = run("patchbox", "apply", "-p", t.pid, pbx, check=False)
        assert proc.returncode == 1
        assert "MPROTECT_FAILED" in proc.stderr or "mprotect" in proc.stderr, proc.stderr
        assert "Permission denied" in proc.stderr, proc.stderr  # EACCES from the W^X rule
        assert t.code_snapshot() == snapshot
        assert (t.call("pair_a", 5), t.call("pair_b", 5)) == ("6", "10")
        after = info(t)
        assert after["sandbox_used"] == before["sandbox_used"]
        assert after["sandbox_retired"] == before["sandbox_retired"]
        assert json.loads(run("patchbox", "list", "-p", t.pid, "--json").stdout) == []
        assert t.alive()
    finally:
        t.stop()


@pytest.fixture(scope="module")
def small_target_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The e2e target linked with an agent whose sandbox is only SMALL_SANDBOX bytes."""
    d = tmp_path_factory.mktemp("small")
    (d / "exe").mkdir()
    return compile_with_small_sandbox(render(), d / "exe" / "target", SMALL_SANDBOX)


PARKING = "if (x == 1) { char c; if (read(park_fds[0], &c, 1) != 1) return -1; } return x + 700;"


def test_parked_thread_keeps_removed_code(
    small_target_exe: Path, patched_obj: Callable[..., Path]
) -> None:
    exe = small_target_exe
    t = Target(exe)
    try:
        park_body = body(patched_obj(PARK=PARKING), exe, ["park"], "park")
        # Two other patches with a new static variable each: never revived, so every
        # apply needs fresh space and the small sandbox is full after a few dozen.
        others = [
            body(patched_obj(STACKED="({ static int hits; hits++; 100; })"), exe, ["stacked"], "s"),
            body(patched_obj(PAIR_A="({ static int seen; seen += x; 1; })"), exe, ["pair_a"], "a"),
        ]
        with Client(pid=t.pid) as client:
            applied = client.apply(park_body)
            lo, size = (
                applied.text_addr,
                len(extract_patch(patched_obj(PARK=PARKING), exe, ["park"], name="park").text),
            )
            assert t.call("park", 3) == "703"
            code = t.read(lo, size)
            assert t.call("spawn", 1) == "spawned"
            # The thread is inside the new code once it sleeps in read(): wait for that.
            for _ in range(500):
                if any(_blocked_in_read(t.pid, tid) for tid in _tids(t.pid)):
                    break
                time.sleep(0.01)
            else:
                pytest.fail("the parked thread never blocked")
            client.remove("park")
            assert t.call("park", 3) == "10"  # new calls run the original again
            assert int(client.info()["sandbox_retired"]) >= size

            cycles = 4 * SMALL_SANDBOX // 64
            for i in range(cycles):
                placed = client.apply(others[i % 2])
                assert not (lo <= placed.text_addr < lo + size), f"cycle {i} reused parked code"
                client.remove("s" if i % 2 == 0 else "a")
                if i % 16 == 0:
                    assert t.read(lo, size) == code, f"parked code overwritten by cycle {i}"
                    assert int(client.info()["sandbox_retired"]) >= size
        # (the agent serves one client at a time: the CLI only once the Client is closed)
        assert t.read(lo, size) == code
        assert int(info(t)["sandbox_retired"]) >= size

        assert t.call("wake", 0) == "woken"
        assert t.call("join", 0) == "701"  # the NEW code's result: it ran to the end
        # Now nothing is inside it: a later apply gets that very space back.
        with Client(pid=t.pid) as client:
            for _ in range(cycles):
                placed = client.apply(others[0])
                client.remove("s")
                if placed.text_addr == lo:
                    break
            else:
                pytest.fail("the retired space was never reused after the thread left")
        assert t.read(lo, size) != code
        assert t.call("stacked", 1) == "101" and t.call("park", 1) == "8"
        assert t.alive()
    finally:
        t.stop()


def _tids(pid: int) -> list[int]:
    return [int(n) for n in os.listdir(f"/proc/{pid}/task")]


def _blocked_in_read(pid: int, tid: int) -> bool:
    """Whether thread ``tid`` sleeps in read(2) (syscall 0) on the park pipe."""
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
    except OSError:
        return False
    return bool(fields) and fields[0] == "0" and tid != pid


def test_replacement_calls_the_original(
    target: Target, target_exe: Path, patched_obj: Callable[..., Path]
) -> None:
    # The header comes from the include path `patchbox config --cflags` prints.
    obj = patched_obj(
        extra=[*shlex.split(cflags()), "-include", "patchbox/patch.h"],
        USE_HELPER="PATCHBOX_ORIGINAL(use_helper)(x) * 2",
        STACKED="(x < 0 ? PATCHBOX_ORIGINAL(stacked)(-x) : 1100)",
    )
    relocs = subprocess.run(
        ["readelf", "-rW", str(obj)], capture_output=True, text=True, check=True
    ).stdout
    assert "patchbox_original_use_helper" in relocs
    pbx = obj.parent / "wrap.pbx"
    run(
        "extract-patch",
        "--function",
        "use_helper",
        "--function",
        "stacked",
        "--name",
        "wrap",
        "-o",
        pbx,
        obj,
        target_exe,
    )
    assert target.call("use_helper", 4) == "41"
    run("patchbox", "apply", "-p", target.pid, pbx)
    assert target.call("use_helper", 4) == "82"  # 2 x the original's 41, not recursion
    assert (target.call("stacked", 1), target.call("stacked", -5)) == ("1101", "100")
    run("patchbox", "remove", "-p", target.pid, "wrap")
    assert target.call("use_helper", 4) == "41"


def test_original_of_unknown_function_is_refused(
    target_exe: Path, patched_obj: Callable[..., Path]
) -> None:
    # The header comes from the include path `patchbox config --cflags` prints.
    obj = patched_obj(
        extra=[*shlex.split(cflags()), "-include", "patchbox/patch.h"],
        USE_HELPER="({ extern int no_such_fn(int); PATCHBOX_ORIGINAL(no_such_fn)(x); })",
    )
    proc = run(
        "extract-patch",
        "--function",
        "use_helper",
        "-o",
        obj.parent / "x.pbx",
        obj,
        target_exe,
        check=False,
    )
    assert proc.returncode != 0 and "no_such_fn" in proc.stderr


def test_retained_patch_memory_is_never_reused(
    small_target_exe: Path, patched_obj: Callable[..., Path]
) -> None:
    """RETAIN (the QEMU profile): after remove, the patch's code stays even though no
    thread is inside it, because suspended coroutine stacks cannot be scanned."""
    exe = small_target_exe
    t = Target(exe)
    try:
        retained = extract_patch(
            patched_obj(PARK="return x + 900;"), exe, ["park"], name="kept", profile="qemu"
        )
        assert retained.flags == ApplyFlag.RETAIN
        others = [
            body(patched_obj(STACKED="({ static int hits; hits++; 100; })"), exe, ["stacked"], "s"),
            body(patched_obj(PAIR_A="({ static int seen; seen += x; 1; })"), exe, ["pair_a"], "a"),
        ]
        with Client(pid=t.pid) as client:
            placed = client.apply(encode_apply_body(retained))
            lo, size = placed.text_addr, len(retained.text)
            assert t.call("park", 3) == "903"
            code = t.read(lo, size)
            client.remove("kept")
            assert t.call("park", 3) == "10"
            for i in range(4 * SMALL_SANDBOX // 64):  # far more than the sandbox holds
                where = client.apply(others[i % 2]).text_addr
                assert not (lo <= where < lo + size), f"cycle {i} reused retained code"
                client.remove("s" if i % 2 == 0 else "a")
            assert t.read(lo, size) == code
            assert int(client.info()["sandbox_retired"]) >= size
        assert t.alive()
    finally:
        t.stop()
