"""`patchbox build` on a program with two source files of one name (tier 2: ``-m
process``): ``a/util.c`` and ``b/util.c``, each with a ``static int helper`` and a
``static int count`` it steps, linked into one binary with the agent (issue 21: QEMU's
``net/vhost-vdpa.c`` and ``hw/virtio/vhost-vdpa.c``).

``.symtab`` names both files ``util.c``. Diffs change ``helper`` in a/util.c, in
b/util.c, and in both (its result and the step of ``count``); each is built, applied to
the running process, observed through its answers — the right file's function changed,
the other's not, and each file's ``count`` keeps counting from where the running program
had it (the replaced code binds to its own file's copy) — and removed. Built with ``-g``
the files are told apart by their compile units' paths; without, by the original objects'
statics and bytes.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from live import Target

from helpers import run_with_tools
from patchbox.format.layout import load_patch

pytestmark = pytest.mark.process
BIN = Path(sys.executable).parent

UTIL = """\
/* {d}/util.c: its statics share their names with the other util.c's. */
static int count = {start};

__attribute__((noinline)) static int helper(int x)
{{
	__asm__ volatile("");
	count += 1;
	return {result};
}}

int {d}_value(int x)
{{
	return helper(x) {outer};
}}

int {d}_count(void)
{{
	return count;
}}
"""
FILES = {
    "a": {"start": "100", "result": "x + 1", "outer": "* 10"},
    "b": {"start": "200", "result": "x * 2", "outer": "+ 1"},
}
# The fixes: another result, another step of count.
FIXES = {
    "a": [("count += 1;", "count += 3;"), ("x + 1;", "x + 5;")],
    "b": [("count += 1;", "count += 7;"), ("x * 2;", "x * 3;")],
}
MAIN = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int a_value(int x);
int b_value(int x);
int a_count(void);
int b_count(void);

int main(void)
{
	char name[16];
	int arg;

	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", (int)getpid());
	while (scanf("%15s %d", name, &arg) == 2) {
		if (!strcmp(name, "a"))
			printf("%d\n", a_value(arg));
		else if (!strcmp(name, "b"))
			printf("%d\n", b_value(arg));
		else if (!strcmp(name, "ac"))
			printf("%d\n", a_count());
		else if (!strcmp(name, "bc"))
			printf("%d\n", b_count());
		else
			printf("?\n");
	}
	return 0;
}
"""
MAKEFILE = """\
CFLAGS += -O2 {debug} -fPIE $(shell patchbox config --cflags)
LDLIBS := $(shell patchbox config --libs --app-version same-names)
OBJS := main.o a/util.o b/util.o

app: $(OBJS)
\t$(CC) -pie $(OBJS) $(LDLIBS) -o $@

%.o: %.c
\t$(CC) $(CFLAGS) -c $< -o $@
"""


run = run_with_tools


def write_tree(root: Path, debug: bool, fixed: str = "") -> None:
    """Writes the tree to ``root``, with the fixes of the files named in ``fixed``."""
    for d, fields in FILES.items():
        text = UTIL.format(d=d, **fields)
        for old, new in FIXES[d] if d in fixed else []:
            assert old in text
            text = text.replace(old, new)
        (root / d).mkdir(parents=True)
        (root / d / "util.c").write_text(text)
    (root / "main.c").write_text(MAIN)
    (root / "Makefile").write_text(MAKEFILE.format(debug="-g" if debug else ""))


def make_diff(tmp: Path, src: Path, fixed: str) -> Path:
    """Returns a unified diff (-p1) from ``src`` to the tree with ``fixed``'s fixes."""
    other = tmp / f"fixed-{fixed}"
    write_tree(other, debug="-g" in (src / "Makefile").read_text(), fixed=fixed)
    skip = ("-x", "*.o", "-x", "app", "-x", "sandbox-sock*")
    proc = run("diff", "-ru", *skip, src.name, other.name, cwd=tmp, check=False)
    assert proc.returncode == 1, proc.stderr
    out = tmp / f"{fixed}.patch"
    out.write_text(proc.stdout)
    return out


class Model:
    """What the target answers: each file's count and whether its helper is fixed."""

    def __init__(self) -> None:
        self.count = {"a": 100, "b": 200}
        self.fixed = {"a": False, "b": False}

    def call(self, d: str, x: int) -> str:
        self.count[d] += {"a": 3, "b": 7}[d] if self.fixed[d] else 1
        if d == "a":
            return str(((x + 5) if self.fixed[d] else (x + 1)) * 10)
        return str(((x * 3) if self.fixed[d] else (x * 2)) + 1)


def check(target: Target, model: Model) -> None:
    for d, x in (("a", 1), ("b", 2), ("a", 3), ("b", 4)):
        assert target.call(d, x) == model.call(d, x), (d, x, model.fixed)
    assert [target.call("ac"), target.call("bc")] == [str(model.count["a"]), str(model.count["b"])]


@pytest.mark.parametrize("debug", [True, False], ids=["dwarf", "no-debug-info"])
def test_same_named_statics_patched_in_each_and_both(
    tmp_path: Path, agent_dir: Path, debug: bool
) -> None:
    src = tmp_path / "src"
    write_tree(src, debug)
    run("make", cwd=src)
    helpers = [
        line.split()
        for line in run("readelf", "-sW", src / "app").stdout.splitlines()
        if line.split()[-1:] == ["helper"]
    ]
    assert len(helpers) == 2  # two static helpers, both in a FILE entry named util.c
    diffs = {fixed: make_diff(tmp_path, src, fixed) for fixed in ("a", "b", "ab")}
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}

    target = Target(src / "app")
    model = Model()
    try:
        check(target, model)
        for fixed, diff in diffs.items():
            out = tmp_path / f"fix{fixed}.pbx"
            proc = run(
                "patchbox", "build", "--source", src, "--diff", diff, "--binary", "app",
                "--explain", "-o", out,
            )  # fmt: skip
            for d in "ab":
                assert (f"{d}/util.o (util.c):" in proc.stdout) == (d in fixed), proc.stdout
            patch = load_patch(out)
            assert [f.symbol for f in patch.functions] == ["helper"] * len(fixed)
            assert len({f.target for f in patch.functions}) == len(fixed)

            run("patchbox", "apply", "-p", str(target.pid), out)
            model.fixed = {d: d in fixed for d in "ab"}
            check(target, model)

            run("patchbox", "remove", "-p", str(target.pid), f"fix{fixed}")
            model.fixed = {"a": False, "b": False}
            check(target, model)
        assert target.alive()
    finally:
        target.stop()
    after = {
        p: p.read_bytes()
        for p in src.rglob("*")
        if p.is_file() and not p.name.startswith("sandbox-sock")
    }
    assert after == before, "patchbox build modified the user's tree"


def test_both_helpers_meta_names_the_second_by_path(tmp_path: Path, agent_dir: Path) -> None:
    """The patch's meta says which file each same-named static came from: the second
    ``util.c`` by its compile unit's path in the binary."""
    src = tmp_path / "src"
    write_tree(src, debug=True)
    run("make", cwd=src)
    out = tmp_path / "both.pbx"
    diff = make_diff(tmp_path, src, "ab")
    run("patchbox", "build", "--source", src, "--diff", diff, "--binary", "app", "-o", out)
    meta = load_patch(out).meta
    assert meta["source:helper"] == "util.c"
    assert meta[f"source:helper@{src}/b/util.c"] == "util.c"
    shutil.rmtree(src)
