"""Stand-in for pypa's get-pip.py, which ansible-test downloads from its own CI file host
(not reachable here: only the package registries are). ansible-test runs it as
``python get_pip_<version>.py [pip options] pip==X ... --no-setuptools --no-wheel`` in an
empty virtual environment; this does the same with the pip that Python bundles
(ensurepip), then with that pip from the package index. get-pip's own flags
``--no-setuptools``/``--no-wheel`` leave those packages out."""

from __future__ import annotations

import subprocess
import sys

if __name__ == "__main__":
    own = {"--no-setuptools", "--no-wheel"}
    args = [a for a in sys.argv[1:] if a not in own]
    # In a child: ensurepip turns the pip configuration (index, certificates) off in the
    # environment of the process that runs it.
    subprocess.run([sys.executable, "-m", "ensurepip", "--upgrade"], check=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "install", "--upgrade", "--force-reinstall", *args], check=True)
    if "--no-setuptools" in sys.argv:
        subprocess.run([*pip, "uninstall", "-q", "-y", "setuptools"], check=True)
