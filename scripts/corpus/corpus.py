#!/usr/bin/env python3
"""Reproduces the corpus of real security fixes (docs/corpus.md).

    scripts/corpus/run.sh [PROGRAM...] [--fix ID...] [--ci]      (run.sh installs what it needs)
    python3 scripts/corpus/corpus.py --list

For each program (dnsmasq, memcached, openssh, qemu): the Debian bookworm source package
is fetched (``apt-get source``), one tree per fix is made at the level before the fix
(the package's patch series applied up to it; QEMU: the fix's hunks reverted from the
latest release) and built with patchbox's flags and agent. Then per fix: the daemon at that
level is started, ``patchbox build --source --diff --binary`` (``--qemu`` for QEMU, nothing
else) builds the patch from the fix's own diff, the patch is applied while a load generator
talks to the daemon, the fix's regression probe runs against the live process (before,
after the apply, after the remove), and the patch is removed again.

Results: ``$CACHE/results/<program>.json`` (one object per fix) and
``$CACHE/results/summary.json``; the table of docs/corpus.md is printed (``--table``).
Cache: ``$PATCHBOX_CORPUS_CACHE`` (default /var/cache/patchbox/corpus): source packages,
level trees and builds; a level is rebuilt when patchbox's flags, the agent or its recipe
change.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "load"))

from fixes import PACKAGES, Fix, Package  # noqa: E402

CACHE = Path(os.environ.get("PATCHBOX_CORPUS_CACHE", "/var/cache/patchbox/corpus"))
BIN = Path(sys.executable).parent  # the venv's bin: patchbox, python
LOAD_SECONDS = float(os.environ.get("PATCHBOX_CORPUS_LOAD_SECONDS", "6"))
APPLY_AT = 2.0  # seconds into the load when the apply (or remove) is sent
JOBS = os.cpu_count() or 2


def log(msg: str) -> None:
    print(f"corpus: {msg}", file=sys.stderr, flush=True)


def env_with_tools(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Returns the environment with the venv's bin first on PATH (patchbox, python)."""
    env = dict(os.environ)
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


def toolchain_stamp() -> str:
    """Changes when the patchbox flags or the agent change: levels are then rebuilt."""
    cflags = run([str(BIN / "patchbox"), "config", "--cflags"]).stdout
    libs = run([str(BIN / "patchbox"), "config", "--libs"]).stdout.split()
    agent = [Path(p).read_bytes() for p in libs if p.endswith(".o") and "build-info" not in p]
    return sha(cflags, *agent)


# --- sources and levels -------------------------------------------------------------------


def fetch(pkg: Package) -> Path:
    """Returns the unpacked source package without its patches (``CACHE/PKG/pristine``)."""
    dl = CACHE / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    upstream_version = pkg.version.split(":", 1)[-1]
    dsc = dl / f"{pkg.name}_{upstream_version}.dsc"
    if not dsc.exists():
        log(f"apt-get source {pkg.name}={pkg.version}")
        run(["apt-get", "source", "-qq", "--download-only", f"{pkg.name}={pkg.version}"], cwd=dl)
    pristine = CACHE / pkg.name / "pristine"
    if not pristine.is_dir():
        tmp = pristine.with_name("pristine.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        run(["dpkg-source", "-x", "--skip-patches", str(dsc), str(tmp)])
        tmp.rename(pristine)
    return pristine


def series(pristine: Path) -> list[str]:
    lines = (pristine / "debian/patches/series").read_text().splitlines()
    return [ln.split()[0] for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def key(fix: Fix) -> str:
    """Returns the fix's short name: the patch file's stem, or the CVE id for QEMU."""
    if fix.patch.endswith(".diff"):
        return fix.ident.split()[0]
    return re.sub(r"\.(patch|diff)$", "", fix.patch)


@dataclass
class Recipe:
    """How a package's level tree is configured (once) and built: plain ``make`` after that,
    which is also what ``patchbox build`` runs in its copies."""

    configure: Callable[[Path, Package], None]
    binary: str  # the daemon, relative to the tree


def _dnsmasq_configure(tree: Path, pkg: Package) -> None:
    # dnsmasq has no configure: its Makefile's variables are the configuration. Assigned
    # there (CFLAGS = ...), so the environment's CFLAGS would be ignored: the tree is
    # configured to call patchbox itself, as docs/build.md asks of such Makefiles.
    mk = tree / "Makefile"
    text = mk.read_text()
    repl = {
        r"^CFLAGS\s*=.*$": "CFLAGS        = -Wall -W -O2 -g $(shell patchbox config --cflags)",
        r"^COPTS\s*=.*$": "COPTS         = -DHAVE_DNSSEC",
        r"^LIBS\s*=.*$": "LIBS          = $(shell patchbox config --libs "
        f"--app-version {pkg.version})",
    }
    for pat, new in repl.items():
        text, n = re.subn(pat, new, text, count=1, flags=re.M)
        if n != 1:
            raise RuntimeError(f"dnsmasq Makefile: no line {pat}")
    mk.write_text(text)


def _autotools(options: list[str]) -> Callable[[Path, Package], None]:
    def configure(tree: Path, pkg: Package) -> None:
        if (
            not (tree / "configure").exists()
            or (tree / "configure.ac").stat().st_mtime > (tree / "configure").stat().st_mtime
        ):
            run(["autoreconf", "-f"], cwd=tree, out=tree / "autoreconf.log")
        cflags = run([str(BIN / "patchbox"), "config", "--cflags"]).stdout.strip()
        libs = run(
            [str(BIN / "patchbox"), "config", "--libs", "--app-version", pkg.version]
        ).stdout.strip()
        run(
            ["./configure", *options, f"CFLAGS={cflags} -g -O2", f"LIBS={libs}"],
            cwd=tree,
            out=tree / "configure.log",
        )

    return configure


def _openssh_options() -> list[str]:
    empty = CACHE / "openssh" / "empty"
    empty.mkdir(parents=True, exist_ok=True)
    empty.chmod(0o755)
    return [
        "--sysconfdir=/etc/ssh",
        "--with-privsep-user=nobody",
        f"--with-privsep-path={empty}",
        "--without-pam",
        "--without-selinux",
        "--without-kerberos5",
        "--without-libedit",
    ]


RECIPES = {
    "dnsmasq": Recipe(_dnsmasq_configure, "src/dnsmasq"),
    # Debian's options (--enable-sasl --enable-tls) plus the ones that compile the fixed
    # code: the SASL password database and the proxy (neither is in Debian's build).
    "memcached": Recipe(
        _autotools(["--enable-sasl", "--enable-sasl-pwdb", "--enable-tls", "--enable-proxy"]),
        "memcached",
    ),
    "openssh": Recipe(lambda t, p: _autotools(_openssh_options())(t, p), "sshd"),
}


def make(tree: Path) -> None:
    run(
        ["make"],
        cwd=tree,
        env=env_with_tools({"MAKEFLAGS": f"-j{JOBS}"}),
        out=tree / "corpus-build.log",
        timeout=3600,
    )


def levels(pkg: Package) -> dict[str, Path]:
    """Returns {fix key: built tree at the level before the fix}: pristine + the series
    up to the fix's patch, configured and built; each level is a copy of the one before
    (timestamps kept, so make rebuilds only what the patches in between changed)."""
    pristine = fetch(pkg)
    names = series(pristine)
    recipe = RECIPES[pkg.name]
    stamp = sha(toolchain_stamp(), pkg.name, str(RECIPE_VERSION))
    root = CACHE / pkg.name / "lv"
    if (root / ".stamp").exists() and (root / ".stamp").read_text() != stamp:
        log(f"{pkg.name}: patchbox flags, agent or recipe changed: rebuilding the levels")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / ".stamp").write_text(stamp)
    out: dict[str, Path] = {}
    prev: tuple[Path, int] | None = None
    for fix in sorted(pkg.fixes, key=lambda f: names.index(f.patch)):
        idx = names.index(fix.patch)
        tree = root / f"{idx:02d}"
        if not (tree / ".built").exists():
            tmp = tree.with_name(tree.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if prev is None:
                run(["cp", "-a", str(pristine), str(tmp)])
                start = 0
            else:
                run(["cp", "-a", str(prev[0]), str(tmp)])
                (tmp / ".built").unlink()
                start = prev[1]
            for p in names[start:idx]:
                run(f"patch -s -p1 -N -f < {pristine}/debian/patches/{p}", cwd=tmp)
            if prev is None:
                recipe.configure(tmp, pkg)
            log(f"{pkg.name}: building the level before {fix.patch} ({tree})")
            t0 = time.monotonic()
            make(tmp)
            (tmp / ".built").write_text(f"{time.monotonic() - t0:.0f} s\n")
            shutil.rmtree(tree, ignore_errors=True)
            tmp.rename(tree)
        out[key(fix)] = tree
        prev = (tree, idx)
    return out


# --- processes, load, apply ---------------------------------------------------------------


# Bumped when a recipe (configure options, the dnsmasq Makefile edit) changes: the level
# trees are then rebuilt, as when the patchbox flags or the agent change.
RECIPE_VERSION = 1

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

    @property
    def log_path(self) -> Path:
        return RUN_DIR / f"{self.name}.log"

    def start(self) -> Daemon:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
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


def patchbox(*args: str | Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    return run([str(BIN / "patchbox"), *map(str, args)], check=check, timeout=600)


def under_load(load_argv: list[str], action: Callable[[], subprocess.CompletedProcess[str]]):
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


@dataclass
class Ctx:
    """What a probe, a load generator or a start function knows of the running daemon."""

    fix: Fix
    tree: Path
    port: int
    daemon: Daemon | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_patch(
    fix: Fix, source: Path, diff: Path, binary: Path, out: Path, qemu: bool = False
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


def apply_remove(
    ctx: Ctx, pbx: Path, load_argv: list[str] | None, probe: Probe | None, store: bool = False
) -> dict[str, Any]:
    """Applies the patch under load, probes, removes it under load, probes again."""
    assert ctx.daemon is not None
    pid = ctx.daemon.pid
    res: dict[str, Any] = {}
    if probe is not None and probe.on_unfixed:
        res["probe_before"] = probe.check(ctx)
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
        res["probe_after"] = probe.check(ctx)
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
        res["probe_removed"] = probe.check(ctx)
        res["probe_reverted"] = not probe.fixed(res["probe_removed"])
    res["alive_at_end"] = ctx.daemon.alive()
    return res


def verdict(fix: Fix | str, r: dict[str, Any]) -> str:
    """Returns one word for the table: live, refused, no-function, applied (applies, but
    not a working live patch: init-time code, or another program's code linked in), failed."""
    b = r.get("build", {}).get("result")
    if b == "no function":
        return "no-function"
    if b != "built":
        return "refused" if b == "refused" else "failed"
    a = r.get("apply", {})
    if a.get("apply") != "applied":
        return "failed"
    failed = [x.get("failed") for x in (a.get("load_apply", {}), a.get("load_remove", {})) if x]
    if any(f != 0 for f in failed) or not a.get("alive_after_apply", True):
        return "failed"
    if a.get("probe_passed") is False:
        return "failed"
    shape = fix if isinstance(fix, str) else fix.shape
    if shape != "function" and not r.get("adapted"):
        return "applied"  # applies, but the fixed code never runs in this process
    return "live"


# --- dnsmasq ------------------------------------------------------------------------------

DNS_UPSTREAM = 5399
TRUST_ANCHOR = ".,20326,8,2,E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D"
_DNSSEC = ["--dnssec", f"--trust-anchor={TRUST_ANCHOR}"]


def _dns_query(ctx: Ctx, name: str, rdtype: str = "A") -> str:
    from dns_client import query  # dnspython: the test extra

    return query(ctx.port, name, rdtype)


_counter = iter(range(1, 1 << 30))


def _dnsmasq_ecs(ctx: Ctx) -> str:
    bad = _dns_query(ctx, f"ecsbad{next(_counter)}.example")
    good = _dns_query(ctx, f"good{next(_counter)}.example")  # the upstream answers
    return f"mismatching ECS: {bad}; matching: {good}"


def _dnsmasq_mx(ctx: Ctx) -> str:
    got = _dns_query(ctx, f"mxlie{next(_counter)}.example", "MX")
    still = _dns_query(ctx, f"after{next(_counter)}.example")
    return f"MX: {got}; then A: {still}"


PROBES: dict[str, Probe] = {
    # CVE-2026-4893: with --add-subnet, a reply whose ECS option is for another subnet must
    # be discarded (unfixed: accepted and answered).
    "dnsmasq_ecs": Probe(
        _dnsmasq_ecs,
        lambda s: s == "mismatching ECS: timeout; matching: A 10.9.8.7",
        expected="reply discarded",
    ),
    # CVE-2026-5172: an MX record whose rdlen lies: unfixed dnsmasq reads past it, stops
    # answering and grows without bound (so never probed unfixed); fixed: SERVFAIL.
    "dnsmasq_mx_rdlen": Probe(
        _dnsmasq_mx,
        lambda s: "SERVFAIL" in s and s.endswith("A 10.9.8.7"),
        on_unfixed=False,
        expected="SERVFAIL, keeps answering",
    ),
}


def _nobody_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.chown(path, "nobody")
    return path


def run_dnsmasq(fix: Fix, tree: Path, out: Path, port: int) -> dict[str, Any]:
    binary = tree / RECIPES["dnsmasq"].binary
    res: dict[str, Any] = {"build": build_patch(fix, tree, patch_path(fix), binary, out)}
    if res["build"]["result"] != "built":
        return res
    # The probes' names are answered by the fake upstream, which signs nothing: DNSSEC
    # validation (on for the fixes in dnssec.c) would turn every answer into SERVFAIL.
    extra = {"CVE-2026-4893": ["--add-subnet=32"], "CVE-2026-5172": ["--cache-rr=MX"]}
    d = Daemon(
        [
            str(binary),
            "-k",
            f"--port={port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-hosts",
            "--no-resolv",
            f"--server=127.0.0.1#{DNS_UPSTREAM}",
            "--address=/test.local/10.1.2.3",
            "--log-facility=-",
            *extra.get(fix.ident, _DNSSEC),
        ],
        f"dnsmasq-{key(fix)}",
        # dnsmasq closes every descriptor at start, the agent's socket too, then drops to
        # nobody: an agent that binds anew after that needs a directory nobody can write
        # (as /run/dnsmasq is the dnsmasq user's); docs/corpus.md, "What the corpus found".
        env={"PATCHBOX_SOCK_DIR": str(_nobody_dir(RUN_DIR / "dnsmasq"))},
    ).start()
    ctx = Ctx(fix, tree, port, d)
    client = str(HERE / "load" / "dns_client.py")
    upstream = Daemon(
        [sys.executable, client, "upstream", "--port", str(DNS_UPSTREAM), "--seconds", "900"],
        "dns-upstream",
    ).start()
    try:
        wait_port(DNS_UPSTREAM, upstream.proc, udp=True)  # type: ignore[arg-type]
        wait_port(port, d.proc, udp=True)  # type: ignore[arg-type]
        wait_agent(d.pid)
        load = [sys.executable, client, "load", "--port", str(port)]
        probe = PROBES.get(fix.probe) if fix.probe else None
        res["apply"] = apply_remove(ctx, out, load, probe)
    finally:
        d.stop()
        upstream.stop()
    return res


# --- memcached ------------------------------------------------------------------------------

MC_BACKEND = 11400
LONG_GET = b"get" + b" " * 100 + b"k" * 250 + b" foo\r\n"


def _mc_raw(ctx: Ctx, *reqs: bytes) -> str:
    from mc_client import raw

    try:
        return " | ".join(repr(r) for r in raw(ctx.port, *reqs))
    except OSError as err:
        return f"error: {err}"


def _mc_sasl(ctx: Ctx) -> str:
    from mc_client import sasl_login

    return f"alice/second: status {sasl_login(ctx.port, 'alice', 'second'):#x}"


PROBES.update(
    {
        # CVE-2026-47783/47784: the password database lists alice twice; the fixed check
        # compares every line (no early break), so the second password works.
        "memcached_sasl_dup_user": Probe(
            _mc_sasl, lambda s: s.endswith("0x0"), expected="second password accepted"
        ),
        # CVE-2023-46852: a multiget with a long prefix of spaces overflows a stack buffer
        # (unfixed: the proxy dies, never probed unfixed); fixed: SERVER_ERROR, proxy alive.
        "memcached_proxy_long_get": Probe(
            lambda c: _mc_raw(c, LONG_GET, b"version\r\n"),
            lambda s: "SERVER_ERROR" in s and "VERSION" in s,
            on_unfixed=False,
            expected="SERVER_ERROR malformed request, proxy alive",
        ),
        # CVE-2023-46853: a request ending in a bare \n loses the last byte of its last key.
        "memcached_proxy_bare_newline": Probe(
            lambda c: _mc_raw(c, b"get foo foox\n"),
            lambda s: "VALUE foox" in s,
            expected="VALUE foo, VALUE foox",
        ),
    }
)


def run_memcached(fix: Fix, tree: Path, out: Path, port: int, diff: Path) -> dict[str, Any]:
    binary = tree / RECIPES["memcached"].binary
    res: dict[str, Any] = {"build": build_patch(fix, tree, diff, binary, out)}
    if res["build"]["result"] != "built":
        return res
    backend = None
    env: dict[str, str] = {}
    argv = [str(binary), "-u", "root", "-l", "127.0.0.1", "-p", str(port), "-U", "0"]
    if fix.probe == "memcached_sasl_dup_user":
        sasl = CACHE / "memcached" / "sasl"
        sasl.mkdir(parents=True, exist_ok=True)
        (sasl / "memcached.conf").write_text("mech_list: plain\n")
        host = socket.gethostname()
        pwdb = f"alice@{host}:first\nbob@{host}:secret\nalice@{host}:second\n"
        (sasl / "pwdb").write_text(pwdb)
        env = {"SASL_CONF_PATH": str(sasl), "MEMCACHED_SASL_PWDB": str(sasl / "pwdb")}
        argv.append("-S")
        load = [str(HERE / "load" / "mc_client.py"), "sasl", "--port", str(port)]
    else:
        backend = Daemon(
            [str(binary), "-u", "root", "-l", "127.0.0.1", "-p", str(MC_BACKEND), "-U", "0"],
            "memcached-backend",
        ).start()
        wait_port(MC_BACKEND, backend.proc)  # type: ignore[arg-type]
        from mc_client import raw

        raw(MC_BACKEND, b"set foo 0 0 1\r\nX\r\n", b"set foox 0 0 1\r\nZ\r\n")
        argv += ["-o", f"proxy_config={HERE / 'conf' / 'mc-proxy.lua'}"]
        load = [str(HERE / "load" / "mc_client.py"), "load", "--port", str(port)]
    d = Daemon(argv, f"memcached-{out.stem}", env=env).start()
    ctx = Ctx(fix, tree, port, d)
    try:
        wait_port(port, d.proc)  # type: ignore[arg-type]
        wait_agent(d.pid)
        probe = PROBES.get(fix.probe) if fix.probe else None
        res["apply"] = apply_remove(ctx, out, [sys.executable, *load], probe)
    finally:
        d.stop()
        if backend is not None:
            backend.stop()
    return res


# --- driver ---------------------------------------------------------------------------------


def patch_path(fix: Fix) -> Path:
    return CACHE / PACKAGES_BY_FIX[id(fix)] / "pristine" / "debian" / "patches" / fix.patch


PACKAGES_BY_FIX = {id(f): p.name for p in PACKAGES.values() for f in p.fixes}


def run_package(pkg: Package, fixes: list[Fix], results: Path) -> list[dict[str, Any]]:
    """Returns the result of every fix of ``fixes`` (all of the package's by default)."""
    if pkg.name == "qemu":
        from qemu_corpus import run_qemu

        return run_qemu(pkg, fixes, results)
    trees = levels(pkg)
    out: list[dict[str, Any]] = []
    base = {"dnsmasq": 5300, "memcached": 11300, "openssh": 2200}[pkg.name]
    for n, fix in enumerate(pkg.fixes):
        if fix not in fixes:
            continue
        k = key(fix)
        tree = trees[k]
        port = base + n + 1
        rows = [(k, patch_path(fix))]
        if fix.note.startswith("adapted") or (HERE / "adapted" / f"{pkg.name}-{k}.diff").exists():
            rows.append((f"{k}-adapted", HERE / "adapted" / f"{pkg.name}-{k}.diff"))
        for name, diff in rows:
            log(f"{pkg.name} {name}: build, apply under load, probe")
            t0 = time.monotonic()
            pbx = results / pkg.name / f"{name}.pbx"
            pbx.parent.mkdir(parents=True, exist_ok=True)
            try:
                if pkg.name == "dnsmasq":
                    r = run_dnsmasq(fix, tree, pbx, port)
                elif pkg.name == "memcached":
                    r = run_memcached(fix, tree, pbx, port, diff)
                else:
                    from openssh_corpus import run_openssh

                    r = run_openssh(fix, tree, pbx, port, diff)
            except Exception as err:  # a broken step is a result too, with its reason
                r = {"error": f"{type(err).__name__}: {err}"[-1500:]}
            row = {
                "program": pkg.name,
                "version": pkg.version,
                "fix": name,
                "ident": fix.ident,
                "patch": diff.name,
                "adapted": name.endswith("-adapted"),
                "shape": fix.shape,
                "what": fix.what,
                "probe": fix.probe,
                "note": fix.note,
                "level": str(tree),
                **r,
                "seconds": round(time.monotonic() - t0, 1),
            }
            row["verdict"] = verdict(fix, row) if "error" not in r else "failed"
            log(f"{pkg.name} {name}: {row['verdict']}")
            out.append(row)
    return out


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Returns the headline numbers: function-only fixes, working live patches, ratio."""
    orig = [r for r in rows if not r.get("adapted")]
    fn = [r for r in orig if r["shape"] == "function"]
    live = [r for r in fn if r["verdict"] == "live"]
    failed = sum(
        (r.get("apply", {}).get(k) or {}).get("failed") or 0
        for r in orig
        for k in ("load_apply", "load_remove")
    )
    requests = sum(
        (r.get("apply", {}).get(k) or {}).get("requests") or 0
        for r in orig
        for k in ("load_apply", "load_remove")
    )
    probes = [r for r in fn if r.get("probe") and r["verdict"] in ("live", "failed")]
    return {
        "fixes": len(orig),
        "by_shape": {
            s: sum(1 for r in orig if r["shape"] == s) for s in sorted({r["shape"] for r in orig})
        },
        "function_only": len(fn),
        "working_live": len(live),
        "ratio": round(len(live) / len(fn), 3) if fn else None,
        "requests_during_apply_remove": requests,
        "failed_requests": failed,
        "probes_passed": sum(1 for r in probes if r.get("apply", {}).get("probe_passed")),
        "probes": len(probes),
        "data_refused": sum(1 for r in orig if r["shape"] == "data" and r["verdict"] == "refused"),
        "data": sum(1 for r in orig if r["shape"] == "data"),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Returns the markdown table of docs/corpus.md."""
    head = (
        "| program | fix | patch | shape | `patchbox build` | apply under load (failed/requests) "
        "| regression probe | verdict |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        b = r.get("build", {})
        if "error" in r:
            build = f"error: {r['error'][:200]}"
        elif b.get("result") == "built":
            fns = b.get("functions", [])
            shown = ", ".join(f"`{f}`" for f in fns[:4]) + (
                f" +{len(fns) - 4}" if len(fns) > 4 else ""
            )
            build = f"{len(fns)} fn: {shown}"
        else:
            msg = _first(b.get("message", "")).removeprefix("refused: ")
            build = f"{b.get('result')}: `{_md(msg)[:400]}`"
        a = r.get("apply", {})
        if a.get("apply") == "applied":
            la, lr = a.get("load_apply") or {}, a.get("load_remove") or {}
            applied = f"applied {la.get('failed')}/{la.get('requests')}"
            if a.get("remove") == "removed":
                applied += f"; removed {lr.get('failed')}/{lr.get('requests')}"
        elif a:
            applied = f"refused: `{_md(a.get('apply_message', ''))[:300]}`"
        else:
            applied = "—"
        if a.get("probe_after") is not None:
            probe = ("passed" if a.get("probe_passed") else "FAILED") + (
                f": before `{_md(a['probe_before'])[:80]}`" if "probe_before" in a else ""
            )
            probe += f"; live `{_md(a['probe_after'])[:100]}`"
            if "probe_removed" in a:
                probe += f"; removed `{_md(a['probe_removed'])[:80]}`"
        else:
            probe = "none" if not r.get("probe") else "not run"
        lines.append(
            f"| {r['program']} | {r['ident']}{' (adapted)' if r.get('adapted') else ''} "
            f"| {r['patch']} | {r['shape']} | {build} | {applied} | {probe} | **{r['verdict']}** |"
        )
    return head + "\n".join(lines) + "\n"


def _first(msg: str) -> str:
    """Returns the first refusal of a message listing one per object (a struct of a header
    is refused in every object that includes it), with how many more there are."""
    if not msg.startswith("refused: "):
        return msg
    parts = msg.removeprefix("refused: ").split("; other data changes:")[0].split("; ")
    heads = [p for p in parts if re.match(r"^[\w./+-]+\.o: ", p)]
    if len(heads) <= 1:
        return msg
    first = parts[: parts.index(heads[1])]
    return "refused: " + "; ".join(first) + f" (and {len(heads) - 1} more refusals)"


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ").replace("`", "'")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("programs", nargs="*", help=f"default: all ({', '.join(PACKAGES)})")
    ap.add_argument("--fix", action="append", default=[], help="only this fix (key or CVE id)")
    ap.add_argument("--ci", action="store_true", help="only the CI subset (Fix.ci)")
    ap.add_argument("--list", action="store_true", help="list the corpus and exit")
    ap.add_argument("--table", action="store_true", help="print the table of every result")
    ap.add_argument(
        "--report", action="store_true", help="run nothing: summary and table from the results"
    )
    ap.add_argument("--results", default=str(CACHE / "results"), help="results directory")
    a = ap.parse_intermixed_args(argv)
    progs = a.programs or list(PACKAGES)
    results = Path(a.results)
    if a.list:
        for p in progs:
            for f in PACKAGES[p].fixes:
                print(f"{p:10} {key(f):45} {f.shape:9} {'ci' if f.ci else '  '} {f.what}")
        return 0
    results.mkdir(parents=True, exist_ok=True)
    for p in [] if a.report else progs:
        pkg = PACKAGES[p]
        chosen = [
            f
            for f in pkg.fixes
            if (not a.fix or key(f) in a.fix or any(i in a.fix for i in f.ident.split()))
            and (not a.ci or f.ci)
        ]
        if not chosen:
            continue
        rows = run_package(pkg, chosen, results)
        path = results / f"{p}.json"
        old = json.loads(path.read_text()) if path.exists() else []
        done = {r["fix"] for r in rows}
        merged = [r for r in old if r["fix"] not in done] + rows
        order = {key(f): i for i, f in enumerate(pkg.fixes)}
        merged.sort(key=lambda r: (order.get(r["fix"].removesuffix("-adapted"), 99), r["fix"]))
        path.write_text(json.dumps(merged, indent=1) + "\n")
        for r in rows:
            print(json.dumps({k: r.get(k) for k in ("program", "fix", "verdict")}), flush=True)
    every = []
    for p in PACKAGES:
        path = results / f"{p}.json"
        if path.exists():
            rows = json.loads(path.read_text())
            for r in rows:  # the rule may have changed since a row was written
                if "error" not in r and r["verdict"] != "not-tried":
                    r["verdict"] = verdict(r["shape"], r)
            path.write_text(json.dumps(rows, indent=1) + "\n")
            every += rows
    summary = summarize(every)
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (results / "table.md").write_text(table(every))
    if a.table:
        print(table(every))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    # One instance of this module: the program modules (openssh_corpus, qemu_corpus) import
    # it by name, and would otherwise see a second copy of its tables.
    import corpus

    sys.exit(corpus.main())
