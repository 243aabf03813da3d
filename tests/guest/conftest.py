"""The guest tier (``-m guest``): scripts/guest importable as ``guest``, the image made
once per session, a timeout fit for booting under TCG. The unit tests of scripts/guest
(parsers, the archive, module order) sit beside it and need none of this."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from helpers import ROOT, project_qemu

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
def guest_qemu() -> Path:
    """Returns the project's QEMU (Debian's device set, the agent linked in) for guests
    whose QEMU is patched (built on first use)."""
    if os.geteuid() != 0:
        pytest.skip("the guest tier needs root (a network namespace and its tap)")
    return project_qemu()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Making the image on a fresh machine and two boots under TCG on 2 shared cores.
    for item in items:
        if item.get_closest_marker("guest"):
            item.add_marker(pytest.mark.timeout(1800))
