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
from hooksprog import FIX, PROGRAM, App, refused_by_pre_apply, shadow_and_hook_order

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
    shadow_and_hook_order(
        App(setup["exe"], {"HOOK_LOG": str(setup["log"]), "REFUSE": str(setup["refuse"])}),
        setup["patch"],
        setup["log"],
    )


def test_pre_apply_hook_refuses_and_nothing_changes(setup: dict[str, Path]) -> None:
    refused_by_pre_apply(
        App(setup["exe"], {"HOOK_LOG": str(setup["log"]), "REFUSE": str(setup["refuse"])}),
        setup["patch"],
        setup["refuse"],
    )
