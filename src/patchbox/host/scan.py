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
matched through the socket inodes in ``/proc/*/fd``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from patchbox.protocol.discovery import (
    FD_ADDRESS,
    SOCK_STREAM_TYPE,
    SOCKET_NAME,
    UnixSocket,
    parse_proc_net_unix,
)

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


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _read_table(who: str) -> str:
    try:
        with open(f"/proc/{who}/net/unix") as f:
            return f.read()
    except OSError:
        return ""


def _other_netns_tables(skip: set[int]) -> Iterator[str]:
    """Returns the /proc/<pid>/net/unix text of every other network namespace, looked for
    among the processes not in ``skip`` (agents already found in ours are in ours)."""
    mine = _readlink("/proc/self/ns/net")
    seen: set[str] = set()
    for pid in _pids():
        if pid in skip:
            continue
        ns = _readlink(f"/proc/{pid}/ns/net")
        if ns and ns != mine and ns not in seen:
            seen.add(ns)
            yield _read_table(str(pid))


def _socket_owners(inodes: set[int]) -> dict[int, int]:
    """Returns {socket inode: pid} for ``inodes``, from every readable ``/proc/*/fd``."""
    owners: dict[int, int] = {}
    for pid in _pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            link = _readlink(f"/proc/{pid}/fd/{fd}")
            if link and link.startswith("socket:["):
                inode = int(link[8:-1])
                if inode in inodes:
                    owners.setdefault(inode, pid)
    return owners


def _holds(pid: int, inode: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return True  # cannot check: SO_PEERCRED will tell
    return any(_readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]" for fd in fds)


def reach(pid: int, bound: str) -> tuple[str, str]:
    """Returns (path to connect to, path to try next) for an agent of host ``pid`` bound at
    ``bound``: the bound path itself first (the same mount namespace: the common case),
    then through ``/proc/<pid>/root`` (another one). An abstract address (``@...``) has
    no file: the address itself, in this process's network namespace."""
    if bound.startswith("@"):
        return bound, ""
    m = FD_ADDRESS.fullmatch(bound)
    if m:
        return f"/proc/{pid}/fd/{m[1]}/{m[2]}", ""
    return bound, f"/proc/{pid}/root{bound}"


def _agent_entries(text: str) -> list[tuple[int, UnixSocket]]:
    out = []
    for s in parse_proc_net_unix(text):
        m = SOCKET_NAME.fullmatch(s.path.rsplit("/", 1)[-1])
        if s.listening and s.type == SOCK_STREAM_TYPE and m:
            out.append((int(m[1]), s))
    return out


def iter_agent_sockets(verify: bool = False) -> list[AgentSocket]:
    """Returns every listening agent socket of the host (every network namespace this
    process can read). With ``verify``, each is checked to be held by its pid through
    ``/proc/<pid>/fd`` (costly on thousands of processes; SO_PEERCRED after connecting
    is the cheap check)."""
    found = _agent_entries(_read_table("self"))
    mine = {n for n, _s in found}
    for text in _other_netns_tables(mine):
        found += _agent_entries(text)
    out: list[AgentSocket] = []
    unplaced: list[tuple[int, UnixSocket]] = []
    live = {int(n) for n in os.listdir("/proc") if n.isdigit()}  # one read, not a stat each
    for nspid, s in found:
        if nspid not in live or (verify and not _holds(nspid, s.inode)):
            unplaced.append((nspid, s))
            continue
        out.append(AgentSocket(nspid, nspid, s.inode, s.path, *reach(nspid, s.path)))
    if unplaced:
        owners = _socket_owners({s.inode for _n, s in unplaced})
        for nspid, s in unplaced:
            pid = owners.get(s.inode)
            if pid is not None:
                out.append(AgentSocket(pid, nspid, s.inode, s.path, *reach(pid, s.path)))
    return sorted(out, key=lambda a: a.pid)
