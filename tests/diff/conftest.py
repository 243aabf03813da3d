"""Differential tests: scripts/difftest importable, and a timeout fit for a batch."""

from __future__ import annotations

import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts" / "difftest"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A batch of programs is one test: the CI handful takes a few minutes, the full tier
    # an hour or more on 2 cores.
    for item in items:
        if "diff_full" in item.keywords:
            item.add_marker(pytest.mark.timeout(6 * 3600))
        elif "diff" in item.keywords:
            item.add_marker(pytest.mark.timeout(900))
