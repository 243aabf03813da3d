"""The OpenSSH part of the corpus: sshd at each level, patches applied through the store.

sshd re-executes itself for every connection (``sshd -R``), so a connection is served by a
fresh copy of the binary: ``patchbox install --apply`` puts the patch into a store
(``PATCHBOX_STORE``) that every new process of that build applies before ``main``, and
applies it to the running listener at once. Removal: ``uninstall`` + ``remove --all``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .fixes import Fix, Package
from .harness import (
    CACHE,
    HERE,
    RUN_DIR,
    Ctx,
    Daemon,
    Probe,
    apply_remove,
    build_patch,
    run,
    wait_agent,
    wait_port,
)
from .levels import Recipe, autotools, run_levels
from .load.ssh_client import ssh_argv

__all__ = ["PROBES", "RECIPE", "run_fix", "run_fixes"]

BASE_PORT = 2200  # fix n of the package listens on BASE_PORT + n + 1

SSH_RUN = CACHE / "openssh" / "run"
STORE = CACHE / "store"


def _options() -> list[str]:
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


def _configure(tree: Path, pkg: Package) -> None:
    """Configures OpenSSH's level tree; the privilege-separation directory is made only
    when a tree is configured, not when the module is imported."""
    autotools(_options())(tree, pkg)


RECIPE = Recipe(_configure, "sshd")


def run_fixes(pkg: Package, fixes: list[Fix], results: Path) -> list[dict[str, Any]]:
    """Returns one result row per OpenSSH fix of ``fixes``."""
    return run_levels(pkg, fixes, results, RECIPE, base_port=BASE_PORT, run_fix=run_fix)


def _keys() -> None:
    """Host key, the load's client key, and for CVE-2026-35414 a certificate (key
    ``probe``, not authorized itself) whose one principal is ``x,alice``, from a CA that
    authorized_keys trusts for the principals ``alice,carol``."""
    from .load.ssh_cert import ca_key, ca_public_line, user_cert

    SSH_RUN.mkdir(parents=True, exist_ok=True)
    for name in ("hostkey", "client", "probe"):
        if not (SSH_RUN / name).exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(SSH_RUN / name)])
        (SSH_RUN / name).chmod(0o600)
    ca = ca_key(SSH_RUN / "ca.seed")
    cert = user_cert((SSH_RUN / "probe.pub").read_text(), ca, ["x,alice"])
    (SSH_RUN / "probe-cert.pub").write_text(cert + "\n")
    (SSH_RUN / "authorized_keys").write_text(
        (SSH_RUN / "client.pub").read_text()
        + f'cert-authority,principals="alice,carol" {ca_public_line(ca)}\n'
    )


def _grace_alarm(ctx: Ctx) -> str:
    """Opens a connection that never authenticates and waits past LoginGraceTime (2 s):
    the connection process's SIGALRM handler calls sshsigdie. Returns whether it logged
    (the unfixed handler calls syslog functions, which are not async-signal-safe)."""
    import socket

    assert ctx.daemon is not None
    before = ctx.daemon.log_path.read_text(errors="replace").count("Timeout before auth")
    with socket.create_connection(("127.0.0.1", ctx.port), timeout=5) as s:
        s.recv(256)  # the server's banner; then silence
        time.sleep(3.5)
    time.sleep(0.5)
    after = ctx.daemon.log_path.read_text(errors="replace").count("Timeout before auth")
    return "logged 'Timeout before authentication'" if after > before else "exited silently"


def _agent_forwarding(ctx: Ctx) -> str:
    """``ssh -A`` with an agent: with DisableForwarding the session must get no
    SSH_AUTH_SOCK. Returns what the session printed."""
    sock = ctx.extra["agent_sock"]
    argv = ssh_argv(ctx.port, str(SSH_RUN / "client"), 'echo "[$SSH_AUTH_SOCK]"', agent=True)
    r = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "SSH_AUTH_SOCK": sock},
        check=False,
    )
    return (r.stdout.strip() or f"rc {r.returncode}: {r.stderr.strip()[:100]}")[:120]


def _comma_principal(ctx: Ctx) -> str:
    """Logs in with a certificate whose one principal, ``x,alice``, contains a comma, where
    authorized_keys accepts the CA for ``alice,carol``: the unfixed match splits the
    principal at the comma and finds ``alice``. Returns accepted or rejected."""
    argv = ssh_argv(ctx.port, str(SSH_RUN / "probe"), "echo ok")
    extra = ["-o", f"CertificateFile={SSH_RUN / 'probe-cert.pub'}", "-o", "IdentitiesOnly=yes"]
    argv[1:1] = extra
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL, check=False
    )
    if r.returncode == 0 and r.stdout.strip() == "ok":
        return "certificate for 'x,alice' accepted"
    return f"rejected ({r.stderr.strip()[-60:]})"


PROBES: dict[str, Probe] = {
    # CVE-2026-35414: a principal with a comma must not match a principals="" list.
    "sshd_comma_principal": Probe(
        _comma_principal, lambda s: s.startswith("rejected"), expected="certificate rejected"
    ),
    # CVE-2024-6387 (regreSSHion): with the fix, sshsigdie exits without logging.
    "sshd_grace_alarm": Probe(
        _grace_alarm, lambda s: s == "exited silently", expected="no log from SIGALRM"
    ),
    # CVE-2025-32728: DisableForwarding must also disable agent forwarding.
    "sshd_disable_forwarding": Probe(
        _agent_forwarding, lambda s: s == "[]", expected="no SSH_AUTH_SOCK in the session"
    ),
}

_EXTRA_CONFIG = {
    "sshd_grace_alarm": "LoginGraceTime 2\n",
    "sshd_disable_forwarding": "DisableForwarding yes\n",
}


def run_fix(fix: Fix, tree: Path, out: Path, port: int, diff: Path) -> dict[str, Any]:
    """Returns the result of one OpenSSH fix against sshd (build; if built: apply through the
    store under ssh load, probe, remove)."""
    binary = tree / RECIPE.binary
    res: dict[str, Any] = {"build": build_patch(fix, tree, diff, binary, out)}
    if res["build"]["result"] != "built":
        return res
    _keys()
    STORE.mkdir(mode=0o755, exist_ok=True)
    os.environ["PATCHBOX_STORE"] = str(STORE)  # patchbox install/uninstall and the agents
    conf = SSH_RUN / f"sshd_config-{port}"
    text = (HERE / "conf" / "sshd_config.in").read_text()
    text = text.replace("@PORT@", str(port)).replace("@RUN@", str(SSH_RUN))
    conf.write_text(text + _EXTRA_CONFIG.get(fix.probe or "", ""))
    d = Daemon([str(binary), "-D", "-e", "-f", str(conf)], f"sshd-{out.stem}").start()
    ctx = Ctx(fix, tree, port, d)
    agent = None
    try:
        wait_port(port, d.started)
        wait_agent(d.pid)
        if fix.probe == "sshd_disable_forwarding":
            sock = str(RUN_DIR / f"ssh-agent-{port}.sock")
            Path(sock).unlink(missing_ok=True)
            agent = subprocess.Popen(
                ["ssh-agent", "-D", "-a", sock],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(50):
                if Path(sock).exists():
                    break
                time.sleep(0.1)
            ctx.extra["agent_sock"] = sock
        load = [
            sys.executable,
            str(HERE / "load" / "ssh_client.py"),
            "--port",
            str(port),
            "--key",
            str(SSH_RUN / "client"),
        ]
        probe = PROBES.get(fix.probe) if fix.probe else None
        res["apply"] = apply_remove(ctx, out, load, probe, store=True)
        m = re.search(r"(\d+) process", res["apply"].get("apply_message", ""))
        if m:
            res["apply"]["processes"] = int(m[1])
    finally:
        d.stop()
        if agent is not None:
            agent.terminate()
            agent.wait(5)
        run(["patchbox", "uninstall", out.stem], check=False)
    return res
