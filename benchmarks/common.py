"""What the benchmark scripts share: building a C program with or without the agent,
driving it over stdin/stdout, and printing the result table."""

from __future__ import annotations

import select
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

from patchbox.config import libs
from patchbox.flags import LINK_FLAGS, PATCH_CFLAGS

__all__ = ["ROOT", "build_program", "Proc", "print_table"]

ROOT = Path(__file__).resolve().parent.parent  # the repository (its tests/, agent/, scripts/)


def build_program(
    tmp: Path, name: str, source: str, *, agent: bool, obj: bool = False, stem: str = "bench"
) -> Path:
    """Returns the program (or with ``obj`` the object) compiled from ``source`` in
    ``tmp/name`` with the patchable flags, linked with the agent if ``agent``."""
    d = tmp / name
    d.mkdir()
    src = d / f"{stem}.c"
    src.write_text(source)
    out = d / (f"{stem}.o" if obj else stem)
    cmd = ["gcc", "-O2", "-fPIE", *PATCH_CFLAGS]
    if obj:
        cmd += ["-c", str(src), "-o", str(out)]
    else:
        cmd += ["-pie", str(src), "-o", str(out), *LINK_FLAGS]
        if agent:
            cmd += shlex.split(libs(app_version="bench"))
    subprocess.run(cmd, check=True)
    return out


class Proc:
    """A benchmark program answering one line per command; it first prints "ready"."""

    def __init__(self, exe: Path) -> None:
        self.p = subprocess.Popen(
            [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.pid = self.p.pid
        assert self.ask("") == "ready"

    def ask(self, cmd: str) -> str:
        """Returns the program's answer line to ``cmd`` (just reads a line if empty)."""
        stdin, stdout = self.p.stdin, self.p.stdout
        assert stdin is not None and stdout is not None  # both pipes (Popen above)
        if cmd:
            stdin.write(cmd + "\n")
            stdin.flush()
        ready, _, _ = select.select([stdout], [], [], 120)
        assert ready, f"no answer to {cmd!r}"
        return stdout.readline().strip()

    def stop(self) -> None:
        self.p.kill()
        self.p.wait()


def print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """Prints ``rows`` under ``header`` in aligned columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
