"""The architectures the process tier runs on (tests/e2e/conftest.py's ``arch``).

``@on_every_arch`` runs a test for x86-64, marked `process` with its id ``x86_64``, and
for aarch64 under qemu-user, marked `aarch64` only: `-m process` needs no cross
toolchain and `-m aarch64` runs the aarch64 instances (docs/aarch64.md). A test of one
architecture only is marked `process` itself and says why.
"""

from __future__ import annotations

import pytest

__all__ = ["ARCH_NAMES", "ARCHES", "TIER", "arch_param", "on_every_arch"]

# Each architecture's tier mark.
TIER = {"x86_64": pytest.mark.process, "aarch64": pytest.mark.aarch64}
ARCH_NAMES = tuple(TIER)


def arch_param(arch: str, *values: object, id: str) -> object:
    """Returns a parameter set of ``arch`` (for the indirect ``arch`` fixture) and
    ``values`` carrying the architecture's tier mark."""
    return pytest.param(arch, *values, marks=TIER[arch], id=id)


ARCHES = [arch_param(arch, id=arch) for arch in ARCH_NAMES]
on_every_arch = pytest.mark.parametrize("arch", ARCHES, indirect=True)
