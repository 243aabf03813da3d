"""The corpus's QEMU device probes (scripts/corpus/qemu_*.py) against the project's QEMU,
which carries every fix: each probe drives its device through qtest on its own machine and
must see the fixed behaviour, with QEMU still answering QMP after it.

The unfixed side (the corpus level, every fix reverted, then the fix applied and removed
live) is the corpus's own run (`-m corpus_full`, docs/corpus.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers import ROOT

sys.path.append(str(ROOT / "scripts"))
from corpus import qemu as corpus_qemu
from corpus.fixes import QEMU
from corpus.harness import Ctx

pytestmark = pytest.mark.qemu

DEVICE_PROBES = sorted(k for k, p in corpus_qemu.PROBES.items() if p.machine)


def test_every_device_probe_belongs_to_a_fix() -> None:
    probes = {f.probe for f in QEMU.fixes}
    assert set(DEVICE_PROBES) <= probes


@pytest.mark.parametrize("name", DEVICE_PROBES)
def test_device_probe_sees_the_fix(name: str, qemu_exe: Path, tmp_path: Path) -> None:
    probe = corpus_qemu.PROBES[name]
    fix = next(f for f in QEMU.fixes if f.probe == name)
    daemon, qmp = corpus_qemu.start_qemu(qemu_exe, probe.machine, tmp_path)
    try:
        extra = {"qmp": str(qmp), "qtest": str(tmp_path / corpus_qemu.QTEST.name)}
        seen = probe.check(Ctx(fix, ROOT, 0, daemon, extra))
        assert probe.fixed(seen), f"{name}: {seen!r} (expected: {probe.expected})"
        assert corpus_qemu.alive(daemon, qmp), f"QEMU gone after {name}: {seen!r}"
    finally:
        daemon.stop()
