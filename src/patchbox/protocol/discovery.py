"""Finding the agent socket of a process, and removing stale ones
(docs/protocol.md, "Socket and discovery").

The agent of process P listens on ``sandbox-sock<n>`` (n: P's pid in its own pid
namespace) in its socket directory, bound either by the full path or, when that is
longer than ``sun_path`` allows, as ``/proc/self/fd/<dirfd>/sandbox-sock<n>``. Nothing
here reads P's environment (a program that sets its process title overwrites it):
P's own view of its sockets is read from ``/proc/P/net/unix`` (every bound socket of
P's network namespace with its inode) and ``/proc/P/fd`` (which of them P holds), and
the socket is reached through ``/proc/P/fd`` or ``/proc/P/root``, so a process in
another mount namespace is reached too (/proc is read through :mod:`patchbox.procfs`).
Only when that finds nothing does the client fall back to guessing: its own
``PATCHBOX_SOCK_DIR``, then the executable's directory.

Every `patchbox info -p` runs this module, and scripts run that in loops: no dataclasses
here (the module and each class cost start-up, docs/decisions.md "Start-up"), and
pathlib only for sweeping.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from patchbox import procfs
from patchbox.errors import ConnectError, PatchboxError
from patchbox.procfs import SOCK_STREAM_TYPE, UnixSocket

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "agent_inside",
    "SOCKET_PREFIX",
    "SOCKET_NAME",
    "FD_ADDRESS",
    "SUN_PATH_MAX",
    "Candidate",
    "Discovery",
    "connect_path_for",
    "discover",
    "connect_unix",
    "connect_unix_ex",
    "probe_socket",
    "peer_pid",
    "SweepRefused",
    "sweep_stale_sockets",
]

SOCKET_PREFIX = "sandbox-sock"
SOCKET_NAME = re.compile(r"sandbox-sock([0-9]{1,9})")
# sun_path holds 108 bytes with the terminating NUL.
SUN_PATH_MAX = 107
# The address the agent binds when the full path does not fit.
FD_ADDRESS = re.compile(r"/proc/self/fd/([0-9]+)/(sandbox-sock[0-9]{1,9})")
SWEEP_LIMIT = 4096


class Candidate(NamedTuple):
    """A place the agent's socket may be: what to connect to and what to call it."""

    connect_path: str  # for connect(); may exceed sun_path (connect_unix handles that)
    path: str  # the socket's path as the target sees it, for messages
    source: str  # how it was found
    # Found among the target's own listening sockets (/proc/PID/net/unix): the agent's,
    # not a guess at a path where it may be.
    listening: bool = False


class Discovery:
    """The candidates for a pid's socket, best first, and what was tried."""

    def __init__(self, pid: int, name: str) -> None:
        self.pid = pid
        self.name = name  # sandbox-sock<n>, n the pid in the target's pid namespace
        self.candidates: list[Candidate] = []
        self.notes: list[str] = []
        self.denied = False  # /proc/PID/... refused us: another user's process


def _same_netns(pid: int) -> bool:
    """Returns False if ``pid`` is known to be in another network namespace than this
    process (an abstract address names another socket there); True if it shares ours or
    that cannot be read (then the connection's SO_PEERCRED tells)."""
    theirs, mine = procfs.namespace(pid, "net"), procfs.namespace("self", "net")
    return theirs is None or mine is None or theirs == mine


def connect_path_for(pid: int, bound: str, root_usable: bool) -> tuple[str, str]:
    """Returns (connect path, path as the target sees it) of a socket pid bound at
    ``bound`` (as /proc/net/unix shows it; ``@...`` an abstract address)."""
    if bound.startswith("@"):
        return bound, bound  # no file: the address itself (connect_unix_ex)
    m = FD_ADDRESS.fullmatch(bound)
    if m:
        fd, name = m.groups()
        try:
            shown = os.path.join(procfs.fd_target(pid, fd), name)
        except OSError:
            shown = bound
        return f"{procfs.fd_path(pid, fd)}/{name}", shown
    if not bound.startswith("/"):
        return procfs.cwd_path(pid, bound), bound  # relative: an older agent's
    if root_usable:
        return procfs.root_path(pid, bound), bound
    return bound, bound


def discover(pid: int, environ: Mapping[str, str] | None = None) -> Discovery:
    """Returns where pid's agent socket may be, best first.

    1. /proc/PID/net/unix: listening stream sockets named ``sandbox-sock<n>`` (n: pid in
       its own namespace) whose inode pid holds open, reached through /proc/PID/fd or
       /proc/PID/root.
    2. Only if 1 found nothing: ``PATCHBOX_SOCK_DIR`` of ``environ`` (this process's by
       default), then the directory of pid's executable.

    Raises ConnectError if there is no process pid.
    """
    if pid <= 0:
        raise ConnectError(f"invalid pid {pid}")
    env = os.environ if environ is None else environ
    if not procfs.exists(pid):
        raise ConnectError(f"no process with pid {pid}")
    found = Discovery(pid, f"{SOCKET_PREFIX}{procfs.get_ns_pid(pid)}")
    root_usable = procfs.root_usable(pid)
    _add_listed(found, root_usable)
    if not found.candidates:
        _add_guesses(found, env, root_usable)
    return found


def _note_unreadable(found: Discovery, what: str, err: OSError) -> None:
    found.notes.append(f"{what} not readable ({err.strerror or err})")
    found.denied |= isinstance(err, PermissionError)


def _listening(found: Discovery) -> list[UnixSocket]:
    """Returns the listening stream sockets named ``found.name`` in /proc/PID/net/unix;
    none (noted) if that cannot be read."""
    try:
        return [
            s
            for s in procfs.iter_unix_sockets(found.pid)
            if s.listening
            and s.type == SOCK_STREAM_TYPE
            and s.path.rsplit("/", 1)[-1] == found.name
        ]
    except OSError as err:
        _note_unreadable(found, f"/proc/{found.pid}/net/unix", err)
        return []


def _held(found: Discovery, listed: list[UnixSocket]) -> set[int]:
    """Returns the inodes of the sockets the process holds open when ``listed`` is not
    empty; notes when none of ``listed`` is held, or nothing is listed."""
    pid, name = found.pid, found.name
    if not listed:
        if not found.notes:
            found.notes.append(f"no {name} listening in /proc/{pid}/net/unix")
        return set()
    try:
        held = procfs.get_socket_inodes(pid)
    except OSError as err:
        _note_unreadable(found, f"/proc/{pid}/fd", err)
        return set()
    if not held.intersection(s.inode for s in listed):
        found.notes.append(f"{name} in /proc/{pid}/net/unix is not held by pid {pid}")
    return held


def _add_listed(found: Discovery, root_usable: bool) -> None:
    """Step 1 of :func:`discover`: the sockets of /proc/PID/net/unix the process holds."""
    pid = found.pid
    listed = _listening(found)
    held = _held(found, listed)
    for s in listed:
        if s.path.startswith("@") and not _same_netns(pid):
            found.notes.append(
                f"{s.path} is an abstract socket of another network namespace: run patchbox "
                f"there (nsenter --net=/proc/{pid}/ns/net)"
            )
            continue
        if s.inode in held:
            connect, shown = connect_path_for(pid, s.path, root_usable)
            found.candidates.append(
                Candidate(connect, shown, f"/proc/{pid}/net/unix", listening=True)
            )


def _add_guesses(found: Discovery, env: Mapping[str, str], root_usable: bool) -> None:
    """Step 2 of :func:`discover`: ``PATCHBOX_SOCK_DIR``, then the executable's directory;
    raises ConnectError if the process has gone."""
    pid, name = found.pid, found.name
    sock_dir = env.get("PATCHBOX_SOCK_DIR")
    if sock_dir:
        path = os.path.join(sock_dir, name)
        found.candidates.append(Candidate(path, path, "PATCHBOX_SOCK_DIR"))
    try:
        exe = procfs.exe_link(pid)
    except FileNotFoundError as err:
        raise ConnectError(f"no process with pid {pid}") from err
    except OSError as err:
        _note_unreadable(found, f"/proc/{pid}/exe", err)
    else:
        # An executable replaced on disk (an upgrade) still has its directory.
        path = os.path.join(os.path.dirname(exe.removesuffix(" (deleted)")), name)
        connect = procfs.root_path(pid, path) if root_usable else path
        found.candidates.append(Candidate(connect, path, "the executable's directory"))


# In every program with the agent: linked (its .rodata) or loaded (libsandbox.so).
_AGENT_MARK = b"PATCHBOX_SOCK_DIR"
# (st_dev, st_ino, st_mtime_ns) of an executable -> whether the agent is linked into it.
_LINKED_MAX = 4096  # executables remembered at most (then forgotten at once)
_LINKED: dict[tuple[int, int, int], bool] = {}


def _linked_agent(pid: int) -> bool:
    """Returns whether ``pid``'s executable holds the agent's strings, read once per file
    identity and mtime; raises OSError if it cannot be read."""
    with procfs.open_exe(pid) as exe:
        st = os.fstat(exe.fileno())
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if key not in _LINKED:
            found, tail = False, b""
            while chunk := exe.read(1 << 20):
                if _AGENT_MARK in tail + chunk:
                    found = True
                    break
                tail = chunk[-len(_AGENT_MARK) :]
            if len(_LINKED) > _LINKED_MAX:
                _LINKED.clear()
            _LINKED[key] = found
        return _LINKED[key]


def agent_inside(pid: int) -> bool | None:
    """Returns whether process ``pid`` carries the agent (libsandbox.so mapped, or its
    executable holds the agent's strings), None when /proc does not tell. Read only to
    explain a missing socket: a slow path the first time an executable is asked about
    (it reads the file), cached per executable after."""
    try:
        if any("libsandbox" in m.path for m in procfs.read_maps(pid)):
            return True
        return _linked_agent(pid)
    except OSError:
        return None


def peer_pid(sock: socket.socket) -> int:
    """Returns the pid (in this pid namespace) of the process that listens on the socket
    ``sock`` is connected to: SO_PEERCRED, recorded by the kernel at listen(); 0 when it
    is unknown (not visible from here)."""
    try:
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return 0
    return int.from_bytes(cred[:4], "little")


def connect_unix_ex(sock: socket.socket, path: str | os.PathLike[str]) -> int:
    """Connects ``sock`` to the Unix socket at ``path``, whatever its length, and returns
    the errno like ``connect_ex`` (0: connected; a non-blocking socket may give EAGAIN):
    a path longer than sun_path goes through an O_PATH descriptor of its directory;
    ``@name`` is the abstract address ``name`` (of this process's network namespace: an
    agent's fallback when its directory refuses it, docs/protocol.md)."""
    raw = os.fsencode(path)
    if raw.startswith(b"@"):
        return sock.connect_ex(b"\0" + raw[1:])
    if len(raw) <= SUN_PATH_MAX:
        return sock.connect_ex(raw)
    head, tail = os.path.split(raw)
    try:
        dirfd = os.open(head or b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        return err.errno or errno.ENOENT
    try:
        return sock.connect_ex(b"/proc/self/fd/%d/%s" % (dirfd, tail))
    finally:
        os.close(dirfd)


def connect_unix(sock: socket.socket, path: str | os.PathLike[str]) -> None:
    """Connects ``sock`` to the Unix socket at ``path``, whatever its length (see
    :func:`connect_unix_ex`); raises the OSError of connect()."""
    err = connect_unix_ex(sock, path)
    if err:
        raise OSError(err, os.strerror(err), os.fsdecode(path))


def probe_socket(path: str | os.PathLike[str]) -> bool | None:
    """Returns True if something accepts connections at path (a full backlog counts),
    False if the connection is refused (nobody listens: stale), None if unknown."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        try:
            connect_unix(s, path)
        except ConnectionRefusedError:
            return False
        except BlockingIOError:
            return True
        except OSError:
            return None
    return True


def _pid_exists(pid: int) -> bool:
    """Returns False if no live process has ``pid``: none at all, or a zombie (it holds
    no socket any more, and its pid cannot be reused until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return procfs.process_state(pid) not in ("Z", "X")  # unreadable (None): it exists


class SweepRefused(PatchboxError):
    """A directory is not swept: others can replace its entries between the checks and
    the removal (writable by group or others, and not sticky)."""


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _probe_entry(dirfd: int, name: str, seen: os.stat_result) -> bool | None:
    """Returns what :func:`probe_socket` would of the socket ``name`` in ``dirfd``, probed
    through an O_PATH descriptor of the very inode ``seen`` (``/proc/self/fd/N``): a link
    or another file put there meanwhile is never connected to (None)."""
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or not _same_file(st, seen):
            return None
        return probe_socket(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def sweep_stale_sockets(
    directory: str | os.PathLike[str] | int,
    *,
    limit: int = SWEEP_LIMIT,
    shown: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Returns the stale agent files removed from ``directory`` (a path, opened once and
    followed as given, or a directory descriptor, kept open by the caller; ``shown``
    names it in the result).

    The rule (docs/protocol.md, "Stale sockets"): a ``sandbox-sock<N>`` entry is removed
    only if no process N exists, it is a socket (lstat), and connecting to that very
    inode is refused; its ``sandbox-sock<N>.log`` only if process N is gone and the log
    is an empty regular file (an agent opens its log as it starts serving). Just before
    each removal the pid is looked up again (still ESRCH) and the entry stat'ed again
    (same st_dev and st_ino). Everything happens through the directory's descriptor:
    ``fstatat``/``unlinkat`` with no link followed, so a link planted under either name,
    or a directory swapped for a link, never makes this remove or probe anything else.

    Raises SweepRefused for a directory writable by group or others that is not sticky;
    in a sticky one only entries owned by this process's euid are considered (nobody
    else can replace those). A log with lines and anything else stay; at most ``limit``
    entries are examined.
    """
    from pathlib import Path

    if isinstance(directory, int):
        return _sweep_fd(directory, Path(shown if shown is not None else "."), limit)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _sweep_fd(fd, Path(shown if shown is not None else directory), limit)
    finally:
        os.close(fd)


def _sweep_fd(dirfd: int, shown: Path, limit: int) -> list[Path]:
    """Returns the stale files removed from directory ``dirfd`` (see sweep_stale_sockets)."""
    dst = os.fstat(dirfd)
    shared = bool(dst.st_mode & (stat.S_IWGRP | stat.S_IWOTH))
    if shared and not dst.st_mode & stat.S_ISVTX:
        raise SweepRefused(
            f"not sweeping {shown}: writable by others and not sticky (owner uid "
            f"{dst.st_uid}, mode {stat.S_IMODE(dst.st_mode):04o}): anyone could swap an "
            f"entry between the checks and the removal"
        )
    euid, me = os.geteuid(), os.getpid()
    removed: list[Path] = []
    with os.scandir(dirfd) as entries:
        for i, entry in enumerate(entries):
            if i >= limit:
                break
            name = entry.name
            log = name.endswith(".log")
            m = SOCKET_NAME.fullmatch(name[:-4] if log else name)
            if not m or int(m[1]) in (0, me) or _pid_exists(int(m[1])):
                continue
            pid = int(m[1])
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except OSError:
                continue
            if shared and st.st_uid != euid:
                continue  # sticky: only what nobody else can rename or replace
            if log:
                if not stat.S_ISREG(st.st_mode) or st.st_size:
                    continue
            elif not stat.S_ISSOCK(st.st_mode) or _probe_entry(dirfd, name, st) is not False:
                continue
            # What was tested is what goes: the pid is still unused, the entry the same.
            if _pid_exists(pid):
                continue
            try:
                again = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except OSError:
                continue
            if not _same_file(st, again) or (log and again.st_size):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dirfd)
                removed.append(shown / name)
    return removed
