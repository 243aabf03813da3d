"""The C header and the Python module must both match wire/constants.toml."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from helpers import ROOT

from patchbox import wire as C


def test_generated_files_are_current() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_wire.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_error_table_has_one_text_per_code() -> None:
    spec = tomllib.loads((ROOT / "wire" / "constants.toml").read_text())
    header = (ROOT / "agent" / "include" / "patchbox" / "wire.h").read_text()
    texts = re.search(r"#define PBX_ERROR_TEXTS \{(.*?)\}", header, re.S).group(1)
    c_texts = re.findall(r'"([^"]*)"', texts)
    # A lost comma would merge two strings and shorten this list (libpulp's bug).
    assert c_texts == [t for _v, t in spec["error"].values()]
    assert len(C.ERROR_TEXTS) == len(C.ErrorCode) == len(c_texts)
    assert len(set(c_texts)) == len(c_texts)
