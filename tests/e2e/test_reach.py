"""Reach (docs/reach.md): processes and libraries not built for patchbox.

Every program here is built with plain gcc, no patchbox flag and no agent; each is
started, `patchbox attach` loads the agent into it, and patches are applied through
entry jumps (held when one atomic store cannot publish them) into the executable, a
library built without flags (with endbr64 entries) and glibc itself. Everything is
observed from outside: the programs' answers on stdout, their memory through /proc.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from live import Target
from plainprog import ANSWER, LOOP, gcc, patch_cflags

from helpers import info_json, run_tool, unique_build_id
from patchbox.config import preload
from patchbox.format.layout import load_patch
from patchbox.procfs import find_mapped, read_maps
from patchbox.reach.attach import AttachError, attach, yama_refusal
from patchbox.wire import ApplyFlag

pytestmark = pytest.mark.process
run = run_tool


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A program with no agent and no patchbox flag: `answer` in the executable."""
    d = tmp_path_factory.mktemp("reach")
    return gcc(d / "plain", LOOP + ANSWER.replace("@MUL@", "7"), "-O0", "-Wl,--build-id")


@pytest.fixture(scope="module")
def with_lib(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(program, libanswer.so): `answer` in a library built without flags, endbr64
    entries (-fcf-protection) at 16-aligned addresses: P is byte 4 of its word."""
    d = tmp_path_factory.mktemp("reachlib")
    lib = gcc(
        d / "libanswer.so",
        ANSWER.replace("@MUL@", "7").replace(
            "int answer", "__attribute__((aligned(16))) int answer"
        ),
        "-O2",
        "-fPIC",
        "-shared",
        "-fcf-protection=full",
        unique_build_id(),  # apply --all --attach selects by it
    )
    exe = gcc(
        d / "uselib", LOOP, "-O0", "-Wl,--build-id", libs=(f"-L{d}", "-lanswer", f"-Wl,-rpath,{d}")
    )
    return exe, lib


def start(exe: Path, *args: str) -> Target:
    """Starts ``exe`` (no agent) with ``args`` and returns it once it answers."""
    t = Target.__new__(Target)
    t.exe = exe
    t.proc = subprocess.Popen(
        [str(exe), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    t._keep_pipes()
    t.pid = t.proc.pid
    assert t._readline(10) == f"ready {t.pid}"
    return t


@pytest.fixture()
def procs() -> Iterator[list[Target]]:
    started: list[Target] = []
    yield started
    for t in started:
        alive = t.alive()
        t.stop()
        assert alive, f"pid {t.pid} died: {t.stderr_text}"


def test_attach_loads_the_agent_and_restores_the_thread(plain: Path, procs: list[Target]) -> None:
    t = start(plain)
    procs.append(t)
    assert t.call("5") == "38"
    maps_before = {(m.start, m.path) for m in read_maps(t.pid)}
    out = run("patchbox", "attach", "-p", t.pid).stdout
    m = re.match(
        rf"attached to pid {t.pid}: libsandbox.so loaded by thread {t.pid} \(interrupted in "
        r"read\), stopped (\d+\.\d+) ms; agent .*sandbox-sock",
        out,
    )
    assert m, out
    assert float(m[1]) < 1000
    # The interrupted read() was restarted: the program answers as before.
    assert t.call("5") == "38" and t.call("6") == "45"
    info = info_json(t.pid)
    assert info["exe"] == str(plain) and int(info["agent_tid"]) != t.pid
    assert run("patchbox", "test", "-p", t.pid).returncode == 0
    after = {(m.start, m.path) for m in read_maps(t.pid)}
    assert {p for _s, p in after - maps_before} >= {str(preload().resolve())}
    refused = run("patchbox", "attach", "-p", t.pid, check=False)
    assert refused.returncode == 1 and "has an agent already" in refused.stderr


def _state(pid: int) -> tuple[set[tuple[int, int, str]], str]:
    """Returns what a refused attach must leave alone: the memory map, the tracer."""
    maps = {(m.start, m.end, m.path) for m in read_maps(pid)}
    return maps, Path(f"/proc/{pid}/status").read_text().split("TracerPid:")[1].split()[0]


def _refused(pid: int, why: str) -> None:
    before = _state(pid)
    proc = run("patchbox", "attach", "-p", pid, check=False)
    assert proc.returncode == 1, proc.stdout
    assert re.search(why, proc.stderr), proc.stderr
    assert _state(pid) == before  # untouched


def test_refused_under_a_seccomp_filter(tmp_path: Path, procs: list[Target]) -> None:
    src = LOOP.replace(
        "int main(void) {",
        "#include <linux/filter.h>\n#include <linux/seccomp.h>\n#include <sys/prctl.h>\n"
        "int main(void) {\n"
        "    struct sock_filter allow = BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);\n"
        "    struct sock_fprog prog = { 1, &allow };\n"
        "    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);\n"
        "    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);\n",
    ) + ANSWER.replace("@MUL@", "7")
    t = start(gcc(tmp_path / "seccomp", src, "-O0"))
    procs.append(t)
    _refused(t.pid, r"seccomp filter \(Seccomp: 2\)")
    assert t.call("1") == "10"


def test_refused_for_a_static_binary(tmp_path: Path, procs: list[Target]) -> None:
    t = start(gcc(tmp_path / "static", LOOP + ANSWER.replace("@MUL@", "7"), "-O0", "-static"))
    procs.append(t)
    _refused(t.pid, r"is a static binary: no dynamic loader")
    assert t.call("1") == "10"


def test_refused_when_another_tracer_is_attached(plain: Path, procs: list[Target]) -> None:
    t = start(plain)
    procs.append(t)
    tracer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import ctypes, sys, time\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            f"assert libc.ptrace(0x4206, {t.pid}, None, None) == 0\n"
            "print('seized', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert tracer.stdout is not None  # pipes
    try:
        assert tracer.stdout.readline().strip() == "seized"
        _refused(t.pid, rf"already traced by pid {tracer.pid} \(python")
    finally:
        tracer.kill()
        tracer.wait()
    assert t.call("1") == "10"


def test_yama_rules_and_the_live_setting(plain: Path, procs: list[Target]) -> None:
    assert "no process may be traced" in yama_refusal(3, 1, True, True)
    assert "CAP_SYS_PTRACE" in yama_refusal(2, 1, False, True)
    assert yama_refusal(2, 1, True, False) == ""
    assert "not a descendant" in yama_refusal(1, 1, False, False)
    assert yama_refusal(1, 1, False, True) == "" and yama_refusal(0, 1, False, False) == ""
    scope = Path("/proc/sys/kernel/yama/ptrace_scope")
    if not scope.exists() or not os.access(scope, os.W_OK):
        pytest.skip("no writable Yama ptrace_scope on this kernel: the rules above only")
    old = scope.read_text()
    t = start(plain)
    procs.append(t)
    try:
        scope.write_text("3")
        _refused(t.pid, r"Yama ptrace_scope is 3")
    except OSError:
        pytest.skip("ptrace_scope cannot be set back once 3; not tried")
    finally:
        try:
            scope.write_text(old)
        except OSError:
            pass


def _extract(obj: Path, ref: Path, name: str, *extra: str) -> Path:
    out = obj.parent / f"{name}.pbx"
    run("extract-patch", "--function", "answer", "--name", name, *extra, "-o", out, obj, ref)
    return out


def _hammer(t: Target, stop: threading.Event, seen: set[str]) -> None:
    """Calls answer(2) in the target as fast as it answers (its one thread busy in it)."""
    while not stop.is_set():
        seen.add(t.call("2"))


def test_held_entry_jump_in_a_stock_executable_under_load(
    plain: Path, tmp_path: Path, procs: list[Target]
) -> None:
    t = start(plain)
    procs.append(t)
    run("patchbox", "attach", "-p", t.pid)
    obj = gcc(tmp_path / "fix.o", ANSWER.replace("@MUL@", "7 + 1"), "-O0", *patch_cflags(), "-c")
    pbx = _extract(obj, plain, "held")
    assert load_patch(pbx).flags & ApplyFlag.HOLD  # push %rbp: 1 byte
    stop, seen = threading.Event(), set[str]()
    # A second caller: the program's own thread answers while the patch goes in and out.
    worker = threading.Thread(target=_hammer, args=(t, stop, seen))
    worker.start()
    try:
        for _ in range(10):
            out = run("patchbox", "apply", "-p", t.pid, pbx).stdout
            assert re.search(r"held \d+ thread\(s\) for at most \d+\.\d+ ms", out), out
            run("patchbox", "remove", "-p", t.pid, "held")
    finally:
        stop.set()
        worker.join()
    assert seen <= {"17", "18"} and "17" in seen
    run("patchbox", "apply", "-p", t.pid, pbx)
    assert t.call("2") == "18"
    run("patchbox", "remove", "-p", t.pid, "held")
    assert t.call("2") == "17"


# A program holding, on demand, the two kinds of stack no thread runs on that the hold
# must see (docs/reach.md, "What the hold sees"): a thread in a signal handler on its
# alternate stack that interrupted a handler on its own stack whose saved PC lies inside
# answer's first bytes (the state a signal arriving right after answer's first
# instruction leaves, with a second, SA_ONSTACK, signal on top), and a suspended
# makecontext coroutine, on a stack of its own with a guard page as QEMU allocates them,
# holding such a word (as a return address there would be).
STACKS = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
int answer(int x);
static uintptr_t inside(void) { return (uintptr_t)answer + 1; }
static int park[2];
static char parked[64];
static void on_alt(int sig) {
    char c;
    (void)sig;
    (void)!write(1, parked, strlen(parked));
    (void)!read(park[0], &c, 1);
}
static void on_plain(int sig, siginfo_t *si, void *ucv) {
    ucontext_t *uc = ucv;
    greg_t pc = uc->uc_mcontext.gregs[REG_RIP];
    (void)sig; (void)si;
    uc->uc_mcontext.gregs[REG_RIP] = (greg_t)inside();
    pthread_kill(pthread_self(), SIGUSR2);
    uc->uc_mcontext.gregs[REG_RIP] = pc;
}
static void *alt_thread(void *arg) {
    pthread_attr_t attr;
    void *lo;
    size_t size;
    stack_t ss = { .ss_size = 65536 };
    (void)arg;
    pthread_getattr_np(pthread_self(), &attr);
    pthread_attr_getstack(&attr, &lo, &size);
    snprintf(parked, sizeof parked, "parked %lx-%lx\n", (unsigned long)lo, (unsigned long)lo + size);
    ss.ss_sp = mmap(NULL, ss.ss_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    sigaltstack(&ss, NULL);
    pthread_kill(pthread_self(), SIGUSR1);
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, NULL);
    munmap(ss.ss_sp, ss.ss_size);
    return NULL;
}
static ucontext_t main_ctx, co_ctx;
static char *co_stack;
static const size_t co_size = 256 * 1024;
static void co_body(void) {
    volatile uintptr_t ret = inside();
    swapcontext(&co_ctx, &main_ctx);
    (void)ret;
}
int main(void) {
    char line[128];
    pthread_t t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa = { .sa_sigaction = on_plain, .sa_flags = SA_SIGINFO };
    sigaction(SIGUSR1, &sa, NULL);
    struct sigaction sb = { .sa_handler = on_alt, .sa_flags = SA_ONSTACK };
    sigaction(SIGUSR2, &sb, NULL);
    printf("ready %d\n", getpid());
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "alt", 3)) {
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            if (line[3] == ' ')
                pthread_attr_setstacksize(&attr, strtoul(line + 4, NULL, 0));
            if (pipe(park) || pthread_create(&t, &attr, alt_thread, NULL))
                return 1;
        } else if (!strncmp(line, "unpark", 6)) {
            (void)!write(park[1], "x", 1);
            pthread_join(t, NULL);
            close(park[0]);
            close(park[1]);
            printf("unparked\n");
        } else if (!strncmp(line, "coro", 4)) {
            co_stack = mmap(NULL, co_size + 4096, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            mprotect(co_stack, 4096, PROT_NONE);
            getcontext(&co_ctx);
            co_ctx.uc_stack.ss_sp = co_stack + 4096;
            co_ctx.uc_stack.ss_size = co_size;
            co_ctx.uc_link = &main_ctx;
            makecontext(&co_ctx, co_body, 0);
            swapcontext(&main_ctx, &co_ctx);
            printf("suspended %lx-%lx\n", (unsigned long)co_stack + 4096,
                   (unsigned long)co_stack + 4096 + co_size);
        } else if (!strncmp(line, "resume", 6)) {
            swapcontext(&main_ctx, &co_ctx);
            munmap(co_stack, co_size + 4096);
            printf("finished\n");
        } else {
            printf("%d\n", answer(atoi(line)));
        }
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(program, held patch of its `answer`): no agent, no flags; `answer` starts with
    push %rbp (no endbr64): P is its entry, and P+1 the word the program plants."""
    d = tmp_path_factory.mktemp("stacks")
    src = STACKS + ANSWER.replace("@MUL@", "7")
    exe = gcc(d / "stacks", src, "-O0", "-fcf-protection=none", "-pthread", "-Wl,--build-id")
    obj = gcc(d / "fix.o", ANSWER.replace("@MUL@", "7 + 1"), "-O0", *patch_cflags(), "-c")
    pbx = _extract(obj, exe, "held")
    assert load_patch(pbx).flags & ApplyFlag.HOLD
    return exe, pbx


def _say(t: Target, line: str) -> str:
    """Returns the target's answer to one command line."""
    t.stdin.write(line + "\n")
    t.stdin.flush()
    return t._readline()


def lib_bias(pid: int, build_id: bytes) -> int:
    """Returns the load bias of the object of ``build_id`` that ``pid`` maps."""
    mapped = find_mapped(pid, build_id.hex())
    assert mapped is not None, f"pid {pid} maps no object of build-id {build_id.hex()}"
    return mapped.bias


def _span(text: str) -> tuple[int, int]:
    m = re.search(r"([0-9a-f]+)-([0-9a-f]+)", text)
    assert m is not None, text
    lo, hi = m.groups()
    return int(lo, 16), int(hi, 16)


def _refused_hold(t: Target, pbx: Path) -> str:
    """Returns the agent's reason after asserting a held apply is refused, untouched."""
    proc = run("patchbox", "apply", "-p", t.pid, pbx, check=False)
    assert proc.returncode == 1 and "[NOT_HELD]" in proc.stderr, proc.stdout + proc.stderr
    assert t.call("2") == "17"
    assert json.loads(run("patchbox", "list", "-p", t.pid, "--json").stdout) == []
    return proc.stderr


@pytest.mark.parametrize("stack", ["", " 0x6400000"], ids=["8MiB-stack", "100MiB-stack"])
def test_hold_sees_the_stack_a_sigaltstack_handler_interrupted(
    stacks: tuple[Path, Path], procs: list[Target], stack: str
) -> None:
    # 100 MiB is over the memory check's cap: only the signal frame on the alternate
    # stack leads there (its saved SP).
    exe, pbx = stacks
    t = start(exe)
    procs.append(t)
    run("patchbox", "attach", "-p", t.pid)
    parked = _say(t, "alt" + stack)
    assert parked.startswith("parked "), parked
    lo, hi = _span(parked)
    why = _refused_hold(t, pbx)
    m = re.search(
        r"thread \d+, in a signal handler on its alternate stack, interrupted a stack with a "
        r"word inside the first bytes of answer \(at 0x([0-9a-f]+)\)",
        why,
    )
    assert m and lo <= int(m[1], 16) < hi, why  # on the interrupted thread's own stack
    assert _say(t, "unpark") == "unparked"
    run("patchbox", "apply", "-p", t.pid, pbx)
    assert t.call("2") == "18"
    run("patchbox", "remove", "-p", t.pid, "held")
    assert t.call("2") == "17"


def test_hold_sees_a_suspended_coroutine(stacks: tuple[Path, Path], procs: list[Target]) -> None:
    exe, pbx = stacks
    t = start(exe)
    procs.append(t)
    run("patchbox", "attach", "-p", t.pid)
    lo, hi = _span(_say(t, "coro"))
    why = _refused_hold(t, pbx)
    m = re.search(
        r"a word at 0x([0-9a-f]+) \(mapping [0-9a-f]+-[0-9a-f]+\) points inside the first bytes "
        r"of answer: a stack no thread runs on now",
        why,
    )
    assert m and lo <= int(m[1], 16) < hi, why  # on the coroutine's stack
    assert _say(t, "resume") == "finished"
    run("patchbox", "apply", "-p", t.pid, pbx)
    assert t.call("2") == "18"
    scan = info_json(t.pid)["hold_scan"]
    assert re.match(r"[1-9]\d* mappings, [1-9]\d* bytes in \d+ us; 0 over 64 MiB", scan), scan
    run("patchbox", "remove", "-p", t.pid, "held")
    assert t.call("2") == "17"


def test_library_without_flags_endbr64_and_apply_all(
    with_lib: tuple[Path, Path], tmp_path: Path, procs: list[Target]
) -> None:
    exe, lib = with_lib
    a, b = start(exe), start(exe)
    procs += [a, b]
    obj = gcc(
        tmp_path / "fix.o", ANSWER.replace("@MUL@", "7 + 1"), "-O2", "-fPIC", *patch_cflags(), "-c"
    )
    pbx = _extract(obj, lib, "libfix")
    patch = load_patch(pbx)
    [fn] = patch.functions
    assert (fn.skip, fn.patch_point % 8) == (4, 4)  # endbr64 at a 16-aligned entry
    assert patch.flags & ApplyFlag.HOLD
    before = {p.pid: p.read(lib_bias(p.pid, patch.build_id) + fn.target, 16) for p in (a, b)}
    # Neither has an agent: --attach loads it into every process mapping the library.
    out = run("patchbox", "apply", "--all", "--attach", "--json", pbx).stdout
    rows = {r["pid"]: r for r in json.loads(out)}
    assert rows[a.pid]["result"] == rows[b.pid]["result"] == "applied", out
    assert a.call("2") == b.call("2") == "18"
    listed = json.loads(run("patchbox", "list", "-p", a.pid, "--json").stdout)
    assert listed[0]["object"] == str(lib)
    # This run's library only (its random build-id: every process mapping it): another
    # test run on the machine may hold a "libfix" too, or a process it cannot reach.
    run("patchbox", "remove", "--all", "--build-id", patch.build_id.hex(), "libfix")
    assert a.call("2") == b.call("2") == "17"
    for p in (a, b):
        assert p.read(lib_bias(p.pid, patch.build_id) + fn.target, 16) == before[p.pid]


# Loads the library of argv[1] on demand and unloads it: `close-map` then maps a page of
# its own, a known pattern, where the library's `answer` was (something else at the old
# address), `close` leaves the place free (a later dlopen may land there again).
DLOPEN = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char line[128];
    void *lib = NULL;
    int (*answer)(int) = NULL;
    (void)argc;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "open", 4)) {
            lib = dlopen(argv[1], RTLD_NOW);
            answer = lib ? (int (*)(int))dlsym(lib, "answer") : NULL;
            printf("opened %lx\n", (unsigned long)answer);
        } else if (!strncmp(line, "close", 5)) {
            uintptr_t page = (uintptr_t)answer & ~4095ul;
            unsigned char *m = MAP_FAILED;
            dlclose(lib);
            answer = NULL;
            if (!strncmp(line, "close-map", 9)) {
                m = mmap((void *)page, 4096, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
                for (int i = 0; m != MAP_FAILED && i < 4096; i++)
                    m[i] = (unsigned char)(i * 7 + 1);
            }
            printf("closed %lx %s\n", (unsigned long)page, m == (void *)page ? "mapped" : "free");
        } else if (answer) {
            printf("%d\n", answer(atoi(line)));
        } else {
            printf("none\n");
        }
    }
    return 0;
}
"""


def test_library_unloaded_while_patched(
    with_lib: tuple[Path, Path], tmp_path: Path, procs: list[Target]
) -> None:
    _exe, lib = with_lib
    prog = gcc(tmp_path / "dlopener", DLOPEN, "-O0", "-Wl,--build-id", libs=("-ldl",))
    t = start(prog, str(lib))
    procs.append(t)
    run("patchbox", "attach", "-p", t.pid)
    obj = gcc(
        tmp_path / "fix.o", ANSWER.replace("@MUL@", "7 + 1"), "-O2", "-fPIC", *patch_cflags(), "-c"
    )
    pbx = _extract(obj, lib, "libfix")
    assert _say(t, "open").startswith("opened ")
    run("patchbox", "apply", "-p", t.pid, pbx)
    assert t.call("2") == "18" and info_json(t.pid)["objects"] == "2"

    # Unloaded while patched, and another mapping where its code was.
    _closed, page, how = _say(t, "close-map").split()
    assert how == "mapped"
    pattern = bytes((i * 7 + 1) & 0xFF for i in range(4096))
    assert t.read(int(page, 16), 4096) == pattern
    [listed] = json.loads(run("patchbox", "list", "-p", t.pid, "--json").stdout)
    assert (listed["name"], listed["state"], listed["object"]) == ("libfix", "unloaded", str(lib))
    assert "UNLOADED: its library was unloaded" in run("patchbox", "list", "-p", t.pid).stdout
    rows = {r["pid"]: r for r in json.loads(run("patchbox", "ps", "--json").stdout)}
    assert rows[t.pid]["patches"] == rows[t.pid]["unloaded"] == ["libfix"]
    info = info_json(t.pid)
    assert (info["patches"], info["patches_unloaded"]) == ("1", "1")
    out = run("patchbox", "remove", "-p", t.pid, "libfix").stdout
    assert "its library had been unloaded, so nothing was written" in out, out
    assert t.read(int(page, 16), 4096) == pattern  # what lies at the old address now
    assert json.loads(run("patchbox", "list", "-p", t.pid, "--json").stdout) == []
    assert info_json(t.pid)["objects"] == "1"  # the library's sandbox unmapped

    # Loaded again (elsewhere: its place is taken) and patched again.
    opened = _say(t, "open")
    assert opened.startswith("opened ")
    assert t.call("2") == "17"
    run("patchbox", "apply", "-p", t.pid, pbx)
    assert t.call("2") == "18"
    # Unloaded and loaded again at the same address (glibc maps it into the gap its
    # dlclose left): same bias, span and build-id, only its bytes, back to the original,
    # tell the new load from the patched one. The patch applied anew replaces the record.
    assert _say(t, "close").endswith("free")
    assert _say(t, "open") == opened
    assert t.call("2") == "17"
    assert [
        p["state"] for p in json.loads(run("patchbox", "list", "-p", t.pid, "--json").stdout)
    ] == ["unloaded"]
    run("patchbox", "apply", "-p", t.pid, pbx)
    assert t.call("2") == "18"
    [listed] = json.loads(run("patchbox", "list", "-p", t.pid, "--json").stdout)
    assert listed["state"] == "applied"
    # More loads than the agent has object slots (8): each unloaded one's slot and region
    # are given back, so the patch goes into every new load.
    for _ in range(8):
        assert _say(t, "close").endswith("free") and _say(t, "open") == opened
        run("patchbox", "apply", "-p", t.pid, pbx)
        assert t.call("2") == "18"
    assert int(info_json(t.pid)["objects"]) <= 3
    assert "nothing was written" not in run("patchbox", "remove", "-p", t.pid, "libfix").stdout
    assert t.call("2") == "17"


def test_glibc_function_in_a_running_process(
    plain: Path, tmp_path: Path, procs: list[Target]
) -> None:
    libc = Path("/lib/x86_64-linux-gnu/libc.so.6")
    t = start(plain)
    procs.append(t)
    assert t.call("atoi 41") == "41"
    src = (
        "#include <stdlib.h>\nint atoi(const char *s) { return (int)strtol(s, NULL, 10) + 1000; }\n"
    )
    obj = gcc(tmp_path / "atoi.o", src, "-O2", "-fPIC", *patch_cflags(), "-c")
    proc = run(
        "extract-patch",
        "--function",
        "atoi",
        "--allow-inlined",
        "--name",
        "atoi",
        "-o",
        tmp_path / "atoi.pbx",
        obj,
        libc,
        check=False,
    )
    if proc.returncode and "stripped" in proc.stderr:
        pytest.skip(f"no debug symbols for {libc} (libc6-dbg): {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    run("patchbox", "apply", "--attach", "-p", t.pid, tmp_path / "atoi.pbx")
    assert t.call("atoi 41") == "1041"
    assert t.call("5") == "7038"  # answer(atoi("5")): 1005 * 7 + 3
    run("patchbox", "remove", "-p", t.pid, "atoi")
    assert t.call("atoi 41") == "41"


def test_attach_refuses_a_process_that_is_gone() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    with pytest.raises(AttachError, match=rf"no process {dead.pid}"):
        attach(dead.pid, str(preload()))
