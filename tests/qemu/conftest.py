"""QEMU fixtures: the cached QEMU build (scripts/qemu/build-qemu.sh) and a running QEMU."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemuutil import Qemu

from helpers import BIN, ROOT


@pytest.fixture(scope="session")
def qemu_exe() -> Path:
    proc = subprocess.run(
        [str(ROOT / "scripts" / "qemu" / "build-qemu.sh")],
        # The patchbox under test, not another one on PATH.
        env={**os.environ, "PATCHBOX": str(BIN / "patchbox")},
        capture_output=True,
        text=True,
        timeout=3600,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exe = Path(proc.stdout.strip().splitlines()[-1])
    assert exe.is_file()
    return exe


@pytest.fixture()
def qemu(qemu_exe: Path, tmp_path: Path) -> Iterator[Qemu]:
    q = Qemu(qemu_exe, tmp_path)
    yield q
    alive = q.proc.poll() is None
    q.stop()
    assert alive, "QEMU died during the test"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The first QEMU test pays for building QEMU (minutes on a fresh machine): the
    # suite-wide pytest-timeout of 300 s counts fixture setup too.
    for item in items:
        if "qemu" in item.keywords:
            item.add_marker(pytest.mark.timeout(3600))
