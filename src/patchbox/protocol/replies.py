"""Reply payload layouts of the wire protocol (docs/protocol.md "Reply payload", "Messages").

Every reply payload starts with an ``i32 status``; a non-zero status is followed by one
``str message`` and raises :class:`patchbox.errors.AgentError`. An OK status is followed by
the message-specific fields decoded here. Any overrun, bad count or trailing byte raises
:class:`patchbox.errors.ProtocolError` naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from patchbox.errors import AgentError, ProtocolError
from patchbox.format.codec import Reader
from patchbox.wire import REPLY_BIT, ErrorCode, ListedState, Msg

__all__ = [
    "PatchFunction",
    "AppliedPatch",
    "ApplyResult",
    "RemoveResult",
    "TestResult",
    "check_status",
    "decode_reply",
    "decode_answer",
    "raise_connection_error",
    "CONNECTION_ERRORS",
    "DECODERS",
]


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


def check_status(r: Reader) -> None:
    """Reads the status; returns if OK, raises AgentError(code, message) otherwise."""
    status = r.i32("status")
    if status == ErrorCode.OK:
        return
    message = r.str("message")
    r.end()
    try:
        name = ErrorCode(status).name
    except ValueError:
        name = None  # a newer agent's code: AgentError names it by number
    raise AgentError(status, message, name)


def _empty(r: Reader) -> None:
    return None


def _info(r: Reader) -> dict[str, str]:
    return r.kv("info")


def _list(r: Reader) -> list[AppliedPatch]:
    count = r.u32("count")
    # Each entry is at least 2+4+8+8+4+8+4+2+2+8+1 bytes: refuse counts the payload cannot
    # hold before looping (a garbage count must not spin for 4 billion iterations).
    if count * 51 > r.remaining():
        raise ProtocolError(f"LIST reply: count {count} overruns the {r.remaining()}-byte payload")
    patches = []
    for i in range(count):
        name = r.str(f"patch[{i}].name")
        pid = r.u32(f"patch[{i}].id")
        applied_at = r.u64(f"patch[{i}].applied_at")
        text_addr = r.u64(f"patch[{i}].text_addr")
        text_size = r.u32(f"patch[{i}].text_size")
        data_addr = r.u64(f"patch[{i}].data_addr")
        data_size = r.u32(f"patch[{i}].data_size")
        nfuncs = r.u16(f"patch[{i}].nfuncs")
        funcs = []
        for j in range(nfuncs):
            where = f"patch[{i}].function[{j}]"
            funcs.append(
                PatchFunction(
                    r.str(f"{where}.symbol"),
                    r.u64(f"{where}.target"),
                    r.u64(f"{where}.new"),
                    r.u32(f"{where}.new_size"),
                )
            )
        obj = r.str(f"patch[{i}].object")
        hold_ns = r.u64(f"patch[{i}].hold_ns")
        state = _state(r, f"patch[{i}].state")
        patches.append(
            AppliedPatch(
                name,
                pid,
                applied_at,
                text_addr,
                text_size,
                data_addr,
                data_size,
                funcs,
                obj,
                hold_ns,
                state,
            )
        )
    return patches


def _state(r: Reader, where: str) -> ListedState:
    value = r.u8(where)
    try:
        return ListedState(value)
    except ValueError:
        raise ProtocolError(f"{where} = {value}: not a patch state") from None


def _apply(r: Reader) -> ApplyResult:
    return ApplyResult(r.u32("id"), r.u64("text_addr"), r.u64("data_addr"), r.u64("elapsed_ns"))


def _remove(r: Reader) -> RemoveResult:
    return RemoveResult(r.u64("elapsed_ns"), _state(r, "state"))


def _test(r: Reader) -> TestResult:
    passed = r.u8("passed")
    if passed not in (0, 1):
        raise ProtocolError(f"TEST reply: passed = {passed}, expected 0 or 1")
    return TestResult(bool(passed), r.str("detail"))


# The reply layout of each message, as data (one decoder per message id).
DECODERS: dict[Msg, Callable[[Reader], Any]] = {
    Msg.INFO: _info,
    Msg.LIST: _list,
    Msg.APPLY: _apply,
    Msg.REMOVE: _remove,
    Msg.TEST: _test,
    Msg.DEBUG: _empty,
}


def decode_reply(msg: Msg, payload: bytes) -> Any:
    """Returns the decoded OK reply to ``msg``; raises AgentError or ProtocolError."""
    r = Reader(payload, ProtocolError, f"{Msg(msg).name} reply")
    check_status(r)
    result = DECODERS[Msg(msg)](r)
    r.end()
    return result


# Errors the agent may send about the connection itself rather than about the request
# (a refused peer, a frame it could not read): accepted whatever the reply's type/seq.
CONNECTION_ERRORS = frozenset(
    {
        ErrorCode.PERMISSION,
        ErrorCode.BAD_MAGIC,
        ErrorCode.BAD_VERSION,
        ErrorCode.TOO_LARGE,
        ErrorCode.UNKNOWN_MESSAGE,
    }
)


def raise_connection_error(payload: bytes) -> None:
    """Raises AgentError if ``payload`` is a connection-level error reply; else returns."""
    r = Reader(payload, ProtocolError, "reply")
    try:
        status = r.i32("status")
        if status not in CONNECTION_ERRORS:
            return
        r.pos = 0
        check_status(r)
    except ProtocolError:
        return


def decode_answer(msg: Msg, seq: int, reply_type: int, reply_seq: int, payload: bytes) -> Any:
    """Returns the decoded reply to request ``msg``/``seq`` given the reply frame's type,
    seq and payload; raises AgentError (the agent refused, or a connection-level error)
    or ProtocolError (the reply does not answer the request)."""
    if reply_type != (msg | REPLY_BIT) or reply_seq != seq:
        raise_connection_error(payload)
        if reply_type != (msg | REPLY_BIT):
            raise ProtocolError(
                f"reply type {reply_type:#x} does not answer {Msg(msg).name} "
                f"(expected {msg | REPLY_BIT:#x})"
            )
        raise ProtocolError(f"reply seq {reply_seq} does not match request seq {seq}")
    return decode_reply(msg, payload)
