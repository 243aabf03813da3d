"""Helpers shared by the QEMU tests: the patchbox commands, a running QEMU."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from qmp import QMP

from patchbox.rebuild.qemu import compile_fixed

BIN = Path(sys.executable).parent


def fixed_object(qemu_exe: Path, tmp: Path, source: str, old: str, new: str) -> Path:
    """Returns a patch object: QEMU's ``source`` with ``old`` replaced by ``new``, compiled
    with the command QEMU's build used for it."""
    src_root = qemu_exe.parent.parent / "src"
    text = (src_root / source).read_text()
    assert old in text, f"{old!r} not in {source}"
    fixed = tmp / "fix" / Path(source).name
    fixed.parent.mkdir(exist_ok=True)
    fixed.write_text(text.replace(old, new))
    return compile_fixed(qemu_exe.parent, source, fixed, tmp / (Path(source).stem + ".o"))


def fixed_patch(
    qemu_exe: Path, tmp: Path, source: str, *, old: str, new: str, function: str, name: str
) -> Path:
    """Returns patch ``tmp/NAME.pbx`` replacing ``function`` by its version in
    :func:`fixed_object`'s object (`extract-patch --qemu`)."""
    obj = fixed_object(qemu_exe, tmp, source, old, new)
    pbx = tmp / f"{name}.pbx"
    run(BIN / "extract-patch", "--qemu", "-f", function, "--name", name, "-o", pbx, obj, qemu_exe)
    return pbx


class Qemu:
    """``qemu-system-x86_64 -machine none`` with two QMP sockets (load, control), and
    ``args`` before them."""

    def __init__(self, exe: Path, tmp: Path, args: Sequence[str] = ()) -> None:
        self.load_sock, self.ctl_sock = tmp / "qmp-load.sock", tmp / "qmp-ctl.sock"
        self.proc = subprocess.Popen(
            [
                str(exe),
                *args,
                "-machine",
                "none",
                "-display",
                "none",
                "-nodefaults",
                "-S",
                "-qmp",
                f"unix:{self.load_sock},server=on,wait=off",
                "-qmp",
                f"unix:{self.ctl_sock},server=on,wait=off",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "PATCHBOX_SOCK_DIR": str(tmp)},
        )
        self.pid = self.proc.pid
        self.agent_sock = tmp / f"sandbox-sock{self.pid}"
        deadline = time.monotonic() + 30
        while not self.agent_sock.exists():
            assert self.proc.poll() is None, self.proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "agent socket never appeared"
            time.sleep(0.05)
        self.ctl = QMP(self.ctl_sock)

    def stop(self) -> None:
        self.ctl.close()
        self.proc.kill()
        self.proc.wait(10)


def run(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc
