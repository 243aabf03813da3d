"""Real-process fixtures: build the target with the agent linked, start it, talk to it.

``arch`` is the architecture the target is built for: this host's unless a test is
parametrized with ``ARCHES`` (``@on_every_arch``), which runs it for x86-64 (tier
`process`) and for aarch64 under qemu-user (tier `aarch64`, skipped naming what is
missing without the cross toolchain and qemu-aarch64; docs/aarch64.md).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from live import Target

from helpers import AGENT_DIR, ROOT, compile_c, cross_link_flags, render
from patchbox.arch import get_arch, host_arch

__all__ = ["AGENT_DIR", "ROOT", "compile_c"]


@pytest.fixture(scope="session")
def arch(request: pytest.FixtureRequest) -> str:
    """Returns the name of the architecture the target is built for (``ARCHES``; this
    host's when the test is not parametrized); skips for one whose toolchain is missing."""
    name: str = getattr(request, "param", host_arch().name)
    if name != host_arch().name:
        missing = missing_cross(name)
        if missing:
            pytest.skip(f"needs the {name} cross toolchain and qemu-user: missing {missing}")
    return name


def missing_cross(name: str) -> str | None:
    """Returns what of the cross toolchain and qemu-user for the architecture ``name`` is
    missing (Debian's gcc-<multiarch>, its libc, qemu-user), None if nothing."""
    arch = get_arch(name)
    tools = (f"{arch.multiarch}-gcc", f"{arch.multiarch}-ld", f"qemu-{arch.name}", "make")
    gone = [t for t in tools if shutil.which(t) is None]
    loader = cross_link_flags(arch)[0].removeprefix("-Wl,--dynamic-linker=")
    if not Path(loader).exists():
        gone.append(f"{loader} (Debian's libc6-dev-*-cross)")
    return ", ".join(gone) or None


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
