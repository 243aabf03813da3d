"""The mutant generator and the oracle of the differential tiers (unit tier: Csmith and
gcc, no agent).

A mutant generator that silently produced the original, or an oracle that ran one version
whatever it was told, would make every differential check pass: these tests fail then.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from difftest import CSMITH_OPTS, executed_lines, refusal
from mutate import KINDS, mutate, oracle_source, parse

SEED = 4  # a quick program (runs in milliseconds) with every kind of site


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("csmith") / "prog.c"
    # Csmith writes platform.info into its working directory.
    subprocess.run(
        ["csmith", "--seed", str(SEED), *CSMITH_OPTS, "-o", str(out)], check=True, cwd=out.parent
    )
    return out.read_text()


def test_parse_finds_every_function(program: str) -> None:
    prog = parse(program)
    names = [f.name for f in prog.functions]
    assert names[0] == "func_1" and names[-1] == "main"
    for f in prog.functions:
        assert prog.lines[f.start - 0].rstrip().endswith(")")
        assert prog.lines[f.body - 1].strip() == "{" and prog.lines[f.end] == "}"
    assert prog.globals and all(g.line < prog.first_code for g in prog.globals)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "inline"])
def test_each_kind_changes_the_source_reproducibly(program: str, kind: str) -> None:
    m = mutate(program, kind, SEED, 0)
    assert m is not None and m.kind == kind
    assert m.text != program
    again = mutate(program, kind, SEED, 0)
    assert again is not None and again.text == m.text
    candidates = [mutate(program, kind, SEED, c) for c in range(1, 6)]
    assert None not in candidates
    others = {c.text for c in candidates if c is not None}
    assert others - {m.text}, "candidates all alike"
    changed = [(a, b) for a, b in zip(program.splitlines(), m.text.splitlines()) if a != b]
    if kind in ("operator", "constant", "string", "data"):
        assert len(changed) == 1  # one line, same line count
        assert len(program.splitlines()) == len(m.text.splitlines())
    if kind == "data":
        assert changed[0][0].startswith("static") and " g_" in changed[0][0]
    if kind == "string":
        assert '"#' in changed[0][1]
    if kind in ("helper", "global"):
        assert ("static " if kind == "helper" else "pb_global(") in m.text
        assert f"pb_{kind}(" in m.text
    if kind == "stmt_add":
        assert len(m.text.splitlines()) == len(program.splitlines()) + 1
    if kind == "stmt_remove":
        assert len(m.text.splitlines()) == len(program.splitlines()) - 1


def test_inline_needs_an_inlined_function(program: str) -> None:
    assert mutate(program, "inline", SEED, 0, inlined=frozenset()) is None
    m = mutate(program, "inline", SEED, 0, inlined=frozenset({"func_1"}))
    assert m is not None and m.function == "func_1"


def test_no_mutation_inside_brackets_or_for_headers(program: str) -> None:
    for c in range(40):
        for kind in ("operator", "constant"):
            m = mutate(program, kind, SEED, c)
            assert m is not None
            old, new = next(
                (a, b) for a, b in zip(program.splitlines(), m.text.splitlines()) if a != b
            )
            assert not old.lstrip().startswith("for ")
            at = next(i for i, (x, y) in enumerate(zip(old, new)) if x != y)
            assert old[:at].count("[") == old[:at].count("]"), (old, new)


def _run(exe: Path, commands: str) -> list[str]:
    """Returns the output of each run the driver made for ``commands``."""
    out = subprocess.run(
        [str(exe)], input=commands, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    runs: list[str] = []
    current: list[str] = []
    for line in out.removeprefix("ready\n").splitlines(keepends=True):
        if line.startswith("=== "):
            runs.append("".join(current))
            current = []
        else:
            current.append(line)
    return runs


def test_oracle_switches_version_by_command(program: str, tmp_path: Path) -> None:
    """The oracle runs the original's code for "iter o" and the mutant's for "iter m",
    each as the separate programs do (from a fresh start, one iteration)."""
    from difftest import HERE

    cc = ["gcc", "-O2", "-w", "-I/usr/include/csmith"]

    def build(name: str, src: str) -> Path:
        c = tmp_path / f"{name}.c"
        c.write_text(src)
        subprocess.run([*cc, "-Dmain=csmith_main", "-c", str(c), "-o", f"{c}.o"], check=True)
        subprocess.run(
            [*cc, str(HERE / "driver.c"), f"{c}.o", "-o", str(tmp_path / name)], check=True
        )
        return tmp_path / name

    o = _run(build("orig", program), "fork\n")[0]
    # The first mutant that prints otherwise: a global updated in code that runs.
    live = executed_lines(tmp_path, program)
    for c in range(20):
        m = mutate(program, "stmt_add", SEED, c, live=live)
        assert m is not None
        mm = _run(build(f"mut{c}", m.text), "fork\n")[0]
        if mm != o:
            break
    assert mm != o and m is not None, "no mutant of 20 prints otherwise"
    (tmp_path / "oracle.c").write_text(oracle_source(program, m.text))
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-w",
            "-I/usr/include/csmith",
            "-DPB_ORACLE",
            str(HERE / "driver.c"),
            str(tmp_path / "oracle.c"),
            "-o",
            str(tmp_path / "oracle"),
        ],
        check=True,
    )
    assert _run(tmp_path / "oracle", "iter o\n")[0] == o
    assert _run(tmp_path / "oracle", "iter m\n")[0] == mm


def test_oracle_refuses_a_data_mutant(program: str) -> None:
    m = mutate(program, "data", SEED, 0)
    assert m is not None
    with pytest.raises(ValueError, match="globals"):
        oracle_source(program, m.text)


def test_refusal_names_a_reason_or_is_an_error() -> None:
    assert refusal("patchbox: error: the diff changes no function of the program")[0] == (
        "no function changed"
    )
    explain = (
        "prog.o (prog.c):\n"
        "  in       function csmith_main     changed: no longer references g_409\n"
        "  refused  variable g_6   initial value of existing variable changed: ...\n"
        "patchbox: error: refused: prog.o: g_6: initial value of existing variable changed\n"
    )
    category, message = refusal(explain)
    assert category == "initial value changed"
    assert "csmith_main" not in message and message.startswith("refused  variable g_6")
    ro = "refused  variable g_361  writable static variable is read-only in the patched object"
    assert refusal(ro)[0] == "static variable made read-only"
    assert refusal("Traceback (most recent call last):\n  File ...\nKeyError: 'x'")[0] == ""
    assert refusal("")[0] == ""
    assert refusal("some output\nwithout an error line")[0] == ""
    assert refusal("patchbox: error: something new")[0] == "other"


def test_oracle_gives_the_mutant_its_own_copy_of_private_globals(
    program: str, tmp_path: Path
) -> None:
    """A global the patch carries as its own (the original object folded it) is a
    separate variable for the mutant's code in the oracle; printed names stay."""
    g = next(g for g in parse(program).globals if not g.dims)
    src = oracle_source(program, program, frozenset({g.name}))
    code = src[src.index("int pb_use_mutant;") :]
    o_part, m_part = code.split("m_func_1(void);", 1) if "m_func_1(void);" in code else (code, "")
    assert f"m_{g.name}" in m_part and f"m_{g.name}" not in o_part
    assert f'"{g.name}"' in m_part  # the name printed with the checksum
    assert f"static {g.ctype} m_{g.name}" in src.replace("  ", " ")
    (tmp_path / "o.c").write_text(src)
    subprocess.run(
        [
            "gcc",
            "-O0",
            "-w",
            "-I/usr/include/csmith",
            "-c",
            str(tmp_path / "o.c"),
            "-o",
            str(tmp_path / "o.o"),
        ],
        check=True,
    )
