#!/usr/bin/env python3
"""Builds the agent and installs it into a package directory (the wheel's build step).

    install_agent.py DEST [--source ROOT] [--jobs N]

DEST (``patchbox/_agent`` of a wheel's build tree, or ``src/patchbox/_agent`` of a
checkout) receives::

    lib/libsandbox.o lib/sandbox-listen.o     link both into the program
    lib/libsandbox.a lib/libsandbox.so        the archive; the LD_PRELOAD library
    include/patchbox/{patch,sandbox,wire}.h   headers for programs and patch sources
    lib/pkgconfig/patchbox.pc                 relocatable (prefix=${pcfiledir}/../..)
    ARCH/lib/libsandbox.o ...                 the same objects cross-built for each other
                                              architecture ARCH of CROSS_ARCHES whose
                                              ARCH-linux-gnu-gcc exists (Debian's
                                              gcc-aarch64-linux-gnu): what `patchbox config
                                              --arch ARCH --libs` names

Used by setup.py (``pip wheel .``, ``pip install .``, editable installs) and by
scripts/bootstrap.sh; standard library only, since it runs inside pip's isolated build
environment. The compile flags come from src/patchbox/flags.py (read, not imported).
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OBJECTS = ("libsandbox.o", "sandbox-listen.o", "libsandbox.a", "libsandbox.so")
# Architectures the agent builds for (agent/src/arch/); the host's is built natively into
# lib/, each other one with its Debian cross compiler, when installed, into ARCH/lib/.
CROSS_ARCHES = ("x86_64", "aarch64")
HEADERS = ("patch.h", "sandbox.h", "shadow.h", "wire.h")


def _literal(source: Path, name: str) -> Any:
    """Returns the value of the top-level assignment ``name = <literal>`` in ``source``."""
    for node in ast.parse(source.read_text()).body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else ([node.target] if isinstance(node, ast.AnnAssign) else [])
        )
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            assert isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
            return ast.literal_eval(node.value)
    raise SystemExit(f"install_agent: {name} not found in {source}")


def pc_text(root: Path) -> str:
    """Returns patchbox.pc: the agent objects and the compile/link flags of a patchable
    program, relocatable (paths relative to the .pc file's own directory)."""
    flags = root / "src" / "patchbox" / "flags.py"
    cflags = " ".join(_literal(flags, "PATCH_CFLAGS"))
    ldflags = " ".join(_literal(flags, "LINK_FLAGS"))
    version = _literal(root / "src" / "patchbox" / "__init__.py", "__version__")
    return (
        "prefix=${pcfiledir}/../..\n"
        "libdir=${prefix}/lib\n"
        "includedir=${prefix}/include\n"
        "\n"
        "Name: patchbox\n"
        "Description: patchbox live-patching agent (libsandbox.o + sandbox-listen.o)\n"
        f"Version: {version}\n"
        f"Cflags: {cflags} -I${{includedir}}\n"
        f"Libs: ${{libdir}}/libsandbox.o ${{libdir}}/sandbox-listen.o {ldflags}\n"
    )


def install(dest: Path, root: Path = ROOT, jobs: int | None = None) -> None:
    """Builds the agent of source tree ``root`` and installs it into ``dest``."""
    make = shutil.which("make")
    if make is None or shutil.which(os.environ.get("CC", "gcc")) is None:
        raise SystemExit("install_agent: building the agent needs make and a C compiler (gcc)")
    dest = dest.resolve()
    _build(make, root, dest / "lib", jobs, [])
    (dest / "lib" / "pkgconfig").mkdir(parents=True, exist_ok=True)
    host = platform.machine()
    for arch in CROSS_ARCHES:
        if arch != host and shutil.which(f"{arch}-linux-gnu-gcc"):
            _build(make, root, dest / arch / "lib", jobs, [f"ARCH={arch}"])
    inc = dest / "include" / "patchbox"
    inc.mkdir(parents=True, exist_ok=True)
    for name in HEADERS:
        _replace(root / "agent" / "include" / "patchbox" / name, inc / name)
    pc = dest / "lib" / "pkgconfig" / "patchbox.pc"
    text = pc_text(root)
    if not pc.is_file() or pc.read_text() != text:
        pc.write_text(text)


def _build(make: str, root: Path, lib: Path, jobs: int | None, args: list[str]) -> None:
    """Builds the agent (make ``args``) and installs its objects into ``lib``."""
    with tempfile.TemporaryDirectory(prefix="patchbox-agent-") as tmp:
        cmd = [make, "-s", "-C", str(root / "agent"), f"OUT={tmp}", *args]
        if jobs:
            cmd.append(f"-j{jobs}")
        proc = subprocess.run(
            cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
        if proc.returncode != 0:
            raise SystemExit(f"install_agent: {' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
        lib.mkdir(parents=True, exist_ok=True)
        for name in OBJECTS:
            _replace(Path(tmp) / name, lib / name)


def _replace(src: Path, dst: Path) -> None:
    """Copies ``src`` to ``dst`` unless identical, atomically (a running build may read it)."""
    if dst.is_file() and dst.read_bytes() == src.read_bytes():
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", type=Path)
    ap.add_argument("--source", type=Path, default=ROOT)
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args(argv)
    install(args.dest, args.source, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
