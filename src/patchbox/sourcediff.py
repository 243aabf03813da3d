"""The one unified-diff parser of patchbox (on :mod:`unidiff`).

`patchbox build` needs three facts from a fix's diff: which files it changes (to rebuild
and recompile them), which new-side lines it touches (to say which function a change is
in), and how it shifts the lines below each hunk (``__LINE__`` arguments). Plain and
``diff --git`` diffs are read, git's C-quoted paths (``"a/dir/foo bar.c"``) unquoted.
:func:`file_texts` gives each file's part of a diff as written, hunk by hunk, for tools
that cut one fix out of a larger diff (the QEMU corpus, scripts/corpus).
"""

from __future__ import annotations

import io
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from unidiff.errors import UnidiffParseError
from unidiff.patch import PatchedFile, PatchSet

from patchbox.errors import BuildError

__all__ = [
    "FileChange",
    "FileText",
    "parse_diff",
    "file_texts",
    "diff_files",
    "changed_lines",
    "line_maps",
    "strip_path",
    "unquote",
]

_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    '"': '"',
    "\\": "\\",
}


def unquote(name: str) -> str:
    """Returns a path as git spells it, without git's C-style quotes (``"a/x\\ty"``)."""
    if len(name) <= 1 or not (name.startswith('"') and name.endswith('"')):
        return name
    out = bytearray()
    body = name[1:-1]
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if re.fullmatch(r"[0-7]{3}", body[i + 1 : i + 4]):
                out.append(int(body[i + 1 : i + 4], 8))
                i += 4
                continue
            out += _ESCAPES.get(nxt, nxt).encode()
            i += 2
            continue
        out += ch.encode()
        i += 1
    return out.decode("utf-8", "surrogateescape")


@dataclass
class FileChange:
    """One file of a diff: its names as the diff spells them (``a/``/``b/`` prefixes kept,
    unquoted; None for ``/dev/null``) and the new-side lines it touches."""

    old: str | None
    new: str | None
    touched: set[int] = field(default_factory=set)  # new-side lines added or next to a deletion
    # (old start, old length, new length) of each hunk, for line shifts below it
    hunks: list[tuple[int, int, int]] = field(default_factory=list)
    # old line -> new line for the context lines inside hunks; None for removed lines
    inside: dict[int, int | None] = field(default_factory=dict)
    # the text of the lines the diff removes, and of those it adds
    removed_text: list[str] = field(default_factory=list)
    added_text: list[str] = field(default_factory=list)

    def new_line(self, old: int) -> int | None:
        """Returns the new-side number of old line ``old``, None if the diff changes or
        deletes it."""
        if old in self.inside:
            return self.inside[old]
        shift = 0
        for start, old_len, new_len in self.hunks:
            if old < start:
                break
            shift += new_len - old_len
        return old + shift

    @property
    def name(self) -> str:
        """Returns the file the change applies to: the new name, the old one if deleted."""
        name = self.new if self.new is not None else self.old
        assert name is not None
        return name


def _name(raw: str) -> str | None:
    name = unquote(raw.strip())
    return None if name == "/dev/null" else name


def _patch_set(text: str) -> PatchSet:
    try:
        return PatchSet(text)
    except UnidiffParseError as err:
        raise BuildError(f"the diff cannot be parsed: {err}") from err


def parse_diff(text: str) -> list[FileChange]:
    """Returns the files of unified diff ``text``; raises BuildError if it is not one."""
    return [_change(f) for f in _patch_set(text)]


def _change(f: PatchedFile) -> FileChange:
    """Returns what one file of a parsed diff changes."""
    change = FileChange(_name(f.source_file), _name(f.target_file))
    for hunk in f:
        change.hunks.append((hunk.source_start, hunk.source_length, hunk.target_length))
        nxt = hunk.target_start
        for line in hunk:
            new_no: int | None = line.target_line_no
            if line.source_line_no is not None:
                change.inside[line.source_line_no] = new_no
            if line.is_removed:
                change.removed_text.append(line.value)
            elif line.is_added:
                change.added_text.append(line.value)
            if line.is_removed:
                change.touched.add(nxt)  # the line that now follows the deletion
            elif new_no is not None:
                if line.is_added:
                    change.touched.add(new_no)
                nxt = new_no + 1
    return change


@dataclass(frozen=True)
class FileText:
    """One file's part of a diff, as written: its header lines (``diff --git``, ``index``,
    ``---``/``+++``) and each hunk from its ``@@`` line, byte for byte."""

    change: FileChange
    head: str
    hunks: tuple[str, ...]

    @property
    def text(self) -> str:
        """Returns the whole part: the header and every hunk."""
        return self.head + "".join(self.hunks)

    def select(self, numbers: Iterable[int]) -> str:
        """Returns the header and the hunks numbered ``numbers`` (1-based, in that order)."""
        return self.head + "".join(self.hunks[n - 1] for n in numbers)


def _first_line(f: PatchedFile) -> int:
    """Returns the 0-based line of the diff where file ``f``'s part starts: its ``diff
    --git`` line, else its ``---`` line and the lines before it that name it."""
    info: list[str] = f.patch_info or []
    if info and info[0].startswith("diff --git "):
        return _at(f.diff_line_no) - 1
    return _at(f.diff_line_no) - 2 - len(info)  # diff_line_no is the +++ line


def _at(line_no: int | None) -> int:
    """Returns a 1-based line number of the diff (unidiff records one for every file and
    line it parses)."""
    assert line_no is not None
    return line_no


def file_texts(text: str) -> list[FileText]:
    """Returns each file's part of unified diff ``text`` as written, in order: a file's
    part runs to the next file's (lines before the first file are left out); raises
    BuildError if ``text`` is not a diff."""
    lines = list(io.StringIO(text))  # split as unidiff splits: at "\n" only
    patch = _patch_set(text)
    starts = [_first_line(f) for f in patch] + [len(lines)]
    out = []
    for f, start, end in zip(patch, starts, starts[1:]):
        # A hunk's part starts at its @@ line, the one before its first line.
        bounds = [_at(h[0].diff_line_no) - 2 for h in f if len(h)] + [end]
        out.append(
            FileText(
                _change(f),
                "".join(lines[start : bounds[0]]),
                tuple("".join(lines[a:b]) for a, b in zip(bounds, bounds[1:])),
            )
        )
    return out


def diff_files(text: str) -> list[str]:
    """Returns the files a unified diff changes, as spelled (``b/`` kept; the old name for
    a deleted file), in order, once each."""
    return list(dict.fromkeys(c.name for c in parse_diff(text)))


def changed_lines(text: str) -> dict[str, set[int]]:
    """Returns {file basename: new-side line numbers added, or next to a deletion}."""
    out: dict[str, set[int]] = defaultdict(set)
    for c in parse_diff(text):
        if c.touched:
            out[os.path.basename(c.name)] |= c.touched
    return dict(out)


def line_maps(text: str) -> dict[str, FileChange]:
    """Returns {file basename: its change} for the files a diff changes (to map old line
    numbers to new ones, :meth:`FileChange.new_line`); files of one basename in several
    directories (``a/util.c``, ``b/util.c``) by their names as the diff spells them."""
    changes = [c for c in parse_diff(text) if c.old is not None]
    count = Counter(os.path.basename(c.name) for c in changes)
    return {
        c.name if count[os.path.basename(c.name)] > 1 else os.path.basename(c.name): c
        for c in changes
    }


def strip_path(name: str, level: int) -> str:
    """Returns ``name`` without its first ``level`` components (``patch -pLEVEL``)."""
    return "/".join(name.split("/")[level:])
