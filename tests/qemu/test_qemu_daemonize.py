"""A QEMU started with ``-daemonize`` keeps its agent (tier 3: `pytest -m qemu`).

QEMU forks, the child calls setsid and forks again, the grandchild finishes its setup
(chdir /, stdio on /dev/null), tells the first process it is ready through a pipe and
runs on; the first process exits. The grandchild is the one to patch: its agent is the
one the fork handler started, found by its pid alone, and the first and middle
processes leave no socket behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from qemuutil import BIN, fixed_patch, run
from qmp import QMP

from patchbox.protocol.discovery import discover

pytestmark = pytest.mark.qemu

MARK = " (live-patched by patchbox, daemonized)"


def wait_for_agent(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any(c.source.startswith("/proc/") for c in discover(pid, environ={}).candidates):
        assert time.monotonic() < deadline, f"no agent in QEMU pid {pid}"
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Returns True while pid runs (a zombie waiting for init to reap it has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_qemu_daemonize_patched_by_pid(qemu_exe: Path, tmp_path: Path) -> None:
    sock_dir = tmp_path / "socks"
    sock_dir.mkdir()
    pidfile, qmp_sock = tmp_path / "qemu.pid", tmp_path / "qmp.sock"
    first = subprocess.Popen(
        [
            str(qemu_exe),
            "-machine",
            "none",
            "-display",
            "none",
            "-nodefaults",
            "-daemonize",
            "-pidfile",
            str(pidfile),
            "-qmp",
            f"unix:{qmp_sock},server=on,wait=off",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "PATCHBOX_SOCK_DIR": str(sock_dir)},
    )
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err.decode()
    pid = int(pidfile.read_text())
    assert pid != first.pid
    qmp = None
    try:
        wait_for_agent(pid)
        qmp = QMP(qmp_sock)
        before = qmp.execute("query-version")
        # The first process removed its socket at exit; the middle one never bound.
        assert sorted(p.name for p in sock_dir.iterdir() if p.is_socket()) == [f"sandbox-sock{pid}"]
        info = json.loads(run(BIN / "patchbox", "info", "-p", pid, "--json").stdout)
        assert info["pid"] == str(pid) and info["socket"] == str(sock_dir / f"sandbox-sock{pid}")

        pbx = fixed_patch(
            qemu_exe,
            tmp_path,
            "monitor/qmp-cmds-control.c",
            old="info->package = g_strdup(QEMU_PKGVERSION);",
            new=f'info->package = g_strdup("{MARK}");',
            function="qmp_query_version",
            name="version",
        )
        run(BIN / "patchbox", "apply", "-p", pid, pbx)
        assert qmp.execute("query-version")["package"] == MARK
        run(BIN / "patchbox", "remove", "-p", pid, "version")
        assert qmp.execute("query-version") == before

        # A normal exit (quit) removes the daemon's socket too.
        qmp.execute_raw("quit")
        deadline = time.monotonic() + 30
        while running(pid):
            assert time.monotonic() < deadline, "QEMU did not quit"
            time.sleep(0.05)
        assert not (sock_dir / f"sandbox-sock{pid}").exists()
    finally:
        if qmp is not None:
            qmp.close()
        if running(pid):
            os.kill(pid, 9)
