"""Real-process fixtures: build the target with the agent linked, start it, talk to it.

``arch`` is the architecture the target is built for: this host's unless a test is
parametrized with ``ARCHES`` (``@on_every_arch``), which runs it for x86-64 (tier
`process`) and for aarch64 under qemu-user (tier `aarch64`, skipped naming what is
missing without the cross toolchain and qemu-aarch64; docs/aarch64.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from a64 import missing_toolchain
from live import Target

from helpers import AGENT_DIR, ROOT, compile_c, render
from patchbox.arch import host_arch

__all__ = ["AGENT_DIR", "ROOT", "compile_c"]


@pytest.fixture(scope="session")
def arch(request: pytest.FixtureRequest) -> str:
    """Returns the name of the architecture the target is built for (``ARCHES``; this
    host's when the test is not parametrized); skips for one whose toolchain is missing."""
    name: str = getattr(request, "param", host_arch().name)
    if name != host_arch().name:
        missing = missing_toolchain()
        if missing:
            pytest.skip(f"needs the {name} cross toolchain and qemu-user: missing {missing}")
    return name


@pytest.fixture(scope="session")
def target_exe(tmp_path_factory: pytest.TempPathFactory, agent_dir: Path, arch: str) -> Path:
    """Returns the original target program, built with the agent linked in."""
    out = tmp_path_factory.mktemp(f"target-{arch}") / "target"
    return compile_c(render(), out, agent=True, arch=arch)


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
def patched_obj(tmp_path: Path, arch: str) -> Callable[..., Path]:
    """Returns a function compiling a patched target.c (same file name) to an object."""
    counter = iter(range(1000))

    def build(extra: list[str] | None = None, **changes: str) -> Path:
        d = tmp_path / f"patched{next(counter)}"
        d.mkdir()
        return compile_c(render(**changes), d / "target.o", obj=True, extra=extra, arch=arch)

    return build
