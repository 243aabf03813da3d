"""The corpus's CI subset (tier `-m corpus`): real security fixes of Debian bookworm
packages, built by `patchbox build` from the fix's own diff, applied to the live daemon
under load, checked by the fix's regression probe from outside (docs/corpus.md).

memcached: its three fixes (the third refused for its struct layout change, then applied
in its hand-adapted form with a shadow variable, docs/shadow.md); dnsmasq: CVE-2026-4893.
Runs as root (apt-get, daemons); a few minutes once the cache is warm.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from corpusutil import run_corpus

pytestmark = pytest.mark.corpus


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("the corpus installs packages and starts daemons as root")
    results: Path = tmp_path_factory.mktemp("corpus")
    return run_corpus(results, "memcached", "dnsmasq", "--ci")


def assert_live(r: dict[str, Any]) -> None:
    a = r["apply"]
    assert r["build"]["result"] == "built", r["build"]
    assert a["apply"] == "applied", a["apply_message"]
    assert a["remove"] == "removed", a["remove_message"]
    for phase in ("load_apply", "load_remove"):
        assert a[phase]["failed"] == 0 and a[phase]["requests"] > 0, a[phase]
    assert a["alive_at_end"]
    assert a["probe_passed"], a["probe_after"]
    assert r["verdict"] == "live"


def test_memcached_sasl_duplicate_user(rows: dict[str, dict[str, Any]]) -> None:
    r = rows["memcached/0008-CVE-2026-47783-CVE-2026-47784"]
    assert_live(r)
    assert r["build"]["functions"] == ["sasl_server_userdb_checkpass"]
    # The unfixed check stops at the first line of a user: the second password fails.
    assert r["apply"]["probe_before"].endswith("0x20")
    assert r["apply"]["probe_removed"].endswith("0x20")


def test_memcached_proxy_long_multiget(rows: dict[str, dict[str, Any]]) -> None:
    r = rows["memcached/0009-CVE-2023-46852"]
    assert_live(r)
    assert r["build"]["functions"] == ["proxy_process_command"]


def test_memcached_parser_field_refused_then_adapted(rows: dict[str, dict[str, Any]]) -> None:
    r = rows["memcached/CVE-2023-46853"]
    assert r["build"]["result"] == "refused"
    assert "struct mcp_parser_s: layout changed" in r["build"]["message"]
    assert "member 'endlen' added" in r["build"]["message"]
    adapted = rows["memcached/CVE-2023-46853-adapted"]
    assert_live(adapted)
    assert "VALUE foox" not in adapted["apply"]["probe_before"]
    assert "VALUE foox" not in adapted["apply"]["probe_removed"]


def test_dnsmasq_ecs_mismatch(rows: dict[str, dict[str, Any]]) -> None:
    r = rows["dnsmasq/CVE-2026-4893"]
    assert_live(r)
    assert r["build"]["functions"] == ["process_reply"]
    assert r["apply"]["probe_before"] == "mismatching ECS: A 10.9.8.7; matching: A 10.9.8.7"
    assert r["apply"]["probe_reverted"]
