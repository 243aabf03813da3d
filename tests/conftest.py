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
