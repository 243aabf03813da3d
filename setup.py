"""The build step of patchbox's wheel (metadata is in pyproject.toml).

The wheel carries the agent: ``build_py`` compiles it with agent/Makefile and installs
it, its headers and patchbox.pc into ``patchbox/_agent/`` (tools/install_agent.py).
The result is platform-specific (x86-64 Linux objects) but independent of the Python
ABI, so the wheel is tagged ``py3-none-linux_x86_64``.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _install_agent(dest: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "install_agent", ROOT / "tools" / "install_agent.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.install(dest, ROOT)


class BuildWithAgent(build_py):
    """build_py, then the agent into patchbox/_agent (of the source tree when editable)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            _install_agent(ROOT / "src" / "patchbox" / "_agent")
        else:
            _install_agent(Path(self.build_lib) / "patchbox" / "_agent")


class PlatformWheel(bdist_wheel):
    """Tags the wheel py3-none-<platform>: it holds native objects, no Python extension
    (so it installs into site-packages as a pure one would)."""

    def get_tag(self) -> tuple[str, str, str]:
        _py, _abi, plat = super().get_tag()
        if plat == "any":
            plat = f"linux_{platform.machine()}"
        return "py3", "none", plat


setup(cmdclass={"build_py": BuildWithAgent, "bdist_wheel": PlatformWheel})
