"""Test helpers: compiling C snippets on the fly, locating the built agent.

Import from here (``from helpers import compile_c``): with two conftest.py files the
module name ``conftest`` is ambiguous.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from patchbox.flags import LINK_FLAGS, PATCH_CFLAGS

ROOT = Path(__file__).resolve().parent.parent
AGENT_DIR = Path(os.environ.get("PATCHBOX_AGENT_DIR", ROOT / "agent" / "build"))


def compile_c(src: str, out: Path, *, obj: bool = False, extra: list[str] | None = None,
              agent: bool = False, opt: str = "-O2") -> Path:
    """Returns ``out`` after compiling C source text ``src`` with the patchable flags."""
    c_file = out.with_suffix(".c")
    c_file.write_text(src)
    cmd = ["gcc", opt, "-fPIE", *PATCH_CFLAGS, *(extra or [])]
    if obj:
        cmd += ["-c", str(c_file), "-o", str(out)]
    else:
        cmd += ["-pie", str(c_file), "-o", str(out), *LINK_FLAGS]
        if agent:
            cmd += [str(AGENT_DIR / "libsandbox.o"), str(AGENT_DIR / "sandbox-listen.o")]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out
