"""Real-process fixtures: build the target with the agent linked, start it, talk to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from live import Target

from helpers import AGENT_DIR, ROOT, compile_c, render

__all__ = ["AGENT_DIR", "ROOT", "compile_c"]


@pytest.fixture(scope="session")
def target_exe(tmp_path_factory: pytest.TempPathFactory, agent_dir: Path) -> Path:
    """Returns the original target program, built with the agent linked in."""
    out = tmp_path_factory.mktemp("target") / "target"
    return compile_c(render(), out, agent=True)


@pytest.fixture()
def target(target_exe: Path) -> Iterator[Target]:
    """Yields a fresh running target; fails the test if it died during it."""
    t = Target(target_exe)
    yield t
    alive = t.alive()
    stderr = "" if alive else t.stderr.read()
    t.stop()
    assert alive, f"target died during the test: {stderr}"


@pytest.fixture()
def patched_obj(tmp_path: Path) -> Callable[..., Path]:
    """Returns a function compiling a patched target.c (same file name) to an object."""
    counter = iter(range(1000))

    def build(extra: list[str] | None = None, **changes: str) -> Path:
        d = tmp_path / f"patched{next(counter)}"
        d.mkdir()
        return compile_c(render(**changes), d / "target.o", obj=True, extra=extra)

    return build
