"""The C header and the Python module must both match wire/constants.toml."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from helpers import ROOT
from patchbox import wire as C
from patchbox.format.layout import decode_apply_body, encode_apply_body, wire_names


def test_generated_files_are_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_wire.py"), "--check"],
        capture_output=True,
        text=True,
    )
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


def _agent_parse_order() -> list[str]:
    """Returns the field names the agent's apply-body parser reads, in source order."""
    for path in sorted((ROOT / "agent" / "src").rglob("*.c")):
        text = path.read_text()
        start = text.find("sandbox_apply_parse(")
        start = text.find("{", text.find(")", start)) if start >= 0 else -1
        if start < 0 or "sandbox_apply_parse(struct" not in text:
            continue
        end = text.find("\n}\n", start)
        body = text[start:end]
        return re.findall(
            r'(?:sandbox_reader_(?:str|uint|blob|take)|SANDBOX_READ_UINT)\(\s*\w+\s*,\s*"([^"]+)"',
            body,
        )
    raise AssertionError("sandbox_apply_parse not found in agent/src")


def test_agent_parses_the_apply_body_in_the_declared_order() -> None:
    # One declaration (format.layout.APPLY_BODY) drives encoder and decoder; the agent's
    # C parser must read the same fields in the same order.
    assert _agent_parse_order() == wire_names()


def test_apply_body_layout_drives_encoder_and_decoder() -> None:
    from test_cli import make_patch

    patch = make_patch()
    body = encode_apply_body(patch)
    back = decode_apply_body(body)
    assert (back.name, back.build_id, back.text, back.functions, back.fixups) == (
        patch.name,
        patch.build_id,
        patch.text,
        patch.functions,
        patch.fixups,
    )
    # The first fields are where the declaration says: name (str), build_id (u8 + bytes).
    assert (
        body[: 2 + len(patch.name)] == len(patch.name).to_bytes(2, "little") + patch.name.encode()
    )
    at = 2 + len(patch.name)
    assert body[at] == len(patch.build_id) and body[at + 1 : at + 1 + body[at]] == patch.build_id
