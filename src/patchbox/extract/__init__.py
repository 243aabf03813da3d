"""Objects → patch: take replacement functions out of patched object files, plan their
relocations as patch fix-ups, and combine one or several objects into one live patch."""

from patchbox.extract.combine import (
    check_reference,
    extract_multi,
    extract_patch,
    patch_from_diffs,
)

__all__ = ["extract_patch", "extract_multi", "patch_from_diffs", "check_reference"]
