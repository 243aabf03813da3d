"""dnsmasq in the corpus: its level's build (no configure: the Makefile edited), its daemon
behind a fake upstream (``load/dns_client.py``), its probes."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Any

from .fixes import Fix, Package, key
from .harness import (
    HERE,
    RUN_DIR,
    Ctx,
    Daemon,
    Probe,
    apply_remove,
    build_patch,
    wait_agent,
    wait_port,
)
from .levels import Recipe, run_levels

__all__ = ["PROBES", "RECIPE", "run_fix", "run_fixes"]

BASE_PORT = 5300  # fix n of the package listens on BASE_PORT + n + 1


def _configure(tree: Path, pkg: Package) -> None:
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


RECIPE = Recipe(_configure, "src/dnsmasq")


def run_fixes(pkg: Package, fixes: list[Fix], results: Path) -> list[dict[str, Any]]:
    """Returns one result row per dnsmasq fix of ``fixes``."""
    return run_levels(pkg, fixes, results, RECIPE, base_port=BASE_PORT, run_fix=run_fix)


DNS_UPSTREAM = 5399
TRUST_ANCHOR = ".,20326,8,2,E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D"
_DNSSEC = ["--dnssec", f"--trust-anchor={TRUST_ANCHOR}"]


def _dns_query(ctx: Ctx, name: str, rdtype: str = "A") -> str:
    from .load.dns_client import query  # dnspython: the test extra

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


def run_fix(fix: Fix, tree: Path, out: Path, port: int, diff: Path) -> dict[str, Any]:
    """Returns the result of one dnsmasq fix (build; if built: apply under DNS load, probe,
    remove)."""
    binary = tree / RECIPE.binary
    res: dict[str, Any] = {"build": build_patch(fix, tree, diff, binary, out)}
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
        wait_port(DNS_UPSTREAM, upstream.started, udp=True)
        wait_port(port, d.started, udp=True)
        wait_agent(d.pid)
        load = [sys.executable, client, "load", "--port", str(port)]
        probe = PROBES.get(fix.probe) if fix.probe else None
        res["apply"] = apply_remove(ctx, out, load, probe)
    finally:
        d.stop()
        upstream.stop()
    return res
