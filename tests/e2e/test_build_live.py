"""`patchbox build` end to end: a multi-file program built with make, running, patched
from a unified diff (tier 2: `-m process`).

The tree (tests/e2e/buildtree) has four translation units; a.c and b.c each define a
``static int helper``. The diff changes a.c's helper, a string in b.c, the step of a
static local counter in util.c, and inserts a line above an assert() in util.c (only
__LINE__ changes there: not part of the patch).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from live import Target

from helpers import run_with_tools
from patchbox.format.layout import load_patch

pytestmark = pytest.mark.process
BIN = Path(sys.executable).parent
TREE = Path(__file__).resolve().parent / "buildtree"


run = run_with_tools


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.fixture()
def tree(tmp_path: Path, agent_dir: Path) -> tuple[Path, Path]:
    """Returns (built source tree, unified diff -p1 of the fix)."""
    src = tmp_path / "src"
    shutil.copytree(TREE, src)
    run("make", cwd=src)
    fixed = tmp_path / "fixed"
    shutil.copytree(TREE, fixed)
    edit(fixed / "a.c", "return x + 1;", "return x + 5;")
    edit(fixed / "b.c", '"bee"', '"bumblebee"')
    edit(fixed / "util.c", "count += 1;", "count += 2;")
    edit(fixed / "util.c", "#include <assert.h>\n", "#include <assert.h>\n\n/* checked */\n")
    proc = run("diff", "-ru", "src", "fixed", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    diff = (
        "\n".join(
            line
            for line in proc.stdout.splitlines()
            if not line.startswith(("Only in", "Binary files"))
        )
        + "\n"
    )
    (tmp_path / "fix.patch").write_text(diff)
    return src, tmp_path / "fix.patch"


def test_build_apply_remove(tree: tuple[Path, Path], tmp_path: Path) -> None:
    src, diff = tree
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    target = Target(src / "app")
    try:
        assert [
            target.call("a", 1),
            target.call("b", 3),
            target.call("name", 1),
            target.call("checked", 2),
        ] == ["20", "7", "bee", "6"]
        assert [target.call("tick"), target.call("tick")] == ["1", "2"]

        out = tmp_path / "fix.pbx"
        proc = run(
            "patchbox",
            "build",
            "--source",
            src,
            "--diff",
            diff,
            "--binary",
            "app",
            "--explain",
            "-o",
            out,
        )
        explain = proc.stdout
        assert "in       function helper" in explain  # a.c's helper
        assert "in       function b_name" in explain
        assert "in       function tick" in explain
        assert "out      function checked" in explain and "__assert_fail" in explain
        patch = load_patch(out)
        assert sorted(f.symbol for f in patch.functions) == ["b_name", "helper", "tick"]
        assert patch.meta["source:helper"] == "a.c"

        run("patchbox", "apply", "-p", str(target.pid), out)
        assert [
            target.call("a", 1),
            target.call("b", 3),
            target.call("name", 1),
            target.call("checked", 2),
        ] == ["60", "7", "bumblebee", "6"]
        assert target.call("tick") == "4"  # the running program's counter, now stepping by 2

        run("patchbox", "remove", "-p", str(target.pid), "fix")
        assert [target.call("a", 1), target.call("b", 3), target.call("name", 1)] == [
            "20",
            "7",
            "bee",
        ]
        assert target.call("tick") == "5"
        assert target.alive()
    finally:
        target.stop()
    after = {
        p: p.read_bytes()
        for p in src.rglob("*")
        if p.is_file() and not p.name.startswith("sandbox-sock")
    }
    assert after == before, "patchbox build modified the user's tree"


def test_build_against_stripped_installed_binary(tree: tuple[Path, Path], tmp_path: Path) -> None:
    """The running program is a stripped copy installed outside the tree, as a package
    installs it; its symbols come from the separate debug file its .gnu_debuglink names."""
    src, diff = tree
    inst = tmp_path / "usr" / "bin"
    inst.mkdir(parents=True)
    exe = inst / "app"
    run("objcopy", "--only-keep-debug", src / "app", inst / "app.debug")
    run("strip", "--strip-all", "-o", exe, src / "app")
    run("objcopy", f"--add-gnu-debuglink={inst / 'app.debug'}", exe, cwd=inst)
    assert b".symtab" not in run("readelf", "-S", exe).stdout.encode()
    target = Target(exe)
    try:
        assert target.call("a", 1) == "20"
        out = tmp_path / "fix.pbx"
        run("patchbox", "build", "--source", src, "--diff", diff, "--binary", exe, "-o", out)
        assert sorted(f.symbol for f in load_patch(out).functions) == [
            "b_name",
            "helper",
            "tick",
        ]
        run("patchbox", "apply", "-p", str(target.pid), out)
        assert [target.call("a", 1), target.call("name", 1)] == ["60", "bumblebee"]
        run("patchbox", "remove", "-p", str(target.pid), "fix")
        assert [target.call("a", 1), target.call("name", 1)] == ["20", "bee"]
        assert target.alive()
    finally:
        target.stop()


def test_build_dry_run_refuses_changed_data(tree: tuple[Path, Path], tmp_path: Path) -> None:
    src, _diff = tree
    fixed = tmp_path / "fixed2"
    shutil.copytree(TREE, fixed)
    edit(fixed / "util.c", "static int count;", "static int count = 7;")
    proc = run("diff", "-ru", "src", "fixed2", cwd=tmp_path, check=False)
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("Only in")]
    diff = "\n".join(lines) + "\n"
    (tmp_path / "data.patch").write_text(diff)
    proc = run(
        "patchbox",
        "build",
        "--source",
        src,
        "--diff",
        tmp_path / "data.patch",
        "--binary",
        "app",
        "--dry-run",
        check=False,
    )
    assert proc.returncode == 1
    assert "count" in proc.stderr and "initial value of existing variable" in proc.stderr
