#!/usr/bin/env python3
"""Builds the agent and installs it into a package directory (the wheel's build step).

    install_agent.py DEST [--source ROOT] [--jobs N]

DEST (``patchbox/_agent`` of a wheel's build tree, or ``src/patchbox/_agent`` of a
checkout) receives::

    lib/libsandbox.o lib/sandbox-listen.o     link both into the program
    lib/libsandbox.a lib/libsandbox.so        the archive; the LD_PRELOAD library
    include/patchbox/{patch,sandbox,wire}.h   headers for programs and patch sources
    lib/pkgconfig/patchbox.pc                 relocatable (paths from ${pcfiledir})
    ARCH/lib/libsandbox.o ...                 the same objects cross-built for each other
    ARCH/lib/pkgconfig/patchbox.pc            architecture ARCH of CROSS_ARCHES whose
                                              ARCH-linux-gnu-gcc exists (Debian's
                                              gcc-aarch64-linux-gnu): what `patchbox config
                                              --arch ARCH --libs|--pkgconfigdir` names

Used by setup.py (``pip wheel .``, ``pip install .``, editable installs) and by
scripts/bootstrap.sh; standard library only, since it runs inside pip's isolated build
environment. The compile flags of each architecture come from src/patchbox/flags.py and
src/patchbox/arch/ of the source tree, asked in a child Python without site-packages
(those modules import nothing but the standard library).
"""

from __future__ import annotations

import argparse
import json
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


_ASK = """
import json, sys
sys.path.insert(0, sys.argv[1])
from patchbox import __version__
from patchbox.arch import get_arch
from patchbox.flags import LINK_FLAGS, patch_cflags
print(json.dumps([__version__, patch_cflags(get_arch(sys.argv[2])), LINK_FLAGS]))
"""


def _flags(root: Path, arch: str) -> Any:
    """Returns [version, compile flags of ``arch``, link flags] of source tree ``root``."""
    proc = subprocess.run(
        [sys.executable, "-S", "-c", _ASK, str(root / "src"), arch],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"install_agent: the flags of {arch}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def pc_text(root: Path, arch: str, up: str = "../..") -> str:
    """Returns patchbox.pc of ``arch``: the agent objects and the compile/link flags of a
    patchable program, relocatable (paths relative to the .pc file's own directory; the
    package's ``_agent`` is ``up`` from it)."""
    version, cflags, ldflags = _flags(root, arch)
    return (
        f"prefix=${{pcfiledir}}/{up}\n"
        "libdir=${pcfiledir}/..\n"
        "includedir=${prefix}/include\n"
        "\n"
        "Name: patchbox\n"
        "Description: patchbox live-patching agent (libsandbox.o + sandbox-listen.o)\n"
        f"Version: {version}\n"
        f"Cflags: {' '.join(cflags)} -I${{includedir}}\n"
        f"Libs: ${{libdir}}/libsandbox.o ${{libdir}}/sandbox-listen.o {' '.join(ldflags)}\n"
    )


def install(dest: Path, root: Path = ROOT, jobs: int | None = None) -> None:
    """Builds the agent of source tree ``root`` and installs it into ``dest``."""
    make = shutil.which("make")
    if make is None or shutil.which(os.environ.get("CC", "gcc")) is None:
        raise SystemExit("install_agent: building the agent needs make and a C compiler (gcc)")
    dest = dest.resolve()
    host = platform.machine()
    _build(make, root, dest / "lib", jobs, [])
    _write(dest / "lib" / "pkgconfig" / "patchbox.pc", pc_text(root, host))
    for arch in CROSS_ARCHES:
        if arch != host and shutil.which(f"{arch}-linux-gnu-gcc"):
            _build(make, root, dest / arch / "lib", jobs, [f"ARCH={arch}"])
            _write(
                dest / arch / "lib" / "pkgconfig" / "patchbox.pc", pc_text(root, arch, "../../..")
            )
    inc = dest / "include" / "patchbox"
    inc.mkdir(parents=True, exist_ok=True)
    for name in HEADERS:
        _replace(root / "agent" / "include" / "patchbox" / name, inc / name)


def _write(pc: Path, text: str) -> None:
    """Writes ``text`` to ``pc`` unless it holds it already."""
    pc.parent.mkdir(parents=True, exist_ok=True)
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
