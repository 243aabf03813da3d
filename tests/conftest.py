"""Shared fixtures (helpers live in helpers.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import AGENT_DIR, ROOT, compile_c

__all__ = ["AGENT_DIR", "ROOT", "compile_c"]


@pytest.fixture(scope="session")
def agent_dir() -> Path:
    """Returns the directory of the installed agent (patchbox.config.agent_dir)."""
    return AGENT_DIR


@pytest.fixture()
def world_dir() -> Iterator[Path]:
    """Yields a new root-owned 0755 directory directly under /tmp, which nobody can reach
    (``tmp_path`` lies under /tmp/pytest-of-root, 0700); removed afterwards. Skips the test
    unless it runs as root with setpriv(1) at hand: these tests act as nobody."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("acts as nobody: needs root and setpriv (util-linux)")
    d = Path(tempfile.mkdtemp(prefix="pbx-sec-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


TIERS = (
    "process",
    "aarch64",
    "qemu",
    "libvirt",
    "guest",
    "fuzz",
    "wheel",
    "ansible",
    "reach",
    "corpus",
    "corpus_full",
    "diff",
    "diff_full",
)
# Tiers that run only when asked for: -m naming them, or their variable set to 1.
ON_REQUEST = {"corpus_full": "PATCHBOX_CORPUS_FULL", "diff_full": "PATCHBOX_DIFF_FULL"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks every test of no other tier `unit`, so `-m unit` runs the fast tier alone.

    The whole corpus (`corpus_full`, ~14 min on 2 cores with the cache warm) and the
    whole differential test (`diff_full`, >= 1,000 programs, ~35 min) run only
    when asked for: `-m` naming them, or PATCHBOX_CORPUS_FULL=1 / PATCHBOX_DIFF_FULL=1."""
    asked = {
        tier
        for tier, var in ON_REQUEST.items()
        if tier in (config.option.markexpr or "") or os.environ.get(var) == "1"
    }
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)
        for tier, var in ON_REQUEST.items():
            if item.get_closest_marker(tier) and tier not in asked:
                item.add_marker(pytest.mark.skip(reason=f"only on request: -m {tier} or {var}=1"))
