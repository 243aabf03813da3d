"""QEMU's build layout: compile one fixed source file exactly as QEMU's build did.

QEMU builds with meson/ninja; every object's command is in
``BUILD/compile_commands.json``. A live-patch object must be compiled with the same
command (same flags, includes, defines) as the running binary's object, but without
touching the build tree (a plain ``ninja`` would relink the running binary's file).
:func:`compile_fixed` runs the recorded command on a fixed copy of the source.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from patchbox.build.incremental import entry_args, strip_outputs
from patchbox.errors import ExtractError

__all__ = ["build_info", "find_command", "compile_fixed"]


def find_command(build_dir: Path, source: str) -> dict:
    """Returns the compile_commands.json entry whose file ends with ``source``
    (e.g. ``monitor/qmp-cmds-control.c``); the first one if several targets build it."""
    db_path = Path(build_dir) / "compile_commands.json"
    try:
        entries = json.loads(db_path.read_text())
    except OSError as err:
        raise ExtractError(f"{db_path}: {err.strerror}: is {build_dir} a configured QEMU build?") from err
    wanted = source.lstrip("./")
    matches = [e for e in entries if str(Path(e["directory"], e["file"]).resolve()).endswith("/" + wanted)]
    if not matches:
        raise ExtractError(f"{source} is not compiled by the QEMU build in {build_dir}")
    return matches[0]


def compile_fixed(build_dir: Path, source: str, fixed: Path, out: Path) -> Path:
    """Returns ``out`` after compiling ``fixed`` (the fixed copy of ``source``; it must have
    the same file name, so static symbols match by source file) with the command QEMU's
    build recorded for ``source``.

    The lower-level tool: ``patchbox build --qemu`` (:mod:`patchbox.build.incremental`)
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
    proc = subprocess.run(cmd, cwd=entry["directory"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExtractError(f"compiling {fixed} failed:\n{proc.stderr.strip()}")
    return Path(out)


# What QEMU's build records about itself (config-host.h, qemu-version.h in the build dir).
_BUILD_INFO_DEFINES = {"QEMU_VERSION": "qemu_version", "QEMU_PKGVERSION": "qemu_pkgversion",
                       "QEMU_FULL_VERSION": "qemu_full_version"}


def build_info(build_dir: Path) -> dict[str, str]:
    """Returns QEMU's version facts from a configured build directory, as patch meta
    (``qemu_version``, ``qemu_pkgversion``, ``qemu_full_version``); {} if it is none."""
    info: dict[str, str] = {}
    for header in ("config-host.h", "qemu-version.h"):
        try:
            lines = (Path(build_dir) / header).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(None, 2)
            if len(parts) == 3 and parts[0] == "#define" and parts[1] in _BUILD_INFO_DEFINES:
                info[_BUILD_INFO_DEFINES[parts[1]]] = parts[2].strip().strip('"')
    return info
