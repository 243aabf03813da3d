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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from patchbox.elf.buildid import read_build_id
from patchbox.errors import AgentError, ElfError, PatchboxError
from patchbox.format.codec import Writer
from patchbox.format.layout import PatchFile
from patchbox.host.batch import Job, run_jobs
from patchbox.host.scan import AgentSocket, iter_agent_sockets
from patchbox.protocol.replies import AppliedPatch
from patchbox.store import iter_installed, store_root
from patchbox.wire import ErrorCode, Msg

__all__ = [
    "Outcome",
    "ProcessRow",
    "exe_of",
    "build_id_of",
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
    installed: list[str] = field(default_factory=list)
    sandbox_used: int = 0
    sandbox_size: int = 0
    socket: str = ""
    error: str = ""  # why the agent could not be reached

    def to_json(self) -> dict[str, Any]:
        """Returns the JSON object `ps --json` prints for this process."""
        return asdict(self)


def exe_of(pid: int) -> str:
    """Returns the executable of ``pid`` ("" if unknown)."""
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return ""


_BUILD_IDS: dict[tuple[int, int, int], str] = {}


def build_id_of(pid: int) -> str:
    """Returns the hex build-id of ``pid``'s executable ("" if unknown), cached per file."""
    path = f"/proc/{pid}/exe"
    try:
        st = os.stat(path)
    except OSError:
        return ""
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    if key not in _BUILD_IDS:
        try:
            found = read_build_id(path)
        except ElfError:
            found = None
        _BUILD_IDS[key] = found.hex() if found else ""
    return _BUILD_IDS[key]


def _select(agents: list[AgentSocket], exe: str | None, build_id: str | None) -> list[AgentSocket]:
    out = agents
    if exe is not None:
        try:
            want = os.stat(exe)
        except OSError as err:
            raise PatchboxError(f"--exe {exe}: {err.strerror}") from err
        keep = []
        for a in out:
            try:
                st = os.stat(f"/proc/{a.pid}/exe")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                keep.append(a)
        out = keep
    if build_id is not None:
        out = [a for a in out if build_id_of(a.pid) == build_id.lower()]
    return out


def list_processes(*, timeout: float = 10.0) -> list[ProcessRow]:
    """Returns one row per agent on the host: INFO and LIST asked of all at once."""
    agents = iter_agent_sockets()
    jobs = [Job(a.pid, a.connect, [(Msg.INFO, b""), (Msg.LIST, b"")]) for a in agents]
    run_jobs(jobs, timeout)
    root = store_root()
    rows = []
    for a, job in zip(agents, jobs, strict=True):
        pid = job.peer_pid or a.pid
        row = ProcessRow(pid, exe=exe_of(pid), build_id=build_id_of(pid), socket=a.bound)
        if job.error is not None:
            row.error = str(job.error)
        else:
            info: dict[str, str] = job.replies[0]
            listed: list[AppliedPatch] = job.replies[1]
            row.exe = info.get("exe", row.exe)
            row.build_id = info.get("build_id", row.build_id)
            row.socket = info.get("socket", row.socket)
            row.patches = [p.name for p in listed]
            row.sandbox_used = int(info.get("sandbox_used", "0") or 0)
            row.sandbox_size = int(info.get("sandbox_size", "0") or 0)
        if row.build_id and row.build_id != "unknown":
            row.installed = [e.name for e in iter_installed(root, row.build_id)]
        rows.append(row)
    return rows


def _batch(
    agents: list[AgentSocket],
    request: Callable[[AgentSocket], tuple[Msg, bytes]],
    done: str,
    benign: ErrorCode,
    benign_reason: str,
    timeout: float,
) -> list[Outcome]:
    jobs = [Job(a.pid, a.connect, [request(a)]) for a in agents]
    run_jobs(jobs, timeout)
    out = []
    for a, job in zip(agents, jobs, strict=True):
        pid = job.peer_pid or a.pid
        o = Outcome(pid, done, exe=exe_of(pid), build_id=build_id_of(pid))
        err = job.error
        if isinstance(err, AgentError) and err.code == benign:
            o.result, o.reason = "skipped", benign_reason
        elif err is not None:
            o.result, o.reason, o.retry = "failed", str(err), job.retry
        out.append(o)
    return out


def apply_all(
    pf: PatchFile,
    *,
    exe: str | None = None,
    build_id: str | None = None,
    rollback: bool = False,
    timeout: float = 10.0,
) -> list[Outcome]:
    """Applies ``pf`` to every agent whose executable has the patch's build-id (narrowed
    by ``exe``/``build_id``); others are skipped. With ``rollback``, a failure anywhere
    removes the patch again from every process this call applied it to."""
    want = pf.patch.build_id.hex()
    agents = _select(iter_agent_sockets(), exe, build_id)
    skipped, targets = [], []
    for a in agents:
        have = build_id_of(a.pid)
        if have and have != want:
            skipped.append(
                Outcome(
                    a.pid,
                    "skipped",
                    f"runs build-id {have}; the patch is for {want}",
                    exe_of(a.pid),
                    have,
                )
            )
        else:
            targets.append(a)
    done = _batch(
        targets,
        lambda _a: (Msg.APPLY, pf.body),
        "applied",
        ErrorCode.ALREADY_APPLIED,
        f"{pf.patch.name} is already applied",
        timeout,
    )
    if rollback and any(o.result == "failed" for o in done):
        applied = {o.pid for o in done if o.result == "applied"}
        back = _batch(
            [a for a in targets if a.pid in applied],
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


def _remove_request(name: str) -> Callable[[AgentSocket], tuple[Msg, bytes]]:
    payload = bytes(Writer().str(name))
    return lambda _a: (Msg.REMOVE, payload)


def remove_all(
    name: str, *, exe: str | None = None, build_id: str | None = None, timeout: float = 10.0
) -> list[Outcome]:
    """Removes patch ``name`` from every agent that has it (narrowed by ``exe`` or
    ``build_id``); agents without it are skipped."""
    agents = _select(iter_agent_sockets(), exe, build_id)
    done = _batch(
        agents,
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
