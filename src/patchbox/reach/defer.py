"""The client's signals while it holds threads of another process (docs/reach.md,
"Attach" and "Entry jumps in stock code").

While the client has a target thread borrowed for a call (attach) or stopped clear of
bytes the agent is writing (the hold), quitting half-way must not happen: Ctrl-C,
``kill``, a hang-up of the terminal or Ctrl-Z would otherwise cut the client off in the
middle (a ``KeyboardInterrupt`` raised between two ptrace requests, a ``finally`` that
lets threads go early, a stopped client whose tracee waits at its next stop).
:func:`deferred_signals` blocks those signals in the calling thread for the window; they
stay pending and are delivered the moment it closes. SIGKILL and SIGSTOP cannot be
blocked: what the target is left with then is the kernel's detach, and the windows are
built so that this is safe at every instant.

SIGCHLD is blocked too: the tracer gets one for every stop of a tracee, and
:func:`patchbox.reach.ptrace.wait_stop` sleeps until it instead of polling.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DEFERRED", "deferred_signals", "pending_deferred"]

# Signals whose default action ends or stops the client and that nothing synchronous
# raises (a SIGSEGV of the client itself must not be blocked).
DEFERRED: frozenset[signal.Signals] = frozenset(
    {
        signal.SIGHUP,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGTERM,
        signal.SIGTSTP,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGPIPE,
        signal.SIGALRM,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGXCPU,
        signal.SIGXFSZ,
        signal.SIGVTALRM,
        signal.SIGPROF,
        signal.SIGPWR,
    }
)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Yields with :data:`DEFERRED` and SIGCHLD blocked in the calling thread; on exit
    the previous mask comes back and whatever arrived meanwhile is delivered."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED | {signal.SIGCHLD})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def pending_deferred() -> set[signal.Signals]:
    """Returns the deferred signals waiting for the window to close (the user asked the
    client to stop: a long wait inside the window ends early, safely)."""
    return set(signal.sigpending()) & DEFERRED
