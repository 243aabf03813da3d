"""The architectures the process tier runs on (tests/e2e/conftest.py's ``arch``).

``@on_every_arch`` runs a test for x86-64, marked `process` with its id ``x86_64``, and
for aarch64 under qemu-user, marked `aarch64` only: `-m process` needs no cross
toolchain and `-m aarch64` runs the aarch64 instances (docs/aarch64.md). A test of one
architecture only is marked `process` itself and says why.
"""

from __future__ import annotations

import pytest

__all__ = ["ARCHES", "on_every_arch"]

ARCHES = [
    pytest.param("x86_64", marks=pytest.mark.process, id="x86_64"),
    pytest.param("aarch64", marks=pytest.mark.aarch64, id="aarch64"),
]
on_every_arch = pytest.mark.parametrize("arch", ARCHES, indirect=True)
