"""The entry-jump fallback for originals without the patchable entry: capstone analysis of
compiled snippets, one test per refusal rule and its message, the accepted cases, and the
kind/skip fields of the function record (docs/redirect.md, "Functions without the padding").
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from patchbox.arch import get_arch
from patchbox.errors import ExtractError, PatchFormatError
from patchbox.extract import extract_patch
from patchbox.extract.entry import analyse_entry
from patchbox.flags import LINK_FLAGS, PATCH_CFLAGS
from patchbox.format.layout import decode_apply_body, encode_apply_body, read_patch, write_patch
from patchbox.format.model import Function, Patch
from patchbox.wire import ApplyFlag, RedirectKind

PLAIN = ["-O2", "-fPIE", "-ffunction-sections", "-fcf-protection=none", "-g"]

ORIG = r"""
#include <stdlib.h>
__attribute__((noipa, aligned(16))) int answer(int x) { return x * 7 + 3; }
__attribute__((noipa, aligned(16))) int shortfirst(int x) { if (x > 5) return 1234567; return x; }
__attribute__((noipa, aligned(16))) void tiny(void) { __asm__ volatile(""); }
int loopy(int);
int midjump(int);
int ebr_ok(int);
/* Hand-written so the instruction layout is exact:
 *   loopy:   xor eax,eax (2) ; 1: add eax,edi ; dec edi ; jg 1b   -> branch to P+2
 *   midjump: mov eax,1 (5) ; test edi,edi ; jne midjump+2 ; ret    -> branch into an insn
 *   ebr_ok:  at 16k+4: endbr64 ; mov eax,42 (5) ; ret              -> P = entry+4, 8-aligned */
__asm__(".text\n.p2align 4\n.globl loopy\n.type loopy,@function\nloopy:\n"
        "\txor %eax,%eax\n1:\tadd %edi,%eax\n\tdec %edi\n\tjg 1b\n\tret\n.size loopy,.-loopy\n"
        ".p2align 4\n.globl midjump\n.type midjump,@function\nmidjump:\n"
        "\tmov $1,%eax\n\ttest %edi,%edi\n\tjne midjump+2\n\tret\n.size midjump,.-midjump\n"
        ".p2align 4\n\tint3\n\tint3\n\tint3\n\tint3\n.globl ebr_ok\n.type ebr_ok,@function\nebr_ok:\n"
        "\tendbr64\n\tmov $42,%eax\n\tret\n.size ebr_ok,.-ebr_ok\n");
int main(int argc, char **argv) {
    tiny();
    return answer(argc) + shortfirst(argc) + loopy(argc) + midjump(argc) + ebr_ok(argc)
        + (getenv(argv[0]) != 0);
}
"""

FIXED = (
    ORIG.replace("x * 7 + 3", "x * 7 + 4")
    .replace("return x; }", "return x + 1; }")
    .replace(
        'void tiny(void) { __asm__ volatile(""); }', 'void tiny(void) { __asm__ volatile("nop"); }'
    )
)

REPL = r"""
__attribute__((noipa)) int answer(int x) { return x * 7 + 4; }
__attribute__((noipa)) int shortfirst(int x) { return x + 1; }
__attribute__((noipa)) void tiny(void) { }
__attribute__((noipa)) int loopy(int x) { return x; }
__attribute__((noipa)) int midjump(int x) { return x; }
__attribute__((noipa)) int ebr_ok(int x) { return x + 42; }
__attribute__((noipa)) char *getenv(const char *s) { return (char *)s; }
"""

X86 = get_arch("x86_64")


def gcc(src: str, out: Path, *flags: str) -> Path:
    c = out.with_suffix(".c")
    c.write_text(src)
    subprocess.run(
        ["gcc", *flags, str(c), "-o", str(out)], check=True, capture_output=True, text=True
    )
    return out


@pytest.fixture(scope="module")
def prog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Returns (executable without padding, padded replacement object, plain object)."""
    d = tmp_path_factory.mktemp("fallback")
    exe = gcc(ORIG, d / "prog", *PLAIN, "-pie", *LINK_FLAGS)
    (d / "padded").mkdir()
    (d / "plain").mkdir()
    padded = gcc(REPL, d / "padded" / "prog.o", *PLAIN, *PATCH_CFLAGS, "-c")
    plain = gcc(REPL, d / "plain" / "prog.o", *PLAIN, "-c")
    return exe, padded, plain


def test_accepted_entry_jump(prog: tuple[Path, Path, Path]) -> None:
    exe, padded, _plain = prog
    patch = extract_patch(padded, exe, ["answer"])
    [fn] = patch.functions
    assert (fn.kind, fn.skip) == (RedirectKind.ENTRY_JUMP, 0)
    assert fn.target % 8 == 0 and fn.expected[:1] == b"\x8d"  # lea, 7 bytes
    assert len(fn.expected) >= 8
    assert fn.new_offset >= 6 and patch.text[fn.new_offset - 6 : fn.new_offset + 2] == b"\x90" * 8
    again = read_patch(write_patch(patch))
    assert (again.functions[0].kind, again.functions[0].skip) == (RedirectKind.ENTRY_JUMP, 0)


def test_accepted_after_endbr64(prog: tuple[Path, Path, Path]) -> None:
    exe, padded, _plain = prog
    [fn] = extract_patch(padded, exe, ["ebr_ok"]).functions
    assert (fn.kind, fn.skip) == (RedirectKind.ENTRY_JUMP, 4)
    assert fn.patch_point % 8 == 0 and fn.expected[:1] == b"\xb8"  # mov eax, 42 after endbr64


def test_rule1_too_short(prog: tuple[Path, Path, Path]) -> None:
    exe, padded, _plain = prog
    with pytest.raises(
        ExtractError,
        match=r"tiny has no patchable entry and cannot use an entry "
        r"jump \(rule 1, too short\): 1 bytes from the patch "
        r"point 0x[0-9a-f]+ to its end",
    ):
        extract_patch(padded, exe, ["tiny"])


def test_rule2_short_first_instruction_is_held(prog: tuple[Path, Path, Path]) -> None:
    exe, padded, _plain = prog
    patch = extract_patch(padded, exe, ["shortfirst"])
    [fn] = patch.functions
    assert fn.kind == RedirectKind.ENTRY_JUMP
    assert patch.flags & ApplyFlag.HOLD  # written while the client holds the threads
    assert not extract_patch(padded, exe, ["answer"]).flags & ApplyFlag.HOLD  # 7-byte lea
    warnings: list[str] = []
    extract_patch(padded, exe, ["shortfirst"], force=True, warnings=warnings)  # a no-op now


def test_rule3_branch_into_overwritten_bytes(prog: tuple[Path, Path, Path]) -> None:
    exe, padded, _plain = prog
    # Held past rule 2, the loop back to P+2 still refuses.
    with pytest.raises(
        ExtractError,
        match=r"loopy .*\(rule 3, branch target\): the jg at "
        r"loopy\+0x6 \(0x[0-9a-f]+\) goes to 0x[0-9a-f]+, "
        r"inside the 5 bytes",
    ):
        extract_patch(padded, exe, ["loopy"])
    # A first instruction of 5 bytes, but a jump into its middle.
    with pytest.raises(ExtractError, match=r"midjump .*\(rule 3, branch target\): the jne"):
        extract_patch(padded, exe, ["midjump"])


def test_rule3_call_returning_inside() -> None:
    code = bytes.fromhex("ffd0") + bytes.fromhex("b801000000c3")  # call *%rax ; mov eax,1 ; ret
    with pytest.raises(ExtractError, match=r"rule 3, return address\): the call at 0x1000 returns"):
        analyse_entry("f", 0x1000, code, arch=X86)


def test_rule3_undecodable_bytes() -> None:
    code = bytes.fromhex("b801000000") + b"\x06\x06"  # mov eax,1 ; push es: invalid in 64-bit
    with pytest.raises(
        ExtractError,
        match=r"rule 3, branch target\): capstone cannot decode "
        r"f\+0x5",
    ):
        analyse_entry("f", 0x1000, code, arch=X86)


def test_rule4_alignment_and_endbr64_held(tmp_path: Path, prog: tuple[Path, Path, Path]) -> None:
    _exe, padded, _plain = prog
    # gcc with -fcf-protection: endbr64 at a 16-aligned entry puts P at byte 4 of its word:
    # the jump spans two words, so it is held.
    exe = gcc(
        ORIG,
        tmp_path / "cet",
        *[f for f in PLAIN if "cf-protection" not in f],
        "-fcf-protection=full",
        "-pie",
        *LINK_FLAGS,
    )
    patch = extract_patch(padded, exe, ["answer"])
    [fn] = patch.functions
    assert (fn.skip, fn.patch_point % 8) == (4, 4) and patch.flags & ApplyFlag.HOLD
    assert analyse_entry("g", 0x1005, bytes.fromhex("b801000000c3"), arch=X86).held
    with pytest.raises(
        ExtractError,
        match=r"rule 4, alignment\): the patch point 0x1007 is byte 7",
    ):
        analyse_entry("g", 0x1007, bytes.fromhex("b801000000c3"), arch=X86)


def test_shared_library_reference(tmp_path: Path, prog: tuple[Path, Path, Path]) -> None:
    exe, _padded, plain = prog
    with pytest.raises(
        ExtractError,
        match=r"getenv is in a shared library, not in .*prog: build the patch against that",
    ):
        extract_patch(plain, exe, ["getenv"])
    lib = gcc(
        ORIG.replace("int main(", "int not_main("),
        tmp_path / "libprog.so",
        *PLAIN,
        "-fPIC",
        "-shared",
        "-Wl,--build-id=sha1",
    )
    patch = extract_patch(plain, lib, ["answer"])
    assert patch.functions[0].kind == RedirectKind.ENTRY_JUMP


def test_replacement_without_padding(prog: tuple[Path, Path, Path]) -> None:
    exe, _padded, plain = prog
    warnings: list[str] = []
    patch = extract_patch(plain, exe, ["answer"], warnings=warnings)
    [fn] = patch.functions
    assert fn.new_offset == 0 and fn.kind == RedirectKind.ENTRY_JUMP
    assert any("cannot be stacked on this one" in w for w in warnings)
    assert read_patch(write_patch(patch)).functions[0].new_offset == 0


def _body(**fn_changes: Any) -> bytes:
    fn = Function(symbol="f", target=0x1000, new_offset=0, new_size=4, expected=bytes(8))
    return encode_apply_body(
        Patch(name="p", build_id=b"\x01", text=b"\xc3" * 8, functions=[replace(fn, **fn_changes)])
    )


def test_record_kind_and_skip_encoding() -> None:
    body = _body(kind=RedirectKind.ENTRY_JUMP, skip=4)
    fn = decode_apply_body(body).functions[0]
    assert (fn.kind, fn.skip, fn.patch_point) == (RedirectKind.ENTRY_JUMP, 4, 0x1004)
    # kind and skip sit between new_size and expected_len.
    assert body.index(bytes([1, 4, 8, 0]) + bytes(8)) > 0
    assert decode_apply_body(_body()).functions[0].kind == RedirectKind.PATCHABLE_ENTRY
    with pytest.raises(PatchFormatError, match=r"unknown redirect kind 2"):
        decode_apply_body(_body(kind=2))
    with pytest.raises(PatchFormatError, match=r"skip 4 invalid for PATCHABLE_ENTRY"):
        decode_apply_body(_body(skip=4))
    with pytest.raises(PatchFormatError, match=r"skip 3 invalid for ENTRY_JUMP"):
        decode_apply_body(_body(kind=RedirectKind.ENTRY_JUMP, skip=3))


ODD = r"""
__attribute__((noipa)) int f0(int x) { return x + 1; }
__attribute__((noipa)) int f1(int x) { return x * 3 + 7; }
__attribute__((noipa)) long f2(long x) { return x * 100000 - 3; }
__attribute__((noipa)) int f3(int x) { return x > 5 ? x : -x; }
__attribute__((noipa)) int f4(int x) { return x ^ 0x55; }
__attribute__((noipa)) int f5(int x) { return x << 3; }
int main(int argc, char **argv) {
    (void)argv;
    return f0(argc) + f1(argc) + (int)f2(argc) + f3(argc) + f4(argc) + f5(argc);
}
"""


def test_odd_padded_entry_takes_the_entry_jump(tmp_path: Path) -> None:
    """At -Os (as at -O0 and -O1) GCC does not align functions: an entry with the 6+2
    NOPs may be odd, where the agent refuses the 2-byte publish. Such a function gets
    the entry jump over its two NOPs (held: the first instruction is a 1-byte NOP), or a
    refusal naming the odd entry and the remedy (found by the differential test)."""
    from patchbox.elf.binary import Binary

    flags = ["-Os", "-fPIE", *PATCH_CFLAGS]
    exe = gcc(ODD, tmp_path / "odd", *flags, "-pie", *LINK_FLAGS)
    (tmp_path / "fix").mkdir()
    fixed = ODD.replace("x + 1", "x + 2").replace("+ 7", "+ 8").replace("- 3", "- 4")
    fixed = fixed.replace("-x;", "-x - 1;").replace("0x55", "0x56").replace("<< 3", "<< 4")
    obj = gcc(fixed, tmp_path / "fix" / "odd.o", *flags, "-c")
    binary = Binary(exe)
    seen = set()
    for name in ("f0", "f1", "f2", "f3", "f4", "f5"):
        sym = binary.find_symbol(name, local=False)
        assert sym is not None
        addr = sym.address
        if addr % 2 == 0:
            [fn] = extract_patch(obj, exe, [name]).functions
            assert fn.kind == RedirectKind.PATCHABLE_ENTRY, name
            seen.add("even")
        elif addr % 8 == 7:  # rule 4: the jump's first two bytes in two words
            with pytest.raises(ExtractError, match=rf"{name}'s entry {addr:#x} is odd.*-falign"):
                extract_patch(obj, exe, [name])
            seen.add("refused")
        else:
            patch = extract_patch(obj, exe, [name])
            [fn] = patch.functions
            assert (fn.kind, fn.skip, fn.target) == (RedirectKind.ENTRY_JUMP, 0, addr), name
            assert fn.expected[:2] == b"\x90\x90"  # the two entry NOPs are overwritten
            assert patch.flags & ApplyFlag.HOLD
            seen.add("jump")
    # gcc 12 lays these six out with every case present.
    assert seen == {"even", "refused", "jump"}


def test_aarch64_entry_jump_only_over_a_nop_or_a_b() -> None:
    """aarch64 (rule 5): a B over the first instruction only where the ARM ARM allows
    the store while other cores execute it, a NOP or a B; past `bti c` the same."""
    a64 = get_arch("aarch64")
    nop, bti, stp, ret = 0xD503201F, 0xD503245F, 0xA9BF7BFD, 0xD65F03C0

    def code(*words: int) -> bytes:
        return b"".join(w.to_bytes(4, "little") for w in words)

    ok = analyse_entry("f", 0x1000, code(nop, stp, ret), arch=a64)
    assert (ok.skip, ok.first_len, ok.held) == (0, 4, False)
    assert analyse_entry("f", 0x1000, code(bti, nop, ret), arch=a64).skip == 4
    assert analyse_entry("f", 0x1000, code(0x14000010, ret), arch=a64).point == 0x1000  # b
    for words in ((stp, ret), (bti, stp, ret)):
        with pytest.raises(ExtractError, match=r"rule 5, .*a9bf7bfd\) is not a NOP or a B"):
            analyse_entry("f", 0x1000, code(*words), arch=a64)
