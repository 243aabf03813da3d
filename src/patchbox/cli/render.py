"""What the commands print, made without click: the click commands and the fast path
(:mod:`patchbox.cli.fast`) print these same strings."""

from __future__ import annotations

from typing import Any

__all__ = ["error_line", "info_lines", "json_text", "printable"]


def error_line(err: BaseException) -> str:
    """Returns the one stderr line of a PatchboxError: ``patchbox: error: <cause>``, the
    cause's line breaks made spaces."""
    return "patchbox: error: " + " ".join(str(err).split("\n"))


def info_lines(facts: dict[str, str]) -> list[str]:
    """Returns the lines of `patchbox info`: each key, padded to the longest, then two
    spaces and its value, in the agent's order."""
    width = max((len(key) for key in facts), default=0)
    return [f"{key:<{width}}  {value}" for key, value in facts.items()]


def json_text(value: Any) -> str:
    """Returns ``value`` as the indented JSON that ``--json`` prints."""
    import json  # only for --json: a plain `patchbox info` does not pay for it

    return json.dumps(value, indent=2, sort_keys=False)


def printable(text: str) -> str:
    """Returns ``text`` with every character that is not printable (control characters,
    escape sequences' ESC, line breaks) written as a Python escape: a name read from a
    process's memory (a VM name) is shown, it does not drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
