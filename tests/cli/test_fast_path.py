"""`patchbox info` without click (cli/fast.py): which command lines it takes, and that it
prints what the click command prints, for inputs no agent answers
(tests/e2e/test_cli_fast_live.py runs both against a real process with the agent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import FELL_BACK, modules_imported, run_cli_way
from patchbox.cli.fast import InfoRequest, parse_info

NO_PID = 2**22 + 4321  # above pid_max: no process has it
# What the info path must never import: click and the modules of other commands (ELF,
# disassembly, signing), and what was taken out of its way for start-up (issue 20).
NOT_FOR_INFO = {
    "click",
    "elftools",
    "capstone",
    "lief",
    "cryptography",
    "dataclasses",
    "inspect",
    "pathlib",
    "json",
}


@pytest.mark.parametrize(
    ("argv", "env", "want"),
    [
        (["info", "-p", "42"], {}, InfoRequest(42, None, False, None)),
        (["info", "-p42"], {}, InfoRequest(42, None, False, None)),
        (["info", "--pid", "0042"], {}, InfoRequest(42, None, False, None)),
        (["info", "--pid=42", "--json"], {}, InfoRequest(42, None, True, None)),
        (["info", "--json", "-s", "/x/sock"], {}, InfoRequest(None, "/x/sock", True, None)),
        (["info", "-s/x/sock"], {}, InfoRequest(None, "/x/sock", False, None)),
        (["info", "--socket=/x/a=b"], {}, InfoRequest(None, "/x/a=b", False, None)),
        (["--timeout", "2.5", "info", "-p", "1"], {}, InfoRequest(1, None, False, 2.5)),
        (["--timeout=.5", "info", "-p", "1"], {}, InfoRequest(1, None, False, 0.5)),
        (["info", "-p", "1"], {"PATCHBOX_TIMEOUT": "3"}, InfoRequest(1, None, False, 3.0)),
        (["info", "-p", "1"], {"PATCHBOX_TIMEOUT": ""}, InfoRequest(1, None, False, None)),
        # The command line's --timeout wins, as in click: the variable is not read.
        (
            ["--timeout", "4", "info", "-p", "1"],
            {"PATCHBOX_TIMEOUT": "x"},
            InfoRequest(1, None, False, 4.0),
        ),
    ],
)
def test_taken(argv: list[str], env: dict[str, str], want: InfoRequest) -> None:
    assert parse_info(argv, env) == want


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["info"], {}),  # neither -p nor -s
        (["info", "-p", "1", "-s", "/x"], {}),  # both
        (["info", "-p", "1", "-p", "2"], {}),  # click takes the last: left to it
        (["info", "--json", "--json", "-p", "1"], {}),
        (["info", "-p"], {}),
        (["info", "-p", "0"], {}),
        (["info", "-p", "-5"], {}),
        (["info", "-p", "+5"], {}),  # click reads 5; not read here
        (["info", "-p", " 5"], {}),
        (["info", "-p", "５"], {}),  # a full-width digit: int() reads it, click too
        (["info", "-p", "9" * 19], {}),
        (["info", "-p=5"], {}),
        (["info", "--pid="], {}),
        (["info", "-s", ""], {}),
        (["info", "-s", "-sock"], {}),
        (["info", "-s", "/"], {}),  # a directory: click refuses it
        (["info", "-p", "1", "--json=1"], {}),
        (["info", "-p", "1", "--js"], {}),
        (["info", "-p", "1", "--bogus"], {}),
        (["info", "-p", "1", "extra"], {}),
        (["info", "-p", "1", "--"], {}),
        (["info", "-p", "1", "-h"], {}),
        (["info", "--help"], {}),
        (["-h", "info"], {}),
        (["--version", "info", "-p", "1"], {}),
        (["--timeout", "0", "info", "-p", "1"], {}),
        (["--timeout", "1e3", "info", "-p", "1"], {}),
        (["--timeout", "nan", "info", "-p", "1"], {}),
        (["--timeout", "9" * 400, "info", "-p", "1"], {}),  # inf
        (["--timeout", "1", "--timeout", "2", "info", "-p", "1"], {}),
        (["--timeout", "info", "-p", "1"], {}),
        (["info", "-p", "1"], {"PATCHBOX_TIMEOUT": "soon"}),
        (["info", "-p", "1"], {"_PATCHBOX_COMPLETE": "bash_complete"}),
        (["list", "-p", "1"], {}),
        ([], {}),
    ],
)
def test_left_to_click(argv: list[str], env: dict[str, str]) -> None:
    assert parse_info(argv, env) is None


def assert_same(args: list[str], env: dict[str, str] | None = None, *, fast: bool) -> None:
    """Asserts that `patchbox ARGS` prints the same and ends the same through click, the
    console script and (if ``fast``) the fast path alone, which else leaves it to click."""
    click = run_cli_way("click", *args, env=env)
    ways = {"console": run_cli_way("console", *args, env=env)}
    direct = run_cli_way("fast", *args, env=env)
    if fast:
        ways["fast"] = direct
    else:
        assert direct.returncode == FELL_BACK, direct.stderr
        assert direct.stdout == direct.stderr == ""
    for way, proc in ways.items():
        assert (proc.returncode, proc.stdout, proc.stderr) == (
            click.returncode,
            click.stdout,
            click.stderr,
        ), way


def test_same_errors_without_an_agent(tmp_path: Path) -> None:
    """The errors the fast path prints itself: the client's, one line, exit status 1."""
    regular = tmp_path / "file"
    regular.write_text("")
    for args, env in [
        (["info", "-p", str(NO_PID)], None),
        (["info", "-p", str(os.getpid())], {"PATCHBOX_SOCK_DIR": "/nonexistent"}),
        (["info", "-s", str(tmp_path / "missing")], None),
        (["info", "-s", str(regular), "--json"], None),
        (["--timeout", "0.5", "info", "--socket", f"{tmp_path}/\x1b[31mred\x1b[0m"], None),
    ]:
        assert_same(args, env, fast=True)
        assert run_cli_way("click", *args, env=env).returncode == 1


def test_ansi_codes_removed_from_error_lines(tmp_path: Path) -> None:
    """click.echo drops colour codes when stderr is no terminal; so does the fast path."""
    proc = run_cli_way("fast", "info", "-s", f"{tmp_path}/\x1b[31mred\x1b[0m")
    assert proc.returncode == 1
    assert f"{tmp_path}/red" in proc.stderr and "\x1b" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["info"], None),
        (["info", "-p", "1", "-s", "/x"], None),
        (["info", "-p", "0"], None),
        (["info", "-s", "/"], None),
        (["info", "-p", "1", "--bogus"], None),
        (["--timeout", "0", "info", "-p", "1"], None),
        (["info", "-p", "1"], {"PATCHBOX_TIMEOUT": "soon"}),
        (["info", "-h"], None),
    ],
)
def test_usage_errors_are_clicks(args: list[str], env: dict[str, str] | None) -> None:
    assert_same(args, env, fast=False)


def test_info_imports_no_click() -> None:
    """`import patchbox.cli` and `patchbox info` (an error path here; the e2e test runs the
    whole exchange with an agent) import none of what other commands need."""
    imported = modules_imported("info", "-p", NO_PID)
    assert "patchbox.protocol.client" in imported
    assert not {m.split(".")[0] for m in imported} & NOT_FOR_INFO, sorted(imported)


def test_knows_every_option_of_the_click_command() -> None:
    """The fast path reads `info`'s options and the group's --timeout as click declares
    them: a changed or new one must be taught to cli/fast.py (or left to click there)."""
    import click

    from patchbox.cli.fast import VALUE_OPTIONS
    from patchbox.cli.info import info_command
    from patchbox.cli.main import DEFAULT_TIMEOUT, cli

    def options(command: click.Command) -> dict[str, click.Option]:
        ctx = click.Context(command, info_name="patchbox")
        params = command.get_params(ctx)
        return {
            p.name: p
            for p in params
            if isinstance(p, click.Option) and p.name is not None and p.name != "help"
        }

    info = options(info_command)
    assert {name: p.opts for name, p in info.items()} == {
        "pid": ["-p", "--pid"],
        "socket_path": ["-s", "--socket"],
        "as_json": ["--json"],
    }
    assert set(VALUE_OPTIONS) == {*info["pid"].opts, *info["socket_path"].opts}
    pid, sock = info["pid"].type, info["socket_path"].type
    assert isinstance(pid, click.IntRange) and (pid.min, pid.max, pid.min_open) == (1, None, False)
    assert isinstance(sock, click.Path)
    assert (sock.exists, sock.dir_okay, sock.resolve_path, sock.allow_dash) == (0, 0, 0, 0)
    assert not any(p.envvar or p.multiple or p.default for p in info.values())
    group = options(cli)
    assert set(group) == {"version", "timeout"}
    timeout = group["timeout"]
    assert (timeout.opts, timeout.envvar, timeout.default) == (
        ["--timeout"],
        "PATCHBOX_TIMEOUT",
        DEFAULT_TIMEOUT,
    )
    assert isinstance(timeout.type, click.FloatRange)
    assert (timeout.type.min, timeout.type.max, timeout.type.min_open) == (0, None, True)
