"""Every process of the host by the build it runs, read from /proc (docs/host.md, "Every
process counts").

Whether an agent answers is not what decides whether a process runs a build: a process
started with ``PATCHBOX_DISABLE``, a worker whose agent was stopped after ``fork``, one
whose agent listens where this client cannot connect, one that never loaded an agent:
all run the build's code too. So host-wide
operations start from what each process runs:

- its executable: one ``stat`` of ``/proc/PID/exe`` gives the file's identity, and the
  build-id is read once per (``st_dev``, ``st_ino``, ``st_mtime_ns``) from the program
  headers (thousands of processes of one program cost one read);
- a library's build-id: the objects ``/proc/PID/maps`` lists from file offset 0, each
  named there by device and inode, so one read per process and one build-id read per
  file (cached by its identity and mtime) — only when no executable has that build-id,
  which is what a library patch looks like from here.

A process of the build without an agent that answers is *unreachable*, and
:func:`unreachable_reason` says why from what /proc shows.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from patchbox.elf.buildid import read_build_id
from patchbox.errors import ElfError
from patchbox.protocol.discovery import agent_inside, get_ns_pid
from patchbox.reach.procfs import file_build_id

__all__ = [
    "Running",
    "census",
    "exe_path",
    "processes_of",
    "maps_build_id",
    "unreachable_reason",
]


@dataclass(frozen=True)
class Running:
    """What one process runs, as /proc says it."""

    pid: int
    file: tuple[int, int]  # (st_dev, st_ino) of its executable
    build_id: str  # the executable's GNU build-id (hex), "" when it has none


# (st_dev, st_ino, st_mtime_ns) of an executable -> its build-id ("" when none).
_EXE_IDS: dict[tuple[int, int, int], str] = {}
_CACHE_MAX = 65536


def _exe_build_id(pid: int, st: os.stat_result) -> str:
    """Returns the build-id of ``pid``'s executable whose stat is ``st``, read once per
    file identity and mtime (through /proc/PID/exe: a replaced file is still readable)."""
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    found = _EXE_IDS.get(key)
    if found is None:
        try:
            bid = read_build_id(f"/proc/{pid}/exe")
        except ElfError:
            bid = None
        found = bid.hex() if bid else ""
        if len(_EXE_IDS) >= _CACHE_MAX:
            _EXE_IDS.clear()
        _EXE_IDS[key] = found
    return found


def census(pids: Collection[int] | None = None) -> dict[int, Running]:
    """Returns {pid: what it runs} for every process of this pid namespace whose
    executable can be looked at (``pids``: only those), this process excluded. Kernel
    threads, zombies and processes of other users (for a client that is not root) have
    no readable ``/proc/PID/exe`` and are not listed."""
    me = os.getpid()
    names: Iterable[int] = (
        pids if pids is not None else (int(n) for n in os.listdir("/proc") if n.isdigit())
    )
    out: dict[int, Running] = {}
    for pid in names:
        if pid == me:
            continue
        try:
            st = os.stat(f"/proc/{pid}/exe")
        except OSError:
            continue
        out[pid] = Running(pid, (st.st_dev, st.st_ino), _exe_build_id(pid, st))
    return out


def exe_path(pid: int) -> str:
    """Returns the path of ``pid``'s executable as /proc names it (" (deleted)" dropped for
    a file replaced since it started), "" when it cannot be read."""
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return ""


def maps_build_id(pid: int, build_id: str, memo: dict[tuple[str, int], str]) -> bool:
    """Returns whether process ``pid`` maps an ELF object of build-id ``build_id`` (hex)
    from file offset 0. ``memo`` maps a file named by a maps line (device, inode) to its
    build-id for the whole census, so each file is looked at once."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        # start-end perms offset dev inode path
        parts = line.split(None, 5)
        if len(parts) < 6 or parts[2].strip("0") or parts[4] == "0":
            continue
        path = parts[5]
        if not path.startswith("/"):
            continue
        key = (parts[3], int(parts[4]))
        bid = memo.get(key)
        if bid is None:
            # The process's view of the path (its mount namespace), stat'ed for the cache.
            bid = memo[key] = file_build_id(f"/proc/{pid}/root{path.removesuffix(' (deleted)')}")
        if bid == build_id:
            return True
    return False


def processes_of(running: dict[int, Running], build_id: str) -> set[int]:
    """Returns the pids of ``running`` that run build ``build_id`` (hex): those whose
    executable has it; when none has, those that map a library of it (a library's
    build-id is never an executable's)."""
    want = build_id.lower()
    exes = {pid for pid, r in running.items() if r.build_id == want}
    if exes:
        return exes
    memo: dict[tuple[str, int], str] = {}
    return {pid for pid in running if maps_build_id(pid, want, memo)}


def unreachable_reason(pid: int) -> str:
    """Returns why process ``pid`` has no agent this client can talk to, as far as /proc
    tells (it has no listening agent socket)."""
    name = f"sandbox-sock{get_ns_pid(pid)}"
    inside = agent_inside(pid)
    if inside is None:
        return (
            f"no {name} listening, and /proc/{pid} cannot be read to tell whether it "
            "carries an agent: run as root or as the process's user"
        )
    if not inside:
        return "no agent loaded (not linked, not preloaded): --attach loads one"
    return (
        f"agent present but no socket: no {name} listening (its agent was stopped or "
        f"disabled, is still starting, or could bind neither in its socket directory nor "
        f"on @patchbox/{name})"
    )
