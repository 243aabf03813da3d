"""QEMU's build layout: compile one fixed source file exactly as QEMU's build did.

QEMU builds with meson/ninja; every object's command is in
``BUILD/compile_commands.json``. A live-patch object must be compiled with the same
command (same flags, includes, defines) as the running binary's object, but without
touching the build tree (a plain ``ninja`` would relink the running binary's file).
:func:`compile_fixed` runs the recorded command on a fixed copy of the source.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from patchbox.errors import BuildError, ExtractError
from patchbox.rebuild.incremental import entry_args, load_db, strip_outputs

__all__ = ["find_command", "compile_fixed"]


def find_command(build_dir: Path, source: str) -> dict[str, Any]:
    """Returns the compile_commands.json entry whose file ends with ``source``
    (e.g. ``monitor/qmp-cmds-control.c``); the first one if several targets build it."""
    entries = load_db(Path(build_dir))
    wanted = source.lstrip("./")
    matches = [
        e for e in entries if str(Path(e["directory"], e["file"]).resolve()).endswith("/" + wanted)
    ]
    if not matches:
        raise BuildError(f"{source} is not compiled by the QEMU build in {build_dir}")
    return matches[0]


def compile_fixed(build_dir: Path, source: str, fixed: Path, out: Path) -> Path:
    """Returns ``out`` after compiling ``fixed`` (the fixed copy of ``source``; it must have
    the same file name, so static symbols match by source file) with the command QEMU's
    build recorded for ``source``.

    The lower-level tool: ``patchbox build --qemu`` (:mod:`patchbox.rebuild.incremental`)
    finds and recompiles every object a diff affects the same way."""
    fixed = Path(fixed).resolve()
    if fixed.name != Path(source).name:
        raise ExtractError(f"the fixed copy must be named {Path(source).name}, not {fixed.name}")
    entry = find_command(build_dir, source)
    original = entry["file"]
    cmd = [str(fixed) if arg == original else arg for arg in strip_outputs(entry_args(entry))]
    if str(fixed) not in cmd:
        raise ExtractError(f"cannot find {original} in its recorded compile command")
    # `#include "x.h"` looks beside the source first: keep finding the original's neighbours.
    orig_dir = Path(entry["directory"], original).resolve().parent
    cmd += ["-iquote", str(orig_dir), "-o", str(Path(out).resolve())]
    proc = subprocess.run(cmd, cwd=entry["directory"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ExtractError(f"compiling {fixed} failed:\n{proc.stderr.strip()}")
    return Path(out)
