"""The `patchbox` command line (`patchbox.cli.main`), one module per subcommand.

:func:`main` is the console script. What scripts ask in loops is answered before click
is imported: `patchbox --version` here, `patchbox info` by :mod:`patchbox.cli.fast` (the
command lines it takes in full); everything else goes to click.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """Console-script entry point (`patchbox`, `raxlpxs`)."""
    args = sys.argv[1:]
    if args in (["--version"], ["-V"]):
        from patchbox import __version__

        print(f"patchbox, version {__version__}")  # as click's version_option says it
        return
    if "info" in args[:3]:  # info ..., --timeout=S info ..., --timeout S info ...
        from patchbox.cli.fast import try_info

        status = try_info(args)
        if status is not None:
            sys.exit(status)  # as click's main ends
    from patchbox.cli.main import main as click_main

    click_main()
