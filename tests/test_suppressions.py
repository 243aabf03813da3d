"""Every suppression of a check names what it suppresses and says why, on its own line:
a ruff noqa comment as ``noqa: CODE (reason)`` (ansible-lint's in YAML as ``noqa: rule-id
reason``), a mypy type-ignore as ``type: ignore[code]`` followed by ``# reason``. A bare one silences every later finding of its
line, and nobody can tell whether it is still needed. ruff itself refuses a noqa or a
type: ignore without a code (PGH004, PGH003) and one that suppresses nothing (RUF100),
mypy one that is unused (warn_unused_ignores); the reason is this test's."""

from __future__ import annotations

import io
import os
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

from helpers import ROOT

# Directories of the tree that hold no source of ours (tools' caches, builds, the venv).
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", "_agent", "node_modules"}
SUFFIXES = {".py", ".yml", ".yaml"}

# A noqa comment: its codes after the colon (E402; SIM115, B008; ansible-lint's rule ids),
# then the reason: E402 (why), SIM115, B008 - why, command-instead-of-shell  why.
NOQA = re.compile(r"#\s*noqa\b", re.IGNORECASE)
NOQA_WITH_REASON = re.compile(
    r"#\s*noqa:\s*(?P<codes>[A-Za-z][\w-]*(?:\s*,\s*[A-Za-z][\w-]*)*)\s+\S.*", re.IGNORECASE
)
# A type-ignore comment: its codes in brackets, then a second comment with the reason.
IGNORE = re.compile(r"#\s*type:\s*ignore\b")
IGNORE_WITH_REASON = re.compile(r"#\s*type:\s*ignore\[[\w-]+(?:\s*,\s*[\w-]+)*\]\s*#\s*\S.*")


def source_files(root: Path = ROOT) -> Iterator[Path]:
    """Yields the Python and YAML files of the tree (not of caches, builds or the venv)."""
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if Path(name).suffix in SUFFIXES:
                yield Path(top) / name


def comments(path: Path, text: str) -> Iterator[tuple[int, str]]:
    """Yields (line, comment) of every comment of ``text``: Python's by its tokens (so a
    string that shows a suppression is not one), YAML's from its first ``#``."""
    if path.suffix == ".py":
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                yield tok.start[0], tok.string
        return
    for number, line in enumerate(text.splitlines(), 1):
        at = line.find("#")
        if at >= 0:
            yield number, line[at:]


def bare_suppressions(path: Path, text: str) -> list[str]:
    """Returns ``path:line: comment`` of each suppression in ``text`` without a code and a
    reason."""
    bare = []
    for number, comment in comments(path, text):
        for start in (m.start() for m in NOQA.finditer(comment)):
            if not NOQA_WITH_REASON.match(comment, start):
                bare.append(f"{path}:{number}: {comment}")
        for start in (m.start() for m in IGNORE.finditer(comment)):
            if not IGNORE_WITH_REASON.match(comment, start):
                bare.append(f"{path}:{number}: {comment}")
    return bare


def test_every_suppression_has_a_code_and_a_reason() -> None:
    bare = [
        line
        for path in source_files()
        for line in bare_suppressions(path.relative_to(ROOT), path.read_text())
    ]
    assert not bare, "say what is suppressed and why, on the line:\n" + "\n".join(bare)


def test_the_check_finds_bare_suppressions() -> None:
    """The patterns themselves: each bare form is found, each complete one passes."""
    py = Path("x.py")
    bare = [
        "import os  # noqa\n",
        "import os  # noqa: E402\n",
        "import os  # NOQA:F401\n",
        "x = f()  # type: ignore\n",
        "x = f()  # type: ignore[misc]\n",
        "x = f()  # type: ignore[misc]  #\n",
        "x = f()  # ok  # noqa: E501\n",
    ]
    for line in bare:
        assert bare_suppressions(py, line), line
    fine = [
        "import os  # noqa: E402 (after the sys.path line)\n",
        "import os  # noqa: F401, E402 - re-exported\n",
        "x = f()  # type: ignore[misc]  # assigning to a frozen field is the test\n",
        "x = f()  # type: ignore[arg-type, misc]  # pyelftools' stubs say int\n",
        'text = "# noqa"  # a string that shows one is not one\n',
    ]
    for line in fine:
        assert not bare_suppressions(py, line), line
    yml = Path("x.yml")
    assert bare_suppressions(yml, "  shell: x  # noqa: command-instead-of-shell\n")
    assert not bare_suppressions(yml, "  shell: x  # noqa: command-instead-of-shell  why\n")
