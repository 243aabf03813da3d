"""Test helpers: compiling C snippets on the fly, locating the built agent.

Import from here (``from helpers import compile_c``): with two conftest.py files the
module name ``conftest`` is ambiguous.
"""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from patchbox.config import libs
from patchbox.flags import LINK_FLAGS, PATCH_CFLAGS

ROOT = Path(__file__).resolve().parent.parent
APP_VERSION = "e2e-1.0"
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
        if agent:  # exactly what a user's build gets from `patchbox config --libs`
            cmd += shlex.split(libs(app_version=APP_VERSION, app_cflags=" ".join(PATCH_CFLAGS)))
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out
