"""What the agent's replies are decoded into (docs/protocol.md "Messages"): the patches
LIST shows, and the results of APPLY, REMOVE and TEST.

:mod:`patchbox.protocol.replies` decodes the payloads into these; INFO's reply stays a
plain dict and never loads this module (docs/decisions.md, "Start-up").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from patchbox.wire import ListedState

__all__ = ["PatchFunction", "AppliedPatch", "ApplyResult", "RemoveResult", "TestResult"]


@dataclass(frozen=True)
class PatchFunction:
    """One redirected function of an applied patch (absolute addresses in the process)."""

    symbol: str
    target: int  # absolute address of the original function
    new: int  # absolute address of the replacement entry
    new_size: int


@dataclass(frozen=True)
class AppliedPatch:
    """One entry of a LIST reply."""

    name: str
    id: int
    applied_at: int  # unix time, nanoseconds
    text_addr: int
    text_size: int
    data_addr: int
    data_size: int
    functions: list[PatchFunction] = field(default_factory=list)
    object: str = ""  # "" for the executable, else the path of the library it patches
    hold_ns: int = 0  # held entry jumps: how long the agent waited for the threads
    # APPLIED, or UNLOADED: its library was unloaded (dlclose); nothing of it is written
    # again and REMOVE drops the record only (docs/reach.md, "Shared libraries").
    state: ListedState = ListedState.APPLIED

    @property
    def unloaded(self) -> bool:
        """Returns whether the patch's library was unloaded since it was applied."""
        return self.state == ListedState.UNLOADED

    def to_json(self) -> dict[str, Any]:
        """Returns a JSON-ready dict of this entry (``state``: "applied" or "unloaded")."""
        d = asdict(self)
        d["state"] = self.state.name.lower()
        return d


@dataclass(frozen=True)
class ApplyResult:
    """The APPLY reply: the id the agent gave the patch and where it was placed."""

    id: int
    text_addr: int
    data_addr: int
    elapsed_ns: int  # time the agent spent checking, copying and redirecting


@dataclass(frozen=True)
class RemoveResult:
    """The REMOVE reply: the agent's time, and the state the patch was in (APPLIED: its
    original bytes were restored; UNLOADED: its library was gone, nothing was written)."""

    elapsed_ns: int
    state: ListedState

    @property
    def written(self) -> bool:
        """Returns whether the agent wrote the original bytes back."""
        return self.state == ListedState.APPLIED


class TestResult(NamedTuple):
    """The TEST reply; unpacks as ``(passed, detail)``."""

    passed: bool
    detail: str
