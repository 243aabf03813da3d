"""Module patchbox.live.qmp against a real QEMU (tier `qemu`): the QEMU health check of the
rollout playbook (docs/ansible.md). Run with ``ansible`` on localhost (local connection),
the collection taken from the checkout's ansible/ through a collections path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from qemuutil import BIN, Qemu

pytestmark = pytest.mark.qemu

ROOT = Path(__file__).resolve().parents[2]


def qmp_module(tmp: Path, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Returns the exit status of ``ansible localhost -m patchbox.live.qmp`` and its result."""
    cols = tmp / "collections"
    link = cols / "ansible_collections" / "patchbox" / "live"
    if not link.exists():
        link.parent.mkdir(parents=True)
        link.symlink_to(ROOT / "ansible")
    tree = tmp / f"tree{len(list(tmp.glob('tree*')))}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_COLLECTIONS_PATH=str(cols), ANSIBLE_HOME=str(tmp / "ansible-home"))
    proc = subprocess.run(
        [str(BIN / "ansible"), "localhost", "-i", "localhost,", "-c", "local"]
        + ["-e", f"ansible_python_interpreter={sys.executable}"]
        + ["-m", "patchbox.live.qmp", "-a", json.dumps(args), "-t", str(tree)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )
    assert (tree / "localhost").is_file(), proc.stdout + proc.stderr
    return proc.returncode, json.loads((tree / "localhost").read_text())


def test_qmp_health_check_on_real_qemu(qemu: Qemu, tmp_path: Path) -> None:
    sock = str(qemu.load_sock)  # the test holds the other monitor
    rc, r = qmp_module(tmp_path, {"socket": sock, "expect": {"status": "prelaunch"}})
    assert rc == 0 and r["response"]["status"] == "prelaunch", r
    assert r["changed"] is False and r["qemu_version"]["major"] == 7
    rc, r = qmp_module(tmp_path, {"socket": sock, "expect": {"status": "running"}})
    assert rc == 2 and "status is 'prelaunch', expected 'running'" in r["msg"], r
    rc, r = qmp_module(tmp_path, {"socket": sock, "command": "cont", "read_only": False})
    assert rc == 0 and r["changed"] is True, r
    rc, r = qmp_module(tmp_path, {"socket": sock, "expect": {"status": "running"}})
    assert rc == 0 and r["response"]["running"] is True, r
    assert qemu.ctl.execute("query-status")["status"] == "running"
    rc, r = qmp_module(tmp_path, {"socket": sock, "command": "no-such-command"})
    assert rc == 2 and "CommandNotFound" in r["msg"], r
