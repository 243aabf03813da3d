"""Holding a process's threads clear of an entry jump while the agent writes it
(the HOLD apply flag; docs/reach.md, "Entry jumps in stock code").

An entry jump over a first instruction shorter than the jump (a stack adjustment, a
push) or across two 8-byte words (a landing pad at a 16-aligned entry, the jump right
after it) cannot be published with one atomic store that no thread can be inside. The
client sends APPLY; the agent prepares everything, then waits (asleep in
``clock_nanosleep``) for the threads to be held; the client then stops every thread but
the agent's with ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``, checks that no PC lies strictly inside (P,
P+5) (else lets them go, backs off and tries again), and keeps them stopped until the
reply. The agent checks the same itself (every other thread in a tracing stop, PCs and
stacks clear), and, right before it writes, every stack no thread runs on (suspended
coroutines, alternate signal stacks: docs/reach.md, "What the hold sees"); a word inside
there refuses the apply at once (NOT_HELD). The longest time a thread was stopped is
measured.

Rules that keep it safe: threads are let go early only when a PC was inside (the agent
cannot accept that state), else only after the reply or after the agent's own wait has
run out with a margin (:data:`RELEASE_AFTER`). From the request to the release the
client's terminating signals are deferred (:mod:`patchbox.reach.defer`): Ctrl-C or
``kill`` cannot let the threads go while the agent writes. SIGKILL can: the kernel
releases the tracees of a dead client; the agent writes only while this client's
connection is open, and a dying client's sockets close before its tracees are let go
(docs/reach.md).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from patchbox import wire as C
from patchbox.arch import get_arch_by_machine
from patchbox.errors import PatchboxError
from patchbox.format.model import Patch
from patchbox.procfs import find_mapped, task_ids, task_syscall
from patchbox.protocol.client import Client
from patchbox.protocol.results import ApplyResult
from patchbox.reach import ptrace
from patchbox.reach.defer import deferred_signals
from patchbox.wire import ApplyFlag, RedirectKind

__all__ = ["HoldError", "Holder", "HoldStats", "RELEASE_AFTER", "held_ranges", "apply_held"]

# The client lets held threads go without a reply only this long after the APPLY was
# sent: well past the agent's own wait (PBX_HOLD_WAIT_MS), after which it refuses.
RELEASE_AFTER = C.HOLD_WAIT_MS / 1000 + 2.0
_READY_WAIT = 0.5  # longest wait for the agent to reach its hold wait
_SLEEP_CALLS = {35, 230}  # nanosleep, clock_nanosleep: the agent waits for the hold
_STOP_TIMEOUT = 0.2  # a thread that does not stop this fast (D state): try again


class HoldError(PatchboxError):
    """The threads could not be held clear of the jump; worth a retry."""


@dataclass
class HoldStats:
    """What a hold cost: threads stopped, attempts, the longest stop of one thread."""

    threads: int = 0
    attempts: int = 0
    longest_ns: int = 0
    reason: str = ""  # why the last attempt let go (a PC inside the bytes)


@dataclass
class Holder:
    """Stops every thread of ``pid`` but ``agent_tid`` while none is inside ``ranges``
    ([P, P+5) of each held entry jump, absolute): :meth:`hold` after the APPLY is sent,
    :meth:`release` after its reply."""

    pid: int
    agent_tid: int
    ranges: list[tuple[int, int]]
    budget: float = C.HOLD_WAIT_MS / 1000 * 0.8
    stats: HoldStats = field(default_factory=HoldStats)
    _held: dict[int, int] = field(default_factory=dict)  # tid -> monotonic ns of its stop

    def _inside(self, pc: int) -> bool:
        return any(lo < pc < hi for lo, hi in self.ranges)

    def _wait_agent_ready(self) -> None:
        """Waits until the agent thread sleeps in its hold wait (nothing left to allocate)."""
        deadline = time.monotonic() + _READY_WAIT
        while time.monotonic() < deadline:
            state = task_syscall(self.pid, self.agent_tid)
            if state is not None and state[0] in _SLEEP_CALLS:
                return
            time.sleep(0.0001)

    def _stop_all(self) -> None:
        """Stops every thread but the agent's, new ones too, until the set is stable."""
        while True:
            new = [t for t in task_ids(self.pid) if t != self.agent_tid and t not in self._held]
            if not new:
                return
            for tid in new:
                try:
                    ptrace.seize(tid)
                    ptrace.interrupt(tid)
                except ptrace.PtraceError as err:
                    if err.errno == errno.ESRCH:
                        continue  # exited
                    raise HoldError(
                        f"cannot hold thread {tid} of pid {self.pid}: {err} (another tracer?)"
                    ) from err
                self._held[tid] = 0
            for tid in new:
                if tid not in self._held:
                    continue
                try:
                    ptrace.wait_stop(tid, _STOP_TIMEOUT)
                    self._held[tid] = time.monotonic_ns()
                except ptrace.PtraceError as err:
                    if err.errno != errno.ESRCH:
                        raise HoldError(f"pid {self.pid}: {err}") from err  # kept: released
                    del self._held[tid]

    def _clear(self) -> str:
        """Returns "" if no held thread's PC lies inside the bytes, else why."""
        for tid in self._held:
            try:
                pc = int(getattr(ptrace.get_regs(tid), ptrace.REGISTERS.pc))
            except ptrace.PtraceError:
                continue
            if self._inside(pc):
                return f"thread {tid} stopped at {pc:#x}, inside the bytes to replace"
        return ""

    def hold(self) -> None:
        """Holds the threads (called right after APPLY is sent); raises HoldError when no
        attempt within the budget found them clear (the agent will refuse)."""
        self._wait_agent_ready()
        deadline = time.monotonic() + self.budget
        backoff = 0.0005
        while True:
            self.stats.attempts += 1
            try:
                self._stop_all()
            except HoldError:
                self.release()
                raise
            why = self._clear()
            if not why:
                self.stats.threads = len(self._held)
                return
            self.stats.reason = why
            self.release()  # a PC inside: the agent cannot accept this state
            if time.monotonic() + backoff > deadline:
                raise HoldError(f"pid {self.pid}: after {self.stats.attempts} attempts: {why}")
            time.sleep(backoff)
            backoff = min(backoff * 2, 0.05)

    def release(self) -> None:
        """Lets every held thread go; records the longest stop."""
        now = time.monotonic_ns()
        for tid, since in self._held.items():
            try:
                if not since:  # asked to stop, not stopped yet (uninterruptible sleep)
                    ptrace.wait_stop(tid, 2.0)
                ptrace.detach(tid)
            except ptrace.PtraceError:
                pass
            if since:
                self.stats.longest_ns = max(self.stats.longest_ns, now - since)
        self._held.clear()


def held_ranges(pid: int, patch: Patch, info: dict[str, str]) -> list[tuple[int, int]]:
    """Returns [P, P+len) (absolute, in ``pid``; len: the entry jump's bytes on the
    patch's architecture) of every entry jump of ``patch``: the executable's load bias
    from INFO, a library's from /proc/PID/maps."""
    jump_len = get_arch_by_machine(patch.machine).branches.jump_len
    want = patch.build_id.hex()
    if info.get("build_id", "").lower() == want:
        bias = int(info.get("load_bias", "0"), 16)
    else:
        obj = find_mapped(pid, want)
        if obj is None:
            raise HoldError(f"pid {pid} maps no object of build-id {want}")
        bias = obj.bias
    return [
        (bias + f.patch_point, bias + f.patch_point + jump_len)
        for f in patch.functions
        if f.kind == RedirectKind.ENTRY_JUMP
    ]


def apply_held(
    client: Client,
    pid: int,
    patch: Patch,
    body: bytes,
    info: dict[str, str],
    *,
    on_phase: Callable[[str], None] | None = None,
) -> tuple[ApplyResult, HoldStats | None]:
    """Applies ``body`` through ``client`` to ``pid``; with the HOLD flag, holds the
    threads between the request and its reply. Returns the reply and the hold's cost.
    ``on_phase`` is told each step: send (the request about to go), held (every thread
    stopped clear of the bytes), released."""
    phase = on_phase or (lambda _name: None)
    if not patch.flags & ApplyFlag.HOLD:
        return client.apply(body), None
    holder = Holder(pid, int(info.get("agent_tid", "0") or 0), held_ranges(pid, patch, info))
    if not holder.agent_tid:
        raise HoldError(f"pid {pid}: the agent does not say which thread is its own (too old)")

    def hold() -> None:
        holder.hold()
        phase("held")

    # Signals deferred from before the request to after the release: the threads go
    # only after the reply (or the agent's deadline), never on a Ctrl-C in between.
    with deferred_signals():
        try:
            phase("send")
            result = client.apply(body, after_send=hold, reply_timeout=RELEASE_AFTER)
        finally:
            holder.release()
            phase("released")
    return result, holder.stats
