"""patchbox.procfs, the one reader of /proc: what it reads of this test process, and that
no other module of the package opens, stats, lists or reads a link under /proc."""

from __future__ import annotations

import ast
import os
import socket
from pathlib import Path

from helpers import ROOT
from patchbox import procfs
from patchbox.elf.buildid import read_build_id

PKG = ROOT / "src" / "patchbox"
# Calls that read the file system: a "/proc/..." argument to one of them reads /proc.
_READERS = {"open", "stat", "lstat", "readlink", "listdir", "scandir", "exists", "Path"}
# Allowed elsewhere: /proc/self/fd/N names one's own descriptor (connect through an O_PATH
# descriptor, linkat), and a traced process's memory is ptrace's (docs/decisions.md).
_ELSEWHERE = ("/proc/self/fd/",)
_MEMORY = PKG / "reach" / "ptrace.py"


def _literal_head(node: ast.expr) -> str:
    """Returns the constant text an argument starts with ("" if none)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
        value = node.value
        return value.decode() if isinstance(value, bytes) else value
    if isinstance(node, ast.JoinedStr) and node.values:
        return _literal_head(node.values[0])
    if isinstance(node, ast.BinOp):  # b"/proc/self/fd/%d/%s" % (...)
        return _literal_head(node.left)
    return ""


def test_only_procfs_reads_proc() -> None:
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if path in (PKG / "procfs.py", _MEMORY):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in _READERS:
                continue
            for arg in node.args:
                head = _literal_head(arg)
                if head.startswith("/proc") and not head.startswith(_ELSEWHERE):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}({head}...)")
    assert not found, "read /proc through patchbox.procfs:\n" + "\n".join(found)


def test_this_process_as_procfs_reads_it() -> None:
    me = os.getpid()
    assert me in procfs.process_ids() and procfs.exists(me)
    assert procfs.process_state(me) == "R"
    assert procfs.get_ns_pid(me) == me
    assert procfs.read_status(me)["Pid"] == str(me)
    assert procfs.exe_path(me) == os.path.realpath("/proc/self/exe")
    assert procfs.namespace(me, "net") == procfs.namespace("self", "net") is not None
    assert procfs.task_ids(me)[0] == me
    assert procfs.task_status(me, me)["Pid"] == str(me)
    maps = procfs.read_maps(me)
    assert all(m.dev.count(":") == 1 for m in maps)


def test_mapped_objects_have_their_files_build_ids() -> None:
    me = os.getpid()
    objects = {o.path: o for o in procfs.mapped_objects(me)}
    libc = next(p for p in objects if p.endswith("/libc.so.6"))
    found = read_build_id(libc)
    assert found is not None and objects[libc].build_id == found.hex()
    assert procfs.find_mapped(me, found.hex().upper()) == objects[libc]
    st = procfs.stat_exe(me)
    exe = read_build_id(procfs.exe_path(me))
    assert procfs.exe_build_id(me, st) == (exe.hex() if exe else "")


def test_sockets_held_and_owned(tmp_path: Path) -> None:
    me = os.getpid()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(tmp_path / "sandbox-sock1"))
        s.listen()
        listed = [
            x for x in procfs.iter_unix_sockets("self") if x.path == str(tmp_path / "sandbox-sock1")
        ]
        assert len(listed) == 1 and listed[0].listening
        assert listed[0].type == procfs.SOCK_STREAM_TYPE
        inode = listed[0].inode
        assert procfs.holds_socket(me, inode)
        assert procfs.socket_owners({inode}, [me]) == {inode: me}
        fd_link = procfs.fd_target(me, s.fileno())
        assert fd_link == f"socket:[{inode}]"
