"""Reach: processes and code not built for patchbox. Attaching the agent to a running
process (`patchbox attach`), holding threads clear of an entry jump while it is written,
and the ELF objects a process maps (docs/reach.md)."""
