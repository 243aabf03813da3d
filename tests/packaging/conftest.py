"""The wheel tier's fixture: the package built and installed once per session, for
tests/packaging/test_wheel.py and test_wheel_aarch64.py alike."""

from __future__ import annotations

import pytest
from wheelenv import Installed, install


@pytest.fixture(scope="session")
def installed(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Installed:
    """Returns the wheel installed into a fresh virtualenv outside the checkout."""
    return install(tmp_path_factory.mktemp("wheel"), request.addfinalizer)
