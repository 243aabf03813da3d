"""extract-patch refuses replaced functions that the reference binary also inlined
elsewhere (found through its DWARF), unless --allow-inlined."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import compile_c
from patchbox.cli.extract import extract_command
from patchbox.errors import ExtractError
from patchbox.extract import extract_patch
from patchbox.format.layout import read_patch

# describe_year: inlined into main (always_inline) and kept out of line (its address is
# taken); year_name: global, inlined into two callers; only_pointer: never inlined.
SRC = r"""
#include <stdio.h>
static inline __attribute__((always_inline)) const char *describe_year(int y) {
    return (y % 4 == 0) ? "leap" : "common";
}
const char *(*volatile year_fn)(int) = describe_year;
inline __attribute__((always_inline)) int year_name(int y) { return y * 7 + 1; }
extern int year_name(int y);
int (*volatile name_fn)(int) = year_name;
__attribute__((noipa)) int first(int y) { return year_name(y) + 1; }
__attribute__((noipa)) int second(int y) { return year_name(y) - 1; }
__attribute__((noipa)) static int only_pointer(int y) { return y + 3; }
int (*volatile ptr_fn)(int) = only_pointer;
int main(int argc, char **argv) {
    (void)argv;
    printf("%s %s %d %d %d\n", describe_year(argc), year_fn(argc), first(argc), second(argc),
           ptr_fn(argc));
    return 0;
}
"""

FIXED = (
    SRC.replace('(y % 4 == 0) ? "leap"', '(y % 4 == 0 && y % 100 != 0) ? "leap"')
    .replace("y * 7 + 1", "y * 7 + 2")
    .replace("y + 3", "y + 4")
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inline")
    (d / "fix").mkdir()
    (d / "nodebug").mkdir()
    return {
        "bin": compile_c(SRC, d / "service", extra=["-g"]),
        "nodebug": compile_c(SRC, d / "nodebug" / "service"),
        "obj": compile_c(FIXED, d / "fix" / "service.o", obj=True),
    }


def test_inlined_into_caller_is_refused(built: dict[str, Path]) -> None:
    with pytest.raises(ExtractError) as exc:
        extract_patch(built["obj"], built["bin"], ["describe_year"])
    assert str(exc.value) == (
        "describe_year is inlined into main (service.c): calls there would keep the old "
        "code; add --function main if it can be replaced, or pass --allow-inlined to accept"
    )


def test_allow_inlined_warns_and_records(built: dict[str, Path]) -> None:
    warnings: list[str] = []
    patch = extract_patch(
        built["obj"],
        built["bin"],
        ["describe_year", "year_name"],
        allow_inlined=True,
        warnings=warnings,
    )
    assert warnings == [
        "describe_year is inlined into main (service.c) at 1 site(s): calls there keep the "
        "old code (--allow-inlined)",
        "year_name is inlined into first (service.c) at 1 site(s), second (service.c) at "
        "1 site(s): calls there keep the old code (--allow-inlined)",
    ]
    assert patch.meta["inlined_check"] == "dwarf"
    assert patch.meta["inlined:describe_year"] == "main"
    assert patch.meta["inlined:year_name"] == "first,second"


def test_several_callers_are_all_named(built: dict[str, Path]) -> None:
    with pytest.raises(
        ExtractError,
        match=r"year_name is inlined into first \(service.c\), "
        r"second \(service.c\): .*add --function first --function second if "
        r"they can be replaced",
    ):
        extract_patch(built["obj"], built["bin"], ["year_name"])


def test_caller_replaced_too_is_accepted(built: dict[str, Path]) -> None:
    warnings: list[str] = []
    patch = extract_patch(built["obj"], built["bin"], ["describe_year", "main"], warnings=warnings)
    assert not any("inlined" in w for w in warnings)
    assert [w for w in warnings if w.startswith("main is replaced")]  # its loop keeps old code
    assert patch.meta["inlined_check"] == "dwarf"
    assert not any(k.startswith("inlined:") for k in patch.meta)


def test_not_inlined_gives_no_warning(built: dict[str, Path]) -> None:
    warnings: list[str] = []
    patch = extract_patch(built["obj"], built["bin"], ["only_pointer"], warnings=warnings)
    assert warnings == []
    assert patch.meta["inlined_check"] == "dwarf"


def test_no_debug_info_warns(built: dict[str, Path]) -> None:
    warnings: list[str] = []
    patch = extract_patch(built["obj"], str(built["nodebug"]), ["describe_year"], warnings=warnings)
    assert warnings == [
        f"{built['nodebug']} has no debug info (.debug_info): cannot check whether "
        f"describe_year is inlined elsewhere; build with -g"
    ]
    assert patch.meta["inlined_check"] == "unavailable"
    # Without the list, extract_patch stays silent and still succeeds.
    extract_patch(built["obj"], built["nodebug"], ["describe_year"])


def test_cli_refuses_then_allows(built: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fix.pbx"
    args = ["-f", "describe_year", "-o", str(out), str(built["obj"]), str(built["bin"])]
    res = CliRunner().invoke(extract_command, args)
    assert res.exit_code == 1
    assert "extract-patch: error: describe_year is inlined into main (service.c)" in res.output
    assert not out.exists()
    res = CliRunner().invoke(extract_command, ["--allow-inlined", *args])
    assert res.exit_code == 0, res.output
    assert (
        "extract-patch: warning: describe_year is inlined into main (service.c) at 1 site(s)"
    ) in res.output
    assert read_patch(out.read_bytes()).meta["inlined:describe_year"] == "main"


def test_cli_warns_without_debug_info(built: dict[str, Path], tmp_path: Path) -> None:
    res = CliRunner().invoke(
        extract_command,
        [
            "-f",
            "describe_year",
            "-o",
            str(tmp_path / "p.pbx"),
            str(built["obj"]),
            str(built["nodebug"]),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "extract-patch: warning: " in res.output and "build with -g" in res.output
