"""Plain objects (compiled without ``-ffunction-sections``): the replaced function shares
one ``.text`` with others, and the patch must run exactly the function asked for
(docs/patch-format.md, "How extract-patch fills it"; tier 2: ``-m process``).

The fixed object changes ``f`` (selected) and also ``g`` (global) and ``h`` (static),
which ``f`` calls — ``h`` through a call the assembler resolved without a relocation —
and ``f`` compares a pointer the program stored with ``&g``. Applied to a running
process, ``f`` must call the program's own ``g`` and ``h`` and see its ``g`` as ``&g``,
exactly as the same object compiled with ``patchbox config --cflags`` does.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import compile_c, run_tool
from patchbox.format.layout import load_patch

pytestmark = pytest.mark.process

PROGRAM = r"""
#include <stdio.h>
#include <string.h>
__attribute__((noinline, noclone)) int g(int x) { return x + @G@; }
__attribute__((noinline, noclone, used)) static int h(int x) { return x * @H@; }
@EXTRA@
int (*g_ptr)(int) = g;
__attribute__((noinline, noclone)) int f(int x) { return @F@; }
int main(void)
{
	char cmd[16];
	int x;
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	while (scanf("%15s %d", cmd, &x) == 2) {
		if (!strcmp(cmd, "f"))
			printf("%d\n", f(x));
		else if (!strcmp(cmd, "g"))
			printf("%d\n", g(x));
		else if (!strcmp(cmd, "h"))
			printf("%d\n", h(x));
	}
	return 0;
}
"""
ORIGINAL = {"G": "1", "H": "2", "F": "g(x) + h(x)", "EXTRA": ""}
# f changed as asked; g and h changed too, but only f is selected.
FIXED = {"G": "100", "H": "200", "F": "10000 * (g_ptr == g) + g(x) + h(x) + 7"}


def source(**changes: str) -> str:
    src = PROGRAM
    for key, value in {**ORIGINAL, **changes}.items():
        src = src.replace(f"@{key}@", value)
    return src


def plain_object(where: Path, src: str, name: str = "prog") -> Path:
    """Returns ``where/name.o``: ``src`` compiled as code built without patchbox's flags."""
    where.mkdir(exist_ok=True)
    c = where / f"{name}.c"
    c.write_text(src)
    out = where / f"{name}.o"
    subprocess.run(["gcc", "-O2", "-fPIE", "-c", str(c), "-o", str(out)], check=True)
    return out


class Prog:
    """The running program, asked over stdin/stdout."""

    def __init__(self, exe: Path) -> None:
        self.proc = subprocess.Popen(
            [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def ask(self, cmd: str, x: int) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{cmd} {x}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def stop(self) -> None:
        alive = self.proc.poll() is None
        self.proc.kill()
        self.proc.wait()
        assert alive, "the program died"


@pytest.fixture()
def prog(tmp_path: Path) -> Path:
    """Returns the program, built with patchbox's flags and agent as usual."""
    (tmp_path / "bin").mkdir()
    return compile_c(source(), tmp_path / "bin" / "prog", agent=True)


@pytest.mark.parametrize("built", ["plain", "with-flags"])
def test_only_the_selected_function_runs_new_code(built: str, prog: Path, tmp_path: Path) -> None:
    """`extract-patch --function f` of an object that also changes g and h: f runs new
    code, calling the program's g and h (h reached by an assembler-resolved call) and
    comparing the program's &g; g and h themselves stay as they were."""
    fix = tmp_path / "fix"
    if built == "plain":
        obj = plain_object(fix, source(**FIXED))
    else:
        fix.mkdir()
        obj = compile_c(source(**FIXED), fix / "prog.o", obj=True)
    pbx = tmp_path / "f.pbx"
    run_tool("extract-patch", "--function", "f", "--name", "f", "-o", pbx, obj, prog)
    patch = load_patch(pbx)
    assert [f.symbol for f in patch.functions] == ["f"]
    assert not any(k.startswith("new:") for k in patch.meta), patch.meta  # g, h not copied
    p = Prog(prog)
    try:
        assert (p.ask("f", 5), p.ask("g", 5), p.ask("h", 5)) == (16, 6, 10)
        run_tool("patchbox", "apply", "-p", p.proc.pid, pbx)
        # 10000 (the program's &g) + g(5) = 6 + h(5) = 10 + 7
        assert (p.ask("f", 5), p.ask("g", 5), p.ask("h", 5)) == (10023, 6, 10)
        run_tool("patchbox", "remove", "-p", p.proc.pid, "f")
        assert p.ask("f", 5) == 16
    finally:
        p.stop()


def test_a_function_the_program_lacks_is_copied(prog: Path, tmp_path: Path) -> None:
    """A new static helper in the same plain .text: the program has none, so it is copied
    (and only it), and f's assembler-resolved call to it stays inside the patch."""
    extra = "__attribute__((noinline, noclone)) static int k(int x) { return x * 1000; }"
    obj = plain_object(tmp_path / "fix", source(EXTRA=extra, F="k(x) + g(x)", G="100"))
    pbx = tmp_path / "f.pbx"
    run_tool("extract-patch", "--function", "f", "--name", "f", "-o", pbx, obj, prog)
    assert sorted(k for k in load_patch(pbx).meta if k.startswith("new:")) == ["new:k"]
    p = Prog(prog)
    try:
        run_tool("patchbox", "apply", "-p", p.proc.pid, pbx)
        assert p.ask("f", 5) == 5000 + 6  # the new k, the program's g
    finally:
        p.stop()


def test_a_static_the_program_cannot_name_is_refused(prog: Path, tmp_path: Path) -> None:
    """The fixed object compiled under another file name: the program has no static
    symbols of that file, so its h cannot be found; copying h would run code nobody
    selected. Refused, naming h and the remedy."""
    obj = plain_object(tmp_path / "fix", source(**FIXED), name="other")
    proc = run_tool(
        "extract-patch", "--function", "f", "-o", tmp_path / "f.pbx", obj, prog, check=False
    )
    assert proc.returncode != 0
    assert "reaches static h" in proc.stderr and "-ffunction-sections" in proc.stderr, proc.stderr


def test_a_short_jump_to_a_program_function_is_refused(prog: Path, tmp_path: Path) -> None:
    """f tail-jumps to h with a 2-byte jmp the assembler resolved: the program's h is
    out of a short jump's reach, and copying h would run code nobody selected."""
    fix = tmp_path / "fix"
    fix.mkdir()
    (fix / "prog.s").write_text(
        """\t.file "prog.c"
\t.text
\t.type h, @function
h:
\tleal (%rdi,%rdi), %eax
\tret
\t.size h, .-h
\t.globl f
\t.type f, @function
f:
\tjmp h
\t.size f, .-f
\t.globl g
\t.type g, @function
g:
\tleal 1(%rdi), %eax
\tret
\t.size g, .-g
"""
    )
    obj = fix / "prog.o"
    subprocess.run(["gcc", "-c", str(fix / "prog.s"), "-o", str(obj)], check=True)
    proc = run_tool(
        "extract-patch", "--function", "f", "-o", tmp_path / "f.pbx", obj, prog, check=False
    )
    assert proc.returncode != 0
    assert "short jmp" in proc.stderr and "goes to h" in proc.stderr, proc.stderr
