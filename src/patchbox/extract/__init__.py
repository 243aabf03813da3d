"""Objects → patch: take replacement functions out of patched object files, plan their
relocations as patch fix-ups, and combine one or several objects into one live patch."""

from patchbox.extract.combine import extract_objects, extract_patch
from patchbox.extract.model import Contribution

__all__ = ["extract_patch", "extract_objects", "Contribution"]
