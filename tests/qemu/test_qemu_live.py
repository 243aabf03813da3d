"""Live-patching a real QEMU 7.2 (tier 3: `pytest -m qemu`).

QEMU is built from Debian's source package by scripts/qemu/build-qemu.sh with the
patchbox flags and the agent linked (cached across runs). It runs with no guest
(`-machine none`) and two QMP sockets: one client hammers `query-version` in a loop
while the other patches and checks, so a dropped or failed request would show.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from qemuutil import BIN, Qemu, fixed_object, fixed_patch, run
from qmp import QMP

pytestmark = pytest.mark.qemu


class Hammer(threading.Thread):
    """Sends query-version in a loop on its own QMP connection; records every answer."""

    def __init__(self, sock: Path) -> None:
        super().__init__(daemon=True)
        self.qmp = QMP(sock)
        self.answers: list[str] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                v = self.qmp.execute("query-version")
                self.answers.append(f"{v['qemu']['micro']}{v['package']}")
            except Exception as err:  # any failure is a dropped request
                self.errors.append(repr(err))
                return

    def wait_for(self, answer: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.answers)
        while answer not in self.answers[start:]:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"never saw {answer!r}"
            time.sleep(0.01)


def test_query_version_patched_under_qmp_load(qemu: Qemu, qemu_exe: Path, tmp_path: Path) -> None:
    before = qemu.ctl.execute("query-version")
    old = f"{before['qemu']['micro']}{before['package']}"
    pbx = fixed_patch(
        qemu_exe,
        tmp_path,
        "monitor/qmp-cmds-control.c",
        old="info->package = g_strdup(QEMU_PKGVERSION);",
        new='info->package = g_strdup(" (live-patched by patchbox)");',
        function="qmp_query_version",
        name="version",
    )
    new = f"{before['qemu']['micro']} (live-patched by patchbox)"

    hammer = Hammer(qemu.load_sock)
    hammer.start()
    try:
        hammer.wait_for(old)
        run(BIN / "patchbox", "apply", "-p", qemu.pid, pbx)
        hammer.wait_for(new)
        assert "(live-patched by patchbox)" in qemu.ctl.hmp("info version")
        run(BIN / "patchbox", "remove", "-p", qemu.pid, "version")
        hammer.wait_for(old)
        assert before["package"] in qemu.ctl.hmp("info version")
    finally:
        hammer.halt.set()
        hammer.join(30)
    assert not hammer.errors, hammer.errors
    assert set(hammer.answers) == {old, new}
    # Answers switch old -> new -> old exactly once each way: no flapping, no third value.
    changes = [a for i, a in enumerate(hammer.answers) if i == 0 or a != hammer.answers[i - 1]]
    assert changes == [old, new, old]
    assert len(hammer.answers) > 50


def test_monitor_command_fix_and_info(qemu: Qemu, qemu_exe: Path, tmp_path: Path) -> None:
    before = qemu.ctl.hmp("info version")
    pbx = fixed_patch(
        qemu_exe,
        tmp_path,
        "monitor/hmp-cmds.c",
        old='monitor_printf(mon, "%" PRId64 ".%" PRId64 ".%" PRId64 "%s\\n",',
        new='monitor_printf(mon, "QEMU emulator version %" PRId64 ".%" PRId64 ".%" PRId64 "%s\\n",',
        function="hmp_info_version",
        name="hmp-fix",
    )
    run(BIN / "patchbox", "apply", "-p", qemu.pid, pbx)
    assert qemu.ctl.hmp("info version") == "QEMU emulator version " + before
    listing = json.loads(run(BIN / "patchbox", "list", "-p", qemu.pid, "--json").stdout)
    assert [p["name"] for p in listing] == ["hmp-fix"]
    run(BIN / "patchbox", "remove", "-p", qemu.pid, "hmp-fix")
    assert qemu.ctl.hmp("info version") == before

    info = json.loads(run(BIN / "patchbox", "info", "-p", qemu.pid, "--json").stdout)
    assert info["app_version"].startswith("7.2")
    assert "-fpatchable-function-entry=8,6" in info["app_cflags"]
    assert run(BIN / "patchbox", "test", "-p", qemu.pid).returncode == 0


def test_qemu_profile_records_build_info(qemu_exe: Path, tmp_path: Path) -> None:
    obj = fixed_object(qemu_exe, tmp_path, "monitor/qmp-cmds.c", "return info;", "return info;")
    pbx = tmp_path / "same.pbx"
    run(BIN / "extract-patch", "--qemu", "--function", "qmp_query_name", "-o", pbx, obj, qemu_exe)
    shown = json.loads(run(BIN / "patchbox", "show", "--json", pbx).stdout)
    assert (
        shown["meta"]["qemu_version"]
        == (qemu_exe.parent.parent / "src" / "VERSION").read_text().strip()
    )
    assert shown["meta"]["profile"] == "qemu" and shown["flags"] == 1  # RETAIN
