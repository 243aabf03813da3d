"""Nothing outside :mod:`patchbox.arch` names an architecture (issue 22): the modules of
``src/patchbox`` other than ``arch/`` read every per-architecture fact from the ``Arch``
of the binary they work on. Read from the source with :mod:`tokenize`: names, strings
(docstrings among them) and comments, so a register name in a comment counts as much
as one in code."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

from helpers import ROOT

PKG = ROOT / "src" / "patchbox"

# Architectures by name, their ELF machines, capstone's names, their landing pads.
_NAMES = (
    r"x86|amd64|i[3-6]86|aarch64|arm64|\barm\b|ia32"
    r"|\bEM_[A-Z0-9_]+|\bR_(?:X86_64|AARCH64|386|ARM)_\w*"
    r"|CS_ARCH_\w+|CS_MODE_\w+|\w+_OP_(?:IMM|REG|MEM)\b"
    r"|endbr|\bbti\b"
)
# Registers: x86-64's general and flags registers, AArch64's x0..x30 and pstate.
_REGISTERS = (
    r"\b(?:[re]?(?:ip|sp|bp|ax|bx|cx|dx|si|di)|r(?:[89]|1[0-5])[dwb]?|[re]?flags|orig_rax"
    r"|x(?:[12]?[0-9]|30)|pstate)\b"
)
ARCH_WORDS = re.compile(f"{_NAMES}|{_REGISTERS}", re.IGNORECASE)

# Modules that may name one, each with its reason. None: the patch's machine field
# (patchbox.arch.Machine) and the entry's facts moved into the room (issue 22).
EXCEPTIONS: dict[str, str] = {}

# Words that match the patterns but name no architecture.
_NOT_ARCH = {
    "sp",  # a stack pointer in general (Frame.sp, SyscallInfo.sp)
    "ip",  # an instruction pointer in general (SyscallInfo.ip)
    "flags",  # any flags word (ELF sh_flags, apply flags)
    "di",
}


def _words(path: Path) -> list[tuple[int, str]]:
    """Returns (line, word) of every architecture name in ``path``'s names, strings and
    comments."""
    found = []
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    for tok in tokens:
        if tok.type not in (tokenize.NAME, tokenize.STRING, tokenize.COMMENT):
            continue
        for m in ARCH_WORDS.finditer(tok.string):
            if m[0].lower() not in _NOT_ARCH:
                found.append((tok.start[0] + tok.string[: m.start()].count("\n"), m[0]))
    return found


def _modules() -> list[Path]:
    return sorted(
        p
        for p in PKG.rglob("*.py")
        if "arch" not in p.relative_to(PKG).parts[:1] and "_agent" not in p.parts
    )


def test_only_arch_names_an_architecture() -> None:
    wrong = [
        f"src/patchbox/{rel}:{line}: {word}"
        for path in _modules()
        if (rel := path.relative_to(PKG).as_posix()) not in EXCEPTIONS
        for line, word in _words(path)
    ]
    assert not wrong, "move these facts into src/patchbox/arch:\n" + "\n".join(wrong)


def test_exceptions_are_needed() -> None:
    """An exception whose module no longer names an architecture goes."""
    idle = [rel for rel in EXCEPTIONS if not _words(PKG / rel)]
    assert not idle, idle


def test_the_patterns_find_what_they_should() -> None:
    for text in (
        "R_X86_64_PC32",
        "EM_AARCH64",
        "capstone.CS_ARCH_X86",
        "X86_OP_IMM",
        "regs.rip",
        "orig_rax",
        "%rsp",
        "endbr64",
        "x86-64",
        "arm64",
        "x30",
        "pstate",
        "r12",
    ):
        assert ARCH_WORDS.search(text), text
    for text in ("strip", "syntax", "0x10", "sp", "max0", "flags", "index", "arrange"):
        m = ARCH_WORDS.search(text)
        assert m is None or m[0].lower() in _NOT_ARCH, (text, m)
