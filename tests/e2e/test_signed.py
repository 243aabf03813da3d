"""Signed patches against a real target (tier 2: `-m process`)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from live import Target

from patchbox.extract import extract_patch
from patchbox.format.layout import save_patch

pytestmark = pytest.mark.process


def patchbox(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [str(Path(sys.executable).parent / "patchbox"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_trust_dir_gates_apply(
    target: Target, target_exe: Path, patched_obj: Callable[..., Path], tmp_path: Path
) -> None:
    pbx = tmp_path / "fix.pbx"
    save_patch(
        extract_patch(
            patched_obj(USE_HELPER="scale(x) + 9"), target_exe, ["use_helper"], name="signed-fix"
        ),
        pbx,
    )
    trust = tmp_path / "trusted"
    trust.mkdir()
    assert patchbox("keygen", "--out", str(tmp_path / "k" / "ops")).returncode == 0
    assert patchbox("keygen", "--out", str(tmp_path / "k" / "other")).returncode == 0
    (trust / "ops.pub").write_bytes((tmp_path / "k" / "ops.pub").read_bytes())
    env = {"PATCHBOX_TRUST_DIR": str(trust)}
    before = target.code_snapshot()

    run = patchbox("apply", "-p", str(target.pid), str(pbx), env=env)
    assert run.returncode == 1 and "is not signed" in run.stderr and str(trust) in run.stderr

    assert patchbox("sign", "--key", str(tmp_path / "k" / "other.key"), str(pbx)).returncode == 0
    run = patchbox("apply", "-p", str(target.pid), str(pbx), env=env)
    assert run.returncode == 1 and "not trusted" in run.stderr, run.stderr
    assert target.code_snapshot() == before and target.call("use_helper", 4) == "41"

    assert patchbox("sign", "--key", str(tmp_path / "k" / "ops.key"), str(pbx)).returncode == 0
    run = patchbox("apply", "-p", str(target.pid), str(pbx), env=env)
    assert run.returncode == 0, run.stderr
    assert target.call("use_helper", 4) == "49"
    # show still reads a signed file
    assert patchbox("show", str(pbx)).returncode == 0
