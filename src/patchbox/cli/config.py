"""`patchbox config`: flags for building a patchable program (like pkg-config)."""

from __future__ import annotations

import click

from patchbox import config
from patchbox.arch import iter_arches

__all__ = ["config_command"]


@click.command("config")
@click.option("--cflags", "want_cflags", is_flag=True, help="Compile flags of a patchable program.")
@click.option(
    "--libs",
    "want_libs",
    is_flag=True,
    help="Link inputs: the agent objects, a build-info object, link flags.",
)
@click.option(
    "--preload", "want_preload", is_flag=True, help="Path of libsandbox.so for LD_PRELOAD."
)
@click.option(
    "--pkgconfigdir",
    "want_pcdir",
    is_flag=True,
    help="Directory holding patchbox.pc: PKG_CONFIG_PATH=$(patchbox config --pkgconfigdir).",
)
@click.option(
    "--app-version", metavar="V", help="Version recorded by --libs [$PATCHBOX_APP_VERSION]."
)
@click.option("--app-cflags", metavar="FLAGS", help="Compile flags recorded by --libs [$CFLAGS].")
@click.option(
    "--arch",
    "arch_name",
    metavar="ARCH",
    help="Flags and agent for another architecture, by uname -m's name ("
    + ", ".join(a.name for a in iter_arches())
    + "; the agent cross-built when the package was) [this host's].",
)
def config_command(
    *,
    arch_name: str | None,
    want_cflags: bool,
    want_libs: bool,
    want_preload: bool,
    want_pcdir: bool,
    app_version: str | None,
    app_cflags: str | None,
) -> None:
    """Print compile flags, link inputs, the preload library or the pkg-config directory.

    \b
      gcc $(patchbox config --cflags) -c app.c
      gcc app.o $(patchbox config --libs --app-version 1.2) -o app
      PKG_CONFIG_PATH=$(patchbox config --pkgconfigdir) pkg-config --cflags --libs patchbox
      CROSS-gcc $(patchbox config --arch ARCH --cflags) -c app.c    (cross-built)
      PKG_CONFIG_PATH=$(patchbox config --arch ARCH --pkgconfigdir) pkg-config ...

    pkg-config gives the same agent and flags, without the build-info object (the
    program's version, git revision and date that INFO reports; they read "unknown").
    """
    alone = [
        flag for flag, on in (("--preload", want_preload), ("--pkgconfigdir", want_pcdir)) if on
    ]
    if not (want_cflags or want_libs or alone):
        raise click.UsageError("give --cflags, --libs, --preload or --pkgconfigdir")
    if alone and (want_cflags or want_libs or len(alone) > 1):
        raise click.UsageError(f"{alone[0]} cannot be combined with other options")
    if (app_version is not None or app_cflags is not None) and not want_libs:
        raise click.UsageError("--app-version and --app-cflags only apply to --libs")
    arch = config.target_arch(arch_name)
    if want_preload:
        click.echo(str(config.preload(arch)))
        return
    if want_pcdir:
        click.echo(str(config.pkgconfig_dir(arch)))
        return
    parts = []
    if want_cflags:
        parts.append(config.cflags(arch))
    if want_libs:
        parts.append(config.libs(app_version, app_cflags, arch=arch))
    click.echo(" ".join(parts))
