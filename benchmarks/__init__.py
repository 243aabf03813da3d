"""Benchmarks printing measured tables (docs/benchmarks.md), run from the repository's root
as modules: ``.venv/bin/python -m benchmarks.bench_live``. They import the installed
patchbox and their shared helpers (``benchmarks.common``) as a package, never by editing
``sys.path``."""
