"""A real QEMU's VM name (tier 3: `pytest -m qemu`): what `patchbox ps` reads from the
command line is what QEMU itself answers to QMP `query-name`, for each form of `-name`
(libvirt's among them), and `--vm` finds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qemuutil import BIN, Qemu, run

pytestmark = pytest.mark.qemu

FORMS = [
    "guest=web-01,debug-threads=on",  # libvirt's
    "web-01",
    "web-01,process=qemu-web-01",
    "guest=a,,b c,debug-threads=on",  # a comma in the name, doubled
    "first,guest=second",  # the last guest wins
]


@pytest.mark.parametrize("form", FORMS)
def test_ps_reads_the_name_qemu_answers(qemu_exe: Path, tmp_path: Path, form: str) -> None:
    q = Qemu(qemu_exe, tmp_path, ["-name", form])
    try:
        name = q.ctl.execute("query-name")["name"]
        rows = json.loads(run(BIN / "patchbox", "ps", "--vm", name, "--json").stdout)
        assert [(r["pid"], r["vm"]) for r in rows if r["pid"] == q.pid] == [(q.pid, name)]
        assert name in run(BIN / "patchbox", "ps").stdout
    finally:
        q.stop()
