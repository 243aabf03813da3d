"""What /proc says about a process: its status fields, threads, where each thread is,
its memory map and the ELF objects it maps (by GNU build-id, cached per file)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from patchbox.elf.buildid import read_build_id
from patchbox.elf.records import EHDR, PHDR
from patchbox.errors import ElfError

__all__ = [
    "Mapping",
    "MappedObject",
    "read_status",
    "read_maps",
    "task_ids",
    "task_syscall",
    "task_comm",
    "mapped_objects",
    "find_mapped",
]

PT_LOAD = 1


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str


@dataclass(frozen=True)
class MappedObject:
    """An ELF file mapped by a process: its path (in the process's view), load bias and
    GNU build-id (hex, "" if none)."""

    path: str
    bias: int
    build_id: str


def read_status(pid: int) -> dict[str, str]:
    """Returns the fields of /proc/PID/status ({} if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: v.strip() for k, _s, v in (line.partition(":") for line in f)}
    except OSError:
        return {}


def read_maps(pid: int) -> list[Mapping]:
    """Returns the mappings of process ``pid`` (raises OSError if unreadable)."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 5:
                continue
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            path = parts[5].rstrip("\n") if len(parts) > 5 else ""
            out.append(Mapping(lo, hi, parts[1], int(parts[2], 16), int(parts[4]), path))
    return out


def task_ids(pid: int) -> list[int]:
    """Returns the thread ids of process ``pid`` ([] if it is gone)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if t.isdigit())
    except OSError:
        return []


def task_syscall(pid: int, tid: int) -> tuple[int, int, int] | None:
    """Returns (system call number or -1, sp, pc) of a thread that is not running, None
    for one that runs (or is gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return None
    if not fields or fields[0] == "running" or len(fields) < 3:
        return None
    return int(fields[0]), int(fields[-2], 16), int(fields[-1], 16)


def task_comm(pid: int, tid: int) -> str:
    """Returns the name of thread ``tid`` ("" if gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


_FILES: dict[tuple[int, int, int, int], tuple[str, int]] = {}  # file identity -> (bid, vaddr)


def _file_facts(path: str) -> tuple[str, int]:
    """Returns (build-id hex, page-aligned p_vaddr of the PT_LOAD at file offset 0) of the
    ELF file ``path``, cached by its identity; ("", 0) for what is not one."""
    try:
        st = os.stat(path)
    except OSError:
        return "", 0
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _FILES:
        bid, vaddr = "", 0
        try:
            found = read_build_id(path)
            bid = found.hex() if found else ""
            with open(path, "rb") as f:
                head = f.read(EHDR.size)
                eh = dict(zip(EHDR.fields, EHDR.unpack_from(head, 0, path), strict=True))
                f.seek(eh["e_phoff"])
                table = f.read(PHDR.size * eh["e_phnum"])
            for ph in PHDR.iter_table(table, 0, len(table), path):
                if ph[0] == PT_LOAD and ph[2] == 0:
                    vaddr = ph[3] & ~0xFFF
                    break
        except (ElfError, OSError, ValueError, KeyError):
            pass
        if len(_FILES) > 4096:
            _FILES.clear()
        _FILES[key] = (bid, vaddr)
    return _FILES[key]


def mapped_objects(pid: int) -> list[MappedObject]:
    """Returns the ELF files process ``pid`` maps from file offset 0 (its executable, its
    libraries), each once, read through /proc/PID/root (the process's mount namespace).
    [] when its map cannot be read."""
    try:
        maps = read_maps(pid)
    except OSError:
        return []
    out: list[MappedObject] = []
    seen: set[str] = set()
    for m in maps:
        if m.offset != 0 or not m.path.startswith("/") or m.path in seen or not m.inode:
            continue
        seen.add(m.path)
        bid, vaddr = _file_facts(f"/proc/{pid}/root{m.path.removesuffix(' (deleted)')}")
        if bid:
            out.append(MappedObject(m.path, m.start - vaddr, bid))
    return out


def find_mapped(pid: int, build_id: str) -> MappedObject | None:
    """Returns the object of build-id ``build_id`` (hex) that ``pid`` maps, or None."""
    return next((o for o in mapped_objects(pid) if o.build_id == build_id.lower()), None)
