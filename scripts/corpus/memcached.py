"""memcached in the corpus: its level's build (autotools, with the SASL password database and
the proxy), its daemon (with SASL, or as a proxy in front of a plain memcached), its probes
(``load/mc_client.py``)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

from .fixes import Fix, Package
from .harness import (
    CACHE,
    HERE,
    Ctx,
    Daemon,
    Probe,
    apply_remove,
    build_patch,
    wait_agent,
    wait_port,
)
from .levels import Recipe, autotools, run_levels

__all__ = ["PROBES", "RECIPE", "run_fix", "run_fixes"]

BASE_PORT = 11300  # fix n of the package listens on BASE_PORT + n + 1

# Debian's options (--enable-sasl --enable-tls) plus the ones that compile the fixed
# code: the SASL password database and the proxy (neither is in Debian's build).
RECIPE = Recipe(
    autotools(["--enable-sasl", "--enable-sasl-pwdb", "--enable-tls", "--enable-proxy"]),
    "memcached",
)


def run_fixes(pkg: Package, fixes: list[Fix], results: Path) -> list[dict[str, Any]]:
    """Returns one result row per memcached fix of ``fixes``."""
    return run_levels(pkg, fixes, results, RECIPE, base_port=BASE_PORT, run_fix=run_fix)


MC_BACKEND = 11400
LONG_GET = b"get" + b" " * 100 + b"k" * 250 + b" foo\r\n"


def _mc_raw(ctx: Ctx, *reqs: bytes) -> str:
    from .load.mc_client import raw  # pymemcache: the test extra

    try:
        return " | ".join(repr(r) for r in raw(ctx.port, *reqs))
    except OSError as err:
        return f"error: {err}"


def _mc_sasl(ctx: Ctx) -> str:
    from .load.mc_client import sasl_login

    return f"alice/second: status {sasl_login(ctx.port, 'alice', 'second'):#x}"


PROBES: dict[str, Probe] = {
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


def run_fix(fix: Fix, tree: Path, out: Path, port: int, diff: Path) -> dict[str, Any]:
    """Returns the result of one memcached fix (build; if built: apply under load, probe,
    remove): SASL fixes against a memcached with SASL, proxy fixes against a proxy in front
    of a plain memcached."""
    binary = tree / RECIPE.binary
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
        wait_port(MC_BACKEND, backend.started)
        from .load.mc_client import raw

        raw(MC_BACKEND, b"set foo 0 0 1\r\nX\r\n", b"set foox 0 0 1\r\nZ\r\n")
        argv += ["-o", f"proxy_config={HERE / 'conf' / 'mc-proxy.lua'}"]
        load = [str(HERE / "load" / "mc_client.py"), "load", "--port", str(port)]
    d = Daemon(argv, f"memcached-{out.stem}", env=env).start()
    ctx = Ctx(fix, tree, port, d)
    try:
        wait_port(port, d.started)
        wait_agent(d.pid)
        probe = PROBES.get(fix.probe) if fix.probe else None
        res["apply"] = apply_remove(ctx, out, [sys.executable, *load], probe)
    finally:
        d.stop()
        if backend is not None:
            backend.stop()
    return res
