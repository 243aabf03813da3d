"""Debian source packages and their levels: the tree of a package at the level before each
fix (its patch series applied up to the fix), configured by the program's recipe and
built; and the loop that runs every fix of such a package against its level.

A level is rebuilt when patchbox's flags, the agent or ``RECIPE_VERSION`` change.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fixes import Fix, Package, key
from .harness import BIN, CACHE, HERE, env_with_tools, log, run, sha
from .report import verdict

__all__ = ["RECIPE_VERSION", "Recipe", "RunFix", "autotools", "levels", "patch_path", "run_levels"]

# Bumped when a recipe (configure options, the dnsmasq Makefile edit) changes: the level
# trees are then rebuilt, as when the patchbox flags or the agent change.
RECIPE_VERSION = 1
JOBS = os.cpu_count() or 2

# One fix of a program against its level: (fix, level tree, patch to write, port, diff)
# -> its result (build, and apply when built).
RunFix = Callable[[Fix, Path, Path, int, Path], dict[str, Any]]


def toolchain_stamp() -> str:
    """Returns a stamp of the patchbox flags and the agent's objects: when it changes, the
    levels are rebuilt."""
    cflags = run([str(BIN / "patchbox"), "config", "--cflags"]).stdout
    libs = run([str(BIN / "patchbox"), "config", "--libs"]).stdout.split()
    agent = [Path(p).read_bytes() for p in libs if p.endswith(".o") and "build-info" not in p]
    return sha(cflags, *agent)


def fetch(pkg: Package) -> Path:
    """Returns the unpacked source package without its patches (``CACHE/PKG/pristine``)."""
    dl = CACHE / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    upstream_version = pkg.version.split(":", 1)[-1]
    dsc = dl / f"{pkg.name}_{upstream_version}.dsc"
    if not dsc.exists():
        log(f"apt-get source {pkg.name}={pkg.version}")
        run(["apt-get", "source", "-qq", "--download-only", f"{pkg.name}={pkg.version}"], cwd=dl)
    pristine = CACHE / pkg.name / "pristine"
    if not pristine.is_dir():
        tmp = pristine.with_name("pristine.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        run(["dpkg-source", "-x", "--skip-patches", str(dsc), str(tmp)])
        tmp.rename(pristine)
    return pristine


def series(pristine: Path) -> list[str]:
    """Returns the names of the package's patches, in the order of debian/patches/series."""
    lines = (pristine / "debian/patches/series").read_text().splitlines()
    return [ln.split()[0] for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


@dataclass(frozen=True)
class Recipe:
    """How a package's level tree is configured (once) and built: plain ``make`` after that,
    which is also what ``patchbox build`` runs in its copies."""

    configure: Callable[[Path, Package], None]
    binary: str  # the daemon, relative to the tree


def autotools(options: list[str]) -> Callable[[Path, Package], None]:
    """Returns a configure step: ``autoreconf`` when needed, then ``./configure OPTIONS``
    with the patchbox flags and agent."""

    def configure(tree: Path, pkg: Package) -> None:
        if (
            not (tree / "configure").exists()
            or (tree / "configure.ac").stat().st_mtime > (tree / "configure").stat().st_mtime
        ):
            run(["autoreconf", "-f"], cwd=tree, out=tree / "autoreconf.log")
        cflags = run([str(BIN / "patchbox"), "config", "--cflags"]).stdout.strip()
        libs = run(
            [str(BIN / "patchbox"), "config", "--libs", "--app-version", pkg.version]
        ).stdout.strip()
        run(
            ["./configure", *options, f"CFLAGS={cflags} -g -O2", f"LIBS={libs}"],
            cwd=tree,
            out=tree / "configure.log",
        )

    return configure


def make(tree: Path) -> None:
    run(
        ["make"],
        cwd=tree,
        env=env_with_tools({"MAKEFLAGS": f"-j{JOBS}"}),
        out=tree / "corpus-build.log",
        timeout=3600,
    )


def levels(pkg: Package, recipe: Recipe) -> dict[str, Path]:
    """Returns {fix key: built tree at the level before the fix}: pristine + the series
    up to the fix's patch, configured and built; each level is a copy of the one before
    (timestamps kept, so make rebuilds only what the patches in between changed)."""
    pristine = fetch(pkg)
    names = series(pristine)
    stamp = sha(toolchain_stamp(), pkg.name, str(RECIPE_VERSION))
    root = CACHE / pkg.name / "lv"
    if (root / ".stamp").exists() and (root / ".stamp").read_text() != stamp:
        log(f"{pkg.name}: patchbox flags, agent or recipe changed: rebuilding the levels")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / ".stamp").write_text(stamp)
    out: dict[str, Path] = {}
    prev: tuple[Path, int] | None = None
    for fix in sorted(pkg.fixes, key=lambda f: names.index(f.patch)):
        idx = names.index(fix.patch)
        tree = root / f"{idx:02d}"
        if not (tree / ".built").exists():
            tmp = tree.with_name(tree.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if prev is None:
                run(["cp", "-a", str(pristine), str(tmp)])
                start = 0
            else:
                run(["cp", "-a", str(prev[0]), str(tmp)])
                (tmp / ".built").unlink()
                start = prev[1]
            for p in names[start:idx]:
                run(f"patch -s -p1 -N -f < {pristine}/debian/patches/{p}", cwd=tmp)
            if prev is None:
                recipe.configure(tmp, pkg)
            log(f"{pkg.name}: building the level before {fix.patch} ({tree})")
            t0 = time.monotonic()
            make(tmp)
            (tmp / ".built").write_text(f"{time.monotonic() - t0:.0f} s\n")
            shutil.rmtree(tree, ignore_errors=True)
            tmp.rename(tree)
        out[key(fix)] = tree
        prev = (tree, idx)
    return out


def patch_path(pkg: Package, fix: Fix) -> Path:
    """Returns the fix's patch file in the package's unpacked source."""
    return CACHE / pkg.name / "pristine" / "debian" / "patches" / fix.patch


def run_levels(
    pkg: Package,
    fixes: list[Fix],
    results: Path,
    recipe: Recipe,
    *,
    base_port: int,
    run_fix: RunFix,
) -> list[dict[str, Any]]:
    """Returns the result row of every fix of ``fixes``, each run by ``run_fix`` against its
    level, on port ``base_port`` + its place in the package; a fix with an adapted diff
    (``adapted/PROGRAM-KEY.diff``) is run twice, as it is and adapted."""
    trees = levels(pkg, recipe)
    out: list[dict[str, Any]] = []
    for n, fix in enumerate(pkg.fixes):
        if fix not in fixes:
            continue
        k = key(fix)
        tree = trees[k]
        port = base_port + n + 1
        rows = [(k, patch_path(pkg, fix))]
        if fix.note.startswith("adapted") or (HERE / "adapted" / f"{pkg.name}-{k}.diff").exists():
            rows.append((f"{k}-adapted", HERE / "adapted" / f"{pkg.name}-{k}.diff"))
        for name, diff in rows:
            log(f"{pkg.name} {name}: build, apply under load, probe")
            t0 = time.monotonic()
            pbx = results / pkg.name / f"{name}.pbx"
            pbx.parent.mkdir(parents=True, exist_ok=True)
            try:
                r = run_fix(fix, tree, pbx, port, diff)
            except Exception as err:  # a broken step is a result too, with its reason
                r = {"error": f"{type(err).__name__}: {err}"[-1500:]}
            row = {
                "program": pkg.name,
                "version": pkg.version,
                "fix": name,
                "ident": fix.ident,
                "patch": diff.name,
                "adapted": name.endswith("-adapted"),
                "shape": fix.shape,
                "what": fix.what,
                "probe": fix.probe,
                "note": fix.note,
                "level": str(tree),
                **r,
                "seconds": round(time.monotonic() - t0, 1),
            }
            row["verdict"] = verdict(fix, row) if "error" not in r else "failed"
            log(f"{pkg.name} {name}: {row['verdict']}")
            out.append(row)
    return out
