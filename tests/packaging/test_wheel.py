"""The product as a user meets it (tier `wheel`): the sdist and the wheel built the
standard way, the wheel installed into a fresh virtualenv outside the checkout, its
commands used there, and the real-process tier run through the installed package."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from wheelenv import Installed

from helpers import CROSS_CC, ROOT

pytestmark = [pytest.mark.wheel, pytest.mark.timeout(1800)]


def test_sdist_builds_the_same_wheel(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as a, zipfile.ZipFile(installed.direct_wheel) as b:
        names = sorted(n for n in a.namelist() if not n.endswith("RECORD"))
        assert names == sorted(n for n in b.namelist() if not n.endswith("RECORD"))
        for name in (
            "patchbox/_agent/lib/pkgconfig/patchbox.pc",
            "patchbox/_agent/include/patchbox/sandbox.h",
        ):
            assert a.read(name) == b.read(name)
    assert installed.wheel.name.endswith("-py3-none-linux_x86_64.whl")


def test_installed_package_carries_the_agent(installed: Installed) -> None:
    where = installed.run(
        installed.bin("python"),
        "-c",
        "import patchbox, patchbox.config as c; print(patchbox.__file__); print(c.agent_dir())",
        cwd="/",
    )
    assert where.returncode == 0, where.stderr
    module, agent = where.stdout.split()
    assert module.startswith(str(installed.venv)) and agent.startswith(str(installed.venv))
    for name in ("libsandbox.o", "sandbox-listen.o", "libsandbox.a", "libsandbox.so"):
        assert (Path(agent) / name).is_file()
    libs = installed.run(installed.bin("patchbox"), "config", "--cflags", "--libs", cwd="/")
    assert libs.returncode == 0, libs.stderr
    assert str(ROOT) not in libs.stdout, "an installed patchbox must not point into a checkout"
    assert str(installed.venv) in libs.stdout
    # Built where the aarch64 cross compiler is: the cross-built agent too (docs/aarch64.md).
    if shutil.which(CROSS_CC):
        a64 = installed.run(
            installed.bin("patchbox"), "config", "--arch", "aarch64", "--libs", cwd="/"
        )
        assert a64.returncode == 0, a64.stderr
        objs = [Path(w) for w in a64.stdout.split() if w.endswith(".o")]
        assert objs[0] == Path(agent).parent / "aarch64" / "lib" / "libsandbox.o", objs
        assert all(o.read_bytes()[18:20] == b"\xb7\x00" for o in objs)  # EM_AARCH64


def test_program_built_with_pkg_config_is_patchable(installed: Installed, tmp_path: Path) -> None:
    pcdir = installed.run(installed.bin("patchbox"), "config", "--pkgconfigdir").stdout.strip()
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "patchbox"],
        check=True,
        env={**os.environ, "PKG_CONFIG_PATH": pcdir},
        capture_output=True,
        text=True,
    ).stdout
    src = tmp_path / "hello.c"
    src.write_text(
        "#include <stdio.h>\n#include <unistd.h>\n#include <patchbox/sandbox.h>\n"
        'int main(void) { puts("up"); fflush(stdout); pause(); return 0; }\n'
    )
    exe = tmp_path / "hello"
    subprocess.run(
        ["gcc", "-O2", "-fPIE", "-pie", str(src), "-o", str(exe), *shlex.split(flags)], check=True
    )
    proc = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        for _ in range(100):
            if (tmp_path / f"sandbox-sock{proc.pid}").exists():
                break
            time.sleep(0.05)
        test = installed.run(installed.bin("patchbox"), "test", "-p", str(proc.pid))
        assert test.returncode == 0 and "self-test passed" in test.stdout, test.stderr
    finally:
        proc.kill()
        proc.wait()


def run_recipe(
    installed: Installed, tmp_path: Path, *args: str, timeout: float, **env: str
) -> subprocess.CompletedProcess[str]:
    """Runs scripts/qemu/build-qemu.sh copied out of the checkout (no .venv beside it) with
    only the virtualenv's bin and the system's on PATH (``env`` adds or overrides)."""
    script = tmp_path / "build-qemu.sh"
    shutil.copy(ROOT / "scripts" / "qemu" / "build-qemu.sh", script)
    base = {
        "PATH": f"{installed.venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PATCHBOX_CACHE": str(tmp_path / "patchbox-cache"),
    }
    return subprocess.run(
        ["/bin/bash", str(script), *args],
        env={**base, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )


def test_qemu_recipe_takes_the_installed_patchbox(installed: Installed, tmp_path: Path) -> None:
    """scripts/qemu/build-qemu.sh copied out of the checkout (no .venv beside it) and run
    with only the virtualenv's bin and the system's on PATH resolves its flags and agent
    through the installed `patchbox config` (--print-flags: nothing is fetched or built);
    with no patchbox at all it says how to get one."""
    env = {"PATCHBOX_QEMU_CACHE": str(tmp_path / "qemu-cache")}

    def recipe(path: str) -> subprocess.CompletedProcess[str]:
        return run_recipe(installed, tmp_path, "--print-flags", timeout=120, **env, PATH=path)

    proc = recipe(f"{installed.venv / 'bin'}:/usr/bin:/bin")
    assert proc.returncode == 0, proc.stderr
    said = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    assert said["patchbox"] == installed.bin("patchbox")
    agent = installed.run(
        installed.bin("python"), "-c", "import patchbox.config as c; print(c.agent_dir())"
    ).stdout.strip()
    assert said["agent"] == agent and agent.startswith(str(installed.venv))
    cflags = installed.run(installed.bin("patchbox"), "config", "--cflags").stdout.split()
    assert said["cflags"].split() == [f for f in cflags if not f.startswith("-I")]
    for obj in ("libsandbox.o", "sandbox-listen.o"):
        assert f"{agent}/{obj}" in said["ldflags"].split()
    assert f"--extra-cflags='{said['cflags']}'" in said["configure"]
    assert f"--extra-ldflags='{said['ldflags']}'" in said["configure"]
    assert str(ROOT) not in proc.stdout, "the recipe must not reach into the checkout"
    assert not (tmp_path / "qemu-cache").exists(), "--print-flags fetched or built something"
    missing = recipe("/usr/bin:/bin")
    assert missing.returncode == 1 and "no patchbox command" in missing.stderr, missing.stderr


@pytest.mark.timeout(3600)
def test_qemu_built_by_the_installed_recipe(installed: Installed, tmp_path: Path) -> None:
    """The QEMU recipe run outside the checkout with only the installed package on PATH
    builds (or, with the machine's QEMU cache warm, relinks or reuses) QEMU linked with the
    wheel's agent objects; that QEMU runs, and the installed `patchbox test` passes its
    self-test. On a fresh machine this is the whole QEMU build from the installed package."""
    built = run_recipe(installed, tmp_path, timeout=3300)
    assert built.returncode == 0, built.stderr[-3000:]
    exe = Path(built.stdout.strip().splitlines()[-1])
    agent = Path(
        installed.run(
            installed.bin("python"), "-c", "import patchbox.config as c; print(c.agent_dir())"
        ).stdout.strip()
    )
    # The cache's link inputs are the wheel's objects (the recipe copies what the
    # installed `patchbox config --libs` names, and relinks when they differ).
    for obj in ("libsandbox.o", "sandbox-listen.o"):
        cached = exe.parent.parent / "agent" / obj
        assert cached.read_bytes() == (agent / obj).read_bytes(), f"{cached} is not the wheel's"
    qmp = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        [str(exe), "-machine", "none", "-nodefaults", "-display", "none"]
        + ["-qmp", f"unix:{qmp},server=on,wait=off"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        test = None
        for _ in range(100):
            test = installed.run(installed.bin("patchbox"), "test", "-p", str(proc.pid))
            if test.returncode == 0 or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert test is not None and test.returncode == 0, test.stderr if test else ""
        assert "self-test passed" in test.stdout
    finally:
        proc.kill()
        proc.wait()


def test_process_tier_through_the_installed_commands(installed: Installed) -> None:
    """The real-process tests, run by the virtualenv's Python: `patchbox`, `extract-patch`
    and the agent objects are the wheel's (tests/helpers.py takes them from the running
    interpreter and from patchbox.config)."""
    proc = installed.run(
        installed.bin("python"),
        "-m",
        "pytest",
        "-q",
        "-x",
        "-m",
        "process",
        "-p",
        "no:cacheprovider",
        "tests",
        cwd=str(ROOT),
        timeout=1500,
    )
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", tail)
    assert passed and int(passed[1]) >= 100, tail
