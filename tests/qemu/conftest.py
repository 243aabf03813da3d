"""QEMU fixtures: the cached QEMU build (scripts/qemu/build-qemu.sh) and a running QEMU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from qemuutil import Qemu

from helpers import project_qemu


@pytest.fixture(scope="session")
def qemu_exe() -> Path:
    return project_qemu()


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
