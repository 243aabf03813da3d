"""Apply/remove hooks and shadow variables on aarch64, under qemu-user (tier `aarch64`;
docs/aarch64.md): the program and fix of test_hooks_shadow.py cross-built with
`patchbox config --arch aarch64`, the patch built by `extract-patch`, applied and removed
by this x86-64 client. The hooks run in the emulated process in their order, the
pre-apply hook refuses with nothing changed, the shadow field lives while the patch is
applied and is freed by the post-remove hook."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from a64 import CC, LOADER, QEMU, missing_toolchain
from hooksprog import FIX, PROGRAM, App, refused_by_pre_apply, shadow_and_hook_order

from helpers import run_tool
from patchbox import config
from patchbox.arch import Machine
from patchbox.format.layout import load_patch

pytestmark = pytest.mark.aarch64


def _config(*args: str) -> list[str]:
    return shlex.split(run_tool("patchbox", "config", "--arch", "aarch64", *args).stdout)


@pytest.fixture()
def setup(tmp_path: Path) -> dict[str, Path]:
    gone = missing_toolchain()
    if gone:
        pytest.skip(f"missing: {gone}")
    cflags = ["-O2", "-fPIE", *_config("--cflags")]
    inc = config.include_dir()
    assert inc is not None
    for name, source in (("app", PROGRAM), ("fix", FIX)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "conn.c").write_text(source)  # one file name: its statics
    subprocess.run([CC, *cflags, f"-I{inc}", "-c", "conn.c"], cwd=tmp_path / "fix", check=True)
    libs = _config("--libs", "--app-version", "a64-hooks")
    link = [CC, *cflags, "-pie", "conn.c", *libs, *LOADER, "-o", "conn"]
    subprocess.run(link, cwd=tmp_path / "app", check=True)
    exe, pbx = tmp_path / "app" / "conn", tmp_path / "fix.pbx"
    obj = tmp_path / "fix" / "conn.o"
    run_tool("extract-patch", "--function", "serve", "--name", "total", "-o", pbx, obj, exe)
    patch = load_patch(pbx)
    assert patch.machine == Machine.AARCH64 and len(patch.hooks) == 4
    return {"exe": exe, "patch": pbx, "log": tmp_path / "hooks.log", "refuse": tmp_path / "no"}


def start(setup: dict[str, Path]) -> App:
    env = {"HOOK_LOG": str(setup["log"]), "REFUSE": str(setup["refuse"])}
    return App(setup["exe"], env, runner=(QEMU,))


def test_shadow_field_and_hook_order(setup: dict[str, Path]) -> None:
    shadow_and_hook_order(start(setup), setup["patch"], setup["log"])


def test_pre_apply_hook_refuses_and_nothing_changes(setup: dict[str, Path]) -> None:
    refused_by_pre_apply(start(setup), setup["patch"], setup["refuse"])
