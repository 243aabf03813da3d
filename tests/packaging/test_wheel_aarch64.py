"""An aarch64 memcached patched live under load through the installed package (issue 22;
docs/aarch64.md, "memcached under load"): with only the wheel's virtualenv and the
system on PATH, scripts/aarch64/memcached.sh (copied out of the checkout) cross-builds
Debian's memcached with `patchbox config --arch aarch64`; the installed `patchbox build`
makes an aarch64 patch of the corpus's CVE-2023-46852 fix; the program runs under
qemu-aarch64 as a proxy in front of a second one, several connections of the corpus's
memcached client send requests while the installed `patchbox apply` and `remove` run,
and the CVE's behaviour, seen over the socket, goes unfixed -> fixed -> unfixed."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from wheelenv import Installed

from helpers import CROSS_CC, ROOT

QEMU = "qemu-aarch64"
LOADER = Path("/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1")
FIX = "0009-CVE-2023-46852.patch"
NAME = "cve-2023-46852"
CONNECTIONS = 4  # load clients, one connection each
LOAD_SECONDS = 10.0
ACTION_AT = 3.0  # seconds into the load when apply (or remove) is sent
# CVE-2023-46852: the proxy splits a multiget into one request per key and copies what
# precedes the first key into a stack buffer. Unfixed, a prefix of 25 spaces is copied
# (it fits: nothing overflows) and both keys are answered; fixed, a prefix longer than 20
# bytes is refused per key ("SERVER_ERROR malformed request"). The corpus's probe (100
# spaces) overflows the buffer and kills an unfixed proxy; this one can be seen unfixed.
PROBE = b"get" + b" " * 25 + b"foo foox\r\n"
UNFIXED = b"VALUE foo 0 1\r\nX\r\nVALUE foox 0 1\r\nZ\r\nEND\r\n"
FIXED = b"SERVER_ERROR malformed request\r\nSERVER_ERROR malformed request\r\nEND\r\n"

pytestmark = [pytest.mark.wheel, pytest.mark.aarch64, pytest.mark.timeout(1800)]


def _missing() -> str | None:
    gone = [t for t in (CROSS_CC, "aarch64-linux-gnu-ld", QEMU) if shutil.which(t) is None]
    if not LOADER.exists():
        gone.append(f"{LOADER} (libc6-dev-arm64-cross)")
    return ", ".join(gone) or None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ask(port: int, *requests: bytes, quiet: float = 1.0) -> list[bytes]:
    """Returns what came back for each request on one connection (a reply ends after
    ``quiet`` seconds without data)."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for req in requests:
            s.sendall(req)
            got = b""
            s.settimeout(quiet)
            try:
                while chunk := s.recv(65536):
                    got += chunk
            except TimeoutError:
                pass
            out.append(got)
    return out


@dataclass
class Daemon:
    """A memcached under qemu-aarch64 (its pid: qemu's, which is the emulated process's)."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @classmethod
    def start(cls, exe: Path, port: int, log: Path, *extra: str) -> Daemon:
        argv = [QEMU, str(exe), "-u", "root", "-l", "127.0.0.1", "-p", str(port), "-U", "0"]
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [*argv, *extra], stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT
            )
        d = cls(proc, port, log)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"memcached exited {proc.returncode}: {log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                return d
            except OSError:
                assert time.monotonic() < deadline, f"nothing listens on {port}"
                time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Load:
    """CONNECTIONS processes of the corpus's memcached client (set + get pairs, one
    connection each), by the virtualenv's Python (pymemcache: the test extra)."""

    def __init__(self, installed: Installed, port: int) -> None:
        client = ROOT / "scripts" / "corpus" / "load" / "mc_client.py"
        argv = [installed.bin("python"), str(client), "load", "--port", str(port)]
        self.procs = [
            subprocess.Popen(
                [*argv, "--seconds", str(LOAD_SECONDS)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(CONNECTIONS)
        ]

    def running(self) -> int:
        return sum(p.poll() is None for p in self.procs)

    def results(self) -> list[dict[str, Any]]:
        out = []
        for p in self.procs:
            stdout, stderr = p.communicate(timeout=LOAD_SECONDS + 120)
            assert p.returncode == 0, stderr[-2000:]
            out.append(dict(json.loads(stdout.strip().splitlines()[-1])))
        return out


def _under_load(
    installed: Installed, port: int, *cmd: str
) -> tuple[subprocess.CompletedProcess[str], float, list[dict[str, Any]]]:
    """Returns (the command's result, its seconds, each connection's counts): the command
    runs ACTION_AT seconds into the load, every load client still sending when it ends."""
    load = Load(installed, port)
    time.sleep(ACTION_AT)
    assert load.running() == CONNECTIONS, "a load client ended before the action"
    t0 = time.monotonic()
    done = installed.run(*cmd, timeout=300)
    secs = time.monotonic() - t0
    assert load.running() == CONNECTIONS, "the load ended before the action did"
    return done, secs, load.results()


def _cross_build(installed: Installed, tmp_path: Path) -> Path:
    """Returns memcached for aarch64, built by the recipe copied out of the checkout with
    only the virtualenv's bin and the system's on PATH: the installed patchbox's cflags
    and its cross-built agent objects."""
    script = tmp_path / "memcached.sh"
    shutil.copy(ROOT / "scripts" / "aarch64" / "memcached.sh", script)
    env = {
        "PATH": f"{installed.venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PATCHBOX_CACHE": str(tmp_path / "patchbox-cache"),
    }
    if "PATCHBOX_AARCH64_CACHE" in os.environ:
        env["PATCHBOX_AARCH64_CACHE"] = os.environ["PATCHBOX_AARCH64_CACHE"]
    built = subprocess.run(
        ["/bin/bash", str(script), str(tmp_path / "src")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=1500,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    exe = Path(built.stdout.strip().splitlines()[-1])
    assert exe.read_bytes()[18:20] == b"\xb7\x00"  # EM_AARCH64
    link = (tmp_path / "src" / "memcached-build.log").read_text()
    a64_objs = [w for w in link.split() if w.endswith("/aarch64/lib/libsandbox.o")]
    assert a64_objs, "the agent objects are not on the link line"
    assert all(w.startswith(str(installed.venv / "lib")) for w in a64_objs), a64_objs
    assert str(ROOT) not in link, "the build must not reach into the checkout"
    return exe


def _build_patch(installed: Installed, exe: Path, pbx: Path) -> None:
    """Writes the fix as an aarch64 patch, by the installed `patchbox build`."""
    tree = exe.parent
    diff = tree / "debian" / "patches" / FIX
    made = installed.run(
        *(installed.bin("patchbox"), "build", "--source", str(tree), "--diff", str(diff)),
        *("--binary", str(exe), "--name", NAME, "-o", str(pbx), "-j2"),
        cwd=str(tree),
        timeout=600,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    assert "1 function(s) (proxy_process_command)" in made.stdout, made.stdout
    shown = installed.run(installed.bin("patchbox"), "show", str(pbx))
    assert "BRANCH26" in shown.stdout, shown.stdout  # aarch64 fix-ups


def _proxy_config(path: Path, backend_port: int) -> Path:
    """Returns ``path`` written with a proxy configuration: every command to one backend
    (scripts/corpus/conf/mc-proxy.lua with the backend's port)."""
    conf = (ROOT / "scripts" / "corpus" / "conf" / "mc-proxy.lua").read_text()
    assert "11400" in conf
    path.write_text(conf.replace("11400", str(backend_port)))
    return path


@pytest.mark.skipif(_missing() is not None, reason=f"aarch64 cross toolchain: no {_missing()}")
def test_aarch64_memcached_patched_under_load(installed: Installed, tmp_path: Path) -> None:
    times: dict[str, float] = {}
    t0 = time.monotonic()
    exe = _cross_build(installed, tmp_path)
    times["cross-build"] = time.monotonic() - t0
    pbx = tmp_path / f"{NAME}.pbx"
    t0 = time.monotonic()
    _build_patch(installed, exe, pbx)
    times["patchbox build"] = time.monotonic() - t0

    # A backend memcached and the proxy in front of it, both under qemu-aarch64.
    backend_port, proxy_port = _free_port(), _free_port()
    lua = _proxy_config(tmp_path / "proxy.lua", backend_port)
    backend = Daemon.start(exe, backend_port, tmp_path / "backend.log")
    proxy = None
    try:
        proxy = Daemon.start(exe, proxy_port, tmp_path / "proxy.log", "-o", f"proxy_config={lua}")
        stored = _ask(backend_port, b"set foo 0 0 1\r\nX\r\n", b"set foox 0 0 1\r\nZ\r\n")
        assert stored == [b"STORED\r\n"] * 2, stored
        pid = str(proxy.proc.pid)
        info = installed.run(installed.bin("patchbox"), "info", "-p", pid)
        assert info.returncode == 0, info.stderr
        assert re.search(r"^arch\s+aarch64$", info.stdout, re.M), info.stdout
        # The proxy connects to its backend on first use: its first answers may be
        # "backend failure" while that connection is made (slower under TCG).
        deadline = time.monotonic() + 60
        while (before := _ask(proxy_port, PROBE)[0]) != UNFIXED:
            assert before != FIXED, before
            assert time.monotonic() < deadline, before
            time.sleep(0.5)

        # Apply under load: fixed.
        applied, times["apply"], load_apply = _under_load(
            installed, proxy_port, installed.bin("patchbox"), "apply", "-p", pid, str(pbx)
        )
        assert applied.returncode == 0, applied.stderr
        assert "proxy_process_command" in applied.stdout, applied.stdout
        after = _ask(proxy_port, PROBE, b"version\r\n")
        assert after[0] == FIXED, after
        assert after[1].startswith(b"VERSION 1.6.18"), after

        # Remove under load: unfixed again.
        removed, times["remove"], load_remove = _under_load(
            installed, proxy_port, installed.bin("patchbox"), "remove", "-p", pid, NAME
        )
        assert removed.returncode == 0, removed.stderr
        assert _ask(proxy_port, PROBE) == [UNFIXED]
        assert proxy.alive() and backend.alive()
    finally:
        if proxy is not None:
            proxy.stop()
        backend.stop()

    for phase, counts in (("apply", load_apply), ("remove", load_remove)):
        requests = sum(c["requests"] for c in counts)
        failed = sum(c["failed"] for c in counts)
        print(
            f"{phase}: {CONNECTIONS} connections, {requests} set+get pairs, {failed} failed, "
            f"{sum(c['per_s'] for c in counts):.0f}/s"
        )
        assert failed == 0 and all(c["ok"] == c["requests"] > 0 for c in counts), counts
    print(", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
