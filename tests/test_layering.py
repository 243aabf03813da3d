"""Who may import whom. The rooms of src/patchbox import downward only: no cycle, and each
room only imports rooms of lower layers (README "Layout"); so do the modules of the corpus
package (scripts/corpus). Read from the source with ast, so an import inside a function
counts too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

PKG = ROOT / "src" / "patchbox"

# Lowest first. A room may import its own modules and rooms of earlier layers.
LAYERS: list[set[str]] = [
    {"errors", "wire"},  # neutral ground: import nothing of the project
    {"arch"},  # what differs per architecture: imports errors and wire (fix-up types)
    {"flags", "profiles", "sourcediff", "safefs", "elf", "format"},
    {"procfs"},  # the one reader of /proc: under every room that asks it about a process
    {"protocol", "config", "signing", "compare"},
    {"policy", "rebuild", "extract", "store", "reach"},
    {"host", "pipeline"},
    {"cli"},
]
LAYER_OF = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


ROOMS = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"} | {
    p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()
}


def _room(module: str) -> str | None:
    """Returns the room (top-level module or package) of ``module``, None outside one
    (``patchbox`` itself, ``patchbox.__version__``)."""
    parts = module.split(".")
    if parts[0] != "patchbox" or len(parts) < 2 or parts[1] not in ROOMS:
        return None
    return parts[1]


def imports_by_room() -> dict[str, set[str]]:
    """Returns {room: rooms its modules import} for every module of the package."""
    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        room = _room(module)
        if room is None:  # patchbox/__init__.py
            continue
        found = out.setdefault(room, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                other = _room(name)
                if other is not None and other != room:
                    found.add(other)
    return out


def test_every_room_has_a_layer() -> None:
    assert set(imports_by_room()) <= set(LAYER_OF), "add new rooms to LAYERS"


def test_rooms_import_downward_only() -> None:
    wrong = [
        f"{room} (layer {LAYER_OF[room]}) imports {other} (layer {LAYER_OF[other]})"
        for room, others in sorted(imports_by_room().items())
        for other in sorted(others)
        if LAYER_OF[other] >= LAYER_OF[room]
    ]
    assert not wrong, wrong


def test_no_import_cycle() -> None:
    graph = imports_by_room()
    state: dict[str, int] = {}

    def visit(room: str, path: list[str]) -> None:
        state[room] = 1
        for other in graph.get(room, ()):
            assert state.get(other) != 1, f"import cycle: {' -> '.join([*path, other])}"
            if other not in state:
                visit(other, [*path, other])
        state[room] = 2

    for room in graph:
        if room not in state:
            visit(room, [room])


def test_neutral_modules_import_nothing_of_the_project() -> None:
    graph = imports_by_room()
    assert graph.get("errors") == set()
    assert graph.get("wire") == set()


def test_extract_patch_does_not_load_tree_rebuilding() -> None:
    code = (
        "import sys, patchbox.cli.extract; "
        "print(sorted(m for m in sys.modules if m.startswith('patchbox.rebuild')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# -- scripts/corpus: a package whose modules import downward only -----------------------------

CORPUS = ROOT / "scripts" / "corpus"
# Lowest first (scripts/corpus/__init__.py); ``load`` is the package of load generators.
CORPUS_LAYERS: list[set[str]] = [
    {"fixes", "load"},
    {"harness", "report"},
    {"levels", "qemu_pci", "qemu_scsi", "qemu_virtio"},
    {"dnsmasq", "memcached", "openssh", "qemu"},
    {"__main__"},
]
CORPUS_LAYER_OF = {m: i for i, mods in enumerate(CORPUS_LAYERS) for m in mods}


def corpus_imports() -> dict[str, set[str]]:
    """Returns {module: modules of the corpus package it imports}, a module of ``load/``
    counted as ``load``; relative imports resolved, absolute ones (``corpus.x``, or a bare
    sibling name as a sys.path hack would have it) counted too."""
    mods = {p.stem for p in CORPUS.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in CORPUS.iterdir() if (p / "__init__.py").is_file()
    }
    out: dict[str, set[str]] = {}
    for path in CORPUS.rglob("*.py"):
        rel = path.relative_to(CORPUS).with_suffix("").parts
        if rel == ("__init__",):
            continue
        package = list(rel[:-1])  # a module's package, relative to scripts/corpus
        found = out.setdefault(rel[0], set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[list[str]] = []
            if isinstance(node, ast.Import):
                targets = [a.name.split(".") for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    targets = [base + node.module.split(".")]
                else:
                    targets = [base + [a.name] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module.split(".")]
            for target in targets:
                parts = target[1:] if target and target[0] == "corpus" else target
                if parts and parts[0] in mods and parts[0] != rel[0]:
                    found.add(parts[0])
    return out


def test_corpus_modules_have_a_layer() -> None:
    assert set(corpus_imports()) == set(CORPUS_LAYER_OF), "add new modules to CORPUS_LAYERS"


def test_corpus_modules_import_downward_only() -> None:
    """Downward only: no cycle (the old driver and its program modules imported each other)."""
    wrong = [
        f"{mod} imports {other}"
        for mod, others in sorted(corpus_imports().items())
        for other in sorted(others)
        if CORPUS_LAYER_OF[other] >= CORPUS_LAYER_OF[mod]
    ]
    assert not wrong, wrong


# -- tests: laid out by room, sharing helpers, never test modules -----------------------------

TESTS = ROOT / "tests"
# Directories of tests/ that are tiers, not rooms (a room's unit tests may share one: reach).
TIER_DIRS = {"e2e", "qemu", "guest", "reach", "ansible", "corpus", "diff", "packaging", "fuzz"}
# Tests of the whole tree, not of one room.
TOP_LEVEL_TESTS = {
    "test_layering.py",
    "test_api_doc.py",
    "test_suppressions.py",
    "test_arch_confined.py",
}


def _imported_names(path: Path) -> list[str]:
    """Returns every module name ``path`` imports absolutely (``from a import b``: ``a`` and
    ``a.b``), inside functions too."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_no_test_module_imports_another() -> None:
    """Tests share helpers through conftest.py fixtures and helper modules (helpers.py,
    e2e/live.py, ...): a test module imported by another runs its module code twice, under
    two names, and ties one test file to another's layout."""
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted(TESTS.rglob("*.py"))
        for name in _imported_names(path)
        if name.split(".")[0] == "tests"
        or any(p.startswith("test_") or p == "conftest" for p in name.split("."))
    ]
    assert not wrong, wrong


def test_tests_are_laid_out_by_room() -> None:
    """A directory of tests/ is named for the room of src/patchbox its unit tests test, or
    is a tier; only tests of the whole tree sit in tests/ itself."""
    dirs = {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert dirs - ROOMS - TIER_DIRS == set(), "name a test directory for the room it tests"
    top = {p.name for p in TESTS.glob("test_*.py")}
    assert top <= TOP_LEVEL_TESTS, f"move {sorted(top - TOP_LEVEL_TESTS)} to its room's directory"


# -- benchmarks and scripts/corpus: packages, imported as such ---------------------------------


def _uses_sys_path(path: Path) -> bool:
    """Returns whether the code of ``path`` touches ``sys.path``."""
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
    )


def test_benchmarks_and_corpus_leave_sys_path_alone() -> None:
    """Benchmarks import the installed patchbox and their own package (python -m
    benchmarks.NAME); the corpus runs as python -m corpus."""
    wrong = [
        str(p.relative_to(ROOT))
        for p in sorted([*(ROOT / "benchmarks").glob("*.py"), *CORPUS.rglob("*.py")])
        if _uses_sys_path(p)
    ]
    assert not wrong, wrong
