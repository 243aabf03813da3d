"""What every program of the corpus runs on: commands, daemons, a load under which an
action runs, ``patchbox build`` of one fix, and the apply / probe / remove sequence.

Paths: the package's directory (``HERE``: ``load/``, ``conf/``, ``adapted/``), the cache
(``$PATCHBOX_CORPUS_CACHE``, default /var/cache/patchbox/corpus) and the venv's commands.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fixes import Fix

__all__ = [
    "APPLY_AT",
    "BIN",
    "CACHE",
    "HERE",
    "LOAD_SECONDS",
    "ROOT",
    "RUN_DIR",
    "Ctx",
    "Daemon",
    "Load",
    "Probe",
    "apply_remove",
    "build_patch",
    "env_with_tools",
    "log",
    "patchbox",
    "run",
    "sha",
    "under_load",
    "wait_agent",
    "wait_port",
]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = Path(os.environ.get("PATCHBOX_CORPUS_CACHE", "/var/cache/patchbox/corpus"))
BIN = Path(sys.executable).parent  # the venv's bin: patchbox, python
LOAD_SECONDS = float(os.environ.get("PATCHBOX_CORPUS_LOAD_SECONDS", "6"))
APPLY_AT = 2.0  # seconds into the load when the apply (or remove) is sent


def log(msg: str) -> None:
    print(f"corpus: {msg}", file=sys.stderr, flush=True)


def env_with_tools(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Returns the environment with the venv's bin first on PATH (patchbox, python)."""
    env = dict(os.environ)
    # run.sh's, for `python -m corpus`: not the daemons', their builds' or patchbox's.
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(extra or {})
    return env


def run(
    cmd: list[str] | str,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 3600,
    check: bool = True,
    out: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs a command (a string runs with sh), stdin closed; output captured or to ``out``."""
    shell = isinstance(cmd, str)
    kw: dict[str, Any] = {"capture_output": True}
    fh = None
    if out is not None:
        fh = out.open("w")
        kw = {"stdout": fh, "stderr": subprocess.STDOUT}
    try:
        proc = subprocess.run(
            cmd,
            shell=shell,
            cwd=cwd,
            env=env or env_with_tools(),
            timeout=timeout,
            text=True,
            stdin=subprocess.DEVNULL,
            **kw,
            check=False,
        )
    finally:
        if fh:
            fh.close()
    if check and proc.returncode != 0:
        tail = out.read_text()[-3000:] if out else (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{cmd!r} failed ({proc.returncode}) in {cwd}:\n{tail}")
    return proc


def sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# --- processes, load, apply ---------------------------------------------------------------

RUN_DIR = CACHE / "run"  # agent sockets (PATCHBOX_SOCK_DIR) and daemon logs


def wait_port(
    port: int, proc: subprocess.Popen[bytes], udp: bool = False, secs: float = 20
) -> None:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        if udp:
            out = run(["ss", "-Hlun", f"sport = :{port}"], check=False).stdout
            if out.strip():
                return
        else:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def wait_agent(pid: int, secs: float = 20) -> None:
    deadline = time.monotonic() + secs
    while True:
        proc = run([str(BIN / "patchbox"), "info", "-p", str(pid)], check=False)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the agent of pid {pid} never answered: {proc.stderr.strip()}")
        time.sleep(0.2)


@dataclass
class Daemon:
    """A daemon started in the foreground (its own session), its log in RUN_DIR."""

    argv: list[str]
    name: str
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_dir: Path = RUN_DIR

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> Daemon:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = env_with_tools({"PATCHBOX_SOCK_DIR": str(RUN_DIR), **self.env})
        with self.log_path.open("wb") as fh:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def started(self) -> subprocess.Popen[bytes]:
        """Returns the daemon's process (it must have been started)."""
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class Load:
    """A load generator (a separate process printing one JSON line with ``failed``)."""

    def __init__(self, argv: list[str], seconds: float = LOAD_SECONDS) -> None:
        self.proc = subprocess.Popen(
            [*argv, "--seconds", str(seconds)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.t0 = time.monotonic()

    def result(self) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=LOAD_SECONDS + 600)
        try:
            return dict(json.loads(out.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            return {"error": (out + err)[-500:], "failed": None}


def patchbox(*args: str | Path | int, check: bool = False) -> subprocess.CompletedProcess[str]:
    return run([str(BIN / "patchbox"), *map(str, args)], check=check, timeout=600)


def under_load(
    load_argv: list[str], action: Callable[[], subprocess.CompletedProcess[str]]
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Returns (the action's process result, the load's counts): the action runs APPLY_AT
    seconds into the load."""
    load = Load(load_argv)
    time.sleep(APPLY_AT)
    res = action()
    return res, load.result()


# --- one fix --------------------------------------------------------------------------------


@dataclass
class Probe:
    """A regression check of one fix against the live process."""

    check: Callable[[Ctx], str]  # returns what was observed
    fixed: Callable[[str], bool]  # whether that observation is the fixed behaviour
    on_unfixed: bool = True  # safe to run on the unfixed process (does not kill or hang it)
    expected: str = ""  # the fixed behaviour, in words
    # QEMU: the machine and devices (QEMU arguments) the probe drives through qtest
    # (load/qtest_client.py); the fix is then applied to a QEMU started with them.
    machine: tuple[str, ...] = ()


@dataclass
class Ctx:
    """What a probe, a load generator or a start function knows of the running daemon."""

    fix: Fix
    tree: Path
    port: int
    daemon: Daemon | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_patch(
    fix: Fix, source: Path, diff: Path, binary: Path, out: Path, *, qemu: bool = False
) -> dict[str, Any]:
    """Runs ``patchbox build`` (no flag beyond --source/--diff/--binary, and --qemu) and
    returns its result: built (functions), refused (message) or no function."""
    args = ["build", "--source", source, "--diff", diff, "--binary", binary, "--explain"]
    args += ["--qemu"] if qemu else []
    args += ["--name", out.stem, "-o", out]
    t0 = time.monotonic()
    out.unlink(missing_ok=True)
    proc = run([str(BIN / "patchbox"), *map(str, args)], check=False, timeout=3600, cwd=source)
    secs = round(time.monotonic() - t0, 1)
    explain = out.with_suffix(".explain")
    explain.write_text(proc.stdout + proc.stderr)
    res: dict[str, Any] = {"seconds": secs, "explain": str(explain)}
    m = re.search(r"^wrote .*?: (\d+) function\(s\) \((.*?)\) from", proc.stdout, re.M)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("patchbox: error:")]
    res["warnings"] = [
        ln.removeprefix("patchbox build: warning: ")
        for ln in proc.stderr.splitlines()
        if ln.startswith("patchbox build: warning:")
    ]
    if proc.returncode == 0 and m:
        res["result"] = "built"
        res["functions"] = m[2].split(", ")
    else:
        msg = errors[-1].removeprefix("patchbox: error: ") if errors else proc.stderr[-400:]
        res["result"] = "no function" if "changes no function" in msg else "refused"
        res["message"] = msg
    return res


def _observe(probe: Probe, ctx: Ctx) -> str:
    """Returns the probe's observation; a probe that raises (a daemon gone mid-probe, a
    protocol surprise) is an observation too, not the end of the corpus run."""
    try:
        return probe.check(ctx)
    except Exception as err:  # any failure of a probe is a result of its fix
        return f"probe raised {err!r}"[:300]


def apply_remove(
    ctx: Ctx, pbx: Path, load_argv: list[str] | None, probe: Probe | None, store: bool = False
) -> dict[str, Any]:
    """Applies the patch under load, probes, removes it under load, probes again."""
    assert ctx.daemon is not None
    pid = ctx.daemon.pid
    res: dict[str, Any] = {}
    if probe is not None and probe.on_unfixed:
        res["probe_before"] = _observe(probe, ctx)
    name = pbx.stem
    if store:

        def apply() -> subprocess.CompletedProcess[str]:
            return patchbox("install", "--apply", pbx)

        def remove() -> subprocess.CompletedProcess[str]:
            patchbox("uninstall", name)
            return patchbox("remove", "--all", name)
    else:

        def apply() -> subprocess.CompletedProcess[str]:
            return patchbox("apply", "-p", pid, pbx)

        def remove() -> subprocess.CompletedProcess[str]:
            return patchbox("remove", "-p", pid, name)

    if load_argv is not None:
        done, load = under_load(load_argv, apply)
    else:
        done, load = apply(), {}
    res["apply"] = "applied" if done.returncode == 0 else "refused"
    res["apply_message"] = (done.stdout + done.stderr).strip()[-600:]
    res["load_apply"] = load
    res["alive_after_apply"] = ctx.daemon.alive()
    if done.returncode != 0:
        return res
    if probe is not None:
        # Passed: the fixed behaviour now, and the unfixed one before (where it can be
        # observed without killing the daemon).
        res["probe_after"] = _observe(probe, ctx)
        res["probe_passed"] = probe.fixed(res["probe_after"]) and not (
            "probe_before" in res and probe.fixed(res["probe_before"])
        )
    if load_argv is not None:
        gone, load = under_load(load_argv, remove)
    else:
        gone, load = remove(), {}
    res["remove"] = "removed" if gone.returncode == 0 else "failed"
    res["remove_message"] = (gone.stdout + gone.stderr).strip()[-400:]
    res["load_remove"] = load
    if probe is not None and probe.on_unfixed and ctx.daemon.alive():
        res["probe_removed"] = _observe(probe, ctx)
        res["probe_reverted"] = not probe.fixed(res["probe_removed"])
    res["alive_at_end"] = ctx.daemon.alive()
    return res
