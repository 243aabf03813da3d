"""Shared fixtures (helpers live in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import AGENT_DIR, ROOT, compile_c

__all__ = ["AGENT_DIR", "ROOT", "compile_c"]


@pytest.fixture(scope="session")
def agent_dir() -> Path:
    """Returns the directory of the installed agent (patchbox.config.agent_dir)."""
    return AGENT_DIR


TIERS = ("process", "qemu", "fuzz", "wheel", "ansible", "reach", "corpus", "corpus_full")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks every test of no other tier `unit`, so `-m unit` runs the fast tier alone.

    The whole corpus (`corpus_full`, ~14 min on 2 cores with the cache warm) runs only
    when asked for: `-m` naming it, or PATCHBOX_CORPUS_FULL=1."""
    full = "corpus_full" in (config.option.markexpr or "") or (
        os.environ.get("PATCHBOX_CORPUS_FULL") == "1"
    )
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("corpus_full") and not full:
            item.add_marker(
                pytest.mark.skip(
                    reason="the whole corpus: -m corpus_full or PATCHBOX_CORPUS_FULL=1"
                )
            )
