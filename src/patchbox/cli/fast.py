"""`patchbox info` without click: the command scripts run in loops, answered with the
protocol client and nothing else imported (docs/decisions.md, "Start-up").

:func:`try_info` takes only the command lines it understands in full,
``patchbox [--timeout SECONDS] info (-p PID | -s SOCKET) [--json]`` with each option at
most once and values click accepts as they are, and prints what the click command
prints, byte for byte, with the same exit status. Anything else returns None and click
answers it, with its own messages for its own errors: help, an unknown, repeated or
malformed option, a value click would refuse or that this module would have to read
differently (a sign, an exponent, a leading ``-``, an empty string), both or neither of
``-p`` and ``-s``, shell completion, a standard stream click would wrap.
tests/cli/test_fast_path.py and tests/e2e/test_cli_fast_live.py run both on the same inputs.
"""

from __future__ import annotations

import codecs
import errno
import io
import os
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, TextIO, cast

from patchbox.cli.render import error_line, info_lines, json_text
from patchbox.errors import PatchboxError

__all__ = ["InfoRequest", "parse_info", "run_info", "try_info"]

# click.echo removes ANSI colour and style codes unless the stream is a terminal
# (click._compat._ansi_re).
ANSI = re.compile(r"\033\[[;?0-9]*[a-zA-Z]")
# The numbers taken here: plain decimals, which int() and float() read as click does (a
# pid of more digits than any pid has is left to click: int() refuses 4,301 digits).
PID_TEXT = re.compile(r"[0-9]{1,18}")
SECONDS_TEXT = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
# Set by a shell asking click for completions (cli/completion.py).
COMPLETE_VAR = "_PATCHBOX_COMPLETE"
# `info`'s options that take a value, by every spelling click accepts before the value.
VALUE_OPTIONS = {"-p": "pid", "--pid": "pid", "-s": "socket", "--socket": "socket"}


class InfoRequest(NamedTuple):
    """One `patchbox info` command line, as the click command would receive it."""

    pid: int | None
    socket_path: str | None
    as_json: bool
    timeout: float | None  # None: the default (protocol.client.DEFAULT_TIMEOUT)


def _is_dir(path: str) -> bool:
    """Returns whether ``path`` is a directory, which click refuses for ``-s`` (click.Path
    with dir_okay=False: os.stat, and anything it cannot stat is accepted)."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _seconds(text: str | None) -> float | None:
    """Returns the --timeout value ``text`` means, None for the default; raises ValueError
    for one this module leaves to click (click.FloatRange(min=0, min_open=True))."""
    if text is None:
        return None
    if not SECONDS_TEXT.fullmatch(text):
        raise ValueError(text)
    seconds = float(text)
    if not 0 < seconds < float("inf"):
        raise ValueError(text)
    return seconds


def parse_info(argv: Sequence[str], environ: Mapping[str, str]) -> InfoRequest | None:
    """Returns the request of the command line ``patchbox ARGV`` if it is an `info` this
    module takes in full (see the module's docstring), else None: click's to answer."""
    if COMPLETE_VAR in environ:
        return None
    try:
        args, timeout_text = _group_options(list(argv))
        values, as_json = _info_options(args)
        pid, socket_path = _target(values)
        if timeout_text is None:
            timeout_text = environ.get("PATCHBOX_TIMEOUT") or None  # click: "" is unset
        timeout = _seconds(timeout_text)
    except ValueError:
        return None
    return InfoRequest(pid, socket_path, as_json, timeout)


class _ForClick(ValueError):
    """A command line, or a part of one, that this module leaves to click."""


def _group_options(args: list[str]) -> tuple[list[str], str | None]:
    """Returns (the arguments after ``info``, the text of --timeout or None) of a command
    line whose group options are --timeout at most once."""
    timeout_text: str | None = None
    while args and args[0] != "info":  # the group's options: --timeout only
        arg = args.pop(0)
        if timeout_text is not None:
            raise _ForClick(arg)
        if arg == "--timeout" and args:
            timeout_text = args.pop(0)
        elif arg.startswith("--timeout="):
            timeout_text = arg.removeprefix("--timeout=")
        else:
            raise _ForClick(arg)
    if not args:
        raise _ForClick("no info command")
    return args[1:], timeout_text


def _info_options(args: list[str]) -> tuple[dict[str, str], bool]:
    """Returns ({"pid" or "socket": its text}, --json given) of `info`'s arguments, each
    option at most once, every value non-empty and without a leading ``-``."""
    values: dict[str, str] = {}
    as_json = False
    while args:
        arg = args.pop(0)
        if arg == "--json" and not as_json:
            as_json = True
            continue
        key, value = _option_value(arg, args)
        if key in values or not value or value.startswith("-"):
            raise _ForClick(arg)
        values[key] = value
    return values, as_json


def _option_value(arg: str, rest: list[str]) -> tuple[str, str]:
    """Returns (name, value) of the option ``arg``, taking its value from ``rest`` when it
    is not attached (``-p123``, ``--pid=123``)."""
    if arg in VALUE_OPTIONS and rest:
        return VALUE_OPTIONS[arg], rest.pop(0)
    if arg[:2] in ("-p", "-s") and arg[2:]:  # -p123: a short option's value
        return VALUE_OPTIONS[arg[:2]], arg[2:]
    if arg.startswith(("--pid=", "--socket=")):
        name, _, value = arg.partition("=")
        return VALUE_OPTIONS[name], value
    raise _ForClick(arg)


def _target(values: dict[str, str]) -> tuple[int | None, str | None]:
    """Returns (pid, socket path) of exactly one of -p (a plain positive decimal) and -s
    (not a directory)."""
    pid_text, socket_path = values.get("pid"), values.get("socket")
    if (pid_text is None) == (socket_path is None):
        raise _ForClick("both or neither of -p and -s")
    if pid_text is not None and (not PID_TEXT.fullmatch(pid_text) or int(pid_text) < 1):
        raise _ForClick(pid_text)
    if socket_path is not None and _is_dir(socket_path):
        raise _ForClick(socket_path)
    return (int(pid_text) if pid_text is not None else None), socket_path


def _plain_stream(stream: object) -> bool:
    """Returns whether click.echo writes to ``stream`` as it is: a text file of an encoding
    other than ASCII (click rewraps an ASCII one: UTF-8, errors replaced)."""
    return isinstance(stream, io.TextIOWrapper) and codecs.lookup(stream.encoding).name != "ascii"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except Exception:  # click.utils.isatty's rule: any failure means no terminal
        return False


def _echo(text: str, stream: TextIO) -> None:
    """Writes ``text`` and a newline as click.echo does: ANSI codes removed unless the
    stream is a terminal, then flushed."""
    out = text + "\n"
    if not _isatty(stream):
        out = ANSI.sub("", out)
    stream.write(out)
    stream.flush()


class _QuietFlush:
    """A stream whose flush ignores EPIPE (click's PacifyFlushWrapper): once the reader of
    stdout has gone, Python's own flush at exit stays quiet."""

    def __init__(self, wrapped: TextIO) -> None:
        self.wrapped = wrapped

    def flush(self) -> None:
        try:
            self.wrapped.flush()
        except OSError as err:
            if err.errno != errno.EPIPE:
                raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def run_info(request: InfoRequest) -> int:
    """Returns the exit status of `patchbox info` for ``request``, after printing what the
    click command prints: the facts (or their JSON) on stdout, or one error line on stderr.
    The same endings as click's main: Ctrl-C "Aborted!" and 1, a closed stdout 1."""
    from patchbox.protocol.client import DEFAULT_TIMEOUT, Client

    timeout = request.timeout or DEFAULT_TIMEOUT
    try:
        try:
            if request.pid is not None:
                client = Client(pid=request.pid, timeout=timeout)
            else:
                client = Client(request.socket_path, timeout=timeout)
            with client:
                facts = client.info()
        except PatchboxError as err:
            _echo(error_line(err), sys.stderr)
            return 1
        for line in [json_text(facts)] if request.as_json else info_lines(facts):
            _echo(line, sys.stdout)
    except (EOFError, KeyboardInterrupt):
        _echo("", sys.stderr)
        _echo("Aborted!", sys.stderr)
        return 1
    except OSError as err:
        if err.errno != errno.EPIPE:
            raise
        sys.stdout = cast(TextIO, _QuietFlush(sys.stdout))
        sys.stderr = cast(TextIO, _QuietFlush(sys.stderr))
        return 1
    return 0


def try_info(argv: Sequence[str]) -> int | None:
    """Returns the exit status of the command line ``patchbox ARGV`` after answering it, or
    None without doing anything when click is to answer it (see the module's docstring)."""
    request = parse_info(argv, os.environ)
    if request is None or not (_plain_stream(sys.stdout) and _plain_stream(sys.stderr)):
        return None
    return run_info(request)
