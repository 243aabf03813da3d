"""Every matching process of the host (tier 2: `-m process`): `patchbox ps`, `apply --all`,
`remove --all`, failures reported per process, rollback, and the exit statuses.

Real targets of two builds run at once; behaviour is observed on their stdout. Other
processes of the machine may have agents too: assertions look at this test's pids only,
and every `--all` here is narrowed to this test's builds by build-id or executable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from live import Target

from helpers import (
    BIN,
    compile_c,
    elf_symbol,
    gnu_build_id,
    info_json,
    render,
    run_tool,
    unique_build_id,
)

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory, agent_dir: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("host")
    for d in ("a", "b", "fixed"):
        (base / d).mkdir()
    # Random build-ids: `apply --all` here reaches no process of another test run.
    a = compile_c(render(), base / "a" / "target", agent=True, extra=[unique_build_id()])
    b = compile_c(
        render(GREETING="hola"), base / "b" / "target", agent=True, extra=[unique_build_id()]
    )
    obj = compile_c(render(USE_HELPER="scale(x) + 2"), base / "fixed" / "target.o", obj=True)
    pbx = base / "helper.pbx"
    run_tool("extract-patch", "--function", "use_helper", "--name", "helper", "-o", pbx, obj, a)
    return {"a": a, "b": b, "patch": pbx}


@pytest.fixture()
def fleet(builds: dict[str, Path]) -> Iterator[Callable[[str, int], list[Target]]]:
    started: list[Target] = []

    def start(which: str, n: int) -> list[Target]:
        new = [Target(builds[which]) for _ in range(n)]
        started.extend(new)
        return new

    yield start
    for t in started:
        if t.alive():
            os.kill(t.pid, signal.SIGCONT)
        t.stop()


def build_id(exe: Path) -> str:
    return gnu_build_id(exe)


def patchbox_json(*args: object, expect: int = 0, timeout: float = 60) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [str(BIN / "patchbox"), *map(str, args), "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == expect, f"{args}: rc {proc.returncode}: {proc.stderr}"
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    return rows


def by_pid(rows: list[dict[str, Any]], targets: list[Target]) -> dict[int, dict[str, Any]]:
    mine = {t.pid for t in targets}
    return {r["pid"]: r for r in rows if r["pid"] in mine}


def corrupt_padding(t: Target, exe: Path) -> None:
    """Changes one padding byte of use_helper in the running process (its bytes now differ
    from what the patch expects)."""
    sym = elf_symbol(exe, "use_helper")
    addr = int(info_json(t.pid)["load_bias"], 16) + sym["st_value"] - 6
    with open(f"/proc/{t.pid}/mem", "r+b") as mem:
        mem.seek(addr)
        mem.write(b"\xcc")


def test_ps_lists_every_agent(
    fleet: Callable[[str, int], list[Target]], builds: dict[str, Path]
) -> None:
    targets = fleet("a", 3) + fleet("b", 2)
    rows = by_pid(patchbox_json("ps"), targets)
    assert set(rows) == {t.pid for t in targets}
    for t in targets:
        row = rows[t.pid]
        assert row["exe"] == str(t.exe) and row["patches"] == [] and not row["error"]
        assert row["build_id"] == build_id(t.exe)
        assert row["sandbox_size"] > 0
    text = run_tool("patchbox", "ps").stdout
    assert all(str(t.pid) in text for t in targets)


def test_apply_all_two_builds_then_remove_all(
    fleet: Callable[[str, int], list[Target]], builds: dict[str, Path]
) -> None:
    a, b = fleet("a", 6), fleet("b", 3)
    rows = by_pid(patchbox_json("apply", "--all", builds["patch"]), a + b)
    assert {rows[t.pid]["result"] for t in a} == {"applied"}
    assert {rows[t.pid]["result"] for t in b} == {"skipped"}
    assert all("build-id" in rows[t.pid]["reason"] for t in b)
    assert all(t.call("use_helper", 4) == "42" for t in a)
    assert all(t.call("use_helper", 4) == "41" for t in b)
    assert by_pid(patchbox_json("ps"), a)[a[0].pid]["patches"] == ["helper"]
    # Applied already: skipped, not failed (exit 0).
    again = by_pid(patchbox_json("apply", "--all", "--exe", builds["a"], builds["patch"]), a)
    assert {r["result"] for r in again.values()} == {"skipped"}
    gone = by_pid(
        patchbox_json("remove", "--all", "--build-id", build_id(builds["a"]), "helper"), a
    )
    assert {r["result"] for r in gone.values()} == {"removed"}
    assert all(t.call("use_helper", 4) == "41" for t in a)


def test_killed_midway_and_refusing_are_reported(
    fleet: Callable[[str, int], list[Target]], builds: dict[str, Path]
) -> None:
    a = fleet("a", 6)
    victim, refuser = a[0], a[1]
    corrupt_padding(refuser, builds["a"])
    os.kill(victim.pid, signal.SIGSTOP)  # its agent cannot answer...
    proc = subprocess.Popen(
        [
            str(BIN / "patchbox"),
            "apply",
            "--all",
            "--exe",
            builds["a"],
            str(builds["patch"]),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    os.kill(victim.pid, signal.SIGKILL)  # ...and dies while apply --all waits for it
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    rows = by_pid(json.loads(out), a)
    assert rows[victim.pid]["result"] == "failed"
    assert rows[refuser.pid]["result"] == "failed"
    assert "EXPECTED_MISMATCH" in rows[refuser.pid]["reason"]
    rest = [t for t in a if t not in (victim, refuser)]
    assert {rows[t.pid]["result"] for t in rest} == {"applied"}
    assert all(t.call("use_helper", 4) == "42" for t in rest)
    assert refuser.call("use_helper", 4) == "41"


def test_rollback_on_failure_restores_all(
    fleet: Callable[[str, int], list[Target]], builds: dict[str, Path]
) -> None:
    a = fleet("a", 5)
    refuser = a[2]
    corrupt_padding(refuser, builds["a"])
    rows = by_pid(
        patchbox_json(
            "apply",
            "--all",
            "--exe",
            builds["a"],
            "--rollback-on-failure",
            builds["patch"],
            expect=1,
        ),
        a,
    )
    assert rows[refuser.pid]["result"] == "failed"
    others = [t for t in a if t is not refuser]
    assert {rows[t.pid]["result"] for t in others} == {"removed"}
    assert all("rolled back" in rows[t.pid]["reason"] for t in others)
    assert all(t.call("use_helper", 4) == "41" for t in a)
    assert all(info_json(t.pid)["patches"] == "0" for t in others)


def test_busy_agent_is_worth_a_retry(
    fleet: Callable[[str, int], list[Target]], builds: dict[str, Path]
) -> None:
    a = fleet("a", 3)
    stopped = a[0]
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        proc = subprocess.run(
            [
                str(BIN / "patchbox"),
                "--timeout",
                "1",
                "apply",
                "--all",
                "--exe",
                builds["a"],
                str(builds["patch"]),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
    assert proc.returncode == 2, proc.stderr
    rows = by_pid(json.loads(proc.stdout), a)
    assert rows[stopped.pid]["result"] == "failed"
    assert "within 1 s" in rows[stopped.pid]["reason"]
    assert {rows[t.pid]["result"] for t in a[1:]} == {"applied"}
