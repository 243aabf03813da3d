"""Thread-local variables in patches (patchbox.extract.tls, patchbox.elf.tls): compiled on
the fly, each patch is "linked" at fake addresses the way the agent applies fix-ups (load
bias 0), and its thread-local operands are compared with those of the binary's own code
for the same function: a replacement must reach exactly the per-thread variables the
original reaches, whatever the access model."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs, CsInsn
from capstone.x86 import X86_OP_IMM, X86_OP_MEM, X86_OP_REG, X86_REG_FS, X86_REG_RIP

from patchbox.elf.binary import Binary
from patchbox.elf.tls import read_tls
from patchbox.errors import UnsupportedRelocation
from patchbox.extract import extract_patch
from patchbox.flags import PATCH_CFLAGS
from patchbox.format.model import Patch
from patchbox.wire import FixupBase, FixupSection, FixupType

TEXT_ADDR = 0x1000_0000
STUB = 0x7F00_0000_1000  # where every import (__tls_get_addr) is, once linked

EXE = r"""
__thread long le_count = 3;
__thread long ie_count __attribute__((tls_model("initial-exec")));
static __thread long st_count;
extern __thread long ext_count;
extern __thread long lib_count;
__thread char small;
__thread long aligned __attribute__((aligned(64)));
__attribute__((noipa)) void step(void)
{
    le_count += 1; ie_count += 2; st_count += 3; ext_count += 4; lib_count += 5;
    small += 6; aligned += 7;
}
__attribute__((noipa)) long counter(void) { static __thread long n; return ++n; }
int main(void) { step(); return (int)counter(); }
"""
OTHER = "__thread long ext_count;\n"
LIB_OF_EXE = "__thread long lib_count;\n"

LIB = r"""
__thread long lib_g;
static __thread long lib_s;
__thread long lib_h __attribute__((visibility("hidden")));
__attribute__((noipa)) long bump(long n) { lib_g += n; lib_s += 2 * n; lib_h += 3 * n; return lib_g; }
__attribute__((noipa)) long counter(void) { static __thread long n; return ++n; }
"""


def gcc(out: Path, src: str, *flags: str, libs: tuple[str, ...] = ()) -> Path:
    """Returns ``out`` after compiling ``src`` with the patchable flags and ``flags``."""
    c = out.with_suffix(".c")
    c.write_text(src)
    cmd = ["gcc", "-O2", *PATCH_CFLAGS, *flags, str(c), "-o", str(out), *libs]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def link(patch: Patch) -> bytes:
    """Returns ``patch``'s text with every fix-up applied: text at TEXT_ADDR, load bias 0,
    every import at STUB."""
    text = bytearray(patch.text)
    for fx in patch.fixups:
        assert fx.section == FixupSection.TEXT, fx
        s = {FixupBase.TEXT: TEXT_ADDR, FixupBase.EXE: 0, FixupBase.ABS: 0}.get(fx.base, STUB)
        if fx.type == FixupType.PC32:
            struct.pack_into("<i", text, fx.offset, s + fx.addend - (TEXT_ADDR + fx.offset))
        else:
            struct.pack_into("<Q", text, fx.offset, (s + fx.addend) % 2**64)
    return bytes(text)


def insns(code: bytes, address: int) -> list[CsInsn]:
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    return list(md.disasm(code, address))


def tp_offsets(code: list[CsInsn], read8: Callable[[int], bytes | None]) -> list[tuple[str, int]]:
    """Returns what straight-line ``code`` adds to the thread pointer: ("tp", offset) for
    ``%fs:disp``, or ``%fs:(%reg)`` with the register loaded from an immediate or from
    memory ``read8`` knows; ("slot", address) where ``read8`` returns None (a GOT slot
    the loader fills)."""
    known: dict[int, tuple[str, int]] = {}
    out = []
    for i in code:
        ops = i.operands
        for op in ops:
            if op.type == X86_OP_MEM and op.mem.segment == X86_REG_FS:
                kind, base = known[op.mem.base] if op.mem.base else ("tp", 0)
                out.append((kind, base + op.mem.disp))
        if i.mnemonic == "mov" and len(ops) == 2 and ops[0].type == X86_OP_REG:
            if ops[1].type == X86_OP_IMM:
                known[ops[0].reg] = ("tp", ops[1].imm)
            elif ops[1].type == X86_OP_MEM and ops[1].mem.base == X86_REG_RIP:
                at = i.address + i.size + ops[1].mem.disp
                raw = read8(at)
                known[ops[0].reg] = (
                    ("slot", at) if raw is None else ("tp", struct.unpack("<q", raw)[0])
                )
    return sorted(out)


def operands(code: list[CsInsn]) -> list[tuple[str, int]]:
    """Returns the rip-relative targets (GOT pairs, slots, descriptors) and the
    displacements from registers (offsets in a TLS block) of ``code``, calls left out."""
    out = []
    for i in code:
        if i.mnemonic == "call":
            continue
        for op in i.operands:
            if op.type != X86_OP_MEM or op.mem.segment == X86_REG_FS:
                continue
            if op.mem.base == X86_REG_RIP:
                out.append(("rip", i.address + i.size + op.mem.disp))
            elif op.mem.disp:
                out.append(("disp", op.mem.disp))
    return out


def original(binary: Path, name: str) -> list[CsInsn]:
    with Binary(binary) as b:
        sym = b.get_symbol(name)
        return insns(b.read(sym.address, sym.size), sym.address)


def replacement(patch: Patch, name: str) -> tuple[list[CsInsn], bytes]:
    text = link(patch)
    fn = next(f for f in patch.functions if f.symbol == name)
    code = text[fn.new_offset : fn.new_offset + fn.new_size]
    return insns(code, TEXT_ADDR + fn.new_offset), text


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Returns (executable, object of its step.c): a PIE with thread-local variables of
    its own (one from another file) and one of a library it links."""
    d = tmp_path_factory.mktemp("tlsexe")
    gcc(d / "libother.so", LIB_OF_EXE, "-fPIC", "-shared")
    other = gcc(d / "other.o", OTHER, "-fPIE", "-c")
    prog = gcc(
        d / "prog", EXE, "-fPIE", "-pie", "-Wl,--build-id", libs=(str(other), f"-L{d}", "-lother")
    )
    (d / "new").mkdir()
    obj = gcc(d / "new" / "prog.o", EXE, "-fPIE", "-c")
    return prog, obj


def test_executable_accesses_reach_the_offsets_its_own_code_uses(exe: tuple[Path, Path]) -> None:
    """local-exec, initial-exec (attribute, extern of the executable), variables of
    several sizes and alignments (the TP offset rounds the TLS segment up), a
    function-local static: the same offsets from the thread pointer as the program."""
    prog, obj = exe
    patch = extract_patch(obj, prog, ["step", "counter"])
    with Binary(prog) as b:
        loader_filled = set(read_tls(b).tpoff.by_name.values())
        for name in ("step", "counter"):
            code, text = replacement(patch, name)

            def in_text(a: int, text: bytes = text) -> bytes | None:
                return text[a - TEXT_ADDR : a - TEXT_ADDR + 8] if a >= TEXT_ADDR else None

            mine = tp_offsets(code, in_text)
            theirs = tp_offsets(
                original(prog, name), lambda a: None if a in loader_filled else b.read(a, 8)
            )
            assert mine == theirs and mine, name
    assert patch.meta["tls:le_count"].startswith("local-exec: TP offset -")
    assert patch.meta["tls:ie_count"].startswith("initial-exec: TP offset -")
    assert patch.meta["tls:ext_count"].startswith("initial-exec: TP offset -")


def test_a_library_variable_goes_through_the_executables_own_slot(exe: tuple[Path, Path]) -> None:
    """lib_count is the library's: its offset from the thread pointer is the loader's to
    choose, and the program reads it from its GOT slot (R_X86_64_TPOFF64); so does the
    patch."""
    prog, obj = exe
    patch = extract_patch(obj, prog, ["step"])
    slot = read_tls(Binary(prog)).tpoff.find("lib_count", None)
    assert slot is not None
    code, _ = replacement(patch, "step")
    assert ("rip", slot) in operands(code)
    assert ("rip", slot) in operands(original(prog, "step"))
    assert patch.meta["tls:lib_count"] == f"initial-exec: GOT slot (R_X86_64_TPOFF64) at {slot:#x}"


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param((), id="general-and-local-dynamic"),
        pytest.param(("-ftls-model=initial-exec",), id="initial-exec"),
        pytest.param(("-mtls-dialect=gnu2",), id="descriptors"),
    ],
)
def test_library_accesses_share_the_librarys_got_entries(
    tmp_path: Path, flags: tuple[str, ...]
) -> None:
    """A library's module id and TP offsets are known only at run time: the patch reaches
    lib_g (global), lib_s (static), lib_h (hidden) and a function-local static through
    the very GOT pairs, slots or descriptors the library's code uses, and the offsets in
    the block (DTPOFF32) it uses."""
    lib = gcc(tmp_path / "lib.so", LIB, "-fPIC", "-shared", "-Wl,--build-id", *flags)
    (tmp_path / "new").mkdir()
    obj = gcc(tmp_path / "new" / "lib.o", LIB, "-fPIC", "-c", *flags)
    patch = extract_patch(obj, lib, ["bump", "counter"])
    for name in ("bump", "counter"):
        code, _ = replacement(patch, name)
        assert operands(code) == operands(original(lib, name)), name
        assert any(kind == "rip" for kind, _ in operands(code))
    imports = {f.symbol for f in patch.fixups if f.base == FixupBase.IMPORT}
    assert imports <= {"__tls_get_addr"}


def test_local_dynamic_offsets_are_the_librarys(tmp_path: Path) -> None:
    lib = gcc(tmp_path / "lib.so", LIB, "-fPIC", "-shared", "-Wl,--build-id")
    (tmp_path / "new").mkdir()
    obj = gcc(tmp_path / "new" / "lib.o", LIB, "-fPIC", "-c")
    patch = extract_patch(obj, lib, ["bump"])
    image = read_tls(Binary(lib))
    assert image.ld_pair is not None and image.pairs.find("lib_g", None) is not None
    assert patch.meta["tls:lib_g"].startswith("general-dynamic: GOT pair (R_X86_64_DTPMOD64)")
    with Binary(lib) as b:
        s = b.get_symbol("lib_s")
    assert patch.meta["tls:lib_s"] == (
        f"local-dynamic: GOT pair {{module id, 0}} at {image.ld_pair:#x}; "
        f"local-dynamic: offset {s.address} in the block"
    )


# -- refusals ----------------------------------------------------------------------------


def test_new_thread_local_variable_is_refused_by_name(
    exe: tuple[Path, Path], tmp_path: Path
) -> None:
    prog, _ = exe
    src = EXE.replace("small += 6;", "small += 6; fresh += 1;").replace(
        "__thread char small;", "__thread char small;\n__thread int fresh;"
    )
    obj = gcc(tmp_path / "prog.o", src, "-fPIE", "-c")
    with pytest.raises(
        UnsupportedRelocation, match=r"new thread-local variable 'fresh'.*cannot add"
    ):
        extract_patch(obj, prog, ["step"])


def test_executable_patch_compiled_for_a_library_is_refused(
    exe: tuple[Path, Path], tmp_path: Path
) -> None:
    """-fPIC: general-dynamic accesses; ld relaxed the program's own to local-exec, so no
    GOT pair exists, and the message says how to compile the fix."""
    prog, _ = exe
    obj = gcc(tmp_path / "prog.o", EXE, "-fPIC", "-c")
    with pytest.raises(
        UnsupportedRelocation,
        match=r"thread-local variable '\w+' \(general-dynamic access in \.text\.step\+0x[0-9a-f]+, "
        r"R_X86_64_TLSGD\): .* has no GOT pair \(R_X86_64_DTPMOD64\) for it .*-fPIE, not -fPIC",
    ):
        extract_patch(obj, prog, ["step"])


def test_local_exec_in_a_library_is_refused(tmp_path: Path) -> None:
    lib = gcc(tmp_path / "lib.so", LIB, "-fPIC", "-shared", "-Wl,--build-id")
    obj = gcc(tmp_path / "lib.o", LIB, "-fPIE", "-c")
    with pytest.raises(
        UnsupportedRelocation,
        match=r"thread-local variable 'lib_\w' \(local-exec access .*is a shared library",
    ):
        extract_patch(obj, lib, ["bump"])


def test_model_the_library_never_uses_is_refused(tmp_path: Path) -> None:
    """The library reaches its variables with initial-exec only (TPOFF64 slots): a patch
    compiled for general-dynamic finds no GOT pair, and no module id exists at build time."""
    lib = gcc(
        tmp_path / "lib.so", LIB, "-fPIC", "-shared", "-Wl,--build-id", "-ftls-model=initial-exec"
    )
    obj = gcc(tmp_path / "lib.o", LIB, "-fPIC", "-c")
    with pytest.raises(
        UnsupportedRelocation,
        match=r"'lib_[gs]' \((general|local)-dynamic access .* has no GOT pair .* module id is "
        r"known only at run time$",
    ):
        extract_patch(obj, lib, ["bump"])


def test_variable_that_is_not_thread_local_in_the_program_is_refused(tmp_path: Path) -> None:
    src = "long plain;\n__attribute__((noipa)) void f(void) { plain += 1; }\nint main(void) { f(); }\n"
    prog = gcc(tmp_path / "prog", src, "-fPIE", "-pie", "-Wl,--build-id")
    (tmp_path / "new").mkdir()
    obj = gcc(
        tmp_path / "new" / "prog.o",
        src.replace("long plain;", "__thread long plain;"),
        "-fPIE",
        "-c",
    )
    with pytest.raises(
        UnsupportedRelocation, match=r"'plain' is thread-local in the patch .* not in"
    ):
        extract_patch(obj, prog, ["f"])


def test_another_modules_variable_without_a_slot_is_refused(tmp_path: Path) -> None:
    """An initial-exec access to a variable the executable does not define goes through the
    program's own GOT slot for it; the program has none (its code never reaches it)."""
    src = "__attribute__((noipa)) void f(void) { }\nint main(void) { f(); }\n"
    prog = gcc(tmp_path / "prog", src, "-fPIE", "-pie", "-Wl,--build-id")
    (tmp_path / "new").mkdir()
    fixed = src.replace("{ }", "{ extern __thread long elsewhere; elsewhere += 1; }")
    obj = gcc(tmp_path / "new" / "prog.o", fixed, "-fPIE", "-c")
    with pytest.raises(
        UnsupportedRelocation,
        match=r"'elsewhere' \(initial-exec access .* has no GOT slot \(R_X86_64_TPOFF64\) for it",
    ):
        extract_patch(obj, prog, ["f"])
