"""Host-wide operations: list every agent (`ps`), apply or remove a patch everywhere.

A process's build is read from its executable (``/proc/<pid>/exe``, program headers
only, cached per file), so processes of other builds are skipped without a round trip;
the agent checks the build-id again before it applies anything. A process whose agent
answers APPLY with ALREADY_APPLIED is *skipped* (nothing to do), one answering REMOVE
with NOT_APPLIED likewise.

Exit status of `apply --all` / `remove --all` (as Xen's livepatch tool): 0 nothing
failed, 1 something failed, 2 every failure is worth a retry (a busy agent).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from patchbox import safefs
from patchbox.config import preload
from patchbox.elf.buildid import read_build_id
from patchbox.errors import AgentError, ConnectError, ElfError, PatchboxError
from patchbox.format.codec import Writer
from patchbox.format.layout import PatchFile
from patchbox.host.batch import Job, run_jobs
from patchbox.host.scan import AgentSocket, iter_agent_sockets
from patchbox.protocol.client import Client
from patchbox.protocol.discovery import FD_ADDRESS, holds_socket, peer_pid, sweep_stale_sockets
from patchbox.protocol.replies import AppliedPatch
from patchbox.reach.attach import AlreadyAttached, AttachError, PrivilegedProcess, attach
from patchbox.reach.hold import apply_held
from patchbox.reach.procfs import find_mapped, mapped_objects
from patchbox.store import iter_installed, store_root
from patchbox.wire import ApplyFlag, ErrorCode, Msg

__all__ = [
    "Outcome",
    "ProcessRow",
    "exe_facts",
    "list_processes",
    "apply_all",
    "remove_all",
    "exit_status",
]


@dataclass
class Outcome:
    """What happened to one process (``result``: applied, removed, skipped or failed)."""

    pid: int
    result: str
    reason: str = ""
    exe: str = ""
    build_id: str = ""
    retry: bool = False

    def to_json(self) -> dict[str, Any]:
        """Returns the JSON object `--json` prints for this process."""
        d = asdict(self)
        del d["retry"]
        return d


@dataclass
class ProcessRow:
    """One line of `patchbox ps`."""

    pid: int
    exe: str = ""
    build_id: str = ""
    patches: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)  # of patches: their library was unloaded
    installed: list[str] = field(default_factory=list)
    sandbox_used: int = 0
    sandbox_size: int = 0
    socket: str = ""
    error: str = ""  # why the agent could not be reached

    def to_json(self) -> dict[str, Any]:
        """Returns the JSON object `ps --json` prints for this process."""
        return asdict(self)


@dataclass(frozen=True)
class _Exe:
    """What a process runs: its executable's path, file identity and build-id."""

    path: str = ""
    file: tuple[int, int] = (0, 0)  # (st_dev, st_ino)
    build_id: str = ""


_BUILD_IDS: dict[str, str] = {}  # executable (as /proc/PID/exe names it) -> build-id


def exe_facts(pid: int, identity: bool = False) -> _Exe:
    """Returns what ``pid`` runs (empty fields where /proc does not tell). The build-id is
    read once per executable (program headers only) and cached by its path; a replaced
    executable is named "PATH (deleted)" and read through /proc/PID/exe. ``identity``
    also stats the file (for --exe)."""
    proc = f"/proc/{pid}/exe"
    try:
        link = os.readlink(proc)
        st = os.stat(proc) if identity or link.endswith(" (deleted)") else None
    except OSError:
        return _Exe()
    key = link if st is None else f"{link}\0{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}"
    if key not in _BUILD_IDS:
        try:
            found = read_build_id(proc)
        except ElfError:
            found = None
        _BUILD_IDS[key] = found.hex() if found else ""
    file = (st.st_dev, st.st_ino) if st is not None else (0, 0)
    return _Exe(link.removesuffix(" (deleted)"), file, _BUILD_IDS[key])


def _select(
    agents: list[AgentSocket],
    facts: dict[int, _Exe],
    exe: str | None,
    build_id: str | None,
    pids: Collection[int] | None = None,
) -> list[AgentSocket]:
    out = agents if pids is None else [a for a in agents if a.pid in pids]
    if exe is not None:
        try:
            want = os.stat(exe)
        except OSError as err:
            raise PatchboxError(f"--exe {exe}: {err.strerror}") from err
        out = [a for a in out if facts[a.pid].file == (want.st_dev, want.st_ino)]
    if build_id is not None:
        out = [a for a in out if facts[a.pid].build_id == build_id.lower()]
    return out


def _agents(identity: bool = False) -> tuple[list[AgentSocket], dict[int, _Exe]]:
    """Returns the agents of the host and what each runs (``identity``: with the file's
    identity, for --exe)."""
    agents = iter_agent_sockets()
    return agents, {a.pid: exe_facts(a.pid, identity) for a in agents}


def _shares_namespaces(pid: int) -> bool:
    """Returns whether ``pid`` is in this process's pid and mount namespaces: only then do
    its socket's path and the pids in ``sandbox-sock<N>`` names mean the same here."""
    try:
        return all(
            os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/self/ns/{ns}")
            for ns in ("pid", "mnt")
        )
    except OSError:
        return False


def _open_agent_dir(a: AgentSocket) -> tuple[int, str] | None:
    """Returns (directory descriptor, its path) of agent ``a``'s socket directory, None if
    it cannot be named from here. A bound path is walked from / without following any
    link (the agent binds a real path: a link there now was put by someone else); a
    directory too deep for sun_path is the agent's own descriptor of it."""
    m = FD_ADDRESS.fullmatch(a.bound)
    if m:
        path = f"/proc/{a.pid}/fd/{m[1]}"
        fd = os.open(path, safefs.DIR_FLAGS)
        try:
            return fd, os.readlink(path)
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


def list_processes(*, timeout: float = 10.0, sweep: bool = True) -> list[ProcessRow]:
    """Returns one row per agent on the host: INFO and LIST asked of all at once. With
    ``sweep``, stale sockets in the agents' directories are removed first."""
    agents, facts = _agents()
    if sweep:
        sweep_agent_dirs(agents)
    jobs = [
        Job(a.pid, a.connect, [(Msg.INFO, b""), (Msg.LIST, b"")], a.alt, a.inode) for a in agents
    ]
    run_jobs(jobs, timeout)
    root = store_root()
    rows = []
    for a, job in zip(agents, jobs, strict=True):
        pid = job.peer_pid or a.pid
        f = facts[a.pid] if pid == a.pid else exe_facts(pid)
        row = ProcessRow(pid, exe=f.path, build_id=f.build_id, socket=a.bound)
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
        if row.build_id and row.build_id != "unknown":
            row.installed = [e.name for e in iter_installed(root, row.build_id)]
        rows.append(row)
    return rows


def _batch(
    agents: list[AgentSocket],
    facts: dict[int, _Exe],
    request: tuple[Msg, bytes],
    done: str,
    benign: ErrorCode,
    benign_reason: str,
    timeout: float,
) -> list[Outcome]:
    """Sends ``request`` to every agent at once; returns one outcome per agent: ``done``,
    skipped (the agent answered ``benign``) or failed."""
    jobs = [Job(a.pid, a.connect, [request], a.alt, a.inode) for a in agents]
    run_jobs(jobs, timeout)
    out = []
    for a, job in zip(agents, jobs, strict=True):
        pid = job.peer_pid or a.pid
        f = facts[a.pid] if pid == a.pid else exe_facts(pid)
        o = Outcome(pid, done, exe=f.path, build_id=f.build_id)
        err = job.error
        if isinstance(err, AgentError) and err.code == benign:
            o.result, o.reason = "skipped", benign_reason
        elif err is not None:
            o.result, o.reason, o.retry = "failed", str(err), job.retry
        out.append(o)
    return out


def _attach_missing(
    want: str,
    have_agent: set[int],
    exe: str | None,
    pids: Collection[int] | None,
    include_privileged: bool = False,
) -> list[Outcome]:
    """Attaches the agent to every process without one that runs or maps build-id
    ``want`` (and runs ``exe``, and is one of ``pids``, when given); returns the failures
    and the privileged processes skipped (unless ``include_privileged``), an outcome
    each (an attached process is then found as an agent)."""
    out = []
    library = str(preload())
    want_file = None
    if exe is not None:
        try:
            st = os.stat(exe)
        except OSError as err:
            raise PatchboxError(f"--exe {exe}: {err.strerror}") from err
        want_file = (st.st_dev, st.st_ino)
    for pid in sorted(int(n) for n in os.listdir("/proc") if n.isdigit()):
        if pid in have_agent or pid == os.getpid() or (pids is not None and pid not in pids):
            continue
        if want_file is not None and exe_facts(pid, identity=True).file != want_file:
            continue
        if not any(o.build_id == want for o in mapped_objects(pid)):
            continue
        try:
            attach(pid, library, include_privileged=include_privileged)
        except AlreadyAttached:
            continue
        except PrivilegedProcess as err:
            f = exe_facts(pid)
            reason = f"not attached: privileged ({err.reason}); --include-privileged attaches"
            out.append(Outcome(pid, "skipped", reason, f.path, f.build_id))
        except AttachError as err:
            f = exe_facts(pid)
            out.append(Outcome(pid, "failed", f"attach: {err}", f.path, f.build_id, err.retry))
    return out


def _apply_one_held(
    a: AgentSocket, facts: dict[int, _Exe], pf: PatchFile, timeout: float
) -> Outcome:
    """Applies a HOLD patch to one process: its threads held around the APPLY."""
    f = facts[a.pid]
    o = Outcome(a.pid, "applied", exe=f.path, build_id=f.build_id)
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
            o.result, o.reason = "skipped", f"{pf.patch.name} is already applied"
        else:
            o.result, o.reason, o.retry = "failed", str(err), err.code == ErrorCode.NOT_HELD
    except PatchboxError as err:
        o.result, o.reason, o.retry = "failed", str(err), True
    return o


def apply_all(
    pf: PatchFile,
    *,
    exe: str | None = None,
    build_id: str | None = None,
    pids: Collection[int] | None = None,
    rollback: bool = False,
    timeout: float = 10.0,
    attach: bool = False,
    include_privileged: bool = False,
) -> list[Outcome]:
    """Applies ``pf`` to every agent whose executable has the patch's build-id, or that
    maps a library of that build-id (narrowed by ``exe``/``build_id``/``pids``); others
    are skipped. With ``attach``, processes of that build without an agent (within the
    same narrowing) get one first, except processes the kernel protects from same-uid
    tracing (setuid, setgid, file capabilities, not dumpable), which are skipped with
    the reason unless ``include_privileged``. With ``rollback``, a failure anywhere
    removes the patch again from every process this call applied it to. Patches with
    held entry jumps (HOLD) go to one process after the other, each held around its
    APPLY; the others to all at once."""
    want = pf.patch.build_id.hex()
    found, facts = _agents(identity=exe is not None)
    attached: list[Outcome] = []
    if attach:
        attached = _attach_missing(want, {a.pid for a in found}, exe, pids, include_privileged)
        found, facts = _agents(identity=exe is not None)
    skipped, targets = [], []
    for a in _select(found, facts, exe, build_id, pids):
        have = facts[a.pid].build_id
        if have and have != want and find_mapped(a.pid, want) is None:
            reason = f"runs build-id {have} and maps no library of {want}"
            skipped.append(Outcome(a.pid, "skipped", reason, facts[a.pid].path, have))
        else:
            targets.append(a)
    if pf.patch.flags & ApplyFlag.HOLD:
        done = [_apply_one_held(a, facts, pf, timeout) for a in targets]
    else:
        done = _batch(
            targets,
            facts,
            (Msg.APPLY, pf.body),
            "applied",
            ErrorCode.ALREADY_APPLIED,
            f"{pf.patch.name} is already applied",
            timeout,
        )
    done += attached
    if rollback and any(o.result == "failed" for o in done):
        applied = {o.pid for o in done if o.result == "applied"}
        back = _batch(
            [a for a in targets if a.pid in applied],
            facts,
            _remove_request(pf.patch.name),
            "removed",
            ErrorCode.NOT_APPLIED,
            "not applied",
            timeout,
        )
        undone = {o.pid: o for o in back}
        first = next(o for o in done if o.result == "failed")
        for o in done:
            r = undone.get(o.pid)
            if r is not None and r.result == "removed":
                o.result, o.reason = "removed", f"rolled back: pid {first.pid} failed"
            elif r is not None:
                o.result, o.reason = "failed", f"applied, rollback failed: {r.reason}"
    return sorted(skipped + done, key=lambda o: o.pid)


def _remove_request(name: str) -> tuple[Msg, bytes]:
    return Msg.REMOVE, bytes(Writer().str(name))


def remove_all(
    name: str,
    *,
    exe: str | None = None,
    build_id: str | None = None,
    pids: Collection[int] | None = None,
    timeout: float = 10.0,
) -> list[Outcome]:
    """Removes patch ``name`` from every agent that has it (narrowed by ``exe``,
    ``build_id`` or ``pids``); agents without it are skipped."""
    found, facts = _agents(identity=exe is not None)
    done = _batch(
        _select(found, facts, exe, build_id, pids),
        facts,
        _remove_request(name),
        "removed",
        ErrorCode.NOT_APPLIED,
        f"{name} is not applied",
        timeout,
    )
    return sorted(done, key=lambda o: o.pid)


def exit_status(outcomes: list[Outcome]) -> int:
    """Returns 0 if nothing failed, 2 if every failure is worth a retry, else 1."""
    failed = [o for o in outcomes if o.result == "failed"]
    if not failed:
        return 0
    return 2 if all(o.retry for o in failed) else 1
