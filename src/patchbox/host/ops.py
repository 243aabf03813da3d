"""Host-wide operations: list every process of the builds patchbox knows (`ps`), apply or
remove a patch on every process of its build.

What a process runs is read from /proc (:mod:`patchbox.host.census`: the executable's
build-id, cached per file; for a library's build-id, the objects it maps), not from its
agent: every process running the patch's build is a row, whether its agent answers or
not. Agents of other builds are skipped without a round trip; the agent checks the
build-id again before it applies anything. A process whose agent answers APPLY with
ALREADY_APPLIED is *skipped* (nothing to do), one answering REMOVE with NOT_APPLIED
likewise. A process of the build that has no agent socket, or whose agent refuses this
client, is *unreachable*, with the reason.

Exit status of `apply --all` / `remove --all` (as Xen's livepatch tool): 0 nothing failed
and nothing was unreachable, 1 something failed or was unreachable, 2 every failure is
worth a retry (a busy agent).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from patchbox import safefs
from patchbox.config import preload
from patchbox.errors import AgentError, ConnectError, PatchboxError
from patchbox.format.codec import Writer
from patchbox.format.layout import PatchFile
from patchbox.host.batch import Job, run_jobs
from patchbox.host.census import (
    Running,
    census,
    processes_of,
    sandboxed,
    unreachable_reason,
)
from patchbox.host.scan import AgentSocket, iter_agent_sockets
from patchbox.procfs import (
    age_seconds,
    exe_path,
    fd_path,
    fd_target,
    holds_socket,
    namespace,
    process_state,
    vm_name,
)
from patchbox.protocol.client import Client
from patchbox.protocol.discovery import (
    FD_ADDRESS,
    agent_inside,
    peer_pid,
    sweep_stale_sockets,
)
from patchbox.protocol.results import AppliedPatch
from patchbox.reach.attach import AlreadyAttached, AttachError, PrivilegedProcess, attach
from patchbox.reach.hold import apply_held
from patchbox.store import iter_installed, store_root
from patchbox.wire import ApplyFlag, ErrorCode, Msg

__all__ = [
    "Result",
    "RESULTS",
    "Outcome",
    "ProcessRow",
    "list_processes",
    "DRY_RUN",
    "already_applied",
    "apply_all",
    "remove_all",
    "exit_status",
]


class Result(StrEnum):
    """What happened to one process: the values are what ``--json`` prints (`apply
    --all`, `remove --all`) and what the Ansible modules report."""

    APPLIED = "applied"
    REMOVED = "removed"
    SKIPPED = "skipped"  # nothing to do: already applied, or not applied
    FAILED = "failed"
    UNREACHABLE = "unreachable"  # a process of the build whose agent cannot be reached

    @property
    def failure(self) -> bool:
        """Returns True for the results that make the exit status 1 (or 2)."""
        return self in (Result.FAILED, Result.UNREACHABLE)


RESULTS = tuple(r.value for r in Result)


@dataclass
class Outcome:
    """What happened to one process."""

    pid: int
    result: Result
    reason: str = ""
    exe: str = ""
    build_id: str = ""
    vm: str = ""  # a QEMU's VM name (-name guest=...), "" for other programs
    retry: bool = False
    lost: bool = False  # the connection broke before the answer (not printed)

    def to_json(self) -> dict[str, Any]:
        """Returns the JSON object `--json` prints for this process."""
        d = asdict(self)
        del d["retry"], d["lost"]
        d["result"] = self.result.value  # a plain string, whatever encodes it
        return d


@dataclass
class ProcessRow:
    """One line of `patchbox ps`."""

    pid: int
    exe: str = ""
    build_id: str = ""
    vm: str = ""  # a QEMU's VM name (-name guest=...), "" for other programs
    patches: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)  # of patches: their library was unloaded
    installed: list[str] = field(default_factory=list)
    sandbox_used: int = 0
    sandbox_size: int = 0
    socket: str = ""
    error: str = ""  # why the agent could not be reached (unreachable)

    def to_json(self) -> dict[str, Any]:
        """Returns the JSON object `ps --json` prints for this process."""
        return asdict(self)


@dataclass(frozen=True)
class _Host:
    """One look at the host: the agents listening and what every process runs."""

    agents: dict[int, AgentSocket]  # host pid -> its agent's socket
    running: dict[int, Running]  # host pid -> what it runs (readable ones)
    # Agents listening where this process cannot connect: host pid -> why.
    far: dict[int, str] = field(default_factory=dict)

    def why(self, pid: int) -> str:
        """Returns why ``pid`` (which has no agent this client can use) is unreachable."""
        return self.far.get(pid) or unreachable_reason(pid)

    def describe(self, pid: int) -> tuple[str, str, str]:
        """Returns (executable path, build-id, VM name) of ``pid`` ("" where unknown or
        none)."""
        r = self.running.get(pid)
        path = exe_path(pid)
        return path, r.build_id if r is not None else "", vm_name(pid, path)

    def outcome(self, pid: int, result: Result, reason: str = "", retry: bool = False) -> Outcome:
        """Returns the row of ``pid`` with its executable, build-id and VM name filled in."""
        return Outcome(pid, result, reason, *self.describe(pid), retry=retry)


def _look() -> _Host:
    """Returns the agents of the host (every network namespace this process can read)
    and what each process of this pid namespace runs. An agent on an abstract address
    of another network namespace cannot be connected to from here (the name means
    another socket here): it is set apart, with the way to reach it."""
    agents: dict[int, AgentSocket] = {}
    far: dict[int, str] = {}
    mine = namespace("self", "net")
    for a in iter_agent_sockets():
        theirs = namespace(a.pid, "net") if a.bound.startswith("@") else None
        if theirs is not None and theirs != mine:
            far[a.pid] = (
                f"its agent listens on {a.bound} in another network namespace: run patchbox "
                f"there (nsenter --net=/proc/{a.pid}/ns/net)"
            )
            continue
        agents.setdefault(a.pid, a)  # a process bound twice (re-bind): the first
    return _Host(agents, census(), far)


# An agent binds its socket as its process starts, and binds again within its poll
# period (about a second) when a daemon closed it (docs/host.md). A process of the
# build younger than this whose agent has no socket yet is still starting: waited for,
# not reported unreachable (sshd's connection processes, forked and re-executed per
# connection, are found in that state by any apply under load).
STARTING_S = 3.0
_STARTING_POLL_S = 0.1
# A process of the build under a seccomp filter whose agent has no socket (OpenSSH's
# pre-authentication child, census.sandboxed) cannot be patched: the apply waits this long
# for it to end (PATCHBOX_SANDBOX_WAIT_S overrides), then reports it unreachable.
SANDBOX_WAIT_S = 10.0
_SANDBOX_WAIT_MAX_S = 3600.0
# /proc gives a process's start time in clock ticks (10 ms): a process that appears
# after the batch counts as forked before the batch ended unless it is younger by more.
_FORK_SLACK_S = 0.02
# /proc/PID/stat states of a process that runs nothing any more (None: no such process).
_ENDED = (None, "Z", "X")


def _sandbox_wait() -> float:
    """Returns how long to wait for sandboxed processes to end: SANDBOX_WAIT_S, or
    PATCHBOX_SANDBOX_WAIT_S (seconds, 0 to 3600)."""
    try:
        wait = float(os.environ.get("PATCHBOX_SANDBOX_WAIT_S", ""))
    except ValueError:
        return SANDBOX_WAIT_S
    return wait if 0 <= wait <= _SANDBOX_WAIT_MAX_S else SANDBOX_WAIT_S


def _starting(host: _Host, pids: Collection[int]) -> set[int]:
    """Returns the pids of ``pids`` whose agent is loaded but has no socket yet and which
    started less than STARTING_S ago."""
    out = set()
    for pid in pids:
        if pid in host.agents or pid in host.far:
            continue
        age = age_seconds(pid)
        if age is not None and age < STARTING_S and agent_inside(pid):
            out.add(pid)
    return out


def _settled(host: _Host, pids: Collection[int]) -> _Host:
    """Returns a look at the host once none of ``pids`` is still starting (at most
    STARTING_S later)."""
    deadline = time.monotonic() + STARTING_S
    while _starting(host, pids) and time.monotonic() < deadline:
        time.sleep(_STARTING_POLL_S)
        host = _look()
    return host


def _waitable(host: _Host, pid: int) -> str:
    """Returns why process ``pid`` of the build, which has no agent socket this client can
    use, is worth waiting for: "gone" (it exited), "ending" (/proc no longer shows its
    memory), "sandboxed" (its agent is loaded and it runs under a seccomp filter: it may
    end soon, it will not bind), "starting" (its agent is loaded and it is younger than
    STARTING_S: it may bind soon); "" when it is not (no agent, an agent of another
    network namespace, an old process)."""
    if pid in host.far:
        return ""
    if process_state(pid) in _ENDED:
        return "gone"
    inside = agent_inside(pid)
    if process_state(pid) in _ENDED:  # ended while /proc was read
        return "gone"
    if inside is None:  # /proc no longer tells: exiting, its memory already released
        return "ending"
    if not inside:
        return ""
    if sandboxed(pid):
        return "sandboxed"
    age = age_seconds(pid)
    return "starting" if age is not None and age < STARTING_S else ""


@dataclass
class _Pending:
    """A process of the build the batch could not reach, waited for after it."""

    # See _waitable; "" for a process that appeared after the first look, "lost" for
    # one whose connection broke before the answer (row: that failure).
    kind: str
    row: Outcome  # its executable, build-id and VM name, read while it ran


def _exited(p: _Pending) -> Outcome:
    """Returns the row of a waited-for process that ended (or executed another program)
    before its agent was reached: skipped, it runs nothing of the build any more."""
    if p.kind == "sandboxed":
        why = (
            "exited; not patchable while it ran: a seccomp sandbox left its agent no "
            "socket (OpenSSH's pre-authentication child), it ran the code it was forked "
            "with until it ended"
        )
    else:
        why = (
            "no longer runs the build (exited, or executed another program) before its "
            "agent listened: it ran the code it was forked with until then"
        )
    return Outcome(p.row.pid, Result.SKIPPED, why, p.row.exe, p.row.build_id, p.row.vm)


def _follow(
    pending: dict[int, _Pending],
    seen: set[int],
    since: float,
    *,
    done: list[Outcome],
    done_as: Result,
    of_build: Callable[[_Host], set[int]],
    send: Callable[[_Host, list[AgentSocket]], list[Outcome]],
    give_up: Callable[[_Host, int, bool], Outcome],
) -> tuple[list[Outcome], list[AgentSocket]]:
    """Returns (rows: ``done``'s and the waited-for processes', agents sent to) once
    every process of ``pending`` has bound (then ``send`` reaches it), exited (skipped:
    it runs nothing any more), or is not worth waiting for any longer (``give_up`` says
    what it is): one still starting until it is STARTING_S old, one ending for
    STARTING_S, a sandboxed one until the sandbox wait has passed. Processes of the
    build that appear meanwhile (not in ``seen``) and started before ``since`` (when the
    batch ended, monotonic) were forked before the batch reached their parent, which
    may have been patched: they are waited for too. A process asked again after its
    connection broke that answers "nothing to do" is reported ``done_as``: the first
    request may have done it (a rollback must then undo it)."""
    rows: list[Outcome] = []
    sent: list[AgentSocket] = []
    retried: set[int] = set()
    rows += _requeue(done, pending, retried)
    sandbox_deadline = time.monotonic() + _sandbox_wait()
    ending_deadline = time.monotonic() + STARTING_S
    first = True
    while pending or first:
        if not first:
            time.sleep(_STARTING_POLL_S)
        first = False
        host = _look()
        now = time.monotonic()
        build = of_build(host)
        for pid in sorted(build - seen):
            seen.add(pid)
            age = age_seconds(pid)
            if age is not None and age + _FORK_SLACK_S >= now - since:
                pending[pid] = _Pending("", host.outcome(pid, Result.SKIPPED))
        ready = []
        for pid, p in sorted(pending.items()):
            kind = "gone" if pid not in build else _waitable(host, pid)
            if pid in host.agents:
                ready.append(host.agents[pid])
            elif p.kind == "lost" and kind != "gone" and now < ending_deadline:
                continue  # its agent binds again (a program that closed its socket)
            elif p.kind == "lost":
                rows.append(p.row)  # ended (the request may have ended it), or silent
            elif kind == "gone":
                rows.append(_exited(p))
            elif kind == "sandboxed" and now < sandbox_deadline:
                p.kind = kind
                continue
            elif kind == "starting" or (kind == "ending" and now < ending_deadline):
                continue
            elif process_state(pid) in _ENDED:  # ended while /proc was read
                rows.append(_exited(p))
            else:
                rows.append(give_up(host, pid, kind == "sandboxed"))
            del pending[pid]
        if ready:
            sent += ready
            answers = _asked_again(send(host, ready), retried, done_as)
            rows += _requeue(answers, pending, retried)
    return rows, sent


def _asked_again(outcomes: list[Outcome], retried: set[int], done_as: Result) -> list[Outcome]:
    """Returns ``outcomes`` with those of processes asked again after a lost connection
    that found nothing to do (skipped) made ``done_as``: the first request did it."""
    for o in outcomes:
        if o.pid in retried and o.result == Result.SKIPPED:
            o.result, o.reason = done_as, f"asked again after a lost connection: {o.reason}"
    return outcomes


def _requeue(
    outcomes: list[Outcome], pending: dict[int, _Pending], retried: set[int]
) -> list[Outcome]:
    """Returns ``outcomes`` but those whose connection broke before the answer while the
    process still runs (a program closing every descriptor, as sshd re-executed for a
    connection does, closes its agent's socket under the request; the agent binds
    again within a second): those go to ``pending`` to be asked once more, once."""
    out = []
    for o in outcomes:
        if o.lost and o.pid not in retried and process_state(o.pid) not in _ENDED:
            retried.add(o.pid)
            pending[o.pid] = _Pending("lost", o)
        else:
            out.append(o)
    return out


def _narrow(
    host: _Host,
    exe: str | None,
    build_id: str | None,
    pids: Collection[int] | None,
    vms: Collection[str] | None = None,
) -> set[int]:
    """Returns the pids (processes and agents) within ``--exe`` (the same file),
    ``--build-id`` (running it, or mapping a library of it), ``pids`` and ``--vm`` (a
    QEMU whose VM name is one of ``vms``)."""
    scope = set(host.running) | set(host.agents) | set(host.far)
    if pids is not None:
        scope &= set(pids)
    if exe is not None:
        try:
            st = os.stat(exe)
        except OSError as err:
            raise PatchboxError(f"--exe {exe}: {err.strerror}") from err
        want = (st.st_dev, st.st_ino)
        scope = {p for p in scope if p in host.running and host.running[p].file == want}
    if build_id is not None:
        scope = processes_of(_within(host, scope), build_id)
    if vms is not None:
        scope = {p for p in scope if _in_vms(p, vms)}
    return scope


def _in_vms(pid: int, vms: Collection[str]) -> bool:
    """Returns whether ``pid`` is a QEMU whose VM name is one of ``vms`` (a process
    without a name matches none, not even "")."""
    name = vm_name(pid, exe_path(pid))
    return bool(name) and name in vms


def _within(host: _Host, pids: Collection[int]) -> dict[int, Running]:
    """Returns what each of ``pids`` runs, for those whose executable could be read."""
    return {p: host.running[p] for p in pids if p in host.running}


def _known_builds(host: _Host, root: Path | None) -> set[str]:
    """Returns the executable build-ids patchbox knows on this host: those of the agents
    found and those the store holds patches for."""
    agents = set(host.agents) | set(host.far)
    known = {host.running[p].build_id for p in agents if p in host.running}
    if root is not None:
        try:
            known |= {e.build_id for e in iter_installed(root)}
        except OSError:
            pass  # an unreadable store names no build
    known.discard("")
    return known


def _shares_namespaces(pid: int) -> bool:
    """Returns whether ``pid`` is in this process's pid and mount namespaces: only then do
    its socket's path and the pids in ``sandbox-sock<N>`` names mean the same here."""
    for kind in ("pid", "mnt"):
        theirs = namespace(pid, kind)
        if theirs is None or theirs != namespace("self", kind):
            return False
    return True


def _open_agent_dir(a: AgentSocket) -> tuple[int, str] | None:
    """Returns (directory descriptor, its path) of agent ``a``'s socket directory, None if
    it cannot be named from here. A bound path is walked from / without following any
    link (the agent binds a real path: a link there now was put by someone else); a
    directory too deep for sun_path is the agent's own descriptor of it."""
    m = FD_ADDRESS.fullmatch(a.bound)
    if m:
        fd = os.open(fd_path(a.pid, m[1]), safefs.DIR_FLAGS)  # the agent's own descriptor
        try:
            return fd, fd_target(a.pid, m[1])
        except OSError:
            os.close(fd)
            raise
    if not a.bound.startswith("/"):
        return None
    shown = os.path.dirname(a.bound)
    walked = safefs.walk(shown)
    assert walked is not None  # missing_ok is false
    return walked, shown


def sweep_agent_dirs(agents: list[AgentSocket]) -> list[Path]:
    """Removes stale ``sandbox-sock<N>`` files (process N gone, connect refused) from the
    directories of the agents found; returns them (docs/protocol.md, "Stale sockets").

    Only agents in this process's pid and mount namespaces are followed; each directory
    is opened once (see :func:`_open_agent_dir`) and swept through its descriptor. A
    directory that cannot be opened that way, or that others may write to without the
    sticky bit (:class:`SweepRefused`), is left alone."""
    removed: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for a in agents:
        if a.pid != a.nspid or not _shares_namespaces(a.pid):
            continue
        try:
            opened = _open_agent_dir(a)
        except (OSError, PatchboxError):
            continue  # gone, not ours to open, or a link on the way
        if opened is None:
            continue
        fd, shown = opened
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            removed += sweep_stale_sockets(fd, shown=shown)
        except (OSError, PatchboxError):
            continue  # not ours to list, or refused (SweepRefused says why)
        finally:
            os.close(fd)
    return removed


def list_processes(
    *, timeout: float = 10.0, sweep: bool = True, vms: Collection[str] | None = None
) -> list[ProcessRow]:
    """Returns one row per process with an agent socket (INFO and LIST asked of all at
    once), and one per process of a build patchbox knows (an agent's, or one the store
    holds patches for) that has none, with the reason in ``error``; with ``vms``, only
    those of QEMUs whose VM name is one of them. With ``sweep``, stale sockets in the
    agents' directories are removed first (every agent's, whatever ``vms`` says)."""
    host = _look()
    agents = list(host.agents.values())
    if sweep:
        sweep_agent_dirs(agents)
    if vms is not None:
        agents = [a for a in agents if _in_vms(a.pid, vms)]
    jobs = [
        Job(a.pid, a.connect, [(Msg.INFO, b""), (Msg.LIST, b"")], a.alt, a.inode) for a in agents
    ]
    run_jobs(jobs, timeout)
    root = store_root()
    rows = []
    for a, job in zip(agents, jobs, strict=True):
        pid = job.peer_pid or a.pid
        path, bid, vm = host.describe(pid)
        row = ProcessRow(pid, exe=path, build_id=bid, vm=vm, socket=a.bound)
        if job.error is not None:
            row.error = str(job.error)
        else:
            info: dict[str, str] = job.replies[0]
            listed: list[AppliedPatch] = job.replies[1]
            row.exe = info.get("exe", row.exe)
            row.build_id = info.get("build_id", row.build_id)
            row.socket = info.get("socket", row.socket)
            row.patches = [p.name for p in listed]
            row.unloaded = [p.name for p in listed if p.unloaded]
            row.sandbox_used = int(info.get("sandbox_used", "0") or 0)
            row.sandbox_size = int(info.get("sandbox_size", "0") or 0)
        rows.append(row)
    answered = {r.pid for r in rows} | set(host.agents)
    known = _known_builds(host, root)
    for pid in sorted(set(host.running) | set(host.far)):
        bid = host.running[pid].build_id if pid in host.running else ""
        if pid not in answered and (bid in known or pid in host.far):
            path, bid, vm = host.describe(pid)
            if vms is None or (vm and vm in vms):
                rows.append(ProcessRow(pid, path, bid, vm, error=host.why(pid)))
    for row in rows:
        if row.build_id and row.build_id != "unknown":
            row.installed = [e.name for e in iter_installed(root, row.build_id)]
    return sorted(rows, key=lambda r: r.pid)


def _judge(
    job: Job, done: Result, benign: ErrorCode, benign_reason: str
) -> tuple[Result, str, bool]:
    """Returns (result, reason, retry) of a finished job: ``done``; skipped (the agent
    answered ``benign``, or the process exited before the connection: nothing was sent);
    unreachable (the socket or the agent refused this client); failed."""
    err = job.error
    if err is None:
        return done, "", False
    if isinstance(err, AgentError) and err.code == benign:
        return Result.SKIPPED, benign_reason, False
    if job.denied or (isinstance(err, AgentError) and err.code == ErrorCode.PERMISSION):
        return Result.UNREACHABLE, str(err), False
    if job.refused and process_state(job.key) in _ENDED:
        # Exited between the look and the connection: nothing sent, nothing runs.
        return Result.SKIPPED, f"exited before its agent was reached ({err})", False
    return Result.FAILED, str(err), job.retry


def _batch(
    host: _Host,
    agents: list[AgentSocket],
    request: tuple[Msg, bytes],
    *,
    done: Result,
    benign: ErrorCode,
    benign_reason: str,
    timeout: float,
) -> list[Outcome]:
    """Sends ``request`` to every agent at once; returns one outcome per agent (see
    :func:`_judge`)."""
    jobs = [Job(a.pid, a.connect, [request], a.alt, a.inode) for a in agents]
    run_jobs(jobs, timeout)
    out = []
    for job in jobs:
        # The answering process (the scan's pid is a guess for another pid namespace).
        result, reason, retry = _judge(job, done, benign, benign_reason)
        o = host.outcome(job.peer_pid or job.key, result, reason, retry)
        o.lost = job.lost and result == Result.FAILED
        out.append(o)
    return out


def already_applied(name: str) -> str:
    """Returns the reason of a process skipped because it has patch ``name`` already."""
    return f"{name} is already applied"


DRY_RUN = "check mode: "  # the reason's prefix of a predicted change


def _predict(
    host: _Host, agents: list[AgentSocket], name: str, present: bool, timeout: float
) -> list[Outcome]:
    """Returns what making patch ``name`` present (applied) or absent (removed) would do
    to each agent, from one LIST each: nothing is changed."""
    jobs = [Job(a.pid, a.connect, [(Msg.LIST, b"")], a.alt, a.inode) for a in agents]
    run_jobs(jobs, timeout)
    out = []
    for job in jobs:
        pid = job.peer_pid or job.key
        if job.error is not None:
            # The job failed: ``done`` is not what it returns.
            result, reason, retry = _judge(job, Result.FAILED, ErrorCode.OK, "")
            out.append(host.outcome(pid, result, reason, retry))
            continue
        has = name in (p.name for p in job.replies[0])
        if present:
            result, reason = (
                (Result.SKIPPED, already_applied(name)) if has else (Result.APPLIED, "")
            )
        else:
            result, reason = (
                (Result.REMOVED, "") if has else (Result.SKIPPED, f"{name} is not applied")
            )
        if result in (Result.APPLIED, Result.REMOVED):
            reason = f"{DRY_RUN}would be {result}"
        out.append(host.outcome(pid, result, reason))
    return out


def _attach_missing(
    host: _Host, pids: Collection[int], include_privileged: bool = False
) -> dict[int, Outcome]:
    """Attaches the agent to each of ``pids`` (processes of the build without one);
    returns {pid: outcome} of those it could not attach: failed, or unreachable for a
    privileged process (unless ``include_privileged``). An attached process is then
    found as an agent."""
    out: dict[int, Outcome] = {}
    library = str(preload())
    for pid in sorted(pids):
        try:
            attach(pid, library, include_privileged=include_privileged)
        except AlreadyAttached:
            continue
        except PrivilegedProcess as err:
            # Left without an agent on purpose, still running the build: not patched.
            reason = f"not attached: privileged ({err.reason}); --include-privileged attaches"
            out[pid] = host.outcome(pid, Result.UNREACHABLE, reason)
        except AttachError as err:
            out[pid] = host.outcome(pid, Result.FAILED, f"attach: {err}", err.retry)
    return out


def _apply_one_held(a: AgentSocket, host: _Host, pf: PatchFile, timeout: float) -> Outcome:
    """Applies a HOLD patch to one process: its threads held around the APPLY."""
    o = host.outcome(a.pid, Result.APPLIED)
    try:
        with Client(a.connect, timeout=timeout) as client:
            peer = peer_pid(client.sock) if client.sock is not None else 0
            if peer != a.pid and not holds_socket(peer, a.inode):
                raise ConnectError(
                    f"pid {a.pid}: {a.connect} is answered by pid {peer}, which does not "
                    f"hold the agent socket listed for pid {a.pid}: nothing sent"
                )
            info = client.info()
            # The threads held are the answering process's (the scan's pid is a guess
            # for an agent of another pid namespace).
            _result, hold = apply_held(client, peer, pf.patch, pf.body, info)
        if hold is not None:
            o.reason = f"held {hold.threads} thread(s) for at most {hold.longest_ns / 1e6:.3f} ms"
    except AgentError as err:
        if err.code == ErrorCode.ALREADY_APPLIED:
            o.result, o.reason = Result.SKIPPED, already_applied(pf.patch.name)
        elif err.code == ErrorCode.PERMISSION:
            o.result, o.reason = Result.UNREACHABLE, str(err)
        else:
            o.result, o.reason, o.retry = Result.FAILED, str(err), err.code == ErrorCode.NOT_HELD
    except PatchboxError as err:
        if isinstance(err.__cause__, PermissionError):  # the socket's file refused us
            o.result, o.reason = Result.UNREACHABLE, f"pid {a.pid}: {err}"
        else:
            o.result, o.reason, o.retry = Result.FAILED, str(err), True
    return o


def _apply_scope(
    host: _Host,
    want: str,
    exe: str | None,
    build_id: str | None,
    *,
    pids: Collection[int] | None,
    vms: Collection[str] | None,
) -> tuple[set[int], set[int]]:
    """Returns (pids within the narrowing, those of them running build ``want``)."""
    scope = _narrow(host, exe, build_id, pids, vms)
    return scope, processes_of(_within(host, scope), want)


def _sort_out(
    host: _Host, scope: set[int], of_build: set[int], want: str, dry_run: bool
) -> tuple[list[Outcome], list[AgentSocket], dict[int, _Pending]]:
    """Returns, for `apply --all` of build ``want``: (rows decided now: unreachable, or
    skipped for another build; the agents to send the patch to; the processes of the
    build to wait for, see :func:`_waitable`, none when ``dry_run``)."""
    rows: list[Outcome] = []
    targets: list[AgentSocket] = []
    pending: dict[int, _Pending] = {}
    for pid in sorted(scope):
        a = host.agents.get(pid)
        if pid in of_build or (pid not in host.running and (a is not None or pid in host.far)):
            # Of the build, or an agent whose build cannot be read here: it decides.
            if a is not None:
                targets.append(a)
            elif not dry_run and (kind := _waitable(host, pid)):
                pending[pid] = _Pending(kind, host.outcome(pid, Result.SKIPPED))
            else:
                rows.append(host.outcome(pid, Result.UNREACHABLE, host.why(pid)))
        elif a is not None:
            have = host.running[pid].build_id
            reason = f"runs build-id {have or 'none'} and maps no library of {want}"
            rows.append(host.outcome(pid, Result.SKIPPED, reason))
    return rows, targets, pending


def apply_all(
    pf: PatchFile,
    *,
    exe: str | None = None,
    build_id: str | None = None,
    pids: Collection[int] | None = None,
    vms: Collection[str] | None = None,
    rollback: bool = False,
    timeout: float = 10.0,
    attach: bool = False,
    include_privileged: bool = False,
    dry_run: bool = False,
) -> list[Outcome]:
    """Returns one outcome per process concerned after applying ``pf`` to every process
    that runs the patch's build: whose executable has its build-id or, for a library's,
    that maps it (narrowed by ``exe``/``build_id``/``pids``, and ``vms``: QEMUs of those VM
    names, :func:`patchbox.procfs.vm_name`). Such a process without an
    agent socket, or whose agent refuses this client, is unreachable; agents of other
    builds are skipped. With ``attach``, processes of the build without an agent get
    one first, except processes the kernel protects from same-uid tracing (setuid,
    setgid, file capabilities, not dumpable), which stay unreachable with the reason
    unless ``include_privileged``. With ``rollback``, a failed or unreachable process
    anywhere removes the patch again from every process this call applied it to.
    Patches with held entry jumps (HOLD) go to one process after the other, each held
    around its APPLY; the others to all at once. With ``dry_run``, every agent is asked
    for its patches instead (nothing attached, nothing applied) and the outcomes say
    what would happen ("check mode: would be applied")."""
    want = pf.patch.build_id.hex()
    host = _look()
    scope, of_build = _apply_scope(host, want, exe, build_id, pids=pids, vms=vms)
    attached: dict[int, Outcome] = {}
    if attach and not dry_run:
        attached = _attach_missing(host, of_build - set(host.agents), include_privileged)
        host = _look()
        scope, of_build = _apply_scope(host, want, exe, build_id, pids=pids, vms=vms)
    if dry_run and _starting(host, of_build & scope):
        host = _settled(host, of_build & scope)
        scope, of_build = _apply_scope(host, want, exe, build_id, pids=pids, vms=vms)
    rows, targets, pending = _sort_out(host, scope - set(attached), of_build, want, dry_run)
    rows += attached.values()

    def send(look: _Host, agents: list[AgentSocket]) -> list[Outcome]:
        if dry_run:
            return _predict(look, agents, pf.patch.name, True, timeout)
        if pf.patch.flags & ApplyFlag.HOLD:
            return [_apply_one_held(a, look, pf, timeout) for a in agents]
        return _batch(
            look,
            agents,
            (Msg.APPLY, pf.body),
            done=Result.APPLIED,
            benign=ErrorCode.ALREADY_APPLIED,
            benign_reason=already_applied(pf.patch.name),
            timeout=timeout,
        )

    def build_of(look: _Host) -> set[int]:
        return _apply_scope(look, want, exe, build_id, pids=pids, vms=vms)[1]

    done = send(host, targets)
    if not dry_run:
        # Processes of the build the batch could not reach yet, and those forked before
        # it reached their parent: applied once they bind, skipped once they exit.
        done, sent = _follow(
            pending,
            set(scope),
            time.monotonic(),
            done=done,
            done_as=Result.APPLIED,
            of_build=build_of,
            send=send,
            give_up=_unreachable_now,
        )
        targets += sent
    bad = [o for o in done + rows if o.result.failure]
    if rollback and bad and not dry_run:
        applied = {o.pid for o in done if o.result == Result.APPLIED}
        back = _batch(
            host,
            [a for a in targets if a.pid in applied],
            _remove_request(pf.patch.name),
            done=Result.REMOVED,
            benign=ErrorCode.NOT_APPLIED,
            benign_reason="not applied",
            timeout=timeout,
        )
        undone = {o.pid: o for o in back}
        first = min(bad, key=lambda o: o.pid)
        for o in done:
            r = undone.get(o.pid)
            if r is not None and r.result == Result.REMOVED:
                o.result, o.reason = Result.REMOVED, f"rolled back: pid {first.pid} {first.result}"
            elif r is not None:
                o.result, o.reason = Result.FAILED, f"applied, rollback failed: {r.reason}"
    return sorted(rows + done, key=lambda o: o.pid)


def _remove_request(name: str) -> tuple[Msg, bytes]:
    return Msg.REMOVE, bytes(Writer().str(name))


def remove_all(
    name: str,
    *,
    exe: str | None = None,
    build_id: str | None = None,
    pids: Collection[int] | None = None,
    vms: Collection[str] | None = None,
    timeout: float = 10.0,
    dry_run: bool = False,
) -> list[Outcome]:
    """Returns one outcome per process concerned after removing patch ``name`` from every
    agent that has it (narrowed by ``exe``, ``build_id`` — processes running that build
    or mapping a library of it —, ``pids`` or ``vms``: QEMUs of those VM names); agents
    without it are skipped. Processes
    of the build (of a build patchbox knows, without narrowing) whose agent cannot be
    reached may still run the patch: unreachable. Processes without any agent cannot
    hold it: skipped. With ``dry_run``, every agent is asked for its patches instead
    and the outcomes say what would happen."""
    host = _look()
    scope, of_build = _remove_scope(host, exe, build_id, pids, vms)
    if dry_run and _starting(host, of_build):
        host = _settled(host, of_build)
    agents = [host.agents[p] for p in sorted(scope) if p in host.agents]

    def send(look: _Host, to: list[AgentSocket]) -> list[Outcome]:
        if dry_run:
            return _predict(look, to, name, False, timeout)
        return _batch(
            look,
            to,
            _remove_request(name),
            done=Result.REMOVED,
            benign=ErrorCode.NOT_APPLIED,
            benign_reason=f"{name} is not applied",
            timeout=timeout,
        )

    def not_reached(look: _Host, pid: int, waited: bool = False) -> Outcome:
        if agent_inside(pid) is False:
            return look.outcome(pid, Result.SKIPPED, f"no agent loaded: it cannot hold {name}")
        return _unreachable_now(look, pid, waited)

    def build_of(look: _Host) -> set[int]:
        return _remove_scope(look, exe, build_id, pids, vms)[1]

    done = send(host, agents)
    reached = {o.pid for o in done}
    pending: dict[int, _Pending] = {}
    for pid in sorted((of_build | (set(host.far) & scope)) - set(host.agents) - reached):
        if not dry_run and (kind := _waitable(host, pid)):
            pending[pid] = _Pending(kind, host.outcome(pid, Result.SKIPPED))
        else:
            done.append(not_reached(host, pid))
    if not dry_run:
        # As apply_all: a process forked from a patched one holds the patch too.
        done, _sent = _follow(
            pending,
            set(scope),
            time.monotonic(),
            done=done,
            done_as=Result.REMOVED,
            of_build=build_of,
            send=send,
            give_up=not_reached,
        )
    return sorted(done, key=lambda o: o.pid)


def _remove_scope(
    host: _Host,
    exe: str | None,
    build_id: str | None,
    pids: Collection[int] | None,
    vms: Collection[str] | None,
) -> tuple[set[int], set[int]]:
    """Returns (pids within the narrowing, those of them of the build) for `remove
    --all`: without ``exe`` or ``build_id``, the builds patchbox knows."""
    scope = _narrow(host, exe, build_id, pids, vms)
    if exe is None and build_id is None:
        known = _known_builds(host, store_root())
        return scope, {p for p in scope if p in host.running and host.running[p].build_id in known}
    return scope, scope


def _unreachable_now(host: _Host, pid: int, waited: bool = False) -> Outcome:
    """Returns the row of a process of the build not reached: unreachable, with the
    reason (``waited``: a sandboxed one waited for, and for how long)."""
    why = host.why(pid)
    if waited:
        why += f"; still running after the {_sandbox_wait():g} s waited for it to end"
    return host.outcome(pid, Result.UNREACHABLE, why)


def exit_status(outcomes: list[Outcome]) -> int:
    """Returns 0 if nothing failed and nothing was unreachable, 2 if every failure is
    worth a retry (and nothing was unreachable), else 1."""
    bad = [o for o in outcomes if o.result.failure]
    if not bad:
        return 0
    return 2 if all(o.result == Result.FAILED and o.retry for o in bad) else 1
