"""Shared fixtures (helpers live in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import AGENT_DIR, ROOT, compile_c

__all__ = ["AGENT_DIR", "ROOT", "compile_c"]


@pytest.fixture(scope="session")
def agent_dir() -> Path:
    """Returns the directory of the installed agent (patchbox.config.agent_dir)."""
    return AGENT_DIR


TIERS = ("process", "qemu", "fuzz", "wheel", "ansible", "reach")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks every test of no other tier `unit`, so `-m unit` runs the fast tier alone."""
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)
