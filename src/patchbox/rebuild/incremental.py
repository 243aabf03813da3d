"""Incremental `patchbox build` for meson/ninja build directories (QEMU's layout).

A QEMU-sized tree is not rebuilt twice. The *original* objects are the ones already in
the build directory (they built the running binary; :func:`patchbox.extract.combine`
checks each replaced function's size against the binary). The *patched* side:

1. the source tree is mirrored at ``WORK/tree`` and the diff is applied there. The
   mirror is lazy: a real directory holding a symlink to each entry of the tree's top
   (``.git`` and a build directory inside the tree left out); only the directories on
   the way to a file the diff changes become real ones, and those files copies. QEMU's
   20,000 files cost a hundred symlinks, not 20,000. A compiler that reaches a changed
   file through a symlinked directory and ``..`` would read the original: every
   recompiled object's dependency list is checked for that, and if it happened the
   mirror is made whole (every directory real) and the objects compiled again;
2. the affected objects are every compile_commands.json entry whose source file the diff
   changes, plus every object whose dependency list (``ninja -t deps``, else its ``.d``
   file) names a changed header — restricted to the inputs of the reference binary
   (``ninja -t inputs``) when ninja can tell;
3. each is recompiled with its recorded command, run in its recorded directory (so
   build-directory-relative options and generated headers are the build's own), with
   every path inside the source tree remapped to the copy and the object written to
   ``WORK/obj/<output>``. Relative spellings (``../src/x.c``) go through ``WORK/link``, a
   symlink to ``WORK/tree``, absolute ones to ``WORK/tree``; ``-ffile-prefix-map`` maps
   both back to the original spelling, so ``__FILE__`` strings and DWARF names are the
   same as in the original objects.

Neither the source tree nor the build directory is written to.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchbox.errors import BuildError
from patchbox.rebuild.workspace import Rebuilt, Workspace
from patchbox.sourcediff import diff_files, strip_path

__all__ = [
    "load_db",
    "entry_args",
    "strip_outputs",
    "entry_output",
    "Remap",
    "ninja_deps",
    "ninja_inputs",
    "IncrementalBuild",
]

# Dependency-file options of a recorded command; a recompiled object needs none.
DEP_OPTS_WITH_ARG = {"-MQ", "-MF", "-MT"}
DEP_OPTS = {"-MD", "-MMD"}
# Options whose argument is a path (separate, or joined as in -I../src).
# One entry of compile_commands.json: "file", "directory", "command" or "arguments",
# "output" (JSON, as meson and CMake write it).
Entry = dict[str, Any]
PATH_OPTS = ("-iquote", "-isystem", "-idirafter", "-include", "-imacros", "-iprefix", "-I")


def load_db(build_dir: Path) -> list[Entry]:
    """Returns the entries of ``build_dir/compile_commands.json``."""
    db_path = Path(build_dir) / "compile_commands.json"
    try:
        entries: list[Entry] = json.loads(db_path.read_text())
    except OSError as err:
        raise BuildError(
            f"{db_path}: {err.strerror}: is {build_dir} a configured meson/ninja build directory?"
        ) from err
    except ValueError as err:
        raise BuildError(f"{db_path}: not JSON: {err}") from err
    return entries


def entry_args(entry: Entry) -> list[str]:
    """Returns the argument vector of a compile_commands.json entry."""
    return shlex.split(entry["command"]) if "command" in entry else list(entry["arguments"])


def entry_output(entry: Entry) -> str:
    """Returns the object file an entry writes (its ``output``, else its ``-o`` argument)."""
    output: str | None = entry.get("output")
    if output:
        return output
    args = entry_args(entry)
    for i, arg in enumerate(args[:-1]):
        if arg == "-o":
            return args[i + 1]
    raise BuildError(f"compile command for {entry.get('file')} names no output (-o)")


def strip_outputs(args: list[str]) -> list[str]:
    """Returns ``args`` without ``-o FILE`` and the dependency-file options."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in DEP_OPTS_WITH_ARG or arg == "-o":
            skip = True
            continue
        if arg in DEP_OPTS:
            continue
        out.append(arg)
    return out


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass
class Remap:
    """Maps paths inside the source tree to its copy (see the module docstring)."""

    source: Path  # the source tree as given (absolute)
    tree: Path  # its copy: absolute spellings
    link: Path  # symlink to the copy: relative spellings
    exclude: Path | None = None  # the build directory: never remapped
    _roots: list[str] = field(init=False)

    def __post_init__(self) -> None:
        spelled = os.path.normpath(os.path.abspath(self.source))
        self._roots = list(dict.fromkeys([spelled, os.path.realpath(spelled)]))

    def _root_of(self, full: str) -> str | None:
        for root in self._roots:
            if _inside(full, root):
                return root
        return None

    def _excluded(self, full: str) -> bool:
        if self.exclude is None:
            return False
        ex = os.path.normpath(os.path.abspath(self.exclude))
        return _inside(full, ex) or _inside(full, os.path.realpath(ex))

    def path(self, p: str, directory: str, maps: dict[str, str] | None = None) -> str | None:
        """Returns the copy's spelling of ``p`` (relative to ``directory``), or None when
        ``p`` is not inside the source tree. ``maps`` collects {copy prefix: original}."""
        if not p:
            return None
        full = os.path.normpath(os.path.join(directory, p))
        root = self._root_of(full)
        if root is None or self._excluded(full):
            return None
        rest = os.path.relpath(full, root)
        if os.path.isabs(p):
            base, orig = str(self.tree), root
        else:
            base, orig = str(self.link), os.path.relpath(root, directory)
        if maps is not None:
            maps.setdefault(base, orig)
        return base if rest == "." else os.path.join(base, rest)

    def command(self, entry: Entry, out: Path) -> list[str]:
        """Returns the entry's command compiling the copy of its source into ``out``."""
        directory = entry["directory"]
        args = strip_outputs(entry_args(entry))
        maps: dict[str, str] = {}
        cmd = [args[0]]
        source = self.path(entry["file"], directory, maps)
        found = False
        pending = False  # the previous argument was a path option (-I DIR)
        for arg in args[1:]:
            new = None
            if pending:
                new = self.path(arg, directory, maps)
                pending = False
            elif arg in PATH_OPTS:
                pending = True
            elif arg.startswith("-"):
                for opt in PATH_OPTS:
                    if arg.startswith(opt) and len(arg) > len(opt):
                        tail = self.path(arg[len(opt) :], directory, maps)
                        new = opt + tail if tail is not None else None
                        break
            else:
                new = self.path(arg, directory, maps)
                found = found or (new is not None and new == source)
            cmd.append(arg if new is None else new)
        if source is None or not found:
            raise BuildError(
                f"{entry['file']} (compiled in {directory}) is not a file of the "
                f"source tree {self.source}, or not in its recorded command"
            )
        cmd += [f"-ffile-prefix-map={k}={v}" for k, v in maps.items()]
        return cmd + ["-o", str(out)]


def ninja_deps(build_dir: Path, wanted: set[str]) -> dict[str, set[str]] | None:
    """Returns {object (normalised absolute): the paths of ``wanted`` (normalised
    absolute) it depends on} for every object ``ninja -t deps`` records, or None when
    ninja or its deps log is missing.

    QEMU's deps log lists hundreds of thousands of headers; they are matched as ninja
    prints them (relative to the build directory), and only spellings with ``.`` or
    ``..`` inside are normalised.
    """
    ninja = shutil.which("ninja") or shutil.which("ninja-build")
    if ninja is None or not (Path(build_dir) / ".ninja_deps").exists():
        return None
    proc = subprocess.run(
        [ninja, "-C", str(build_dir), "-t", "deps"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        return None
    base = os.path.abspath(build_dir)
    spelled = {os.path.relpath(w, base): w for w in wanted} | {w: w for w in wanted}
    out: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in proc.stdout.splitlines():
        if not line:
            continue
        if line[0] in " \t":
            dep = line.strip()
            if current is None:
                continue
            hit = spelled.get(dep)
            if hit is None and ("/./" in dep or "/../" in dep.lstrip("./")):
                hit = spelled.get(os.path.normpath(os.path.join(base, dep)))
            if hit is not None:
                current.add(hit)
            continue
        target = line.split(": #deps", 1)[0]
        current = out.setdefault(os.path.normpath(os.path.join(base, target)), set())
    return out


def depfile_paths(path: Path) -> list[str]:
    """Returns the dependencies listed in a make-style ``.d`` file, as spelled there."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    text = text.replace("\\\n", " ")
    deps: list[str] = []
    for rule in text.splitlines():
        if ":" not in rule:
            continue
        rhs = rule.split(":", 1)[1].replace("\\ ", "\0")
        deps += [d.replace("\0", " ") for d in rhs.split()]
    return deps


def read_depfile(path: Path, directory: str) -> list[str]:
    """Returns the dependencies listed in a make-style ``.d`` file (normalised absolute)."""
    return [os.path.normpath(os.path.join(directory, d)) for d in depfile_paths(path)]


def ninja_inputs(build_dir: Path, binary: Path) -> set[str] | None:
    """Returns every input of ``binary`` as ninja sees it (normalised absolute), or None
    when ninja cannot tell (no ninja, ninja < 1.11, not a target of this build)."""
    ninja = shutil.which("ninja") or shutil.which("ninja-build")
    if ninja is None or not (Path(build_dir) / "build.ninja").exists():
        return None
    target = os.path.relpath(os.path.abspath(binary), os.path.abspath(build_dir))
    proc = subprocess.run(
        [ninja, "-C", str(build_dir), "-t", "inputs", target],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    if proc.returncode != 0 or not lines:
        return None
    base = os.path.abspath(build_dir)
    return {os.path.normpath(os.path.join(base, x.strip())) for x in lines}


def _farm(src: str, dst: str, skip: set[str]) -> int:
    """Mirrors one level of ``src`` at ``dst``: a real directory holding a symlink to the
    original of every entry, directories included (nothing in ``src`` is written, not
    even its timestamps); returns the number of entries. :func:`_materialize` and
    :func:`_deepen` turn symlinked directories into real ones where needed."""
    os.makedirs(dst, exist_ok=True)
    n = 0
    with os.scandir(src) as it:
        for entry in it:
            p = os.path.join(src, entry.name)
            if p in skip or entry.name.startswith("sandbox-sock"):
                continue
            os.symlink(p, os.path.join(dst, entry.name))
            n += 1
    return n


def _real_dir(link: str, skip: set[str]) -> bool:
    """Replaces ``link``, a mirror's symlink to an original directory, by a real directory
    of symlinks; False (left alone) for anything else, such as the tree's own symlinks."""
    if not os.path.islink(link):
        return False
    target = os.readlink(link)
    if os.path.islink(target) or not os.path.isdir(target):
        return False
    os.unlink(link)
    _farm(target, link, skip)
    return True


def _materialize(tree: Path, rel: str, skip: set[str]) -> None:
    """Makes ``tree/rel`` a file of its own (a copy of the original), and every directory
    on the way a real one, so applying the diff cannot write through a symlink."""
    cur = tree
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BuildError(f"the diff names {rel}, outside the source tree")
    for i, part in enumerate(parts):
        cur = cur / part
        if not os.path.lexists(cur):
            return  # a new file (or directory): patch creates it
        if not cur.is_symlink():
            continue
        if i == len(parts) - 1:
            if not os.path.isdir(cur):
                target = os.readlink(cur)
                cur.unlink()
                shutil.copy2(target, cur)
        elif not _real_dir(str(cur), skip):
            return


def _deepen(tree: Path, skip: set[str]) -> None:
    """Makes every symlinked directory of the mirror a real one, recursively."""
    for top, dirs, _files in os.walk(tree):
        for d in dirs:
            _real_dir(os.path.join(top, d), skip)  # os.walk then descends into it


class IncrementalBuild(Workspace):
    """The workspace of the incremental mode: ``tree`` (the copy), ``link``, ``obj``."""

    def __init__(
        self,
        source: str | Path,
        build_dir: str | Path,
        binary: str | Path,
        work: str | Path | None = None,
    ) -> None:
        super().__init__(source, work)
        self.build_dir = Path(os.path.abspath(build_dir))
        self.binary = Path(os.path.abspath(binary))
        self.link = self.root / "link"
        self.obj = self.root / "obj"
        self.entries = load_db(self.build_dir)
        self.notes: list[str] = []  # what --explain prints above the comparison
        self.warnings: list[str] = []
        self.timings: dict[str, float] = {}
        self._spelled = os.path.normpath(os.path.abspath(self.source))
        self._skip = {
            os.path.join(self._spelled, ".git"),
            str(self.build_dir),
            os.path.realpath(self.build_dir),
        }
        self._changed: list[str] = []  # set by apply_diff: originals the diff changes

    def rebuild(self, diff: Path, strip: int | None, jobs: int | None) -> Rebuilt:
        """Returns the objects of the build directory that ``diff`` affects, and the same
        objects recompiled from a patched mirror of the source tree."""
        start = time.monotonic()
        self.copy_source()
        copied = time.monotonic()
        level = self.apply_diff(diff, strip)
        entries = self.affected(self.changed_files(Path(diff).read_text(errors="replace"), level))
        for o in self.stale(entries):
            self.warnings.append(
                f"{o} is out of date in {self.build_dir} (ninja would rebuild it): the build "
                f"directory may not be what built the running binary"
            )
        orig, patched = self.compile(entries, jobs)
        built = time.monotonic()
        return Rebuilt(
            orig,
            patched,
            level,
            (("copy", copied - start), ("recompile", built - copied)),
            recompiled=len(entries),
            notes=(
                f"{len(entries)} object(s) of {self.build_dir} affected by the diff, "
                f"recompiled from the patched copy",
                *self.notes,
            ),
            warnings=tuple(self.warnings),
        )

    def copy_source(self) -> None:
        """Mirrors the source tree (without ``.git`` and the build directory) in ``tree``,
        lazily (the module docstring); :meth:`apply_diff` replaces the files the diff
        changes by copies first."""
        _farm(self._spelled, str(self.tree), self._skip)
        self.link.symlink_to(self.tree)

    def make_whole(self) -> None:
        """Makes every directory of the lazy mirror a real one (a symlink per file)."""
        _deepen(self.tree, self._skip)

    def apply_diff(self, diff: str | Path, strip: int | None = None) -> int:
        """Applies the diff to the mirror (after copying the files it names, at every
        strip level tried); returns the -p level used."""
        names = diff_files(Path(diff).read_text(errors="replace"))
        for level in [strip] if strip is not None else [1, 0, 2, 3]:
            for name in names:
                rel = strip_path(name, level)
                if rel and not rel.startswith("/"):
                    _materialize(self.tree, rel, self._skip)
        level = super().apply_diff(diff, strip)
        self._changed = [
            os.path.realpath(os.path.join(self._spelled, strip_path(n, level))) for n in names
        ]
        return level

    def changed_files(self, diff_text: str, level: int) -> list[str]:
        """Returns the files the diff changes, relative to the source tree."""
        return [strip_path(f, level) for f in diff_files(diff_text)]

    def affected(self, changed: list[str]) -> list[Entry]:
        """Returns the compile_commands.json entries to recompile for ``changed``."""
        roots = dict.fromkeys(
            [os.path.normpath(os.path.abspath(self.source)), os.path.realpath(self.source)]
        )
        wanted = {os.path.normpath(os.path.join(r, c)): c for r in roots for c in changed}
        deps = ninja_deps(self.build_dir, set(wanted))
        inputs = ninja_inputs(self.build_dir, self.binary)
        used: set[str] = set()
        out, outside = [], 0
        for e in self.entries:
            directory = e["directory"]
            src = os.path.normpath(os.path.join(directory, e["file"]))
            obj = os.path.normpath(os.path.join(directory, entry_output(e)))
            hits = {wanted[src]} if src in wanted else set()
            recorded = deps.get(obj) if deps is not None else None
            if recorded is not None:
                hits |= {wanted[d] for d in recorded}
            else:  # not a ninja build (or no deps log, or not in it): the .d file
                mf = _depfile_arg(e)
                listed = read_depfile(Path(directory, mf), directory) if mf else []
                hits |= {wanted[d] for d in listed if d in wanted}
            if not hits:
                continue
            if inputs is not None and obj not in inputs:
                outside += 1
                continue
            used |= hits
            out.append(e)
        if outside:
            self.notes.append(
                f"{outside} affected object(s) not linked into {self.binary.name}: not recompiled"
            )
        for c in changed:
            if c not in used:
                self.warnings.append(
                    f"{c} is compiled into no object of {self.binary.name} that "
                    f"{self.build_dir} records (a new file, or an input of generated code, "
                    f"which is not regenerated): its change is not in the patch"
                )
        return out

    def compile(
        self, entries: list[Entry], jobs: int | None
    ) -> tuple[dict[str, Path], dict[str, Path]]:
        """Recompiles ``entries`` from the copy; returns (original, patched) objects by path
        relative to the build directory."""
        remap = Remap(self.source, self.tree, self.link, self.build_dir)
        orig: dict[str, Path] = {}
        work: list[tuple[str, list[str], str]] = []
        for e in entries:
            output = entry_output(e)
            full = Path(os.path.normpath(os.path.join(e["directory"], output)))
            rel = os.path.relpath(full, self.build_dir)
            if rel.startswith(".."):
                rel = output.lstrip("/")
            if not full.is_file():
                raise BuildError(
                    f"{full} does not exist: the build directory {self.build_dir} "
                    f"is not built (the original objects are the build's own)"
                )
            out = self.obj / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            orig[rel] = full
            cmd = remap.command(e, out)
            # The dependency list says which files the compiler really opened.
            cmd[-2:-2] = ["-MD", "-MF", f"{out}.d"]
            work.append((rel, cmd, e["directory"]))
        self._run(work, jobs)
        original = self._read_originals(work)
        if original:
            self.notes.append(
                f"{original} was read through a symlinked directory and `..` (the original, "
                f"not the patched copy): the mirror was made whole and the objects "
                f"compiled again"
            )
            self.make_whole()
            self._run(work, jobs)
            original = self._read_originals(work)
            if original:
                raise BuildError(f"the patched compile read the original {original}")
        return orig, {rel: self.obj / rel for rel in orig}

    def _read_originals(self, work: list[tuple[str, list[str], str]]) -> str | None:
        """Returns an original file the diff changes that a compile of ``work`` read."""
        changed = set(self._changed)
        for _rel, cmd, cwd in work:
            for dep in depfile_paths(Path(cmd[cmd.index("-MF") + 1])):
                full = os.path.realpath(os.path.join(cwd, dep))
                if full in changed:
                    return full
        return None

    def _run(self, work: list[tuple[str, list[str], str]], jobs: int | None) -> None:
        """Runs the compile commands of ``work``; raises BuildError if any fails."""

        def run(item: tuple[str, list[str], str]) -> tuple[str, subprocess.CompletedProcess[str]]:
            rel, cmd, cwd = item
            return rel, subprocess.run(
                cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
            )

        log, failed = [], []
        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            for (rel, proc), (_r, cmd, _c) in zip(pool.map(run, work), work):
                log.append(f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
                if proc.returncode != 0:
                    failed.append((rel, proc.stderr.strip()))
        (self.root / "patched.log").write_text("\n".join(log))
        if failed:
            rel, err = failed[0]
            tail = "\n".join(err.splitlines()[-8:])
            raise BuildError(f"compiling {len(failed)} patched object(s) failed; {rel}:\n{tail}")

    def stale(self, entries: list[Entry]) -> list[str]:
        """Returns the objects ninja would rebuild (the build directory is not up to date)."""
        ninja = shutil.which("ninja") or shutil.which("ninja-build")
        if ninja is None or not entries or not (self.build_dir / "build.ninja").exists():
            return []
        outs = [
            os.path.relpath(os.path.join(e["directory"], entry_output(e)), self.build_dir)
            for e in entries
        ]
        proc = subprocess.run(
            [ninja, "-C", str(self.build_dir), "-n", "--", *outs],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if proc.returncode != 0:
            return []
        return [o for o in outs if f" {o}" in proc.stdout or f"-o {o}" in proc.stdout]


def _depfile_arg(entry: Entry) -> str | None:
    """Returns the entry's ``.d`` file: ``OUTPUT.d`` if it exists, else its ``-MF``."""
    out = entry.get("output")
    if out and Path(entry["directory"], f"{out}.d").exists():
        return f"{out}.d"
    if out:  # meson/ninja: -MF is OUTPUT.d; absent means the object was never built
        return None
    args = entry_args(entry)
    for i, arg in enumerate(args[:-1]):
        if arg == "-MF":
            return args[i + 1]
    return None
