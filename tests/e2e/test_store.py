"""The patch store (tier 2: `-m process`): a patch installed before a process starts is
applied before its main() runs; uninstall; a store others can write is refused by
`patchbox install` and by the agent; `install --apply` reaches running processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import BIN, compile_c, run_tool, unique_build_id

pytestmark = pytest.mark.process

# The first line the program prints comes from the function the patch replaces.
PROGRAM = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((noipa)) int answer(int x) { return x + @DELTA@; }
int main(void)
{
	char c;
	printf("first %d\n", answer(40));
	fflush(stdout);
	while (read(0, &c, 1) == 1) {
		printf("%d\n", answer(40));
		fflush(stdout);
	}
	return 0;
}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, agent_dir: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("store")
    (base / "app").mkdir()
    (base / "fix").mkdir()
    # install --apply reaches every process of the build: this run's only.
    exe = compile_c(
        PROGRAM.replace("@DELTA@", "2"), base / "app" / "app", agent=True, extra=[unique_build_id()]
    )
    obj = compile_c(PROGRAM.replace("@DELTA@", "3"), base / "fix" / "app.o", obj=True)
    pbx = base / "answer.pbx"
    run_tool("extract-patch", "--function", "answer", "--name", "answer", "-o", pbx, obj, exe)
    return {"exe": exe, "patch": pbx}


class App:
    def __init__(self, exe: Path, store: Path) -> None:
        self.proc = subprocess.Popen(
            [str(exe)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PATCHBOX_STORE": str(store)},
        )
        assert self.proc.stdout is not None
        self.first = self.proc.stdout.readline().strip()
        self.pid = self.proc.pid

    def ask(self) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("?")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def patchbox(store: Path, *args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(BIN / "patchbox"), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PATCHBOX_STORE": str(store)},
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def log_of(exe: Path, pid: int) -> str:
    return (exe.parent / f"sandbox-sock{pid}.log").read_text()


def test_installed_before_start_applies_before_main(built: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = json.loads(patchbox(store, "install", built["patch"], "--json").stdout)
    assert out["name"] == "answer" and Path(out["path"]).is_file()
    assert oct(store.stat().st_mode & 0o777) == "0o755"
    app = App(built["exe"], store)
    try:
        assert app.first == "first 43"  # main's very first call ran the installed patch
        assert app.ask() == "43"
        assert "STORE name=answer ok" in log_of(built["exe"], app.pid)
        rows = [
            r for r in json.loads(patchbox(store, "ps", "--json").stdout) if r["pid"] == app.pid
        ]
        assert rows[0]["patches"] == ["answer"] and rows[0]["installed"] == ["answer"]
        # Uninstalled: this process keeps it; a new one starts without it.
        patchbox(store, "uninstall", "answer")
        assert app.ask() == "43"
        later = App(built["exe"], store)
        try:
            assert later.first == "first 42"
        finally:
            later.stop()
    finally:
        app.stop()


def test_store_others_can_write_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    patchbox(store, "install", built["patch"])
    store.chmod(0o777)
    res = patchbox(store, "install", built["patch"], check=False)
    assert res.returncode == 1 and "writable by others" in res.stderr
    app = App(built["exe"], store)  # the agent refuses it too, and says so in its log
    try:
        assert app.first == "first 42"
        log = log_of(built["exe"], app.pid)
        assert "STORE refused" in log and "writable by others" in log
    finally:
        app.stop()
        store.chmod(0o755)


def test_install_apply_reaches_running_processes(built: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    apps = [App(built["exe"], store) for _ in range(3)]
    try:
        assert {a.first for a in apps} == {"first 42"}
        res = patchbox(store, "install", "--apply", built["patch"], "--json")
        rows = {r["pid"]: r for r in json.loads(res.stdout)}
        assert {rows[a.pid]["result"] for a in apps} == {"applied"}
        assert {a.ask() for a in apps} == {"43"}
        fresh = App(built["exe"], store)
        try:
            assert fresh.first == "first 43"
        finally:
            fresh.stop()
    finally:
        for a in apps:
            a.stop()
