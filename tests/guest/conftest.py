"""The guest tier (``-m guest``): scripts/guest importable as ``guest``, the image made
once per session, a timeout fit for booting under TCG. The unit tests of scripts/guest
(parsers, the archive, module order) sit beside it and need none of this."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BIN, ROOT

sys.path.append(str(ROOT / "scripts"))

from guest.image import GuestImage, ensure_image


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """Returns the guest's kernel and initramfs (made on first use: ~70 MB of packages)."""
    if os.geteuid() != 0:
        pytest.skip("the guest tier needs root (a network namespace and its tap)")
    qemu = os.environ.get("PATCHBOX_GUEST_QEMU", "qemu-system-x86_64")
    assert shutil.which(qemu), f"{qemu}: not found (scripts/bootstrap.sh installs qemu-system-x86)"
    return ensure_image()


@pytest.fixture(scope="session")
def project_qemu(guest_image: GuestImage) -> Path:
    """Returns the project's QEMU (scripts/qemu/build-qemu.sh: Debian's device set, the
    agent linked in), built on first use."""
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Making the image on a fresh machine and two boots under TCG on 2 shared cores.
    for item in items:
        if item.get_closest_marker("guest"):
            item.add_marker(pytest.mark.timeout(1800))
