"""What a program's shared libraries export: is a patch's import defined anywhere?

A patch reaches functions the program does not define through base IMPORT fix-ups, which
the agent resolves with ``dlsym(RTLD_DEFAULT, name)`` in the running process. A name that
no library of the program exports would only be refused there, at apply time; this finds
it at build time. The libraries are the program's ``DT_NEEDED`` closure, looked up as the
dynamic loader does (``DT_RUNPATH``/``DT_RPATH`` with ``$ORIGIN``, the ``ldconfig`` cache,
the default directories); each library's ``.dynsym`` is read with the record layouts of
:mod:`patchbox.elf.records`, no pyelftools.
"""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from pathlib import Path

from patchbox.arch import Arch, get_arch_by_machine
from patchbox.elf.records import (
    DT,
    SH_LINK,
    SH_OFFSET,
    SH_SIZE,
    SH_TYPE,
    SHDR,
    SHN_UNDEF,
    SHT,
    ST_NAME,
    ST_SHNDX,
    SYM,
    cstring,
    iter_dynamic,
    read_ehdr,
)
from patchbox.errors import ElfError

__all__ = ["Libraries", "program_libraries", "dynamic_exports", "dynamic_needs"]


def _default_dirs(arch: Arch) -> tuple[str, ...]:
    """Returns the directories the loader searches last for ``arch`` (Debian's multiarch
    directories first)."""
    return (
        f"/lib/{arch.multiarch}",
        f"/usr/lib/{arch.multiarch}",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
    )


def _sections(raw: bytes, what: str) -> list[tuple[int, ...]]:
    eh = read_ehdr(raw, what)
    return list(SHDR.iter_table(raw, eh["e_shoff"], eh["e_shnum"] * SHDR.size, what))


def _dynsym(raw: bytes, what: str) -> tuple[list[tuple[int, ...]], bytes]:
    hdrs = _sections(raw, what)
    for h in hdrs:
        if h[SH_TYPE] == SHT["DYNSYM"]:
            link = hdrs[h[SH_LINK]]
            syms = list(SYM.iter_table(raw, h[SH_OFFSET], h[SH_SIZE], what))
            return syms, raw[link[SH_OFFSET] : link[SH_OFFSET] + link[SH_SIZE]]
    return [], b""


@lru_cache(maxsize=256)
def dynamic_exports(path: str) -> frozenset[str]:
    """Returns the names a shared object defines in ``.dynsym`` (versions stripped)."""
    raw = Path(path).read_bytes()
    syms, strtab = _dynsym(raw, path)
    return frozenset(
        cstring(strtab, s[ST_NAME]).split("@")[0]
        for s in syms
        if s[ST_SHNDX] != SHN_UNDEF and s[ST_NAME]
    )


@lru_cache(maxsize=256)
def dynamic_needs(path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Returns (DT_NEEDED names, RUNPATH/RPATH directories with $ORIGIN expanded)."""
    raw = Path(path).read_bytes()
    hdrs = _sections(raw, path)
    needed: list[str] = []
    dirs: list[str] = []
    for h in hdrs:
        if h[SH_TYPE] != SHT["DYNAMIC"]:
            continue
        strh = hdrs[h[SH_LINK]]
        strtab = raw[strh[SH_OFFSET] : strh[SH_OFFSET] + strh[SH_SIZE]]
        for tag, val in iter_dynamic(raw, h[SH_OFFSET], h[SH_SIZE], f"{path}: .dynamic"):
            if tag == DT["NEEDED"]:
                needed.append(cstring(strtab, val))
            elif tag in (DT["RPATH"], DT["RUNPATH"]):
                origin = os.path.dirname(os.path.realpath(path))
                dirs += [
                    d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
                    for d in cstring(strtab, val).split(":")
                    if d
                ]
    return tuple(needed), tuple(dirs)


@lru_cache(maxsize=4)
def _ldconfig_cache(tag: str) -> dict[str, str]:
    """Returns {soname: path} of ``ldconfig -p`` for libraries marked ``tag``
    (``Arch.ldconfig_tag``)."""
    try:
        out = subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    cache: dict[str, str] = {}
    for line in out.splitlines()[1:]:
        name, _, rest = line.strip().partition(" ")
        if tag in rest and "=>" in rest:
            cache.setdefault(name, rest.split("=>", 1)[1].strip())
    return cache


class Libraries:
    """The shared libraries a program loads (its DT_NEEDED closure) and what they export."""

    def __init__(self, paths: list[str], missing: list[str]) -> None:
        self.paths = paths
        self.missing = missing  # DT_NEEDED names that could not be found here

    def exports(self, name: str) -> bool:
        """Returns True if one of the libraries defines ``name``."""
        return any(name in dynamic_exports(p) for p in self.paths)


def _find(soname: str, dirs: tuple[str, ...], arch: Arch) -> str | None:
    if "/" in soname:
        return soname if os.path.isfile(soname) else None
    for d in dirs:
        cand = os.path.join(d, soname)
        if os.path.isfile(cand):
            return cand
    cached = _ldconfig_cache(arch.ldconfig_tag).get(soname)
    if cached and os.path.isfile(cached):
        return cached
    for d in _default_dirs(arch):
        cand = os.path.join(d, soname)
        if os.path.isfile(cand):
            return cand
    return None


def program_libraries(binary: str | os.PathLike[str]) -> Libraries:
    """Returns the libraries ``binary`` loads, found as the dynamic loader would."""
    seen: dict[str, str] = {}
    missing: list[str] = []
    todo = [os.fspath(binary)]
    try:
        with open(binary, "rb") as f:
            head = f.read(64)
        arch = get_arch_by_machine(read_ehdr(head, todo[0])["e_machine"], todo[0])
    except (OSError, ElfError):
        return Libraries([], [])
    while todo:
        current = todo.pop()
        try:
            needed, dirs = dynamic_needs(current)
        except (OSError, ElfError):
            continue
        for soname in needed:
            if soname in seen or soname in missing:
                continue
            found = _find(soname, dirs, arch)
            if found is None:
                missing.append(soname)
                continue
            seen[soname] = found
            todo.append(found)
    return Libraries(list(seen.values()), missing)
