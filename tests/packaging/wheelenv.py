"""The wheel tier's installed package: the sdist and the wheel built the standard way,
the wheel installed into a fresh virtualenv outside the checkout (the session fixture
``installed`` of tests/packaging/conftest.py), and commands run with it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from helpers import ROOT

__all__ = ["Installed", "build_dist", "install"]


@dataclass(frozen=True)
class Installed:
    wheel: Path
    direct_wheel: Path
    venv: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(
        self, *args: str, cwd: str | None = None, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PATCHBOX_AGENT_DIR")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env['PATH']}"
        return subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            check=False,
            cwd=cwd,
            timeout=timeout,
        )


def build_dist(args: list[str], out: Path) -> Path:
    """Returns the wheel `python -m build ARGS` wrote into ``out``."""
    proc = subprocess.run(
        [sys.executable, "-m", "build", *args, "-o", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    return wheel


def install(base: Path, cleanup: Callable[[Callable[[], None]], None]) -> Installed:
    """Returns the wheel built from the sdist (and one built directly) under ``base``,
    installed with its test extra into a new virtualenv under /tmp (removed through
    ``cleanup``)."""
    assert not str(base).startswith(str(ROOT)), "the virtualenv must be outside the checkout"
    # `python -m build` builds the sdist, then the wheel from the unpacked sdist.
    wheel = build_dist([], base / "dist")
    assert len(list((base / "dist").glob("*.tar.gz"))) == 1
    direct = build_dist(["--wheel"], base / "direct")
    # Where every user may reach it, as /opt/patchbox is: the process tier run with it
    # acts as nobody too (tmp_path lies under /tmp/pytest-of-root, 0700).
    home = Path(tempfile.mkdtemp(prefix="pbx-wheel-", dir="/tmp"))
    home.chmod(0o755)
    cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
    venv = home / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    proc = subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--disable-pip-version-check",
            f"{wheel}[test]",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Installed(wheel, direct, venv)
