"""`patchbox build --qemu` on the real QEMU 7.2 build (tier 3: `pytest -m qemu`).

The diff is made here with difflib from the cached source: (1) `info version` prints
differently (hmp_info_version, monitor/hmp-cmds.c), (2) a comment inserted above
qmp_query_acpi_ospm_status in monitor/qmp-cmds.c, which only shifts the __LINE__ passed
to error_setg()/QOM cast checks in the functions below it. The build recompiles only the
affected objects against the configured build directory; the patch holds (1) alone.
"""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path

import pytest
from qemuutil import BIN, Qemu, run

from patchbox.format.layout import load_patch
from patchbox.wire import ApplyFlag

pytestmark = pytest.mark.qemu

EDITS = [
    (
        "monitor/hmp-cmds.c",
        'monitor_printf(mon, "%" PRId64 ".%" PRId64 ".%" PRId64 "%s\\n",',
        'monitor_printf(mon, "QEMU %" PRId64 ".%" PRId64 ".%" PRId64 "%s (fixed)\\n",',
    ),
    (
        "monitor/qmp-cmds.c",
        "ACPIOSTInfoList *qmp_query_acpi_ospm_status(Error **errp)\n",
        "/* Lists the OSPM status of the ACPI device. */\n"
        "ACPIOSTInfoList *qmp_query_acpi_ospm_status(Error **errp)\n",
    ),
]


def make_diff(src: Path, out: Path) -> Path:
    lines: list[str] = []
    for rel, old, new in EDITS:
        text = (src / rel).read_text()
        assert text.count(old) == 1, f"{old!r} not once in {rel}"
        lines += difflib.unified_diff(
            text.splitlines(True), text.replace(old, new).splitlines(True), f"a/{rel}", f"b/{rel}"
        )
    out.write_text("".join(lines))
    return out


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in d.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def test_build_qemu_from_diff(qemu: Qemu, qemu_exe: Path, tmp_path: Path) -> None:
    build = qemu_exe.parent
    src = build.parent / "src"
    diff = make_diff(src, tmp_path / "fix.patch")
    before_src = snapshot(src / "monitor")
    before_build = snapshot(build / "libcommon.fa.p")
    pbx = tmp_path / "fix.pbx"
    t0 = time.monotonic()
    proc = run(
        BIN / "patchbox",
        "build",
        "--qemu",
        "--source",
        src,
        "--diff",
        diff,
        "--binary",
        qemu_exe,
        "--explain",
        "--name",
        "hmp-version",
        "-o",
        pbx,
        timeout=600,
    )
    elapsed = time.monotonic() - t0
    out = proc.stdout
    print(out, proc.stderr, f"patchbox build --qemu: {elapsed:.1f} s", sep="\n")
    lines = out.splitlines()

    def verdict(fn: str) -> str:
        hit = [ln for ln in lines if ln.split()[2:3] == [fn]]
        assert len(hit) == 1, f"{fn} not explained once:\n{out}"
        return hit[0]

    assert "2 object(s) of" in out  # only the two changed files were recompiled
    assert verdict("hmp_info_version").split()[:2] == ["in", "function"]
    line_only = verdict("qmp_query_acpi_ospm_status")
    assert line_only.split()[0] == "out"
    assert "only __LINE__-like immediates passed to" in line_only
    assert "error_setg_internal" in line_only and "not a change" in line_only
    for fn in ("qmp_x_query_irq_foreach", "qmp_x_query_rdma_foreach"):
        assert verdict(fn).split()[0] == "out"
    assert not [ln for ln in lines if ln.startswith("  in ") and "hmp_info_version" not in ln]
    # Neither the source tree nor the build directory was written to.
    assert snapshot(src / "monitor") == before_src
    assert snapshot(build / "libcommon.fa.p") == before_build

    patch = load_patch(pbx)
    assert [f.symbol for f in patch.functions] == ["hmp_info_version"]
    assert patch.flags & ApplyFlag.RETAIN
    assert patch.meta["profile"] == "qemu"

    original = qemu.ctl.hmp("info version")
    run(BIN / "patchbox", "apply", "-p", qemu.pid, pbx)
    patched = qemu.ctl.hmp("info version")
    assert patched == "QEMU " + original.rstrip("\r\n") + " (fixed)\r\n", patched
    listing = json.loads(run(BIN / "patchbox", "list", "-p", qemu.pid, "--json").stdout)
    assert [p["name"] for p in listing] == ["hmp-version"]
    assert qemu.ctl.execute("query-version")["qemu"]["major"] == 7  # QMP unaffected
    run(BIN / "patchbox", "remove", "-p", qemu.pid, "hmp-version")
    assert qemu.ctl.hmp("info version") == original
