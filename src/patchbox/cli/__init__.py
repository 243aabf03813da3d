"""The `patchbox` command line (`patchbox.cli.main`), one module per subcommand.

:func:`main` is the console script: `patchbox --version`, which scripts ask in loops, is
answered before anything else is imported; everything else goes to click.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """Console-script entry point (`patchbox`, `raxlpxs`)."""
    if sys.argv[1:] in (["--version"], ["-V"]):
        from patchbox import __version__

        print(f"patchbox, version {__version__}")  # as click's version_option says it
        return
    from patchbox.cli.main import main as click_main

    click_main()
