"""Fixtures of the Ansible tier (`-m ansible`): three managed hosts on this machine (network,
PID and mount namespaces, each with its own sshd: fleet.py), the patchbox wheel installed
into a virtualenv that is their ``ansible_python_interpreter``, the collection built and
installed with ansible-galaxy, and real target processes on every host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from controller import Controller
from fleet import Build, Fleet, HostTarget, LibraryBuild

from helpers import BIN, ROOT, compile_c, gnu_build_id, render, run_tool, unique_build_id

HOSTS = 3
TARGETS_PER_HOST = 2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Building the wheel and the sanity virtualenvs counts against the test that pays for it.
    for item in items:
        if "ansible" in item.keywords:
            item.add_marker(pytest.mark.timeout(900))


def _missing() -> str:
    if os.geteuid() != 0:
        return "needs root (network and PID namespaces, sshd)"
    for tool in ("ip", "nsenter", "unshare", "ssh", "ssh-keygen", "/usr/sbin/sshd"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/bootstrap.sh installs openssh-server and iproute2)"
    return ""


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = _missing()
    if why:
        pytest.skip(why)
    return tmp_path_factory.mktemp("ansible")


@pytest.fixture(scope="session")
def host_python(base: Path) -> Path:
    """Returns the Python of a virtualenv with the patchbox wheel installed, built as
    tests/packaging/test_wheel.py builds it: what an operator deploys on the hosts."""
    dist = base / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "-o", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = dist.glob("*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    proc = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv / "bin" / "python"


@pytest.fixture(scope="session")
def collections(base: Path) -> Path:
    """Returns the collections path after `ansible-galaxy collection build ansible/` and
    `ansible-galaxy collection install` of the tarball."""
    out = base / "galaxy"
    out.mkdir()
    env = {**os.environ, "ANSIBLE_HOME": str(base / "ansible-home")}
    build = subprocess.run(
        [str(BIN / "ansible-galaxy"), "collection", "build", str(ROOT / "ansible"), "--output-path"]
        + [str(out)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (tarball,) = out.glob("patchbox-live-*.tar.gz")
    path = base / "collections"
    install = subprocess.run(
        [str(BIN / "ansible-galaxy"), "collection", "install", "-p", str(path), str(tarball)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    assert (path / "ansible_collections" / "patchbox" / "live" / "MANIFEST.json").is_file()
    return path


@pytest.fixture(scope="module")
def fleet(base: Path, host_python: Path, collections: Path) -> Iterator[Controller]:
    """Yields the controller of three running managed hosts; removes them after the test
    module (no host outlives the tier), also when a test failed."""
    f = Fleet(base, HOSTS)
    ctl = Controller(base, f, host_python, collections)
    ctl.make_keys()
    try:
        f.setup(ctl.authorized_keys)
        ctl.configure()
        ping = ctl.adhoc("fleet", "ansible.builtin.ping")
        assert ping.rc == 0, ping.output
        yield ctl
    finally:
        f.teardown()


@pytest.fixture(scope="session")
def program(base: Path) -> Build:
    """Builds the target program (with the agent) and its patch."""
    d = base / "build"
    (d / "fixed").mkdir(parents=True)
    exe = compile_c(render(), d / "target", agent=True)
    obj = compile_c(render(USE_HELPER="scale(x) + 2"), d / "fixed" / "target.o", obj=True)
    pbx = d / "helper.pbx"
    run_tool("extract-patch", "--function", "use_helper", "--name", "helper", "-o", pbx, obj, exe)
    return {"exe": exe, "patch": pbx, "build_id": gnu_build_id(exe)}


@pytest.fixture(scope="module")
def builds(program: Build, fleet: Controller) -> Build:
    """Returns the program's facts after installing it on every host (same path, same
    build-id: one fleet, one package version); ``exe`` is its path on the hosts."""
    return {**program, "exe": fleet.fleet.install_app(program["exe"])}


@pytest.fixture()
def targets(fleet: Controller, builds: Build) -> Iterator[dict[str, list[HostTarget]]]:
    """Yields {host name: its running targets}; every host gets fresh ones and an empty
    store, staging and scratch directory. Fails the test if a target died during it."""
    for h in fleet.fleet.hosts:
        for d in (h.store, h.scratch, h.staging):
            for p in d.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        # Sockets (and logs) of earlier targets: pids start again in a new PID namespace.
        for p in h.app_dir.glob("sandbox-sock*"):
            p.unlink()
    exe = builds["exe"]
    started = {
        h.name: [HostTarget(h, exe).start() for _ in range(TARGETS_PER_HOST)]
        for h in fleet.fleet.hosts
    }
    yield started
    dead = [f"{t.host.name}:{t.pid}" for ts in started.values() for t in ts if not t.alive()]
    for ts in started.values():
        for t in ts:
            t.stop()
    assert not dead, f"targets died during the test: {dead}"


# A library patch: libanswer.so (patchable flags, a random build-id) used by two programs
# with the agent; `lib_answer N` on stdin prints lib_answer(N).
LIB = "__attribute__((noinline)) int lib_answer(int x) { return x * 10 + @ADD@; }\n"
LIB_USER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int lib_answer(int x);
int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    while (fgets(line, sizeof line, stdin))
        printf("%d\n", lib_answer(atoi(line + 11)));
    return 0;
}
"""


@pytest.fixture(scope="module")
def library(base: Path, fleet: Controller) -> LibraryBuild:
    """Returns {lib, users: [two programs], patch, build_id} after building the library,
    two programs of their own that use it (with the agent) and the library's patch, and
    installing them on every host's application directory (the programs find the
    library there by their rpath)."""
    d = base / "libbuild"
    (d / "fix").mkdir(parents=True, exist_ok=True)
    cflags = run_tool("patchbox", "config", "--cflags").stdout.split()
    agent = run_tool("patchbox", "config", "--libs").stdout.split()
    agent = [f for f in agent if not f.startswith("-Wl,--build-id")]

    def gcc(out: Path, src: str, *args: str) -> Path:
        out.with_suffix(".c").write_text(src)
        cmd = ["gcc", "-O2", *cflags, str(out.with_suffix(".c")), "-o", str(out), *args]
        subprocess.run(cmd, check=True, capture_output=True)
        return out

    lib = gcc(d / "libanswer.so", LIB.replace("@ADD@", "1"), "-fPIC", "-shared", unique_build_id())
    use = ["-L", str(d), "-lanswer", f"-Wl,-rpath,{fleet.fleet.app}"]
    users = [gcc(d / n, LIB_USER, *use, *agent, unique_build_id()) for n in ("user1", "user2")]
    obj = gcc(d / "fix" / "libanswer.o", LIB.replace("@ADD@", "2"), "-fPIC", "-c")
    pbx = d / "libfix.pbx"
    run_tool("extract-patch", "--function", "lib_answer", "--name", "libfix", "-o", pbx, obj, lib)
    fleet.fleet.install_app(lib)
    return {
        "users": [fleet.fleet.install_app(u) for u in users],
        "patch": pbx,
        "build_id": gnu_build_id(lib),
    }
