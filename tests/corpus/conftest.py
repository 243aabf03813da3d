"""Corpus tests: scripts/corpus run once per module into a temporary results directory (the
source packages, level trees and builds stay cached in $PATCHBOX_CORPUS_CACHE)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Builds of the levels count against the suite-wide timeout: the first run on a fresh
    # machine fetches and builds every package.
    for item in items:
        if "corpus" in item.keywords or "corpus_full" in item.keywords:
            item.add_marker(pytest.mark.timeout(5400))
