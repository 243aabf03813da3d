"""Shared fixtures (helpers live in helpers.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import AGENT_DIR, ROOT, compile_c

__all__ = ["AGENT_DIR", "ROOT", "compile_c"]


@pytest.fixture(scope="session")
def agent_dir() -> Path:
    """Returns the directory of the built agent, building it if needed."""
    if not (AGENT_DIR / "libsandbox.o").exists():
        subprocess.run(["make", "-C", str(ROOT / "agent")], check=True, capture_output=True)
    return AGENT_DIR
