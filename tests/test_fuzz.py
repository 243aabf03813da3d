"""The agent's libFuzzer harness (agent/fuzz/), built and run for a bounded time (`-m fuzz`).

Builds `make -C agent fuzz` (clang, ASan + UBSan) into a temporary directory, writes a
fresh seed corpus with the current encoders (agent/fuzz/make_corpus.py) beside the one in
the repository, and fuzzes for $PATCHBOX_FUZZ_SECONDS (default 60). Any crash, sanitizer
report, broken reply or half-applied patch (the harness aborts on those) fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = pytest.mark.fuzz

AGENT = ROOT / "agent"
SECONDS = int(os.environ.get("PATCHBOX_FUZZ_SECONDS", "60"))


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("clang"):
        pytest.skip(
            "clang not installed (scripts/bootstrap.sh installs clang and libclang-rt-14-dev)"
        )
    out = tmp_path_factory.mktemp("fuzzbuild")
    build = subprocess.run(
        ["make", "-s", "-C", str(AGENT), f"OUT={out}", "fuzz"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return out / "fuzz" / "fuzz_agent"


def seed_corpus(directory: Path) -> None:
    subprocess.run(
        [sys.executable, str(AGENT / "fuzz" / "make_corpus.py"), str(directory)],
        check=True,
        capture_output=True,
        text=True,
    )


def test_seeds_reach_the_apply_engine(fuzzer: Path, tmp_path: Path) -> None:
    """The generated APPLY seeds pass every agent check (they would be worthless otherwise)."""
    seed_corpus(tmp_path)
    for name, want in [
        ("apply-", "status 0"),
        ("apply-fixups-", "status 0"),
        ("stack-", "status 18 another patch is stacked"),
        ("apply-full-", "status 11 not enough free space"),
    ]:
        seed = next(
            p
            for p in tmp_path.iterdir()
            if p.name.startswith(name) and re.fullmatch(re.escape(name) + "[0-9a-f]{8}", p.name)
        )
        run = subprocess.run(
            [str(fuzzer), "-runs=1", str(seed)],
            capture_output=True,
            text=True,
            env={**os.environ, "FUZZ_VERBOSE": "1"},
            timeout=60,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"fuzz: reply {want}" in run.stderr, run.stderr[-3000:]


def test_fuzz_agent_for_a_bounded_time(fuzzer: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seed_corpus(corpus)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    run = subprocess.run(
        [
            str(fuzzer),
            f"-max_total_time={SECONDS}",
            "-max_len=65536",
            "-timeout=10",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/",
            f"-dict={AGENT / 'fuzz' / 'agent.dict'}",
            str(corpus),
            str(AGENT / "fuzz" / "corpus"),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
    )
    tail = run.stderr[-6000:]
    assert run.returncode == 0, f"fuzzer failed (artifacts in {artifacts}):\n{tail}"
    for bad in ("ERROR: AddressSanitizer", "runtime error:", "deadly signal", "invariant broken"):
        assert bad not in run.stderr, tail
    execs = re.search(r"stat::number_of_executed_units:\s*(\d+)", run.stderr)
    assert execs and int(execs.group(1)) > 1000, tail
    assert not list(artifacts.iterdir())
