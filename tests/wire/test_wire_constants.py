"""The agent and the client share one source of facts, wire/constants.toml, and agree on it
byte for byte.

Generated files are current; a C program compiled against the generated wire.h prints
every record's offsets and widths (the compiler's, from the packed structs) and every
value, compared with the Python struct formats and constants; the agent's own APPLY
parser runs on encoded bodies and its every read must start and end where the declared
layout puts the field; its store reader takes the same patch files as format/layout.py;
its reply writers write the declared widths in the declared order; the version is one.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import tomllib
from collections.abc import Callable
from typing import Any

import pytest

import patchbox
from helpers import ROOT
from patchbox import wire as C
from patchbox.errors import PatchFormatError
from patchbox.format.codec import INT_SIZES, Reader, min_size
from patchbox.format.layout import (
    decode_apply_body,
    encode_apply_body,
    record_widths,
    split_patch_file,
    with_signature,
    write_patch,
)
from patchbox.format.model import Fixup, Function, Hook, Patch
from patchbox.wire import Field, FixupBase, FixupSection, FixupType, HookKind, RedirectKind

SPEC = tomllib.loads((ROOT / "wire" / "constants.toml").read_text())
AGENT = ROOT / "agent"
ENUMS = {  # table of constants.toml: C prefix, Python class
    "message": ("PBX_MSG_", C.Msg),
    "redirect_kind": ("PBX_KIND_", C.RedirectKind),
    "apply_flag": ("PBX_FLAG_", C.ApplyFlag),
    "patch_state": ("PBX_STATE_", C.ListedState),
    "hook_kind": ("PBX_HOOK_", C.HookKind),
    "fixup_type": ("PBX_FIXUP_", C.FixupType),
    "fixup_base": ("PBX_BASE_", C.FixupBase),
    "fixup_section": ("PBX_SECT_", C.FixupSection),
}


def test_generated_files_are_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_wire.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_error_table_has_one_text_per_code() -> None:
    header = (AGENT / "include" / "patchbox" / "wire.h").read_text()
    texts = re.search(r"#define PBX_ERROR_TEXTS \{(.*?)\}", header, re.S)
    assert texts is not None
    c_texts = re.findall(r'"([^"]*)"', texts.group(1))
    # A lost comma would merge two strings and shorten this list (libpulp's bug).
    assert c_texts == [t for _v, t in SPEC["error"].values()]
    assert len(C.ERROR_TEXTS) == len(C.ErrorCode) == len(c_texts)
    assert len(set(c_texts)) == len(c_texts)


# -- the compiled header ------------------------------------------------------------------


def _probe_source() -> str:
    """Returns a C program that prints what the compiler makes of wire.h: every record's
    size and each field's offset and width, every number and every string."""
    out = ["#include <stddef.h>", "#include <stdio.h>", '#include "patchbox/wire.h"', ""]
    out.append("int main(void)\n{")
    for record, fields in SPEC["record"].items():
        s = f"struct pbx_{record}"
        out.append(f'\tprintf("record {record} %zu\\n", sizeof({s}));')
        for name in fields:
            out.append(
                f'\tprintf("field {record} {name} %zu %zu\\n", offsetof({s}, {name}), '
                f"sizeof((({s} *)0)->{name}));"
            )
    numbers = {f"PBX_{n}": v for n, v in SPEC["limits"].items()}
    for table, (prefix, _cls) in ENUMS.items():
        numbers |= {f"{prefix}{n}": v for n, v in SPEC[table].items()}
    numbers |= {f"PBX_E_{n}": v for n, (v, _t) in SPEC["error"].items()}
    numbers |= {f"PBX_FILE_FLAG_{n}": v for n, v in SPEC["file_flag"].items()}
    numbers |= {f"PBX_FIXUP_{n}_WIDTH": v for n, v in SPEC["fixup_width"].items()}
    numbers |= {f"PBX_{r.upper()}_SIZE": 0 for r in SPEC["record"]}
    numbers |= {f"PBX_{k.upper()}_MIN_SIZE": 0 for k in _list_records()}
    numbers["PBX_FILE_FLAGS_KNOWN"] = 0
    numbers |= {f"PBX_FILE_{n}": v for n, v in SPEC["file"].items() if isinstance(v, int)}
    strings = ["PBX_PACKAGE_VERSION"]
    strings += [f"PBX_FILE_{n}" for n, v in SPEC["file"].items() if isinstance(v, str)]
    for macro in numbers:
        out.append(f'\tprintf("number {macro} %lld\\n", (long long)({macro}));')
    for macro in strings:
        out.append(f'\tprintf("string {macro} %s\\n", {macro});')
    out += ["\treturn 0;", "}", ""]
    return "\n".join(out)


def _list_records() -> list[str]:
    """Returns the layouts of constants.toml used as list entries."""
    return sorted(
        {f["record"] for fields in SPEC["layout"].values() for f in fields if "record" in f}
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Returns what the probe compiled against wire.h printed: {"record": {name: size},
    "field": {(record, field): (offset, width)}, "number": {...}, "string": {...}}."""
    d = tmp_path_factory.mktemp("wireprobe")
    (d / "probe.c").write_text(_probe_source())
    subprocess.run(
        [
            "gcc",
            "-std=gnu11",
            "-Wall",
            "-Werror",
            f"-I{AGENT / 'include'}",
            "-o",
            "probe",
            "probe.c",
        ],
        cwd=d,
        check=True,
        capture_output=True,
    )
    lines = subprocess.run([d / "probe"], check=True, capture_output=True, text=True).stdout
    out: dict[str, Any] = {"record": {}, "field": {}, "number": {}, "string": {}}
    for line in lines.splitlines():
        what, rest = line.split(" ", 1)
        if what == "record":
            name, size = rest.split()
            out["record"][name] = int(size)
        elif what == "field":
            record, name, off, width = rest.split()
            out["field"][(record, name)] = (int(off), int(width))
        elif what == "number":
            name, value = rest.split()
            out["number"][name] = int(value)
        else:
            name, value = rest.split(" ", 1)
            out["string"][name] = value
    return out


def test_records_have_the_same_offsets_and_widths_in_c_and_python(compiled: dict[str, Any]) -> None:
    for record in SPEC["record"]:
        up = record.upper()
        fmt, names = getattr(C, f"{up}_FORMAT"), getattr(C, f"{up}_FIELDS")
        widths = record_widths(fmt, names)
        offset, python = 0, {}
        for name in names:
            python[(record, name)] = (offset, widths[name])
            offset += widths[name]
        c_fields = {k: v for k, v in compiled["field"].items() if k[0] == record}
        assert c_fields == python, record
        size = struct.calcsize(fmt)
        assert compiled["record"][record] == size == offset == getattr(C, f"{up}_SIZE")
        assert compiled["number"][f"PBX_{up}_SIZE"] == size


def test_numbers_and_strings_are_the_same_in_c_and_python(compiled: dict[str, Any]) -> None:
    numbers = compiled["number"]
    for name in SPEC["limits"]:
        assert numbers[f"PBX_{name}"] == getattr(C, name), name
    for table, (prefix, cls) in ENUMS.items():
        assert {m.name: m.value for m in cls} == {
            n: numbers[f"{prefix}{n}"] for n in SPEC[table]
        }, table
    assert {m.name: m.value for m in C.ErrorCode} == {
        n: numbers[f"PBX_E_{n}"] for n in SPEC["error"]
    }
    for name, value in SPEC["file"].items():
        py = getattr(C, f"FILE_{name}")
        if isinstance(value, str):
            assert compiled["string"][f"PBX_FILE_{name}"].encode() == py == value.encode()
        else:
            assert numbers[f"PBX_FILE_{name}"] == py == value
    for name, value in SPEC["fixup_width"].items():
        assert numbers[f"PBX_FIXUP_{name}_WIDTH"] == C.FIXUP_WIDTH[C.FixupType[name]] == value
    for name in SPEC["file_flag"]:
        assert numbers[f"PBX_FILE_FLAG_{name}"] == getattr(C, f"FILE_FLAG_{name}")
    assert numbers["PBX_FILE_FLAGS_KNOWN"] == C.FILE_FLAGS_KNOWN
    for layout in _list_records():
        up = layout.upper()
        # Python's own count from the layout, the generated constant, and the C macro.
        assert numbers[f"PBX_{up}_MIN_SIZE"] == getattr(C, f"{up}_MIN_SIZE")
        assert min_size(getattr(C, up)) == getattr(C, f"{up}_MIN_SIZE"), layout


def test_one_version(compiled: dict[str, Any]) -> None:
    version = SPEC["package"]["VERSION"]
    assert compiled["string"]["PBX_PACKAGE_VERSION"] == patchbox.__version__ == version
    galaxy = (ROOT / "ansible" / "galaxy.yml").read_text()
    assert re.findall(r"^version: (\S+)", galaxy, re.M) == [version]
    # The wheel's metadata reads patchbox.__version__: pyproject.toml holds no literal.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "patchbox.__version__"}


def test_expected_limits_nest() -> None:
    # The agent accepts MIN..MAX expected bytes; extract-patch records fewer on purpose.
    assert C.MIN_EXPECTED <= C.EXTRACT_MAX_EXPECTED <= C.MAX_EXPECTED


# -- the agent's apply-body parser and store reader, run --------------------------------

# Every read the parser makes, printed by macros wrapped around the reader calls of
# sandbox-messages.c (the sources before it read untraced): start, end, field name.
HARNESS = r"""
#include "patchbox/wire.h"
%(before)s
#include <stdio.h>

__attribute__((constructor(101))) static void probe_env(void)
{
	setenv("PATCHBOX_DISABLE", "1", 1);	/* no agent thread, no socket */
}

static int probe_read(const struct sandbox_reader *r, const char *field, size_t start, int rc)
{
	if (rc == 0)
		printf("read %%zu %%zu %%s\n", start, r->pos, field);
	return rc;
}
#define PROBE_(r, field, call) \
	({ const struct sandbox_reader *pr_ = (r); size_t at_ = pr_->pos; probe_read(pr_, (field), at_, (call)); })
#define sandbox_reader_take(r, f, n, ret) PROBE_(r, f, sandbox_reader_take(r, f, n, ret))
#define sandbox_reader_uint(r, f, n, ret) PROBE_(r, f, sandbox_reader_uint(r, f, n, ret))
#define sandbox_reader_str(r, f, s, n) PROBE_(r, f, sandbox_reader_str(r, f, s, n))
#define sandbox_reader_blob(r, f, b, n) PROBE_(r, f, sandbox_reader_blob(r, f, b, n))
#include "sandbox-messages.c"

int main(int argc, char **argv)
{
	static uint8_t buf[1 << 20];
	size_t n = fread(buf, 1, sizeof(buf), stdin);
	if (argc > 1 && strcmp(argv[1], "store") == 0) {
		const uint8_t *body;
		size_t len;
		char why[SANDBOX_ERRMSG];
		if (sandbox_store_body(buf, n, &body, &len, why, sizeof(why)) == 0)
			printf("body %%zu %%zu\n", (size_t)(body - buf), len);
		else
			printf("refused %%s\n", why);
		return 0;
	}
	struct sandbox_request q = { .r = { .p = buf, .len = n } };
	struct sandbox_apply_spec spec = { 0 };
	struct sandbox_error err = { PBX_E_OK, "" };
	int rc = sandbox_apply_parse(&q, &spec, &err);
	printf("parsed %%d %%s\n", rc, err.msg);
	free(spec.funcs);
	free(spec.fixups);
	return 0;
}
"""


def _agent_parts() -> list[str]:
    """Returns the agent's sources as agent/Makefile joins them (LIBSANDBOX_PARTS, then
    LISTEN_PARTS), each once."""
    make = (AGENT / "Makefile").read_text().replace("\\\n", " ")
    parts: list[str] = []
    for var in ("LIBSANDBOX_PARTS", "LISTEN_PARTS"):
        m = re.search(rf"^{var}\s*=(.*)$", make, re.M)
        assert m, var
        parts += m.group(1).split()
    return parts


@pytest.fixture(scope="module")
def agent_probe(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bytes], str]:
    """Returns run(mode, data) -> output of the agent's sources built into one program:
    mode "apply" parses ``data`` as an apply body, "store" reads it as a store file."""
    parts = [p for p in _agent_parts() if p != "sandbox-messages"]
    before = "\n".join(f'#include "{p}.c"' for p in parts)
    d = tmp_path_factory.mktemp("agentprobe")
    (d / "probe.c").write_text(HARNESS % {"before": before})
    cmd = ["gcc", "-std=gnu11", "-O0", "-D_GNU_SOURCE", f"-I{AGENT / 'include'}"]
    cmd += [f"-I{AGENT / 'src'}", "-DSANDBOX_ALLOC=65536", "-DSANDBOX_DATA_ALLOC=4096"]
    subprocess.run(
        [*cmd, "-o", "probe", "probe.c", "-pthread", "-ldl"], cwd=d, check=True, capture_output=True
    )

    def run(mode: str, data: bytes) -> str:
        proc = subprocess.run(
            [d / "probe", mode],
            input=data,
            capture_output=True,
            check=True,
            env={"PATCHBOX_DISABLE": "1"},
        )
        return proc.stdout.decode()

    return run


def _declared_reads(fields: tuple[Field, ...], body: bytes) -> list[tuple[int, int, str]]:
    """Returns (start, end, name) of every read the declared layout makes of ``body``,
    a length and its bytes as two reads, named as the agent names the fields."""
    r = Reader(body)
    out: list[tuple[int, int, str]] = []

    def walk(fields: tuple[Field, ...], item: str) -> None:
        values: dict[str, int] = {}
        prefix = f"{item} " if item else ""
        for f in fields:
            if f.when is not None and values.get(f.when[0]) != f.when[1]:
                continue
            if f.optional and r.pos == len(body):  # written only when not its default
                continue
            start = r.pos
            if f.kind in INT_SIZES:
                values[f.name] = getattr(r, f.kind)(f.name)
                out.append((start, r.pos, prefix + f.name))
            elif f.kind in ("str", "blob"):
                getattr(r, f.kind)(f.name)
                out.append((start, r.pos, prefix + f.name))
            elif f.kind in ("bytes8", "bytes16"):
                n = r.u8(f.name) if f.kind == "bytes8" else r.u16(f.name)
                out.append((start, r.pos, f"{prefix}{f.name}_len"))
                out.append((r.pos, r.pos + n, prefix + f.name))
                r.raw(n, f.name)
            else:
                n = r.u16(f.count) if f.kind == "list16" else r.u32(f.count)
                out.append((start, r.pos, prefix + f.count))
                for _ in range(n):
                    walk(f.record, f.item)

    walk(fields, "")
    r.end()
    return out


def _patches() -> list[Patch]:
    """Returns patches that use every field of the apply body: lengths short and long,
    every fix-up base (IMPORT with its symbol), both redirect kinds, hooks or none."""
    text = bytes(range(256)) * 3
    f1 = Function("alpha", 0x401126, 6, 40, b"\x90" * 8)
    f2 = Function("b" * 200, 0x7F0000001000, 100, 300, bytes(range(64)), RedirectKind.ENTRY_JUMP, 4)
    fixups = [
        Fixup(FixupSection.TEXT, FixupType.PC32, FixupBase.EXE, 10, -4),
        Fixup(FixupSection.DATA, FixupType.ABS64, FixupBase.IMPORT, 8, 0, "memcpy"),
        Fixup(FixupSection.TEXT, FixupType.ABS64, FixupBase.DATA, 200, 2**62),
        Fixup(FixupSection.TEXT, FixupType.ABS64, FixupBase.IMPORT, 300, -1, "x" * 70),
    ]
    hooks = [Hook(HookKind.PRE_APPLY, 6), Hook(HookKind.POST_REMOVE, 700)]
    return [
        Patch("one", b"\x01", text[:64], [f1]),
        Patch(
            "every-field", bytes(range(20)), text, [f1, f2], fixups, b"\xaa" * 16, 32, 1, {}, hooks
        ),
        Patch(
            "n" * C.MAX_NAME,
            bytes(C.MAX_BUILD_ID),
            text,
            [f2],
            fixups[1:2],
            bytes(16),
            0,
            3,
        ),
    ]


def _drift(agent: list[tuple[int, int, str]], declared: list[tuple[int, int, str]]) -> str:
    """Returns the first read where the agent and the declaration part, in words."""
    for i, (a, d) in enumerate(zip(agent, declared)):
        if a != d:
            return f"read {i}: the agent reads {a[2]!r} at [{a[0]}, {a[1]}), declared {d[2]!r} at [{d[0]}, {d[1]})"
    return f"the agent makes {len(agent)} reads, the declaration {len(declared)}"


@pytest.mark.parametrize("index", range(3))
def test_agent_parser_reads_every_field_at_its_declared_offset_and_width(
    agent_probe: Callable[[str, bytes], str], index: int
) -> None:
    body = encode_apply_body(_patches()[index])
    if index == 2:  # the optional last field, as an x86-64 body may carry it (3e 00)
        body += struct.pack("<H", C.ABSENT_MACHINE)
    out = agent_probe("apply", body).splitlines()
    agent = [(int(a), int(b), name) for _r, a, b, name in (line.split(" ", 3) for line in out[:-1])]
    declared = _declared_reads(C.APPLY_BODY, body)
    # Offsets and widths first: a field read at another place or width is a drift
    # whatever it is called; then the names, in the order the declaration gives them.
    assert [(a, b) for a, b, _n in agent] == [(a, b) for a, b, _n in declared], _drift(
        agent, declared
    )
    assert [n for _a, _b, n in agent] == [n for _a, _b, n in declared], _drift(agent, declared)
    assert out[-1] == "parsed 0 ", out[-1]


def _store_cases() -> dict[str, bytes]:
    """Returns patch files, good and broken, by what is done to them."""
    good = write_patch(_patches()[1])
    signed = with_signature(good, b"\x11" * 32, lambda _d: b"\x22" * 64)
    h = C.FILE_HEADER_FIELDS
    widths = record_widths(C.FILE_HEADER_FORMAT, h)

    unknown_flag = next(1 << i for i in range(32) if not C.FILE_FLAGS_KNOWN & 1 << i)

    def at(name: str) -> int:
        return sum(widths[n] for n in h[: h.index(name)])

    def poke(data: bytes, name: str, value: int) -> bytes:
        o = at(name)
        return data[:o] + value.to_bytes(widths[name], "little") + data[o + widths[name] :]

    return {
        "unsigned": good,
        "signed": signed,
        "signed-no-trailer": poke(good, "flags", C.FILE_FLAG_SIGNED),
        "unsigned-with-trailer": poke(signed, "flags", 0),
        "unknown-flag": poke(good, "flags", unknown_flag),
        "next-format": poke(good, "format", C.FILE_FORMAT_VERSION + 1),
        "header-size": poke(good, "header_size", C.FILE_HEADER_SIZE + 8),
        "payload-long": poke(good, "payload_len", len(good) - C.FILE_HEADER_SIZE + 1),
        "bad-magic": b"PBXPATCX" + good[8:],
        "short": good[: C.FILE_HEADER_SIZE - 1],
        "truncated": good[:-1],
        "padded": good + b"\x00",
    }


@pytest.mark.parametrize("case", list(_store_cases()))
def test_agent_store_reader_reads_the_file_header_as_python_does(
    agent_probe: Callable[[str, bytes], str], case: str
) -> None:
    data = _store_cases()[case]
    out = agent_probe("store", data).strip()
    try:
        _meta, body = split_patch_file(data)
    except PatchFormatError as err:
        # The agent checks the header's shape only (install checked hash and trailer).
        if "hash" in str(err) or "trailer" in str(err):
            pytest.fail(f"case {case} refused for a reason the agent does not check: {err}")
        assert out.startswith("refused "), (case, out)
        return
    end = (
        C.FILE_HEADER_SIZE
        + struct.unpack_from(C.FILE_HEADER_FORMAT, data)[C.FILE_HEADER_FIELDS.index("payload_len")]
    )
    assert out == f"body {end - len(body)} {len(body)}", case


# -- the agent's reply writers, read ---------------------------------------------------


def _flat(fields: tuple[Field, ...]) -> list[int | str]:
    """Returns the widths (or "str") a layout's writer writes, a list's entry once."""
    out: list[int | str] = []
    for f in fields:
        if f.kind in INT_SIZES:
            out.append(INT_SIZES[f.kind])
        elif f.kind == "str":
            out.append("str")
        elif f.kind == "kv":
            out += [2, "str", "str"]
        else:
            assert f.kind in ("list16", "list32"), f.kind
            out.append(2 if f.kind == "list16" else 4)
            out += _flat(f.record)
    return out


def _writes(handler: str) -> list[int | str]:
    """Returns the widths (or "str") the agent's handler writes into its reply, in source
    order: sandbox_writer_uint(&q->w, value, WIDTH), sandbox_writer_str, sandbox_kv_put."""
    text = (AGENT / "src" / "sandbox-messages.c").read_text()
    start = text.index(f"static int {handler}(")
    body = text[start : text.index("\n}\n", start)]
    out: list[int | str] = []
    call = (
        r"sandbox_writer_uint\(&q->w,.*?,\s*(\d+)\)|(sandbox_writer_str)\(&q->w|(sandbox_kv_put)\("
    )
    for m in re.finditer(call, body, re.S):
        if m.group(1):
            out.append(int(m.group(1)))
        elif m.group(2):
            out.append("str")
        else:
            out += ["str", "str"]
    return out


@pytest.mark.parametrize(
    "handler, layout",
    [
        ("sandbox_msg_info", C.INFO_REPLY),
        ("sandbox_msg_list", C.LIST_REPLY),
        ("sandbox_msg_apply", C.APPLY_REPLY),
        ("sandbox_msg_remove", C.REMOVE_REPLY),
        ("sandbox_msg_test", C.TEST_REPLY),
        ("sandbox_msg_debug", C.DEBUG_REPLY),
    ],
)
def test_agent_writes_replies_as_declared(handler: str, layout: tuple[Field, ...]) -> None:
    assert _writes(handler) == _flat(layout)


# -- the Python side follows the declaration ----------------------------------------------


def test_apply_body_layout_drives_encoder_and_decoder() -> None:
    for patch in _patches():
        body = encode_apply_body(patch)
        back = decode_apply_body(body)
        assert (back.name, back.build_id, back.text, back.functions, back.fixups) == (
            patch.name,
            patch.build_id,
            patch.text,
            patch.functions,
            patch.fixups,
        )
        assert (back.data, back.bss_size, back.flags, back.hooks) == (
            patch.data,
            patch.bss_size,
            patch.flags,
            patch.hooks,
        )
        # Every byte of the body is one declared read, in order.
        reads = _declared_reads(C.APPLY_BODY, body)
        assert reads[0][0] == 0 and reads[-1][1] == len(body)
        assert all(a[1] == b[0] for a, b in zip(reads, reads[1:]))


def test_file_header_fields_are_where_the_declaration_says() -> None:
    data = write_patch(_patches()[0])
    fields = dict(zip(C.FILE_HEADER_FIELDS, struct.unpack_from(C.FILE_HEADER_FORMAT, data)))
    assert fields["magic"] == C.FILE_MAGIC and fields["format"] == C.FILE_FORMAT_VERSION
    assert fields["header_size"] == C.FILE_HEADER_SIZE == len(data) - fields["payload_len"]
