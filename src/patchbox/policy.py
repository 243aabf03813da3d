"""Patch lifecycle and the client-side refusal rules checked before APPLY and REMOVE.

Lifecycle (one enum, four states)::

    BUILT ──apply──▶ APPLIED ──remove──▶ REMOVED
                      ▲   │                 │
                      │   └─(dlclose)─┐     │
                      │               ▼     │
                      ├──apply──── UNLOADED │
                      │               │     │
                      │               └─remove──▶ REMOVED
                      └──────apply──────────┘

- ``BUILT``: a patch file exists; nothing in any process.
- ``APPLIED``: in one process; its functions are redirected (all or none).
- ``UNLOADED``: the process unloaded the library the patch redirected (``dlclose``), or
  loaded it anew in its place; the agent noticed and writes nothing of the patch again
  (its old addresses may belong to something else). LIST still shows it; remove drops
  the agent's record without writing; apply patches the library loaded again and
  replaces the record. Nobody moves a patch here but the process itself.
- ``REMOVED``: the original bytes are back (or, from UNLOADED, the record is gone); the
  file may be applied again.

Every other move is refused (apply of an APPLIED patch, remove of a BUILT/REMOVED one).
The agent enforces the same rules (``ALREADY_APPLIED``, ``BUILD_ID_MISMATCH``,
``NOT_APPLIED``, ``NOT_TOP``); checking them here first gives messages that name both
sides and what to do, and sends nothing the agent would refuse.

Stacking: a patch applied after another on a shared function sits on top of it; patches
are removed top first.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence

from patchbox.arch import get_arch_by_machine
from patchbox.errors import ElfError, PatchboxError
from patchbox.format.model import Patch
from patchbox.protocol.results import AppliedPatch
from patchbox.wire import ListedState

__all__ = [
    "PatchState",
    "Action",
    "PolicyError",
    "TRANSITIONS",
    "transition",
    "state_in",
    "stacked_above",
    "check_apply",
    "check_remove",
]


class PolicyError(PatchboxError):
    """A request the lifecycle rules refuse before anything is sent."""


class PatchState(enum.Enum):
    """Where a patch is in its lifecycle (relative to one process)."""

    BUILT = "built"
    APPLIED = "applied"
    UNLOADED = "unloaded"
    REMOVED = "removed"


class Action(enum.Enum):
    """What moves a patch between states."""

    APPLY = "apply"
    REMOVE = "remove"


# (state, action) -> new state; anything not listed is refused.
TRANSITIONS: dict[tuple[PatchState, Action], PatchState] = {
    (PatchState.BUILT, Action.APPLY): PatchState.APPLIED,
    (PatchState.APPLIED, Action.REMOVE): PatchState.REMOVED,
    (PatchState.UNLOADED, Action.REMOVE): PatchState.REMOVED,
    (PatchState.UNLOADED, Action.APPLY): PatchState.APPLIED,
    (PatchState.REMOVED, Action.APPLY): PatchState.APPLIED,
}


def transition(state: PatchState, action: Action, name: str = "patch") -> PatchState:
    """Returns the state after ``action``; raises PolicyError if the move is not allowed."""
    try:
        return TRANSITIONS[(state, action)]
    except KeyError:
        raise PolicyError(f"cannot {action.value} {name}: it is {state.value}") from None


def state_in(name: str, applied: Sequence[AppliedPatch]) -> PatchState:
    """Returns APPLIED or UNLOADED as the process's LIST says of ``name``, else BUILT.

    (The agent keeps no record of removed patches, so a removed patch reads as BUILT.)
    """
    for p in applied:
        if p.name == name:
            return PatchState.UNLOADED if p.state == ListedState.UNLOADED else PatchState.APPLIED
    return PatchState.BUILT


def stacked_above(name: str, applied: Sequence[AppliedPatch]) -> list[tuple[str, str]]:
    """Returns (patch, symbol) pairs stacked on ``name``'s functions, topmost first (a
    patch whose library was unloaded is nobody's base and on nobody's top)."""
    index = next((i for i, p in enumerate(applied) if p.name == name), None)
    if index is None or applied[index].unloaded:
        return []
    targets = {f.target: f.symbol for f in applied[index].functions}
    above: list[tuple[str, str]] = []
    for later in reversed(applied[index + 1 :]):
        if later.unloaded:
            continue
        shared = [targets[f.target] for f in later.functions if f.target in targets]
        if shared:
            above.append((later.name, shared[0]))
    return above


def check_apply(
    patch: Patch,
    info: dict[str, str],
    applied: Sequence[AppliedPatch],
    pid: int | str,
    mapped: Collection[str] | None = None,
) -> None:
    """Raises PolicyError if ``patch`` must not be applied to the process described by
    ``info`` (INFO reply) with ``applied`` (LIST reply); ``mapped``: build-ids (hex) of
    the libraries it maps, when known (a patch may target one of them)."""
    machine = info.get("machine", "")
    if machine.isdigit() and int(machine) != int(patch.machine):
        # The agent refuses it too (WRONG_MACHINE); said first, before the build-id that
        # differs as a consequence.
        raise PolicyError(
            f"patch {patch.name} is for {_arch_name(int(patch.machine))} (e_machine "
            f"{int(patch.machine)}), pid {pid} is {_arch_name(int(machine))} (e_machine "
            f"{machine}): build the patch against this process's binary (WRONG_MACHINE)"
        )
    want = patch.build_id.hex()
    have = info.get("build_id", "unknown").lower()
    if have != want and mapped is not None and want in mapped:
        have = want  # a patch of a library the process maps (docs/reach.md)
    if have == "unknown":
        raise PolicyError(
            f"pid {pid} ({info.get('exe', '?')}) has no GNU build-id; patch "
            f"{patch.name} was built for {want} (link with -Wl,--build-id)"
        )
    if have != want:
        raise PolicyError(
            f"patch {patch.name} was built for build-id {want} but pid {pid} "
            f"runs {info.get('exe', 'an executable')} with build-id {have}"
            + ("" if mapped is None else " and maps no library of that build-id")
        )
    if state_in(patch.name, applied) is PatchState.APPLIED:
        raise PolicyError(
            f"patch {patch.name} is already applied in pid {pid} "
            f"(remove it first: patchbox remove -p {pid} {patch.name})"
        )


def _arch_name(machine: int) -> str:
    """Returns the name of ELF machine ``machine`` (or how a message says it is unknown)."""
    try:
        return get_arch_by_machine(machine).name
    except ElfError:
        return "an architecture patchbox does not know"


def check_remove(name: str, applied: Sequence[AppliedPatch], pid: int | str) -> None:
    """Raises PolicyError if patch ``name`` must not be removed from the process whose
    LIST reply is ``applied``."""
    state = state_in(name, applied)
    if state not in (PatchState.APPLIED, PatchState.UNLOADED):
        names = ", ".join(p.name for p in applied) or "none"
        raise PolicyError(f"no patch named {name} is applied in pid {pid} (applied: {names})")
    above = stacked_above(name, applied)
    if above:
        top, symbol = above[0]
        order = ", ".join(n for n, _ in above)
        raise PolicyError(
            f"cannot remove {name} from pid {pid}: patch {top} is stacked on it "
            f"(function {symbol}); remove {order} first"
        )
    transition(state, Action.REMOVE, name)
