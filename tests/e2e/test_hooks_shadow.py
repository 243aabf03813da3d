"""Apply/remove hooks and shadow variables (tier 2: `-m process`): the escape hatch for a
fix that needs a new field in objects the running program already holds.

The running program keeps `struct conn { int fd; int len; }` objects; the fix wants a
`total` field. The patch attaches it as a shadow variable (patchbox/shadow.h), frees the
shadows in a post-remove hook, and a pre-apply hook can refuse the apply. Behaviour and
hook order are observed from outside (stdout, a log file the hooks append to).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hooksprog import FIX, HOOK_ORDER, PROGRAM, App

from helpers import compile_c, run_tool
from patchbox import config

pytestmark = pytest.mark.process


@pytest.fixture()
def setup(tmp_path: Path, agent_dir: Path) -> dict[str, Path]:
    (tmp_path / "app").mkdir()
    (tmp_path / "fix").mkdir()
    exe = compile_c(PROGRAM, tmp_path / "app" / "conn", agent=True)
    inc = config.include_dir()
    assert inc is not None
    obj = compile_c(FIX, tmp_path / "fix" / "conn.o", obj=True, extra=[f"-I{inc}"])
    pbx = tmp_path / "fix.pbx"
    run_tool("extract-patch", "--function", "serve", "--name", "total", "-o", pbx, obj, exe)
    return {"exe": exe, "patch": pbx, "log": tmp_path / "hooks.log", "refuse": tmp_path / "refuse"}


def test_shadow_field_and_hook_order(setup: dict[str, Path]) -> None:
    shown = run_tool("patchbox", "show", setup["patch"], "--json").stdout
    assert '"hooks"' in shown and "pre_apply" in shown.lower()
    app = App(setup["exe"], {"HOOK_LOG": str(setup["log"]), "REFUSE": str(setup["refuse"])})
    try:
        assert [app.serve(0), app.serve(0), app.serve(1)] == [1, 2, 1]
        run_tool("patchbox", "apply", "-p", app.pid, setup["patch"])
        # conns[0] already has len 2: the new field starts at 0 for it, then grows.
        assert [app.serve(0), app.serve(0), app.serve(1)] == [3010, 4020, 2010]
        run_tool("patchbox", "remove", "-p", app.pid, "total")
        assert app.serve(0) == 5
        run_tool("patchbox", "apply", "-p", app.pid, setup["patch"])
        assert app.serve(0) == 6010  # the shadows were freed by the post-remove hook
        assert setup["log"].read_text().split() == HOOK_ORDER
    finally:
        app.stop()


def test_pre_apply_hook_refuses_and_nothing_changes(setup: dict[str, Path]) -> None:
    app = App(setup["exe"], {"HOOK_LOG": str(setup["log"]), "REFUSE": str(setup["refuse"])})
    try:
        setup["refuse"].write_text("")
        res = run_tool("patchbox", "apply", "-p", app.pid, setup["patch"], check=False)
        assert res.returncode == 1 and "HOOK_FAILED" in res.stderr and "returned 7" in res.stderr
        assert app.serve(0) == 1
        assert run_tool("patchbox", "list", "-p", app.pid, "--json").stdout.strip() == "[]"
        setup["refuse"].unlink()
        run_tool("patchbox", "apply", "-p", app.pid, setup["patch"])
        assert app.serve(0) == 2010
    finally:
        app.stop()
