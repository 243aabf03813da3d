"""extract-patch: patches built from C compiled on the fly, checked by "linking" them.

:func:`link` applies a patch's fix-ups the way the agent does (docs/protocol.md, APPLY),
at fake addresses (text at TEXT_ADDR, data at DATA_ADDR, load bias 0, imports at
IMPORTS), and capstone then shows where the relocated code really goes.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone.x86 import X86_OP_IMM, X86_OP_MEM, X86_REG_RIP
from click.testing import CliRunner

from helpers import ROOT, compile_c
from patchbox.cli.extract import extract_command
from patchbox.elf.binary import Binary
from patchbox.errors import ElfError, ExtractError, UnsupportedRelocation
from patchbox.extract import extract_patch
from patchbox.flags import LINK_FLAGS
from patchbox.format.layout import read_patch, write_patch
from patchbox.format.model import Patch
from patchbox.wire import FixupBase, FixupSection, FixupType

TEXT_ADDR = 0x1000_0000
DATA_ADDR = 0x1800_0000
IMPORTS = {
    "snprintf": 0x7F00_0000_1000,
    "strtol": 0x7F00_0000_2000,
    "puts": 0x7F00_0000_3000,
    "atoi": 0x7F00_0000_4000,
}

ORIG = r"""
#include <stdio.h>
#include <stdlib.h>
int gvar = 1;
static int svar = 2;
static __attribute__((noipa)) int helper(int x) { return x * 3 + svar++; }
__attribute__((noipa)) int compute(int x) { return helper(x) + 1; }
__attribute__((noipa)) int use_vars(int x) { gvar += x; svar += gvar; return svar; }
__attribute__((noipa)) int show(int x) { char b[32]; snprintf(b, sizeof b, "v=%d", x); return b[2]; }
__attribute__((noipa)) int counter(void) { static int n; return ++n; }
__attribute__((noipa)) int twice(int x) { return compute(x) * 2; }
int main(int argc, char **argv) {
    (void)argv;
    return compute(argc) + use_vars(argc) + show(argc) + counter() + twice(argc);
}
"""

PATCHED = (
    ORIG.replace(
        "__attribute__((noipa)) int compute(int x) { return helper(x) + 1; }",
        "static __attribute__((noipa)) int fresh(int x) { return x ^ 0x5a5a; }\n"
        "__attribute__((noipa)) int compute(int x) { return helper(x) + fresh(x) + 2; }",
    )
    .replace("gvar += x; svar += gvar;", "gvar += 2 * x; svar -= gvar;")
    .replace('"v=%d"', '"patched %d!"')
    .replace("++n", "n += 2")
    .replace("compute(x) * 2", "compute(x) * 4")
)


# -- helpers -----------------------------------------------------------------------------


def link(patch: Patch, imports: dict[str, int] | None = None) -> tuple[bytes, bytes]:
    """Returns (text, data) of ``patch`` with every fix-up applied at the fake addresses."""
    imports = IMPORTS if imports is None else imports
    text = bytearray(patch.text)
    data = bytearray(patch.data + bytes(patch.bss_size))
    for fx in patch.fixups:
        bases = {
            FixupBase.TEXT: TEXT_ADDR,
            FixupBase.DATA: DATA_ADDR,
            FixupBase.EXE: 0,
            FixupBase.ABS: 0,
        }
        s = imports[fx.symbol] if fx.base == FixupBase.IMPORT else bases[fx.base]
        buf, start = (text, TEXT_ADDR) if fx.section == FixupSection.TEXT else (data, DATA_ADDR)
        if fx.type == FixupType.PC32:
            value = s + fx.addend - (start + fx.offset)
            assert -(2**31) <= value < 2**31, fx
            struct.pack_into("<i", buf, fx.offset, value)
        else:
            struct.pack_into("<Q", buf, fx.offset, (s + fx.addend) % 2**64)
    return bytes(text), bytes(data)


def disasm(patch: Patch, text: bytes, symbol: str) -> list[Any]:
    """Returns capstone instructions of the replacement ``symbol`` in linked ``text``."""
    fn = next(f for f in patch.functions if f.symbol == symbol)
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    code = text[fn.new_offset : fn.new_offset + fn.new_size]
    return list(md.disasm(code, TEXT_ADDR + fn.new_offset))


def branch_targets(insns: list[Any]) -> list[int]:
    """Returns the destinations of direct calls and jumps."""
    return [
        i.operands[0].imm
        for i in insns
        if i.mnemonic in ("call", "jmp") and i.operands and i.operands[0].type == X86_OP_IMM
    ]


def rip_targets(insns: list[Any]) -> list[int]:
    """Returns the addresses of all rip-relative memory operands (and lea)."""
    out = []
    for i in insns:
        for op in i.operands:
            if op.type == X86_OP_MEM and op.mem.base == X86_REG_RIP:
                out.append(i.address + i.size + op.mem.disp)
    return out


def text_at(text: bytes, addr: int, n: int) -> bytes:
    """Returns ``n`` bytes of linked text at absolute ``addr``."""
    return text[addr - TEXT_ADDR : addr - TEXT_ADDR + n]


def addr_of(binary: Path, name: str, source: str | None = None) -> int:
    with Binary(binary) as b:
        return b.get_symbol(name, source).address


@pytest.fixture(scope="module")
def prog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Returns (reference binary, patched object) of the main test program."""
    root = tmp_path_factory.mktemp("prog")
    (root / "orig").mkdir()
    (root / "new").mkdir()
    exe = compile_c(ORIG, root / "orig" / "prog")
    obj = compile_c(PATCHED, root / "new" / "prog.o", obj=True)
    return exe, obj


def link_objs(objs: list[Path], out: Path) -> Path:
    subprocess.run(
        ["gcc", "-pie", *map(str, objs), "-o", str(out), *LINK_FLAGS],
        check=True,
        capture_output=True,
    )
    return out


# -- resolution of references ------------------------------------------------------------


def test_existing_static_helper_is_called_in_the_program(prog: tuple[Path, Path]) -> None:
    exe, obj = prog
    patch = extract_patch(obj, exe, ["compute"])
    text, _ = link(patch)
    helper = addr_of(exe, "helper", "prog.c")
    assert helper in branch_targets(disasm(patch, text, "compute"))
    exe_fixups = [f for f in patch.fixups if f.base == FixupBase.EXE]
    assert any(f.type == FixupType.PC32 and f.addend == helper - 4 for f in exe_fixups)
    fn = patch.functions[0]
    assert fn.symbol == "compute" and fn.target == addr_of(exe, "compute")
    assert patch.text[fn.new_offset - 6 : fn.new_offset + 2] == b"\x90" * 8


def test_new_static_helper_is_copied(prog: tuple[Path, Path]) -> None:
    exe, obj = prog
    patch = extract_patch(obj, exe, ["compute"])
    text, _ = link(patch)
    assert patch.meta["new:fresh"] == "text"
    inside = [
        t
        for t in branch_targets(disasm(patch, text, "compute"))
        if TEXT_ADDR <= t < TEXT_ADDR + len(text)
    ]
    assert len(inside) == 1
    # the copy keeps its own patchable entry; its body does the xor
    assert text_at(text, inside[0] - 6, 8) == b"\x90" * 8
    assert (inside[0] - 6 - TEXT_ADDR) % 16 == 0
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    body = list(md.disasm(text_at(text, inside[0], 32), inside[0]))
    assert any("0x5a5a" in i.op_str for i in body)


def test_global_and_static_variables_point_at_the_program(prog: tuple[Path, Path]) -> None:
    exe, obj = prog
    patch = extract_patch(obj, exe, ["use_vars"])
    text, _ = link(patch)
    targets = set(rip_targets(disasm(patch, text, "use_vars")))
    assert addr_of(exe, "gvar") in targets
    assert addr_of(exe, "svar", "prog.c") in targets
    assert patch.data == b"" and patch.bss_size == 0
    assert not [k for k in patch.meta if k.startswith("new:")]


def test_static_local_points_at_the_program(prog: tuple[Path, Path]) -> None:
    exe, obj = prog
    patch = extract_patch(obj, exe, ["counter"])
    text, _ = link(patch)
    with Binary(exe) as b:
        n = [s for s in b.iter_locals("prog.c") if re.fullmatch(r"n\.\d+", s.name)]
    assert len(n) == 1
    assert set(rip_targets(disasm(patch, text, "counter"))) == {n[0].address}
    assert patch.bss_size == 0


def test_string_literal_is_copied_and_snprintf_goes_through_a_stub(prog: tuple[Path, Path]) -> None:
    exe, obj = prog
    patch = extract_patch(obj, exe, ["show"])
    text, _ = link(patch)
    insns = disasm(patch, text, "show")
    strings = [a for a in rip_targets(insns) if text_at(text, a, 12) == b"patched %d!\0"]
    assert strings, "the lea does not reach the copied literal"
    calls = [t for t in branch_targets(insns) if TEXT_ADDR <= t < TEXT_ADDR + len(text)]
    assert len(calls) == 1
    stub = text_at(text, calls[0], 14)
    assert stub[:6] == b"\xff\x25\x00\x00\x00\x00"
    assert struct.unpack("<Q", stub[6:])[0] == IMPORTS["snprintf"]
    imp = [f for f in patch.fixups if f.base == FixupBase.IMPORT]
    assert [(f.symbol, f.type) for f in imp] == [("snprintf", FixupType.ABS64)]


def test_two_functions_call_each_other_inside_the_patch(prog: tuple[Path, Path]) -> None:
    exe, obj = prog
    patch = extract_patch(obj, exe, ["twice", "compute"])
    assert [f.symbol for f in patch.functions] == ["twice", "compute"]
    text, _ = link(patch)
    compute = next(f for f in patch.functions if f.symbol == "compute")
    assert TEXT_ADDR + compute.new_offset in branch_targets(disasm(patch, text, "twice"))
    assert addr_of(exe, "compute") not in branch_targets(disasm(patch, text, "twice"))
    for fn in patch.functions:
        assert (fn.new_offset - 6) % 16 == 0


def test_fixups_sorted_and_meta(prog: tuple[Path, Path]) -> None:
    exe, obj = prog
    patch = extract_patch(obj, exe, ["show", "compute", "use_vars"], name="fix-1")
    assert patch.fixups == sorted(patch.fixups, key=lambda f: (f.section, f.offset))
    with Binary(exe) as b:
        assert patch.build_id == b.build_id()
    m = patch.meta
    assert m["tool"] == "extract-patch" and m["profile"] == "generic"
    assert m["reference"] == str(exe.absolute()) and m["object"] == str(obj.absolute())
    assert m["source:show"] == "prog.c" and re.match(r"\d{4}-\d\d-\d\dT", m["created"])
    assert patch.name == "fix-1"
    assert extract_patch(obj, exe, ["show"], profile="qemu").meta["profile"] == "qemu"


def test_expected_bytes_are_the_original_entry(prog: tuple[Path, Path]) -> None:
    exe, obj = prog
    patch = extract_patch(obj, exe, ["counter"])
    fn = patch.functions[0]
    with Binary(exe) as b:
        sym = b.get_symbol("counter")
        assert fn.expected == b.read(sym.address - 6, min(32, sym.size + 6))
    assert fn.expected[:8] == b"\x90" * 8 and 8 <= len(fn.expected) <= 32


def test_round_trip_through_the_file_format(prog: tuple[Path, Path]) -> None:
    exe, obj = prog
    patch = extract_patch(obj, exe, ["show", "compute", "counter", "use_vars"], name="rt")
    assert read_patch(write_patch(patch)) == patch


# -- multi-file programs, jump tables, GOT -----------------------------------------------


def test_static_functions_of_the_same_name_in_two_files(tmp_path: Path) -> None:
    a = (
        "static __attribute__((noipa)) int helper(int x) { return x + 1; }\n"
        "int fa(int x) { return helper(x); }\n"
    )
    b = (
        "static __attribute__((noipa)) int helper(int x) { return x * 2; }\n"
        "__attribute__((noipa)) int fb(int x) { return helper(x) + 1; }\n"
    )
    m = "int fa(int); int fb(int);\nint main(int c, char **v) { (void)v; return fa(c) + fb(c); }\n"
    (tmp_path / "new").mkdir()
    objs = [
        compile_c(src, tmp_path / f"{n}.o", obj=True)
        for n, src in (("a", a), ("b", b), ("main", m))
    ]
    exe = link_objs(objs, tmp_path / "prog")
    obj = compile_c(b.replace("+ 1;", "+ 7;"), tmp_path / "new" / "b.o", obj=True)
    patch = extract_patch(obj, exe, ["fb"])
    text, _ = link(patch)
    calls = branch_targets(disasm(patch, text, "fb"))
    with Binary(exe) as bin_:
        b_helper = bin_.get_symbol("helper", "b.c").address
        a_helper = bin_.get_symbol("helper", "/elsewhere/a.c").address
        assert a_helper != b_helper
        with pytest.raises(ExtractError, match=r"ambiguous.*a\.c.*b\.c"):
            bin_.get_symbol("helper")
    assert b_helper in calls and a_helper not in calls


def test_switch_jump_table_is_copied(tmp_path: Path) -> None:
    cases = "".join(f"case {i}: return f{i}(x) + {i * 7};\n" for i in range(8))
    funcs = "".join(
        f"__attribute__((noipa)) int f{i}(int x) {{ return x * {i + 3}; }}\n" for i in range(8)
    )
    src = funcs + (
        "__attribute__((noipa)) int dispatch(int k, int x) {\n switch (k) {\n"
        + cases
        + "default: return -1;\n }\n}\n"
        "int main(int c, char **v) { (void)v; return dispatch(c, c); }\n"
    )
    (tmp_path / "orig").mkdir()
    (tmp_path / "new").mkdir()
    exe = compile_c(src, tmp_path / "orig" / "sw")
    obj = compile_c(src.replace("+ 14;", "+ 15;"), tmp_path / "new" / "sw.o", obj=True)
    patch = extract_patch(obj, exe, ["dispatch"])
    assert patch.meta.get("new:.rodata.dispatch") == "text"
    text, _ = link(patch)
    fn = patch.functions[0]
    start, end = TEXT_ADDR + fn.new_offset, TEXT_ADDR + fn.new_offset + fn.new_size
    leas = [a for a in rip_targets(disasm(patch, text, "dispatch")) if a >= end]
    assert len(leas) == 1, "one lea of the copied jump table"
    table = leas[0]
    entries = [
        f
        for f in patch.fixups
        if f.section == FixupSection.TEXT and 0 <= f.offset - (table - TEXT_ADDR) < 4 * 8
    ]
    assert [(f.type, f.base) for f in entries] == [(FixupType.PC32, FixupBase.TEXT)] * 8
    for fx in entries:
        rel = struct.unpack_from("<i", text, fx.offset)[0]
        assert start <= table + rel < end
    # the callees are the program's functions
    with Binary(exe) as b:
        f_addrs = {b.get_symbol(f"f{i}").address for i in range(8)}
    assert f_addrs <= set(branch_targets(disasm(patch, text, "dispatch")))


def test_gotpcrel_references_get_slots(prog: tuple[Path, Path], tmp_path: Path) -> None:
    exe, _ = prog
    (tmp_path / "new").mkdir()
    obj = compile_c(PATCHED, tmp_path / "new" / "prog.o", obj=True, extra=["-fPIC", "-fno-plt"])
    patch = extract_patch(obj, exe, ["use_vars", "show"])
    text, _ = link(patch)
    # gvar via the GOT: the slot holds the program's gvar
    slots = rip_targets(disasm(patch, text, "use_vars"))
    values = {
        struct.unpack("<Q", text_at(text, a, 8))[0]
        for a in slots
        if TEXT_ADDR <= a < TEXT_ADDR + len(text) and (a - TEXT_ADDR) % 8 == 0
    }
    assert addr_of(exe, "gvar") in values
    # snprintf via call *slot(%rip)
    show = disasm(patch, text, "show")
    indirect = [i for i in show if i.mnemonic == "call" and i.operands[0].type == X86_OP_MEM]
    assert indirect
    slot = rip_targets(indirect)[0]
    assert struct.unpack("<Q", text_at(text, slot, 8))[0] == IMPORTS["snprintf"]
    got = [f for f in patch.fixups if f.base == FixupBase.IMPORT and f.symbol == "snprintf"]
    assert len(got) == 1 and got[0].type == FixupType.ABS64


# -- refusals ----------------------------------------------------------------------------


def test_replacement_without_patchable_entry_is_accepted(
    prog: tuple[Path, Path], tmp_path: Path
) -> None:
    """Its entry is its symbol (no padding before it): valid, but not stackable on."""
    exe, _ = prog
    src = PATCHED.replace(
        "__attribute__((noipa)) int counter(void)",
        "__attribute__((noipa, patchable_function_entry(0, 0))) int counter(void)",
    )
    (tmp_path / "new").mkdir()
    obj = compile_c(src, tmp_path / "new" / "prog.o", obj=True)
    warnings: list[str] = []
    patch = extract_patch(obj, exe, ["counter"], warnings=warnings)
    assert patch.functions[0].new_offset == 0
    assert any(
        "counter" in w and "has no patchable entry" in w and "cannot be stacked" in w
        for w in warnings
    )


def test_stripped_binary_is_refused(prog: tuple[Path, Path], tmp_path: Path) -> None:
    exe, obj = prog
    stripped = tmp_path / "stripped"
    shutil.copy(exe, stripped)
    subprocess.run(["strip", str(stripped)], check=True)
    with pytest.raises(ElfError, match=r"stripped.*no \.symtab"):
        extract_patch(obj, stripped, ["compute"])


def test_missing_function_and_files(prog: tuple[Path, Path], tmp_path: Path) -> None:
    exe, obj = prog
    with pytest.raises(ExtractError, match="no function 'nosuch'"):
        extract_patch(obj, exe, ["nosuch"])
    with pytest.raises(ElfError, match=str(tmp_path / "none.o")):
        extract_patch(tmp_path / "none.o", exe, ["compute"])
    with pytest.raises(ElfError, match=str(tmp_path / "none")):
        extract_patch(obj, tmp_path / "none", ["compute"])
    with pytest.raises(ElfError, match="not a relocatable object"):
        extract_patch(exe, exe, ["compute"])
    with pytest.raises(ElfError, match="not a relocatable object|not a linked executable"):
        extract_patch(obj, obj, ["compute"])
    junk = tmp_path / "junk.o"
    junk.write_bytes(b"hello")
    with pytest.raises(ElfError, match="junk.o"):
        extract_patch(junk, exe, ["compute"])


def test_renamed_source_file_does_not_copy_a_variable(
    prog: tuple[Path, Path], tmp_path: Path
) -> None:
    exe, _ = prog
    obj = compile_c(PATCHED, tmp_path / "other.o", obj=True)
    with pytest.raises(ExtractError, match="no static symbols from other.c"):
        extract_patch(obj, exe, ["counter"])


def test_pc32_data_reference_to_a_library_variable_is_refused(tmp_path: Path) -> None:
    orig = "__attribute__((noipa)) int f(void) { return 1; }\nint main(void) { return f(); }\n"
    patched = (
        "extern char **environ;\n"
        "__attribute__((noipa)) int f(void) { return environ != 0; }\n"
        "int main(void) { return f(); }\n"
    )
    (tmp_path / "new").mkdir()
    exe = compile_c(orig, tmp_path / "e")
    obj = compile_c(patched, tmp_path / "new" / "e.o", obj=True)
    with pytest.raises(UnsupportedRelocation, match="PC-relative data reference to 'environ'"):
        extract_patch(obj, exe, ["f"])


# -- CLI ---------------------------------------------------------------------------------


def test_cli_writes_the_patch(
    prog: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exe, obj = prog
    monkeypatch.chdir(tmp_path)
    res = CliRunner(mix_stderr=False).invoke(
        extract_command,
        ["--function", "compute", "--function", "show", "--name", "fix2", str(obj), str(exe)],
    )
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "fix2.pbx"
    patch = read_patch(out.read_bytes())
    assert res.stdout == (
        f"wrote {out}: 2 function(s), {len(patch.text)} bytes text, "
        f"0 bytes data, {len(patch.fixups)} fix-ups\n"
    )
    assert patch.name == "fix2"
    res = CliRunner(mix_stderr=False).invoke(
        extract_command,
        ["-f", "counter", "--qemu", "-o", str(tmp_path / "c-1.pbx"), str(obj), str(exe)],
    )
    assert res.exit_code == 0, res.stderr
    patch = read_patch((tmp_path / "c-1.pbx").read_bytes())
    assert patch.name == "c-1" and patch.meta["profile"] == "qemu"


def test_cli_reports_errors_on_one_line(prog: tuple[Path, Path], tmp_path: Path) -> None:
    exe, obj = prog
    res = CliRunner(mix_stderr=False).invoke(
        extract_command, ["-f", "nosuch", "-o", str(tmp_path / "x.pbx"), str(obj), str(exe)]
    )
    assert res.exit_code == 1
    assert res.stderr.startswith("extract-patch: error: ") and res.stderr.count("\n") == 1
    assert "nosuch" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.pbx").exists()
    res = CliRunner(mix_stderr=False).invoke(extract_command, [str(obj), str(exe)])
    assert res.exit_code == 2  # usage: --function is required


def test_console_script(prog: tuple[Path, Path], tmp_path: Path) -> None:
    exe, obj = prog
    script = ROOT / ".venv" / "bin" / "extract-patch"
    if not script.exists():
        pytest.skip("extract-patch console script not installed")
    res = subprocess.run(
        [str(script), "-f", "nosuch", str(obj), str(exe)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 1 and res.stderr.startswith("extract-patch: error: ")


def test_address_of_a_replaced_function_is_the_original(tmp_path: Path) -> None:
    src = (
        "int (*volatile hook)(int);\n"
        "__attribute__((noipa)) int compute(int x) { return x + 1; }\n"
        "__attribute__((noipa)) void install(void) { hook = compute; }\n"
        "int main(void) { install(); return hook(1) + compute(2); }\n"
    )
    (tmp_path / "new").mkdir()
    exe = compile_c(src, tmp_path / "fp")
    patched = src.replace("x + 1", "x + 2").replace(
        "{ hook = compute; }", "{ hook = compute; compute(0); }"
    )
    obj = compile_c(patched, tmp_path / "new" / "fp.o", obj=True)
    patch = extract_patch(obj, exe, ["install", "compute"])
    text, _ = link(patch)
    compute = next(f for f in patch.functions if f.symbol == "compute")
    insns = disasm(patch, text, "install")
    # the stored pointer stays valid after removal: the original entry, which redirects
    assert addr_of(exe, "compute") in rip_targets(insns)
    # the call goes straight to the replacement
    assert TEXT_ADDR + compute.new_offset in branch_targets(insns)
