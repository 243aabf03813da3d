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
:func:`unreachable_reason` says why from what /proc shows. /proc is read through
:mod:`patchbox.procfs`.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from patchbox import procfs
from patchbox.protocol.discovery import agent_inside

__all__ = [
    "Running",
    "census",
    "processes_of",
    "maps_build_id",
    "sandboxed",
    "unreachable_reason",
]


@dataclass(frozen=True)
class Running:
    """What one process runs, as /proc says it."""

    pid: int
    file: tuple[int, int]  # (st_dev, st_ino) of its executable
    build_id: str  # the executable's GNU build-id (hex), "" when it has none


def census(pids: Collection[int] | None = None) -> dict[int, Running]:
    """Returns {pid: what it runs} for every process of this pid namespace whose
    executable can be looked at (``pids``: only those), this process excluded. Kernel
    threads, zombies and processes of other users (for a client that is not root) have
    no readable ``/proc/PID/exe`` and are not listed."""
    me = os.getpid()
    names: Iterable[int] = pids if pids is not None else procfs.process_ids()
    out: dict[int, Running] = {}
    for pid in names:
        if pid == me:
            continue
        try:
            st = procfs.stat_exe(pid)
        except OSError:
            continue
        out[pid] = Running(pid, (st.st_dev, st.st_ino), procfs.exe_build_id(pid, st))
    return out


def maps_build_id(pid: int, build_id: str, memo: dict[tuple[str, int], str]) -> bool:
    """Returns whether process ``pid`` maps an ELF object of build-id ``build_id`` (hex)
    from file offset 0. ``memo`` maps a file named by a maps line (device, inode) to its
    build-id for the whole census, so each file is looked at once."""
    try:
        maps = procfs.read_maps(pid)
    except OSError:
        return False
    for m in maps:
        if m.offset or not m.inode or not m.path.startswith("/"):
            continue
        key = (m.dev, m.inode)
        bid = memo.get(key)
        if bid is None:
            # The process's view of the path (its mount namespace), stat'ed for the cache.
            path = procfs.root_path(pid, m.path.removesuffix(" (deleted)"))
            bid = memo[key] = procfs.file_build_id(path)
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


def sandboxed(pid: int) -> bool:
    """Returns whether process ``pid`` runs under a seccomp filter (``Seccomp: 2`` in
    /proc/PID/status, its main thread's): a sandbox that may leave an agent loaded
    before it without a socket. OpenSSH's pre-authentication child (``sshd: [net]``,
    ``sandbox-seccomp-filter``) is one: forked from a connection's process, it chroots
    to the privilege-separation directory, becomes the privilege-separation user, sets
    ``RLIMIT_NOFILE`` to 1 and installs its filter, all before its agent's thread binds
    (``PATCHBOX_FORK_DELAY_MS``), which then cannot open any descriptor; it ends after
    authentication or at ``LoginGraceTime``."""
    return procfs.read_status(pid).get("Seccomp") == "2"


def unreachable_reason(pid: int) -> str:
    """Returns why process ``pid`` has no agent this client can talk to, as far as /proc
    tells (it has no listening agent socket)."""
    name = f"sandbox-sock{procfs.get_ns_pid(pid)}"
    inside = agent_inside(pid)
    if inside is None:
        return (
            f"no {name} listening, and /proc/{pid} cannot be read to tell whether it "
            "carries an agent: run as root or as the process's user"
        )
    if not inside:
        return "no agent loaded (not linked, not preloaded): --attach loads one"
    if sandboxed(pid):
        return (
            f"agent present but no socket: no {name} listening, and the process runs under "
            "a seccomp filter (Seccomp: 2), a sandbox set up before its agent could bind "
            "(OpenSSH's pre-authentication child, `sshd: [net]`, also chroots and allows "
            "itself one open file): not patchable, it runs the code it was forked with "
            "until it exits"
        )
    return (
        f"agent present but no socket: no {name} listening (its agent was stopped or "
        f"disabled, is still starting, or could bind neither in its socket directory nor "
        f"on @patchbox/{name})"
    )
