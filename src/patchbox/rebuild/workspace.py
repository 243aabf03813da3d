"""The workspace of `patchbox build`: copy the tree, build it, apply the diff, rebuild.

The user's tree is never modified. Both builds run in the *same* absolute directory
(``WORK/tree``): the original build first, its object files are stashed in ``WORK/orig``,
then the diff is applied in place and the tree is rebuilt, so ``__FILE__`` strings and
DWARF paths are identical in the two sets of objects.

Build contract (docs/build.md): the build command runs in ``WORK/tree`` with
``PATCHBOX_CFLAGS`` set to ``patchbox config --cflags`` and ``CFLAGS`` extended by it
(``MAKEFLAGS`` gets ``-jN`` with ``--jobs``); the tree must compile with those flags, as
the running binary was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self

from patchbox import config
from patchbox.arch import Arch
from patchbox.errors import BuildError
from patchbox.sourcediff import diff_files

__all__ = ["BuildError", "Rebuilt", "TreeBuild", "Workspace", "check_diff"]

ASM_SUFFIXES = (".S", ".s", ".sx", ".asm")


def check_diff(diff_text: str) -> None:
    """Refuses diffs that touch assembly files (or are empty)."""
    files = diff_files(diff_text)
    if not files:
        raise BuildError("the diff names no file (not a unified diff?)")
    asm = [f for f in files if f.endswith(ASM_SUFFIXES)]
    if asm:
        raise BuildError(
            f"assembly file {asm[0]} is changed by the diff: patchbox build "
            f"compares compiled C functions and cannot tell what a changed "
            f"assembly file replaces; patch it with extract-patch by hand"
        )


@dataclass(frozen=True)
class Rebuilt:
    """The two builds of a tree: the objects without and with the diff."""

    original: Mapping[str, Path]  # by path relative to the tree (or build directory)
    patched: Mapping[str, Path]
    level: int  # the -p level the diff applied with
    steps: tuple[tuple[str, float], ...]  # what took how long (seconds), in order
    recompiled: int | None = None  # incremental mode: the objects recompiled
    notes: tuple[str, ...] = ()  # what --explain prints above the comparison
    warnings: tuple[str, ...] = ()


class TreeBuild(Protocol):
    """What `patchbox build` needs of a workspace, whichever the mode: a context that
    removes what it made (unless kept), and one call building both sides."""

    root: Path

    def __enter__(self) -> TreeBuild: ...

    def __exit__(self, *exc: object) -> None: ...

    def rebuild(self, diff: Path, strip: int | None, jobs: int | None) -> Rebuilt:
        """Returns the original and the patched objects of the tree and ``diff``."""
        ...


class Workspace:
    """A temporary copy of the source tree (``root/tree``) and the stashed original
    objects: the make mode of `patchbox build` (:meth:`rebuild`)."""

    def __init__(
        self,
        source: str | Path,
        work: str | Path | None = None,
        keep: bool = False,
        command: str = "make",
        arch: Arch | None = None,
    ) -> None:
        self.arch = arch  # the running binary's: the patchbox flags are its (None: this host's)
        self.source = Path(source).resolve()
        if not self.source.is_dir():
            raise BuildError(f"source tree {source} is not a directory")
        if work is not None:
            self.root = Path(work).resolve()
            if self.root.exists() and any(self.root.iterdir()):
                raise BuildError(f"work directory {work} is not empty")
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            self.root = Path(tempfile.mkdtemp(prefix="patchbox-build-"))
        self.keep = keep or work is not None
        self.tree = self.root / "tree"
        self.orig = self.root / "orig"
        self.command = command  # the build command (sh -c in the copy)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def rebuild(self, diff: Path, strip: int | None, jobs: int | None) -> Rebuilt:
        """Returns the objects of the tree built in the copy, then of the copy with
        ``diff`` applied and built again in the same directory."""
        start = time.monotonic()
        self.copy_source()
        self.build(self.command, jobs, "original")
        orig = self.stash_objects()
        if not orig:
            raise BuildError(f"`{self.command}` produced no object file (*.o) in the tree")
        level = self.apply_diff(diff, strip)
        self.build(self.command, jobs, "patched")
        patched = self.objects()
        return Rebuilt(orig, patched, level, (("builds", time.monotonic() - start),))

    def copy_source(self) -> None:
        """Copies the user's tree (timestamps kept: objects already built stay up to date)."""
        shutil.copytree(
            self.source,
            self.tree,
            symlinks=True,
            ignore=shutil.ignore_patterns(".git", "sandbox-sock*"),
        )

    def build(self, command: str, jobs: int | None, log: str) -> None:
        """Runs ``command`` in the tree with the patchbox flags (of the architecture of the
        binary; its compiler is the tree's, e.g. ``CC`` in the environment); raises
        BuildError on failure."""
        cflags = config.cflags(self.arch)
        env = dict(os.environ)
        env["PATCHBOX_CFLAGS"] = cflags
        env["CFLAGS"] = f"{env.get('CFLAGS', '')} {cflags}".strip()
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        if jobs:
            env["MAKEFLAGS"] = f"{env.get('MAKEFLAGS', '')} -j{jobs}".strip()
        proc = subprocess.run(
            command,
            shell=True,
            cwd=self.tree,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        (self.root / f"{log}.log").write_text(proc.stdout)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.strip().splitlines()[-8:])
            raise BuildError(
                f"{log} build failed (`{command}` exit {proc.returncode} in {self.tree}): {tail}"
            )

    def objects(self, under: Path | None = None) -> dict[str, Path]:
        """Returns {path relative to the tree: path} of every ``*.o`` (recursively)."""
        base = under or self.tree
        return {str(p.relative_to(base)): p for p in sorted(base.rglob("*.o")) if p.is_file()}

    def stash_objects(self) -> dict[str, Path]:
        """Copies the original build's objects to ``root/orig``; returns them by relative path."""
        out = {}
        for rel, path in self.objects().items():
            dest = self.orig / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            out[rel] = dest
        return out

    def apply_diff(self, diff: str | Path, strip: int | None = None) -> int:
        """Applies the diff to the tree with ``patch``; returns the -p level used."""
        if shutil.which("patch") is None:
            raise BuildError("`patch` is not installed (apt-get install patch)")
        diff = Path(diff).resolve()
        levels = [strip] if strip is not None else [1, 0, 2, 3]
        last = ""
        for level in levels:
            base = ["patch", f"-p{level}", "-N", "-f", "-s", "-i", str(diff), "-d", str(self.tree)]
            dry = subprocess.run([*base, "--dry-run"], capture_output=True, text=True, check=False)
            if dry.returncode == 0:
                real = subprocess.run(
                    [*base, "--no-backup-if-mismatch"], capture_output=True, text=True, check=False
                )
                if real.returncode != 0:
                    raise BuildError(f"the diff does not apply: {real.stdout}{real.stderr}")
                return level
            last = (dry.stdout + dry.stderr).strip()
        why = last.splitlines()[-1] if last else ""
        raise BuildError(
            f"the diff {diff} does not apply to {self.source} with "
            f"-p{'/-p'.join(map(str, levels))}: {why}"
        )
