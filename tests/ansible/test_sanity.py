"""`ansible-test sanity` on the collection (tier `ansible`).

ansible-test wants the collection at ``ansible_collections/<namespace>/<name>``, outside
any git work tree (inside one it tests only the files git tracks there): ansible/ is
copied below the test's temporary directory. ansible-test installs each sanity test's
pinned requirements into virtualenvs of its own under ``$HOME/.ansible/test``; HOME
points to ``.cache/ansible-sanity`` of the checkout, so nothing of the user's home is
touched and the virtualenvs are reused by later runs. Their pip comes from get_pip.py (see
there) instead of ansible-test's download.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import BIN, ROOT

pytestmark = pytest.mark.ansible

HOME = ROOT / ".cache" / "ansible-sanity"


def _pip_version() -> str:
    """Returns the pip version ansible-test bootstraps its virtualenvs with."""
    spec = importlib.util.find_spec("ansible_test")
    assert spec is not None and spec.submodule_search_locations
    src = Path(spec.submodule_search_locations[0]) / "_internal" / "python_requirements.py"
    m = re.search(r"pip='([0-9.]+)'", src.read_text())
    assert m, "pip version of ansible-test not found"
    return m[1]


def test_ansible_test_sanity(tmp_path: Path) -> None:
    collection = tmp_path / "ansible_collections" / "patchbox" / "live"
    shutil.copytree(ROOT / "ansible", collection)
    cache = HOME / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    version = _pip_version().replace(".", "_")
    shutil.copy(Path(__file__).with_name("get_pip.py"), cache / f"get_pip_{version}.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env["HOME"] = str(HOME)
    proc = subprocess.run(
        [str(BIN / "ansible-test"), "sanity", "--python", "3.11", "--local", "--color", "no"],
        cwd=collection,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=840,
        check=False,
    )
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith(("ERROR", "FATAL"))]
    assert proc.returncode == 0, "\n".join(errors) or out[-5000:]
    ran = re.findall(r'^Running sanity test "([^"]+)"', out, re.M)
    # Every test ansible-test has for a collection ran (none skipped on this machine).
    for name in ("ansible-doc", "compile", "import", "pep8", "pylint", "validate-modules"):
        assert name in ran, ran
    assert "yamllint" in ran and "runtime-metadata" in ran
