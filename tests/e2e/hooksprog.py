"""The program of the hooks and shadow-variable tests and its fix (test_hooks_shadow.py on
x86-64, test_aarch64_hooks.py under qemu-aarch64): `struct conn` objects the running
program holds, a fix that attaches a `total` field to them as a shadow variable and
frees the shadows in its post-remove hook; every hook notes its name in $HOOK_LOG, and
the pre-apply hook refuses (7) while the file $REFUSE exists."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from helpers import run_tool

__all__ = ["PROGRAM", "FIX", "HOOK_ORDER", "App", "shadow_and_hook_order", "refused_by_pre_apply"]

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

# What the log holds after apply, remove, apply.
HOOK_ORDER = ["pre_apply", "post_apply", "pre_remove", "post_remove", "pre_apply", "post_apply"]


class App:
    """The running program (under ``runner``, e.g. qemu-aarch64, when given), driven
    through its stdin/stdout; its agent's socket awaited beside ``exe``."""

    def __init__(self, exe: Path, env: dict[str, str], runner: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [*runner, str(exe)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"
        self.pid = self.proc.pid
        sock = exe.parent / f"sandbox-sock{self.pid}"
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "no agent socket"
            time.sleep(0.01)

    def serve(self, i: int) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def shadow_and_hook_order(app: App, patch: Path, log: Path) -> None:
    """Apply, remove, apply again: the shadow field lives while applied, the post-remove
    hook frees it, the hooks ran in their order."""
    try:
        assert [app.serve(0), app.serve(0), app.serve(1)] == [1, 2, 1]
        run_tool("patchbox", "apply", "-p", app.pid, patch)
        # conns[0] already has len 2: the new field starts at 0 for it, then grows.
        assert [app.serve(0), app.serve(0), app.serve(1)] == [3010, 4020, 2010]
        run_tool("patchbox", "remove", "-p", app.pid, "total")
        assert app.serve(0) == 5
        run_tool("patchbox", "apply", "-p", app.pid, patch)
        assert app.serve(0) == 6010  # the shadows were freed by the post-remove hook
        assert log.read_text().split() == HOOK_ORDER
        assert app.alive()
    finally:
        app.stop()


def refused_by_pre_apply(app: App, patch: Path, refuse: Path) -> None:
    """The pre-apply hook refuses while ``refuse`` exists: nothing applied; then it
    applies."""
    try:
        refuse.write_text("")
        res = run_tool("patchbox", "apply", "-p", app.pid, patch, check=False)
        assert res.returncode == 1 and "HOOK_FAILED" in res.stderr and "returned 7" in res.stderr
        assert app.serve(0) == 1
        assert run_tool("patchbox", "list", "-p", app.pid, "--json").stdout.strip() == "[]"
        refuse.unlink()
        run_tool("patchbox", "apply", "-p", app.pid, patch)
        assert app.serve(0) == 2010
        assert app.alive()
    finally:
        app.stop()
