"""Apply/remove hooks and shadow variables (tier 2: `-m process`): the escape hatch for a
fix that needs a new field in objects the running program already holds.

The running program keeps `struct conn { int fd; int len; }` objects; the fix wants a
`total` field. The patch attaches it as a shadow variable (patchbox/shadow.h), frees the
shadows in a post-remove hook, and a pre-apply hook can refuse the apply. Behaviour and
hook order are observed from outside (stdout, a log file the hooks append to).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import compile_c, run_tool
from patchbox import config

pytestmark = pytest.mark.process

PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
struct conn { int fd; int len; };
static struct conn conns[4];
__attribute__((noipa)) int serve(int i)
{
	struct conn *c = &conns[i & 3];
	c->len++;
	return c->len;
}
int main(void)
{
	int i;
	printf("ready\n");
	fflush(stdout);
	while (scanf("%d", &i) == 1) {
		printf("%d\n", serve(i));
		fflush(stdout);
	}
	return 0;
}
"""

FIX = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <patchbox/patch.h>
#include <patchbox/shadow.h>
struct conn { int fd; int len; };
static struct conn conns[4];
#define SHADOW_TOTAL 1

static void note(const char *what)
{
	FILE *f = fopen(getenv("HOOK_LOG"), "a");
	if (f) {
		fprintf(f, "%s\n", what);
		fclose(f);
	}
}

__attribute__((noipa)) int serve(int i)
{
	struct conn *c = &conns[i & 3];
	c->len++;
	long *total = patchbox_shadow_get_or_alloc(c, SHADOW_TOTAL, sizeof(long));
	if (!total)
		return -1;
	*total += 10;
	return c->len * 1000 + (int)*total;
}

static int pre_apply(void)
{
	note("pre_apply");
	return access(getenv("REFUSE"), F_OK) == 0 ? 7 : 0;
}
static int post_apply(void) { note("post_apply"); return 0; }
static int pre_remove(void) { note("pre_remove"); return 0; }
static int post_remove(void)
{
	patchbox_shadow_free_all(SHADOW_TOTAL);
	note("post_remove");
	return 0;
}
PATCHBOX_HOOK(pre_apply, pre_apply);
PATCHBOX_HOOK(post_apply, post_apply);
PATCHBOX_HOOK(pre_remove, pre_remove);
PATCHBOX_HOOK(post_remove, post_remove);
"""


class App:
    def __init__(self, exe: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [str(exe)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"
        self.pid = self.proc.pid
        sock = exe.parent / f"sandbox-sock{self.pid}"
        for _ in range(500):
            if sock.exists():
                break
            import time

            time.sleep(0.01)

    def serve(self, i: int) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture()
def setup(tmp_path: Path, agent_dir: Path) -> dict[str, Path]:
    (tmp_path / "app").mkdir()
    (tmp_path / "fix").mkdir()
    exe = compile_c(PROGRAM, tmp_path / "app" / "conn", agent=True)
    inc = config.include_dir()
    assert inc is not None
    obj = compile_c(FIX, tmp_path / "fix" / "conn.o", obj=True, extra=[f"-I{inc}"])
    pbx = tmp_path / "fix.pbx"
    run_tool("extract-patch", "--function", "serve", "--name", "total", "-o", pbx, obj, exe)
    return {"exe": exe, "patch": pbx, "log": tmp_path / "hooks.log", "refuse": tmp_path / "refuse"}


def test_shadow_field_and_hook_order(setup: dict[str, Path]) -> None:
    shown = run_tool("patchbox", "show", setup["patch"], "--json").stdout
    assert '"hooks"' in shown and "pre_apply" in shown.lower()
    app = App(setup["exe"], {"HOOK_LOG": str(setup["log"]), "REFUSE": str(setup["refuse"])})
    try:
        assert [app.serve(0), app.serve(0), app.serve(1)] == [1, 2, 1]
        run_tool("patchbox", "apply", "-p", app.pid, setup["patch"])
        # conns[0] already has len 2: the new field starts at 0 for it, then grows.
        assert [app.serve(0), app.serve(0), app.serve(1)] == [3010, 4020, 2010]
        run_tool("patchbox", "remove", "-p", app.pid, "total")
        assert app.serve(0) == 5
        run_tool("patchbox", "apply", "-p", app.pid, setup["patch"])
        assert app.serve(0) == 6010  # the shadows were freed by the post-remove hook
        assert setup["log"].read_text().split() == [
            "pre_apply",
            "post_apply",
            "pre_remove",
            "post_remove",
            "pre_apply",
            "post_apply",
        ]
    finally:
        app.stop()


def test_pre_apply_hook_refuses_and_nothing_changes(setup: dict[str, Path]) -> None:
    app = App(setup["exe"], {"HOOK_LOG": str(setup["log"]), "REFUSE": str(setup["refuse"])})
    try:
        setup["refuse"].write_text("")
        res = run_tool("patchbox", "apply", "-p", app.pid, setup["patch"], check=False)
        assert res.returncode == 1 and "HOOK_FAILED" in res.stderr and "returned 7" in res.stderr
        assert app.serve(0) == 1
        assert run_tool("patchbox", "list", "-p", app.pid, "--json").stdout.strip() == "[]"
        setup["refuse"].unlink()
        run_tool("patchbox", "apply", "-p", app.pid, setup["patch"])
        assert app.serve(0) == 2010
    finally:
        app.stop()
