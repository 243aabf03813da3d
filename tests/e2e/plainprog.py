"""Programs built with plain gcc, no patchbox flag and no agent (the reach tests and the
attacks on `attach`): a loop answering one line per line on stdin, and the function it
calls, which the tests patch."""

from __future__ import annotations

import subprocess
from pathlib import Path

from helpers import run_tool

__all__ = ["ANSWER", "LOOP", "gcc", "patch_cflags"]

LOOP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int answer(int x);
int main(void) {
    char line[128];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "atoi ", 5))
            printf("%d\n", atoi(line + 5));
        else
            printf("%d\n", answer(atoi(line)));
    }
    return 0;
}
"""
# -O0 keeps the calls (glibc's stdlib.h inlines atoi into strtol when optimising); the
# functions start with push %rbp (1 byte): their entry jumps are held.
ANSWER = "__attribute__((noipa)) int answer(int x) { return x * @MUL@ + 3; }\n"


def gcc(out: Path, src: str, *flags: str, libs: tuple[str, ...] = ()) -> Path:
    """Returns ``out`` after compiling C source text ``src`` with plain gcc and ``flags``."""
    c = out.with_suffix(".c")
    c.write_text(src)
    cmd = ["gcc", *flags, str(c), "-o", str(out), *libs]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def patch_cflags() -> list[str]:
    """Returns the flags of `patchbox config --cflags` (for the objects of fixes)."""
    return run_tool("patchbox", "config", "--cflags").stdout.split()
