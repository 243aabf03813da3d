"""The agent's libFuzzer harnesses (agent/fuzz/), built and run for a bounded time (`-m fuzz`).

Builds `make -C agent fuzz` (clang, ASan + UBSan) into a temporary directory: fuzz_agent
(a connection's bytes) and fuzz_store (a store file's bytes). Writes fresh seed corpora
with the current encoders (agent/fuzz/make_corpus.py) beside the ones in the repository,
and fuzzes each for its share of $PATCHBOX_FUZZ_SECONDS (default 60: 40 s and 20 s). Any
crash, sanitizer report, broken reply or half-applied patch (the harness aborts on those)
fails the test.
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
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return out / "fuzz" / "fuzz_agent"


def seed_corpus(directory: Path, *, store: bool = False) -> None:
    subprocess.run(
        [
            sys.executable,
            str(AGENT / "fuzz" / "make_corpus.py"),
            *(["--store"] if store else []),
            str(directory),
        ],
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
            check=False,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"fuzz: reply {want}" in run.stderr, run.stderr[-3000:]


def test_store_seeds_reach_the_apply_engine(fuzzer: Path, tmp_path: Path) -> None:
    """The store harness reads patch files as the agent reads its store at start: the
    generated ones (signed or not) are applied, broken ones refused with a reason."""
    seed_corpus(tmp_path, store=True)
    for name, want in [
        ("store-simple-", "status 0 simple"),
        ("store-signed-", "status 0 simple"),
        ("store-two-", "status 0 two"),
        ("store-wrong-bid-", "status 7 patch build-id does not match"),
        ("store-padded-", "refused bad header"),
        ("store-bad-magic-", "refused not a patch file"),
    ]:
        seed = next(p for p in tmp_path.iterdir() if p.name.startswith(name))
        run = subprocess.run(
            [str(fuzzer.with_name("fuzz_store")), "-runs=1", str(seed)],
            capture_output=True,
            text=True,
            env={**os.environ, "FUZZ_VERBOSE": "1"},
            timeout=60,
            check=False,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"fuzz: store {want}" in run.stderr, run.stderr[-3000:]


def fuzz_for(binary: Path, seconds: int, corpora: list[Path], tmp_path: Path) -> int:
    """Returns how many inputs ``binary`` ran in ``seconds``; fails on any finding."""
    artifacts = tmp_path / f"artifacts-{binary.name}"
    artifacts.mkdir()
    run = subprocess.run(
        [
            str(binary),
            f"-max_total_time={seconds}",
            "-max_len=65536",
            "-timeout=10",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/",
            f"-dict={AGENT / 'fuzz' / 'agent.dict'}",
            *map(str, corpora),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )
    tail = run.stderr[-6000:]
    assert run.returncode == 0, f"fuzzer failed (artifacts in {artifacts}):\n{tail}"
    for bad in ("ERROR: AddressSanitizer", "runtime error:", "deadly signal", "invariant broken"):
        assert bad not in run.stderr, tail
    assert not list(artifacts.iterdir())
    execs = re.search(r"stat::number_of_executed_units:\s*(\d+)", run.stderr)
    assert execs, tail
    return int(execs.group(1))


def test_fuzz_agent_for_a_bounded_time(fuzzer: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seed_corpus(corpus)
    seconds = max(1, SECONDS * 2 // 3)
    assert fuzz_for(fuzzer, seconds, [corpus, AGENT / "fuzz" / "corpus"], tmp_path) > 1000


def test_fuzz_store_reader_for_a_bounded_time(fuzzer: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus-store"
    corpus.mkdir()
    seed_corpus(corpus, store=True)
    seconds = max(1, SECONDS - SECONDS * 2 // 3)
    store = fuzzer.with_name("fuzz_store")
    assert fuzz_for(store, seconds, [corpus, AGENT / "fuzz" / "corpus-store"], tmp_path) > 1000
