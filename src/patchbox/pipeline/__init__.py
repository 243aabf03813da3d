"""`patchbox build` as a pipeline of named passes: the public Python API (docs/api.md).

Read top to bottom, as :func:`build_patch` runs them::

    check      the diff names files, none assembly; the binary has a build-id
    rebuild    the tree built without and with the diff (make, or recompiled objects)
    compare    every object pair, function by function: one decision per symbol
    plan       what each object contributes: replaced, carried, copied
    extract    the plan as one patch: copies, targets, layout, fix-ups
    write      the patch file

Each pass is a function from immutable values to an immutable value (:mod:`.model`):
compare's decisions are never edited, the plan is derived from them, and a caller can
stop after any pass and look. :func:`build_patch` is what the ``patchbox build``
command, the benchmarks and the corpus of real fixes run.
"""

from patchbox.pipeline.model import (
    BuildRequest,
    BuildResult,
    Checked,
    Comparison,
    Extracted,
    ObjectPlan,
    PassTime,
    Plan,
)
from patchbox.pipeline.passes import (
    NO_FUNCTION,
    build_patch,
    check,
    compare,
    explain,
    extract,
    find_reference,
    patch_from_diffs,
    plan,
    rebuild,
    refuse,
    workspace,
    write,
)

__all__ = [
    "BuildRequest",
    "BuildResult",
    "Checked",
    "Comparison",
    "Extracted",
    "ObjectPlan",
    "PassTime",
    "Plan",
    "NO_FUNCTION",
    "build_patch",
    "check",
    "compare",
    "explain",
    "extract",
    "find_reference",
    "patch_from_diffs",
    "plan",
    "rebuild",
    "refuse",
    "workspace",
    "write",
]
