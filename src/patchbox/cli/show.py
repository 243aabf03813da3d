"""`patchbox show FILE`: what a patch file contains, with its code disassembled."""

from __future__ import annotations

from collections import Counter
from typing import Any

import click

from patchbox.arch import get_arch_by_machine
from patchbox.cli.common import emit_json, json_option
from patchbox.format.layout import read_patch_file
from patchbox.format.model import Fixup, Patch
from patchbox.wire import FixupBase, FixupSection

__all__ = ["show_command", "describe_patch", "disassemble"]


def _fixup_text(fx: Fixup) -> str:
    """Returns one fix-up as ``TYPE BASE target``, e.g. ``PC32 IMPORT puts-0x4``."""
    if fx.base == FixupBase.IMPORT:
        where = fx.symbol + (f"{fx.addend:+#x}" if fx.addend else "")
    elif fx.base in (FixupBase.EXE, FixupBase.ABS):
        where = f"{fx.addend:#x}"
    else:
        where = f"{fx.base.name.lower()}{fx.addend:+#x}"
    return f"{fx.type.name} {fx.base.name} {where}"


def disassemble(patch: Patch, start: int, size: int) -> list[dict[str, Any]]:
    """Returns the instructions of ``patch.text[start:start+size]`` (offsets in text), each
    with the fix-ups written inside it; undecodable bytes appear as ``(bad)``."""
    arch = get_arch_by_machine(int(patch.machine))  # the patch's own (its body's last field)
    md = arch.disasm.disassembler()
    code = patch.text[start : start + size]
    text_fixups = [fx for fx in patch.fixups if fx.section == FixupSection.TEXT]
    out: list[dict[str, Any]] = []
    pos = 0
    while pos < len(code):
        insns = list(md.disasm_lite(code[pos:], start + pos))
        if not insns:  # one undecodable byte; resynchronise after it
            insns = [(start + pos, 1, "(bad)", "")]
        for address, length, mnemonic, op_str in insns:
            fixups = [
                _fixup_text(fx) for fx in text_fixups if address <= fx.offset < address + length
            ]
            out.append(
                {
                    "offset": address,
                    "bytes": code[address - start : address - start + length].hex(),
                    "mnemonic": mnemonic,
                    "op_str": op_str,
                    "fixups": fixups,
                }
            )
            pos = address - start + length
    return out


def describe_patch(patch: Patch) -> dict[str, Any]:
    """Returns the JSON-ready description `show --json` prints."""
    counts = Counter(f"{fx.type.name} {fx.base.name}" for fx in patch.fixups)
    return {
        "name": patch.name,
        "build_id": patch.build_id.hex(),
        "flags": patch.flags,
        "text_size": len(patch.text),
        "data_size": len(patch.data),
        "bss_size": patch.bss_size,
        "functions": [
            {
                "symbol": fn.symbol,
                "target": fn.target,
                "new_offset": fn.new_offset,
                "new_size": fn.new_size,
                "expected": fn.expected.hex(),
                "redirect": "entry_jump" if fn.kind else "patchable_entry",
                "skip": fn.skip,
                "disassembly": disassemble(patch, fn.new_offset, fn.new_size),
            }
            for fn in patch.functions
        ],
        "fixups": {"total": len(patch.fixups), "by_kind": dict(sorted(counts.items()))},
        "imports": sorted({fx.symbol for fx in patch.fixups if fx.base == FixupBase.IMPORT}),
        "hooks": [{"when": h.when.name.lower(), "offset": h.offset} for h in patch.hooks],
        "meta": patch.meta,
    }


@click.command("show")
@json_option
@click.argument("file", type=click.Path(dir_okay=False))
def show_command(as_json: bool, file: str) -> None:
    """Describe the patch FILE: functions, sizes, fix-ups, imports, meta, disassembly."""
    patch = read_patch_file(file).patch
    d = describe_patch(patch)
    if as_json:
        emit_json(d)
        return
    echo = click.echo
    echo(f"patch     {d['name']}  ({file})")
    echo(f"build-id  {d['build_id']}")
    echo(
        f"sizes     text {d['text_size']}, data {d['data_size']}, bss {d['bss_size']}"
        + (f"  flags {d['flags']:#x}" if d["flags"] else "")
    )
    echo(f"functions ({len(d['functions'])}):")
    width = max(len(fn["symbol"]) for fn in d["functions"])
    for fn in d["functions"]:
        jump = f"  entry jump at +{fn['skip']}" if fn["redirect"] == "entry_jump" else ""
        echo(
            f"  {fn['symbol']:<{width}}  target {fn['target']:#x}  replacement "
            f"text+{fn['new_offset']:#x}, {fn['new_size']} bytes{jump}"
        )
    kinds = ", ".join(f"{kind} {n}" for kind, n in d["fixups"]["by_kind"].items())
    echo(f"fix-ups   {d['fixups']['total']}" + (f" ({kinds})" if kinds else ""))
    echo(f"imports   {', '.join(d['imports']) or 'none'}")
    if d["hooks"]:
        echo("hooks     " + ", ".join(f"{h['when']} text+{h['offset']:#x}" for h in d["hooks"]))
    if d["meta"]:
        echo("meta:")
        key_width = max(len(k) for k in d["meta"])
        for key, value in d["meta"].items():
            echo(f"  {key:<{key_width}}  {value}")
    for fn in d["functions"]:
        echo("")
        echo(f"{fn['symbol']} (text+{fn['new_offset']:#x}, {fn['new_size']} bytes):")
        for insn in fn["disassembly"]:
            code = bytes.fromhex(insn["bytes"]).hex(" ")
            line = f"  {insn['offset']:6x}:  {code:<24} {insn['mnemonic']} {insn['op_str']}"
            line = line.rstrip()
            if insn["fixups"]:
                line = f"{line:<60}  ; {', '.join(insn['fixups'])}"
            echo(line)
