"""The rooms of src/patchbox import downward only: no cycle, and each room only imports
rooms of lower layers (README "Layout"). Read from the source with ast, so an import
inside a function counts too."""

from __future__ import annotations

import ast
import subprocess
import sys

from helpers import ROOT

PKG = ROOT / "src" / "patchbox"

# Lowest first. A room may import its own modules and rooms of earlier layers.
LAYERS: list[set[str]] = [
    {"errors", "wire"},  # neutral ground: import nothing of the project
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
