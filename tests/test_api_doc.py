"""docs/api.md's examples run as they are and print what the page shows (each ```python
block, in order and in one namespace, followed by the ```text block of its output;
offsets into compiled code may differ with the compiler)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import BIN, ROOT

DOC = ROOT / "docs" / "api.md"
FIX = {
    "a.c": ("return x + 1;", "return x + 5;"),
    "b.c": ('"bee"', '"bumblebee"'),
    "util.c": ("count += 1;", "count += 2;"),
}


def examples() -> list[tuple[str, str]]:
    """Returns (code, expected output) of every python block followed by a text block."""
    blocks = re.findall(r"```(python|text)\n(.*?)```", DOC.read_text(), re.S)
    return [
        (code, out)
        for (kind, code), (next_kind, out) in zip(blocks, blocks[1:])
        if kind == "python" and next_kind == "text"
    ]


def test_examples_print_what_the_page_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    shutil.copytree(ROOT / "tests" / "e2e" / "buildtree", tmp_path / "server")
    subprocess.run(["make", "-s"], cwd=tmp_path / "server", check=True, capture_output=True)
    diff = ""
    for name, (old, new) in FIX.items():
        text = (tmp_path / "server" / name).read_text()
        (tmp_path / name).write_text(text.replace(old, new))
        diff += subprocess.run(
            ["diff", "-u", "--label", f"a/{name}", "--label", f"b/{name}"]
            + [str(tmp_path / "server" / name), str(tmp_path / name)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    (tmp_path / "fix.patch").write_text(diff)
    monkeypatch.chdir(tmp_path)
    found = examples()
    assert len(found) == 2
    namespace: dict[str, object] = {}
    for code, expected in found:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(DOC), "exec"), namespace)
        # Offsets in compiled code are the compiler's: any offset matches.
        assert _offsets(out.getvalue()) == _offsets(expected)


def _offsets(text: str) -> str:
    return re.sub(r"\+0x[0-9a-f]+", "+0x...", text)
