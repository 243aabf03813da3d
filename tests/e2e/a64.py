"""Programs cross-built for aarch64 and run under qemu-user, driven from this x86-64
process (tier `aarch64`: tests/e2e/test_aarch64.py, tests/e2e/test_aarch64_extract.py;
docs/aarch64.md)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from patchbox.protocol.client import Client

__all__ = ["CC", "QEMU", "LIBDIR", "LOADER", "missing_toolchain", "A64Target"]

CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
LIBDIR = Path("/usr/aarch64-linux-gnu/lib")
# Linked with the cross toolchain's loader path and run without qemu's -L (docs/aarch64.md).
LOADER = [f"-Wl,--dynamic-linker={LIBDIR}/ld-linux-aarch64.so.1", f"-Wl,-rpath={LIBDIR}"]


def missing_toolchain() -> str | None:
    """Returns what of the cross toolchain and qemu-user is missing, None if nothing."""
    gone = [t for t in (CC, "aarch64-linux-gnu-ld", QEMU, "make") if shutil.which(t) is None]
    if not (LIBDIR / "ld-linux-aarch64.so.1").exists():
        gone.append(f"{LIBDIR}/ld-linux-aarch64.so.1 (libc6-dev-arm64-cross)")
    return ", ".join(gone) or None


class A64Target:
    """The program under qemu-aarch64, driven through its stdin/stdout."""

    def __init__(self, exe: Path, preload: Path | None = None) -> None:
        self.exe = exe
        self.proc = subprocess.Popen(
            [QEMU, *(["-E", f"LD_PRELOAD={preload}"] if preload else []), str(exe)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        ready = self.line()
        assert ready == f"ready {self.proc.pid}", ready  # its getpid() is qemu's pid
        self.socket = exe.parent / f"sandbox-sock{self.proc.pid}"
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, f"no agent socket {self.socket}"
            time.sleep(0.05)

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def cmd(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.line()

    def client(self) -> Client:
        return Client(self.socket, timeout=30)

    def stop(self) -> str:
        """Ends the program; returns its stderr."""
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.stderr.read() if self.proc.stderr else ""
