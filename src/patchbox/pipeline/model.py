"""The values the build passes hand each other (:mod:`patchbox.pipeline`).

Every value is immutable: a pass reads earlier values and returns a new one, so a test
(or a caller) can stop after any pass and look at what it made.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from patchbox.compare.model import Decision, ObjectDiff, Verdict
from patchbox.extract.model import Contribution
from patchbox.format.model import Patch
from patchbox.profiles import GENERIC, Profile
from patchbox.rebuild.workspace import Rebuilt

__all__ = [
    "BuildRequest",
    "Checked",
    "Comparison",
    "ObjectPlan",
    "Plan",
    "Extracted",
    "PassTime",
    "BuildResult",
    "NO_OUT_OF_LINE_COPY",
]

# What the plan adds to the reason of a changed function the program has no copy of.
NO_OUT_OF_LINE_COPY = (
    "; no out-of-line copy in the running binary (inlined into its callers, which are in "
    "the patch where their code changed)"
)


@dataclass(frozen=True)
class BuildRequest:
    """What `patchbox build` is asked (docs/build.md; every field a command-line option)."""

    source: Path  # the tree that built the running binary (never modified)
    diff: Path  # the fix, as a unified diff
    binary: Path  # the running program's binary: absolute, in ``source``, or from the cwd
    output: Path | None = None  # the patch file; default NAME.pbx in the current directory
    name: str | None = None  # default: the output's stem, else "patch"
    build_cmd: str | None = None  # make mode: the build command (default make)
    build_dir: Path | None = None  # incremental mode: a configured meson/ninja directory
    jobs: int | None = None
    strip: int | None = None  # patch -pN (default: 1, then 0, 2, 3)
    profile: Profile = GENERIC
    symbols: Path | None = None  # symbols of a stripped binary from an unstripped build
    allow_inlined: bool = False
    work: Path | None = None  # the workspace, kept (default: a temporary one, removed)
    dry_run: bool = False  # compare and plan, write nothing (refusals raise)

    @property
    def patch_name(self) -> str:
        """Returns the patch's name: ``name``, else the output's stem, else ``patch``."""
        if self.name is not None:
            return self.name
        return self.output.stem if self.output is not None else "patch"

    @property
    def patch_path(self) -> Path:
        """Returns where the patch is written."""
        return self.output if self.output is not None else Path.cwd() / f"{self.patch_name}.pbx"


@dataclass(frozen=True)
class Checked:
    """The request checked before anything is built: the diff's text and the reference
    binary found."""

    diff_text: str
    reference: Path  # as found (absolute, in the source tree, or from the cwd)


@dataclass(frozen=True)
class Comparison:
    """Every object of the two builds compared: the diffs of objects with a decision,
    and how many objects had none (identical, or differing only in debug info)."""

    diffs: tuple[ObjectDiff, ...]
    identical: int = 0


@dataclass(frozen=True)
class ObjectPlan:
    """What one compared object contributes to the patch, derived from its diff (which
    stays as compare made it)."""

    diff: ObjectDiff
    replace: tuple[str, ...]  # changed functions the running binary has out of line
    inlined_away: tuple[str, ...] = ()  # changed, but no out-of-line copy: carried

    @property
    def copies(self) -> frozenset[str]:
        """Returns the local functions copied, never linked to the program's: the diff's
        changed clones and the changed functions the program has no copy of."""
        return self.diff.clones | frozenset(self.inlined_away)

    @property
    def contributes(self) -> bool:
        """Returns True if the object is in the patch: it replaces a function, or defines
        a new global another object may reference."""
        return bool(self.replace or self.diff.new_globals)

    @property
    def decisions(self) -> tuple[Decision, ...]:
        """Returns the diff's decisions as planned: a changed function without an
        out-of-line copy is carried, not in."""
        if not self.inlined_away:
            return self.diff.decisions
        return tuple(
            replace(d, verdict=Verdict.CARRIED, reason=d.reason + NO_OUT_OF_LINE_COPY)
            if d.symbol in self.inlined_away and d.verdict is Verdict.IN
            else d
            for d in self.diff.decisions
        )

    def contribution(self) -> Contribution:
        """Returns what the extraction passes take of this object."""
        return Contribution(self.diff.patched, self.replace, self.copies, self.diff.orig)


@dataclass(frozen=True)
class Plan:
    """The whole patch as planned: per compared object, what it contributes."""

    objects: tuple[ObjectPlan, ...]
    identical: int = 0

    @property
    def refusals(self) -> list[str]:
        """Returns ``object: symbol: reason`` of every refusal."""
        return [f"{p.diff.rel}: {r}" for p in self.objects for r in p.diff.refusals]

    @property
    def contributing(self) -> tuple[ObjectPlan, ...]:
        """Returns the objects that are in the patch."""
        return tuple(p for p in self.objects if p.contributes)

    def explained(self) -> tuple[ObjectDiff, ...]:
        """Returns the diffs with the planned decisions (what ``--explain`` shows)."""
        return tuple(
            replace(p.diff, decisions=p.decisions) if p.inlined_away else p.diff
            for p in self.objects
        )


@dataclass(frozen=True)
class Extracted:
    """The patch built from a plan."""

    patch: Patch
    objects: tuple[str, ...]  # the objects in it, relative to the tree


@dataclass(frozen=True)
class PassTime:
    """How long one pass took."""

    name: str
    seconds: float


@dataclass(frozen=True)
class BuildResult:
    """Everything one `patchbox build` made, pass by pass (``patch`` and ``written``
    are None after a dry run)."""

    request: BuildRequest
    checked: Checked
    rebuilt: Rebuilt
    comparison: Comparison
    plan: Plan
    extracted: Extracted | None
    written: Path | None
    warnings: tuple[str, ...] = ()
    timings: tuple[PassTime, ...] = field(default=())

    @property
    def patch(self) -> Patch | None:
        """Returns the patch built, None after a dry run."""
        return self.extracted.patch if self.extracted is not None else None

    def seconds(self, *names: str) -> float:
        """Returns the time the passes ``names`` took together."""
        return sum(t.seconds for t in self.timings if t.name in names)
