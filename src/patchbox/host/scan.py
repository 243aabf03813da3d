"""Every agent on the host: from the kernel's table of bound Unix sockets.

Each agent listens on ``sandbox-sock<n>`` (n: its pid in its own pid namespace). The
kernel lists every bound Unix socket of a network namespace in ``/proc/<pid>/net/unix``
with the path it was bound to, so one read per network namespace finds every agent,
whatever directory it chose and whether or not its environment block was overwritten.
How to reach each one (docs/protocol.md, "Socket and discovery"):

- bound as ``/proc/self/fd/K/sandbox-sock<n>`` (a directory too deep for sun_path):
  through ``/proc/<pid>/fd/K/…``, the agent's own descriptor of its directory;
- bound as an absolute path: that path when the process shares our mount namespace,
  else ``/proc/<pid>/root/<path>`` (a container, a private mount over its directory).

The pid is n when the process is in our pid namespace; the connection's SO_PEERCRED
says for sure. Sockets that cannot be attributed that way (another pid namespace) are
matched through the socket inodes in ``/proc/*/fd``. /proc is read through
:mod:`patchbox.procfs`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from patchbox import procfs
from patchbox.procfs import SOCK_STREAM_TYPE, UnixSocket
from patchbox.protocol.discovery import FD_ADDRESS, SOCKET_NAME

__all__ = ["AgentSocket", "iter_agent_sockets", "reach"]


@dataclass(frozen=True)
class AgentSocket:
    """A listening agent socket and how to reach it from here."""

    pid: int  # host pid (best knowledge: confirm with SO_PEERCRED)
    nspid: int  # the n of sandbox-sock<n>
    inode: int
    bound: str  # the path the agent bound
    connect: str  # the path to connect to from this process
    alt: str = ""  # where to try next if ``connect`` does not reach this pid's agent


def _unix_sockets(who: int | str) -> list[UnixSocket]:
    try:
        return list(procfs.iter_unix_sockets(who))
    except OSError:
        return []


def _other_netns_sockets(skip: set[int]) -> Iterator[list[UnixSocket]]:
    """Returns the Unix sockets of every other network namespace, looked for among the
    processes not in ``skip`` (agents already found in ours are in ours)."""
    mine = procfs.namespace("self", "net")
    seen: set[int] = set()
    for pid in procfs.process_ids():
        if pid in skip:
            continue
        ns = procfs.namespace(pid, "net")
        if ns is not None and ns != mine and ns not in seen:
            seen.add(ns)
            yield _unix_sockets(pid)


def _holds(pid: int, inode: int) -> bool:
    try:
        return inode in procfs.get_socket_inodes(pid)
    except OSError:
        return True  # cannot check: SO_PEERCRED will tell


def reach(pid: int, bound: str) -> tuple[str, str]:
    """Returns (path to connect to, path to try next) for an agent of host ``pid`` bound at
    ``bound``: the bound path itself first (the same mount namespace: the common case),
    then through ``/proc/<pid>/root`` (another one). An abstract address (``@...``) has
    no file: the address itself, in this process's network namespace."""
    if bound.startswith("@"):
        return bound, ""
    m = FD_ADDRESS.fullmatch(bound)
    if m:
        return f"{procfs.fd_path(pid, m[1])}/{m[2]}", ""
    return bound, procfs.root_path(pid, bound)


def _agent_entries(sockets: list[UnixSocket]) -> list[tuple[int, UnixSocket]]:
    out = []
    for s in sockets:
        m = SOCKET_NAME.fullmatch(s.path.rsplit("/", 1)[-1])
        if s.listening and s.type == SOCK_STREAM_TYPE and m:
            out.append((int(m[1]), s))
    return out


def iter_agent_sockets(verify: bool = False) -> list[AgentSocket]:
    """Returns every listening agent socket of the host (every network namespace this
    process can read). With ``verify``, each is checked to be held by its pid through
    ``/proc/<pid>/fd`` (costly on thousands of processes; SO_PEERCRED after connecting
    is the cheap check)."""
    found = _agent_entries(_unix_sockets("self"))
    mine = {n for n, _s in found}
    for sockets in _other_netns_sockets(mine):
        found += _agent_entries(sockets)
    out: list[AgentSocket] = []
    unplaced: list[tuple[int, UnixSocket]] = []
    live = set(procfs.process_ids())  # one read, not a stat each
    for nspid, s in found:
        if nspid not in live or (verify and not _holds(nspid, s.inode)):
            unplaced.append((nspid, s))
            continue
        out.append(AgentSocket(nspid, nspid, s.inode, s.path, *reach(nspid, s.path)))
    if unplaced:
        owners = procfs.socket_owners({s.inode for _n, s in unplaced})
        for nspid, s in unplaced:
            pid = owners.get(s.inode)
            if pid is not None:
                out.append(AgentSocket(pid, nspid, s.inode, s.path, *reach(pid, s.path)))
    return sorted(out, key=lambda a: a.pid)
