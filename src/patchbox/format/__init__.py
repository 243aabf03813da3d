"""The patch: its in-memory model, the byte layout of the patch file and the apply body,
and the bounds-checked codec both use (docs/patch-format.md)."""
