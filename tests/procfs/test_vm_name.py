"""A QEMU's VM name as patchbox.procfs reads it from /proc/PID/cmdline: QEMU's `-name`
in every form it accepts (its QemuOpts syntax, commas doubled), and command lines built
to hurt the reader (huge, NULs where arguments are expected, bytes that are not UTF-8)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from patchbox import procfs
from patchbox.procfs import (
    CMDLINE_MAX,
    is_qemu,
    iter_qemu_opts,
    qemu_guest_name,
    split_cmdline,
    vm_name,
)

QEMU = b"/usr/bin/qemu-system-x86_64"


def name_of(*args: bytes) -> bytes | None:
    return qemu_guest_name([QEMU, *args])


@pytest.mark.parametrize(
    ("arg", "name"),
    [
        (b"vm1", b"vm1"),
        (b"guest=vm1,debug-threads=on", b"vm1"),  # libvirt's form
        (b"vm1,process=qemu:vm1", b"vm1"),
        (b"vm1,debug-threads=on,process=p", b"vm1"),
        (b"debug-threads=on,guest=vm1", b"vm1"),
        (b"process=qemu:vm1,guest=vm1", b"vm1"),
        (b"guest=a,,b,debug-threads=on", b"a,b"),  # libvirt doubles a name's commas
        (b"a,,b,process=p", b"a,b"),
        (b"a,,b", b"a,b"),
        (b"guest=a,,,,b", b"a,,b"),
        (b"guest=a,,", b"a,"),
        (b"a,,=b", b"a,=b"),  # "=" after a doubled comma is the value's
        (b"guest=x=y", b"x=y"),  # only the first "=" separates
        (b"guest=,process=p", b""),
        (b"guest=", b""),
        (b"guest=vm1,guest=vm2", b"vm2"),  # the last one wins
        (b"vm1,guest", b"on"),  # a bare key is a flag: QEMU reads guest=on
        (b"\xe9t\xe9", b"\xe9t\xe9"),
        (b"vm 1", b"vm 1"),
    ],
)
def test_name_forms(arg: bytes, name: bytes) -> None:
    assert name_of(b"-machine", b"none", b"-name", arg, b"-nodefaults") == name
    assert name_of(b"--name", arg) == name


@pytest.mark.parametrize(
    "args",
    [
        [],
        [b"-nodefaults"],
        [b"-name"],  # no value: QEMU would not have started
        [b"-name", b""],  # no element at all
        [b"-name", b"process=p,debug-threads=on"],
        [b"-names", b"vm1"],
        [b"-namevm1"],
        [b"name", b"vm1"],
        [b"-append", b"console=ttyS0 -name vm1"],  # one argument of another option
    ],
)
def test_no_name(args: list[bytes]) -> None:
    assert name_of(*args) is None


def test_the_last_name_option_wins_and_argv0_is_not_an_option() -> None:
    # QEMU merges its -name options (merge_lists): the last guest= counts.
    assert name_of(b"-name", b"vm1", b"-m", b"64", b"-name", b"debug-threads=on") == b"vm1"
    assert name_of(b"-name", b"vm1", b"-name", b"guest=vm2,process=p") == b"vm2"
    assert qemu_guest_name([b"-name", b"vm1"]) is None  # argv[0] is the program
    assert qemu_guest_name([]) is None


def test_options_as_qemu_opts_reads_them() -> None:
    on, off = b"on", b"off"
    assert list(iter_qemu_opts(b"a=1,b,nob,,c", b"first")) == [
        (b"a", b"1"),
        (b"b", on),
        (b"b", off),
        (b"", on),
        (b"c", on),
    ]
    assert list(iter_qemu_opts(b",x", b"guest")) == [(b"guest", b""), (b"x", on)]
    assert list(iter_qemu_opts(b"a,b,,", b"guest")) == [(b"guest", b"a"), (b"b", on), (b"", on)]
    assert list(iter_qemu_opts(b"a,,,b", b"guest")) == [(b"guest", b"a,"), (b"b", on)]
    assert list(iter_qemu_opts(b"x=a,,b,y=c", None)) == [(b"x", b"a,b"), (b"y", b"c")]
    assert list(iter_qemu_opts(b"", b"guest")) == []


# Names as QEMU can be given them: any bytes but NUL (argv strings are C strings).
NAMES = st.binary(min_size=1, max_size=64).filter(lambda b: b"\0" not in b)


@given(NAMES)
def test_every_name_comes_back_in_every_form(name: bytes) -> None:
    quoted = name.replace(b",", b",,")  # as libvirt writes it
    assert name_of(b"-name", b"guest=" + quoted + b",debug-threads=on") == name
    assert name_of(b"-name", b"guest=" + quoted) == name
    if b"=" not in name.split(b",")[0]:
        # Implied: QEMU reads "key=..." in the first element as a key, whatever follows.
        assert name_of(b"-name", quoted) == name
        assert name_of(b"-name", quoted + b",process=qemu") == name


def test_split_cmdline_nuls() -> None:
    assert split_cmdline(b"qemu\0-name\0vm1\0") == [b"qemu", b"-name", b"vm1"]
    assert split_cmdline(b"qemu\0\0-name\0\0vm1\0") == [b"qemu", b"", b"-name", b"", b"vm1"]
    # A title written over argv without a final NUL (setproctitle): one argument.
    assert split_cmdline(b"qemu: vm1 running") == [b"qemu: vm1 running"]
    # A title written over argv and zeros after it: the name is gone with the arguments.
    title = split_cmdline(b"qemu: vm1" + b"\0" * 40)
    assert title[0] == b"qemu: vm1" and set(title[1:]) == {b""}
    assert qemu_guest_name(title) is None
    assert split_cmdline(b"") == [] and split_cmdline(b"\0") == [b""]
    # Cut short: the piece after the last NUL is part of an argument, not one.
    assert split_cmdline(b"qemu\0-name\0vm", complete=False) == [b"qemu", b"-name"]
    assert qemu_guest_name(split_cmdline(b"qemu\0-name\0vm", complete=False)) is None


def test_huge_arguments_are_read_in_linear_time() -> None:
    # A quadratic reader (one search to the end per element) would take hours here.
    n = 1 << 20
    cases = [
        (b"guest=" + b",," * n, b"," * n),
        (b"vm1" + b",x" * n, b"vm1"),
        (b"guest=vm1" + b",," * n + b",x", b"vm1" + b"," * n),
        (b"=" * n, None),
    ]
    for arg, name in cases:
        start = time.monotonic()
        assert name_of(b"-name", arg) == name
        assert time.monotonic() - start < 10
    many = [b"-name", b"x"] * (n // 4)
    start = time.monotonic()
    assert name_of(*many, b"-name", b"last") == b"last"
    assert time.monotonic() - start < 10


def test_is_qemu_by_file_name() -> None:
    for exe in ("/usr/bin/qemu-system-x86_64", "qemu-system-aarch64", "/usr/libexec/qemu-kvm"):
        assert is_qemu(exe)
    assert is_qemu("/usr/bin/kvm")
    for exe in ("/usr/bin/find", "/usr/bin/qemu-img", "/usr/bin/qemu-x86_64", "/x/qemu", ""):
        assert not is_qemu(exe)


# -- real processes -------------------------------------------------------------------


@pytest.fixture()
def spawn(tmp_path: Path) -> Iterator[Callable[..., tuple[int, str]]]:
    """Yields a function starting a copy of /bin/sh named ``name`` with the arguments
    ``args`` after its ``-c`` script (it waits on its stdin); the copies end afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: bytes) -> tuple[int, str]:
        exe = tmp_path / name
        if not exe.exists():
            shutil.copy("/bin/sh", exe)
        proc = subprocess.Popen(
            [bytes(exe), b"-c", b"read x", *args], stdin=subprocess.PIPE, close_fds=True
        )
        started.append(proc)
        deadline = time.monotonic() + 10
        # Until it has exec'ed: the kernel switches /proc/PID/exe before the new
        # arguments are in place (cmdline reads empty in between).
        while procfs.exe_path(proc.pid) != str(exe) or not procfs.read_cmdline(proc.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return proc.pid, str(exe)

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_vm_names_of_running_processes(spawn: Callable[..., tuple[int, str]]) -> None:
    pid, exe = spawn("qemu-system-x86_64", b"-name", b"guest=vm,,1,debug-threads=on")
    assert vm_name(pid, exe) == "vm,1"
    assert vm_name(pid, "") == "vm,1"  # executable unknown: argv[0]'s name decides
    pid, exe = spawn("qemu-system-x86_64", b"-name", b"caf\xe9\x1b[2J")
    assert vm_name(pid, exe) == "caf\\xe9\x1b[2J"  # not UTF-8: \xNN; shown escaped by the CLI
    pid, exe = spawn("qemu-system-x86_64")
    assert vm_name(pid, exe) == ""
    # Not QEMU: no VM name, whatever its arguments say.
    pid, exe = spawn("find", b"-name", b"vm1")
    assert vm_name(pid, exe) == ""
    assert vm_name(os.getpid(), procfs.exe_path(os.getpid())) == ""


def test_huge_command_line_is_read_up_to_its_bound(spawn: Callable[..., tuple[int, str]]) -> None:
    chunk = b"x" * (100 << 10)  # one argument is at most 128 KiB (MAX_ARG_STRLEN)
    filler = [chunk] * (CMDLINE_MAX // len(chunk) + 2)
    pid, exe = spawn("qemu-system-x86_64", b"-name", b"early", *filler)
    assert vm_name(pid, exe) == "early"
    argv = procfs.read_cmdline(pid)
    assert sum(len(a) + 1 for a in argv) <= CMDLINE_MAX
    assert argv[-1] == chunk  # the argument cut at the bound is left out, not half-read
    pid, exe = spawn("qemu-system-x86_64", *filler, b"-name", b"late")
    assert vm_name(pid, exe) == ""  # past the first MiB: not seen
    assert procfs.read_cmdline(1 << 30) == []  # no such process
