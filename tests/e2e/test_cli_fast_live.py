"""`patchbox info` without click (cli/fast.py) against a real process with the agent: the
same bytes and exit status as the click command, and none of click's imports."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from live import Target

from helpers import compile_c, modules_imported, render, run_cli_way

pytestmark = pytest.mark.process

# Shown by INFO as app_version: colour codes (click.echo drops them when stdout is no
# terminal) and text beyond ASCII.
ODD_VERSION = "\x1b[1;31mrouge\x1b[0m é"
# What `info` must not import (json: only for --json); tests/cli/test_fast_path.py says why.
NOT_FOR_INFO = {
    "click",
    "elftools",
    "capstone",
    "lief",
    "cryptography",
    "dataclasses",
    "inspect",
    "pathlib",
}


def assert_same(*args: object, env: dict[str, str] | None = None) -> str:
    """Returns the stdout of `patchbox ARGS` after asserting that the fast path alone and
    the console script print the same and end the same as the click command."""
    click = run_cli_way("click", *args, env=env)
    for way in ("fast", "console"):
        proc = run_cli_way(way, *args, env=env)
        assert (proc.returncode, proc.stdout, proc.stderr) == (
            click.returncode,
            click.stdout,
            click.stderr,
        ), way
    return click.stdout


def test_same_output(target: Target) -> None:
    text = assert_same("info", "-p", target.pid)
    assert f"pid               {target.pid}\n" in text
    assert '"build_id": ' in assert_same("info", "-p", target.pid, "--json")
    assert assert_same("--timeout", "5", "info", f"--pid={target.pid}") == text
    assert assert_same("info", "-p", target.pid, env={"PATCHBOX_TIMEOUT": "3"}) == text
    by_socket = assert_same("info", "-s", target.socket)
    assert by_socket.splitlines()[0] == f"pid               {target.pid}"
    assert_same("info", "--json", f"-s{target.socket}")


def test_same_output_of_odd_values(tmp_path: Path) -> None:
    exe = compile_c(render(), tmp_path / "odd", agent=True, app_version=ODD_VERSION)
    target = Target(exe)
    try:
        text = assert_same("info", "-p", target.pid)
        assert "app_version       rouge é\n" in text  # the codes dropped, as click does
        assert "\\u001b[1;31mrouge" in assert_same("info", "-p", target.pid, "--json")
    finally:
        target.stop()


def test_same_when_stdout_is_gone(target: Target) -> None:
    """A reader that went away (`patchbox info | head -0`): exit status 1, nothing on
    stderr, as click's main does."""
    results = []
    for way in ("click", "fast"):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = run_cli_way(way, "info", "-p", target.pid, stdout=write_end)
        finally:
            os.close(write_end)
        results.append((proc.returncode, proc.stderr))
    assert results[0] == results[1] == (1, "")


def test_same_errors(tmp_path: Path) -> None:
    """Unreachable: the client's error line, as the click command prints it (usage errors
    are click's own: tests/cli/test_fast_path.py)."""
    assert_same("info", "-s", tmp_path / "missing")
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert_same("info", "-p", dead.pid)  # gone: no process with that pid


def test_info_imports_no_click(target: Target) -> None:
    for extra in ([], ["--json"]):
        imported = modules_imported("info", "-p", target.pid, *extra)
        assert "patchbox.protocol.replies" in imported
        assert not {m.split(".")[0] for m in imported} & NOT_FOR_INFO, sorted(imported)
        assert ("json" in imported) == bool(extra)
