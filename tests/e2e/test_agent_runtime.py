"""The agent's life inside its host: start/stop API, socket file, log, debug, idle thread."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import rawwire
from live import Target

from helpers import BIN, ROOT, compile_c
from patchbox.wire import Msg

pytestmark = pytest.mark.process

API_PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <patchbox/sandbox.h>

int main(void)
{
	char line[64];
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", (int)getpid());
	while (fgets(line, sizeof line, stdin)) {
		if (strncmp(line, "stop", 4) == 0) {
			patchbox_agent_stop();
			printf("stopped\n");
		} else if (strncmp(line, "start", 5) == 0) {
			printf("start %d\n", patchbox_agent_start());
		} else if (strncmp(line, "exit", 4) == 0) {
			return 0;
		}
	}
	return 0;
}
"""


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture()
def api_exe(tmp_path: Path, agent_dir: Path) -> Path:
    return compile_c(
        API_PROGRAM, tmp_path / "api", agent=True, extra=[f"-I{ROOT / 'agent' / 'include'}"]
    )


def send(t: Target, line: str) -> str:
    t.stdin.write(line + "\n")
    t.stdin.flush()
    return t._readline()


def test_public_api_stop_start_and_stale_socket(api_exe: Path) -> None:
    t = Target(api_exe)
    try:
        assert send(t, "stop") == "stopped"
        assert not t.socket.exists()
        # A stale socket file at our path (a dead process's): start must replace it.
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(t.socket))
        stale.close()
        assert t.socket.exists()
        assert send(t, "start") == "start 0"
        assert rawwire.request(t.socket, Msg.INFO)[0] == 0
        assert send(t, "start") == "start 0"  # idempotent
    finally:
        t.stop()


def test_socket_removed_at_normal_exit(api_exe: Path) -> None:
    t = Target(api_exe)
    t.stdin.write("exit\n")
    t.stdin.flush()
    assert t.proc.wait(10) == 0
    assert not t.socket.exists()
    t.stop()


def test_idle_agent_thread_sleeps(target: Target) -> None:
    rawwire.request(target.socket, Msg.INFO)  # it has served once
    tasks = Path(f"/proc/{target.pid}/task")
    [agent] = [t for t in tasks.iterdir() if (t / "comm").read_text().strip() == "patchbox-agent"]

    def state() -> str:
        return (agent / "stat").read_text().rsplit(")", 1)[1].split()[0]

    # Once done with the client it must block in accept ("S"), not spin ("R").
    wait_for(lambda: state() == "S", "the agent thread to block")
    time.sleep(0.2)
    assert state() == "S"


def test_log_lines_and_log_off(target_exe: Path, tmp_path: Path) -> None:
    log = tmp_path / "moved.log"
    t = Target(target_exe, env={"PATCHBOX_LOG": str(log)})
    try:
        rawwire.request(t.socket, Msg.INFO)
        rawwire.request(t.socket, Msg.REMOVE, b"\x03\x00abc")
        lines = log.read_text().splitlines()
        assert len(lines) >= 2
        assert "INFO" in lines[-2] and "REMOVE" in lines[-1] and "abc" in lines[-1]
        assert f"uid={os.geteuid()}" in lines[-1] or str(os.geteuid()) in lines[-1]
        assert not Path(f"{t.socket}.log").exists()
    finally:
        t.stop()
    t = Target(target_exe, env={"PATCHBOX_LOG": "0"})
    try:
        assert rawwire.request(t.socket, Msg.INFO)[0] == 0
        assert not Path(f"{t.socket}.log").exists()
    finally:
        t.stop()


def test_debug_from_start_goes_to_stderr(target_exe: Path) -> None:
    t = Target(target_exe, env={"PATCHBOX_DEBUG": "1"})
    try:
        rawwire.request(t.socket, Msg.INFO)
    finally:
        t.stop()
    assert f"patchbox[{t.pid}]" in t.stderr_text


def test_disabled_agent_leaves_program_alone(target_exe: Path) -> None:
    proc = subprocess.Popen(
        [str(target_exe)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PATCHBOX_DISABLE": "1"},
    )
    assert proc.stdin is not None and proc.stdout is not None  # pipes
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready and proc.stdout.readline().startswith("ready")
        time.sleep(0.2)
        assert not (target_exe.parent / f"sandbox-sock{proc.pid}").exists()
        proc.stdin.write("use_helper 4\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "41"
    finally:
        proc.kill()
        proc.wait()


def test_agent_without_socket_is_named_so(target_exe: Path, tmp_path: Path) -> None:
    """The agent cannot bind (its PATCHBOX_SOCK_DIR does not exist): the client says the
    process has an agent that is not listening, not that the program lacks one."""
    gone = tmp_path / "no-such-dir"
    proc = subprocess.Popen(
        [str(target_exe)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PATCHBOX_SOCK_DIR": str(gone)},
    )
    assert proc.stdout is not None  # pipes
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready and proc.stdout.readline().startswith("ready")
        out = subprocess.run(
            [str(BIN / "patchbox"), "info", "-p", str(proc.pid)],
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "PATCHBOX_SOCK_DIR"},
            check=False,
        )
        assert out.returncode == 1
        assert "has the patchbox agent but no socket of its listens" in out.stderr, out.stderr
        assert "config --libs" not in out.stderr
    finally:
        proc.kill()
        proc.wait()
