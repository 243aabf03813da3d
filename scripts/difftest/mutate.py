"""Mutants of Csmith programs: one small source change of a named kind, reproducible from
(seed, candidate).

A Csmith program (``csmith --concise``) is read as lines: the globals, the prototypes, one
definition per function (``func_N``; a body ends at the first ``}`` in column 0) and
``main``. Every mutation keeps the program free of undefined behaviour where it can be
told from the text: no change inside ``[...]`` (array indices), none in a ``for`` header
(loop bounds the body's indices rely on), no write to a variable some loop counts with,
no removal of the one-statement body of an unbraced ``for``/``if``; arithmetic is only
swapped between Csmith's ``safe_*`` wrappers, which are defined for every input. What the
text cannot tell (a removed pointer assignment leaving a null pointer) the runner finds by
running the mutant (a crash or a time-out makes the candidate invalid).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

__all__ = [
    "KINDS",
    "Function",
    "Mutation",
    "Program",
    "mutate",
    "parse",
    "oracle_source",
]

# The mutation kinds, in the order the runner cycles through them.
KINDS = (
    "operator",  # a safe_* wrapper or a comparison/bitwise operator swapped
    "constant",  # an integer literal in a function body changed
    "inline",  # an operator or constant changed in a static function GCC inlined everywhere
    "helper",  # an expression wrapped in a call to a new static helper
    "string",  # a string literal of main changed (the names printed with the checksums)
    "global",  # an expression wrapped in a call to a new global (non-static) function
    "stmt_add",  # a statement added (a global updated)
    "stmt_remove",  # an expression statement removed
    "data",  # the initial value of an existing global changed: must be refused
)

FUNC_DEF = re.compile(r"^(?:static\s+)?[\w ]+?[\s*]+(func_\d+|main)\s*\(.*\)\s*$")
GLOBAL = re.compile(
    r"^static\s+(?P<type>.+?)\s*\b(?P<name>g_\d+)(?P<dims>(?:\[\d+\])*)\s*=\s*(?P<init>.*);\s*$"
)
SCALAR = re.compile(r"^(?:volatile\s+)?(u?int(?:8|16|32|64)_t)$")
SAFE_BIN = re.compile(r"\bsafe_(add|sub|mul|div|mod)_func_(\w+?)_([su])_([su])\(")
SAFE_SHIFT = re.compile(r"\bsafe_(lshift|rshift)_func_(\w+?)_([su])_([su])\(")
SAFE_ANY = re.compile(r"\bsafe_\w+?_func_(u?int(?:8|16|32|64)_t)_[su](?:_[su])?\(")
INT_LIT = re.compile(r"(?<![\w.])(0x[0-9A-Fa-f]+|\d+)([UL]*)(?![\w.])")
FOR_VAR = re.compile(r"\bfor\s*\(\s*([\w.]+)\s*=")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
# Comparison and bitwise operators as Csmith prints them (spaces around), each with the
# operator it becomes: results stay defined whatever the operands.
SWAPS = {
    " == ": " != ",
    " != ": " == ",
    " < ": " >= ",
    " >= ": " < ",
    " > ": " <= ",
    " <= ": " > ",
    " && ": " || ",
    " || ": " && ",
    " | ": " ^ ",
    " ^ ": " | ",
    " & ": " | ",
    # Compound assignments (never + or -: a signed overflow would be undefined).
    " &= ": " |= ",
    " |= ": " ^= ",
    " ^= ": " &= ",
}
# A statement line starts with what an expression statement of Csmith starts with.
STATEMENT_START = ("(", "*", "g_", "l_", "p_", "func_", "++", "--")


@dataclass(frozen=True)
class Function:
    """One function definition: its name and line span (0-based; ``body`` is the line
    after the opening brace, ``end`` the line of the closing brace)."""

    name: str
    start: int
    body: int
    end: int


@dataclass(frozen=True)
class Global:
    """One global variable definition of the program."""

    name: str
    ctype: str
    dims: str
    init: str
    line: int


@dataclass(frozen=True)
class Program:
    """A Csmith program split into what mutations need."""

    lines: tuple[str, ...]
    functions: tuple[Function, ...]
    globals: tuple[Global, ...]
    first_code: int  # first line of the prototypes/definitions (after the globals)
    # 1-based numbers of the lines a run of the original executed (gcov), or None: sites
    # are chosen among them, so that most mutants change what the program prints.
    live: frozenset[int] | None = None

    def function(self, name: str) -> Function:
        """Returns the definition of function ``name``."""
        return next(f for f in self.functions if f.name == name)


@dataclass(frozen=True)
class Mutation:
    """Returned by ``mutate``: the mutant's source and what was changed."""

    kind: str
    function: str  # the function changed ("" for a global's initial value)
    what: str  # one line a person reads: the change
    text: str  # the mutant's source


def parse(text: str) -> Program:
    """Returns the program's functions and globals, found by Csmith's fixed layout."""
    lines = tuple(text.splitlines())
    functions: list[Function] = []
    globals_: list[Global] = []
    first_code = len(lines)
    i = 0
    while i < len(lines):
        line = lines[i]
        m = FUNC_DEF.match(line)
        if m and i + 1 < len(lines) and lines[i + 1].strip() == "{":
            end = next(j for j in range(i + 2, len(lines)) if lines[j].rstrip() == "}")
            functions.append(Function(m.group(1), i, i + 2, end))
            first_code = min(first_code, i)
            i = end + 1
            continue
        g = GLOBAL.match(line)
        if g and not functions:
            globals_.append(Global(g["name"], g["type"], g["dims"], g["init"], i))
        elif line.startswith("static") and "func_" in line and line.rstrip().endswith(";"):
            first_code = min(first_code, i)
        i += 1
    return Program(lines, tuple(functions), tuple(globals_), first_code)


def _depth(line: str) -> list[int]:
    """Returns the bracket nesting depth ([...]) before each character of ``line``."""
    out, d = [], 0
    for ch in line:
        if ch == "[":
            d += 1
        out.append(d)
        if ch == "]":
            d -= 1
    return out


def _loop_vars(prog: Program) -> set[str]:
    """Returns the variables some ``for`` loop counts with (never written by a mutant)."""
    return {m.group(1) for line in prog.lines for m in FOR_VAR.finditer(line)}


def _body_lines(prog: Program, names: list[str]) -> list[tuple[str, int]]:
    """Returns (function, line index) of every body line of ``names`` outside a ``for``
    header."""
    out = []
    for f in prog.functions:
        if f.name in names:
            out += [
                (f.name, i)
                for i in range(f.body, f.end)
                if not prog.lines[i].lstrip().startswith("for ")
            ]
    return out


def _prefer_live(prog: Program, sites: list[T], line_of: Callable[[T], int]) -> list[T]:
    """Returns the sites on lines a run executed (``prog.live``: 0-based ``line_of``
    + 1), or all of them when none is (a mutant of dead code: patchbox build then finds
    no changed function)."""
    if prog.live is None:
        return sites
    return [s for s in sites if line_of(s) + 1 in prog.live] or sites


def _replace_line(prog: Program, i: int, new: str) -> str:
    lines = list(prog.lines)
    lines[i] = new
    return "\n".join(lines) + "\n"


def _operator_sites(prog: Program, names: list[str]) -> list[tuple[str, int, int, int, str]]:
    """Returns (function, line, start, end, replacement) of every operator that can be
    swapped in the bodies of ``names``."""
    sites = []
    for fn, i in _body_lines(prog, names):
        line = prog.lines[i]
        depth = _depth(line)
        for m in SAFE_BIN.finditer(line):
            if depth[m.start()]:
                continue
            for op in ("add", "sub", "mul", "div", "mod"):
                if op != m.group(1):
                    new = f"safe_{op}_func_{m.group(2)}_{m.group(3)}_{m.group(4)}("
                    sites.append((fn, i, m.start(), m.end(), new))
        for m in SAFE_SHIFT.finditer(line):
            if depth[m.start()]:
                continue
            op = "rshift" if m.group(1) == "lshift" else "lshift"
            sites.append(
                (
                    fn,
                    i,
                    m.start(),
                    m.end(),
                    f"safe_{op}_func_{m.group(2)}_{m.group(3)}_{m.group(4)}(",
                )
            )
        for old, new in SWAPS.items():
            start = line.find(old)
            while start >= 0:
                if not depth[start]:
                    sites.append((fn, i, start, start + len(old), new))
                start = line.find(old, start + 1)
    return _prefer_live(prog, sites, lambda site: site[1])


def _constant_sites(prog: Program, names: list[str]) -> list[tuple[str, int, re.Match[str]]]:
    """Returns (function, line, literal) of every integer literal outside brackets and
    not a null pointer in the bodies of ``names``."""
    sites = []
    for fn, i in _body_lines(prog, names):
        line = prog.lines[i]
        depth = _depth(line)
        for m in INT_LIT.finditer(line):
            if depth[m.start()] or line[: m.start()].endswith("(void*)"):
                continue
            if line[: m.start()].rstrip().endswith(("i <", "j <", "k <")):
                continue
            sites.append((fn, i, m))
    return _prefer_live(prog, sites, lambda site: site[1])


def _new_literal(m: re.Match[str], rng: random.Random) -> str:
    """Returns another literal of the same spelling kind and suffix as ``m``."""
    digits, suffix = m.group(1), m.group(2)
    if digits.startswith("0x"):
        width = 4 * (len(digits) - 2)
        value = int(digits, 16) ^ (1 << rng.randrange(width))
        return f"0x{value:0{len(digits) - 2}X}{suffix}"
    value = int(digits)
    return f"{value + 1 if value == 0 or rng.random() < 0.5 else value - 1}{suffix}"


def _at_top(line: str, start: int) -> bool:
    """Returns whether what starts at ``start`` is the whole right-hand side of an
    assignment, or the assignment operator itself: its value is what gets stored, where
    a change inside Csmith's nests of && and comparisons mostly vanishes."""
    before = line[:start].rstrip(" (")
    return before.endswith("=") or line[start:].lstrip().startswith(("&=", "|=", "^="))


def _pick(sites: list[T], top: Callable[[T], bool], rng: random.Random) -> T:
    """Returns a site: most often one ``top`` prefers (likelier to change what the
    program prints), sometimes any, so that every shape keeps being tried."""
    preferred = [s for s in sites if top(s)]
    return rng.choice(preferred if preferred and rng.random() < 0.75 else sites)


def _mutate_operator(
    prog: Program, names: list[str], rng: random.Random, kind: str
) -> Mutation | None:
    sites = _operator_sites(prog, names)
    if not sites:
        return None
    fn, i, s, e, new = _pick(sites, lambda x: _at_top(prog.lines[x[1]], x[2]), rng)
    line = prog.lines[i]
    text = _replace_line(prog, i, line[:s] + new + line[e:])
    return Mutation(kind, fn, f"{fn}: {line[s:e].strip()} -> {new.strip()} (line {i + 1})", text)


def _mutate_constant(
    prog: Program, names: list[str], rng: random.Random, kind: str
) -> Mutation | None:
    sites = _constant_sites(prog, names)
    if not sites:
        return None
    fn, i, m = _pick(sites, lambda x: _at_top(prog.lines[x[1]], x[2].start()), rng)
    new = _new_literal(m, rng)
    line = prog.lines[i]
    text = _replace_line(prog, i, line[: m.start()] + new + line[m.end() :])
    return Mutation(kind, fn, f"{fn}: {m.group(0)} -> {new} (line {i + 1})", text)


def _close_paren(line: str, open_at: int) -> int:
    """Returns the index just past the parenthesis matching the one at ``open_at``."""
    depth = 0
    for j in range(open_at, len(line)):
        if line[j] == "(":
            depth += 1
        elif line[j] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError("unbalanced parentheses")


def _mutate_wrap(prog: Program, rng: random.Random, kind: str) -> Mutation | None:
    """Returns a mutant where one safe_* call's value goes through a new function: a
    static helper (``helper``) or a global function (``global``), noinline or not."""
    names = [f.name for f in prog.functions if f.name != "main"]
    sites = []
    for fn, i in _body_lines(prog, names):
        line = prog.lines[i]
        depth = _depth(line)
        sites += [(fn, i, m) for m in SAFE_ANY.finditer(line) if not depth[m.start()]]
    sites = _prefer_live(prog, sites, lambda site: site[1])
    if not sites:
        return None
    fn, i, m = _pick(sites, lambda x: _at_top(prog.lines[x[1]], x[2].start()), rng)
    ctype = m.group(1)
    line = prog.lines[i]
    end = _close_paren(line, m.end() - 1)
    noinline = rng.random() < 0.5
    attr = "__attribute__((noinline)) " if noinline else ""
    const = rng.randrange(1, 1 << 15)
    if kind == "helper":
        name, linkage = "pb_helper", "static "
    else:
        name, linkage = "pb_global", ""
    helper = [
        f"{linkage}{ctype} {attr}{name}({ctype} v);",
        f"{linkage}{ctype} {attr}{name}({ctype} v)",
        "{",
        f"    return ({ctype})(v ^ ({ctype}){const});",
        "}",
        "",
    ]
    new_line = line[: m.start()] + f"{name}(" + line[m.start() : end] + ")" + line[end:]
    lines = list(prog.lines)
    lines[i] = new_line
    at = prog.functions[0].start
    lines[at:at] = helper
    around = f"around {m.group(0)}...) (line {i + 1})"
    what = f"{fn}: {'noinline ' if noinline else ''}{linkage}{name}({ctype}) ^ {const} {around}"
    return Mutation(kind, fn, what, "\n".join(lines) + "\n")


def _mutate_string(prog: Program, rng: random.Random) -> Mutation | None:
    main = prog.function("main")
    sites = [(i, m) for i in range(main.body, main.end) for m in STRING.finditer(prog.lines[i])]
    sites = [(i, m) for i, m in sites if m.group(0) != '"1"']  # argv[1] == "1" selects the printing
    sites = _prefer_live(prog, sites, lambda site: site[0])
    if not sites:
        return None
    i, m = rng.choice(sites)
    new = '"#' + m.group(0)[1:]
    line = prog.lines[i]
    text = _replace_line(prog, i, line[: m.start()] + new + line[m.end() :])
    return Mutation("string", "main", f"main: {m.group(0)} -> {new} (line {i + 1})", text)


def _mutate_stmt_add(prog: Program, rng: random.Random) -> Mutation | None:
    loops = _loop_vars(prog)
    scalars = [
        g for g in prog.globals if not g.dims and SCALAR.match(g.ctype) and g.name not in loops
    ]
    names = [f.name for f in prog.functions if f.name != "main"]
    spots = []
    for fn, i in _body_lines(prog, names):
        s = prog.lines[i].strip()
        if s.endswith("{") or (
            s.endswith(";") and not s.startswith(("return", "break", "continue", "goto"))
        ):
            spots.append((fn, i))
    # The inserted line runs if the line after it did (a "{" line has no count).
    spots = _prefer_live(prog, spots, lambda spot: spot[1] + 1)
    if not scalars or not spots:
        return None
    g = rng.choice(scalars)
    fn, i = rng.choice(spots)
    line = prog.lines[i]
    indent = len(line) - len(line.lstrip()) + (4 if line.strip().endswith("{") else 0)
    const = rng.randrange(1, 256)
    stmt = " " * indent + f"{g.name} ^= {const};"
    lines = list(prog.lines)
    lines.insert(i + 1, stmt)
    return Mutation(
        "stmt_add", fn, f"{fn}: added '{stmt.strip()}' after line {i + 1}", "\n".join(lines) + "\n"
    )


def _mutate_stmt_remove(prog: Program, rng: random.Random) -> Mutation | None:
    names = [f.name for f in prog.functions if f.name != "main"]
    sites = []
    for fn, i in _body_lines(prog, names):
        s = prog.lines[i].strip()
        prev = prog.lines[i - 1].strip()
        # The previous line ends a statement or opens a block: this line is no unbraced
        # for/if/else body, whose removal would make the next statement the body.
        if s.startswith(STATEMENT_START) and s.endswith(";") and prev.endswith((";", "{", "}")):
            sites.append((fn, i))
    sites = _prefer_live(prog, sites, lambda site: site[1])
    if not sites:
        return None
    fn, i = rng.choice(sites)
    lines = list(prog.lines)
    removed = lines.pop(i)
    return Mutation(
        "stmt_remove",
        fn,
        f"{fn}: removed '{removed.strip()[:80]}' (line {i + 1})",
        "\n".join(lines) + "\n",
    )


def _mutate_data(prog: Program, rng: random.Random) -> Mutation | None:
    sites = []
    for g in prog.globals:
        line = prog.lines[g.line]
        at = line.index("=")
        sites += [
            (g, m) for m in INT_LIT.finditer(line, at) if not line[: m.start()].endswith("(void*)")
        ]
    if not sites:
        return None
    g, m = rng.choice(sites)
    new = _new_literal(m, rng)
    line = prog.lines[g.line]
    text = _replace_line(prog, g.line, line[: m.start()] + new + line[m.end() :])
    return Mutation(
        "data", "", f"{g.name}: initial {m.group(0)} -> {new} (line {g.line + 1})", text
    )


def mutate(
    text: str,
    kind: str,
    seed: int,
    candidate: int = 0,
    *,
    inlined: frozenset[str] = frozenset(),
    live: frozenset[int] | None = None,
) -> Mutation | None:
    """Returns the mutant of kind ``kind`` that (seed, candidate) selects, or None when
    the program has no place for that kind. ``inlined`` names the functions the original
    object does not define (GCC inlined them into every caller): ``inline`` picks one.
    ``live`` (1-based executed lines) narrows sites to code that runs."""
    prog = dataclasses.replace(parse(text), live=live)
    rng = random.Random(f"{seed}:{kind}:{candidate}")
    funcs = [f.name for f in prog.functions if f.name != "main"]
    if kind == "operator":
        return _mutate_operator(prog, funcs, rng, kind)
    if kind == "constant":
        return _mutate_constant(prog, funcs, rng, kind)
    if kind == "inline":
        targets = sorted(inlined & set(funcs))
        if not targets:
            return None
        fn = rng.choice(targets)
        first = _mutate_operator if rng.random() < 0.5 else _mutate_constant
        second = _mutate_constant if first is _mutate_operator else _mutate_operator
        return first(prog, [fn], rng, kind) or second(prog, [fn], rng, kind)
    if kind in ("helper", "global"):
        return _mutate_wrap(prog, rng, kind)
    if kind == "string":
        return _mutate_string(prog, rng)
    if kind == "stmt_add":
        return _mutate_stmt_add(prog, rng)
    if kind == "stmt_remove":
        return _mutate_stmt_remove(prog, rng)
    if kind == "data":
        return _mutate_data(prog, rng)
    raise ValueError(f"unknown mutation kind {kind!r}")


def _renamed(lines: list[str], prefix: str) -> list[str]:
    """Returns ``lines`` with every function of the program (``func_N``, ``main``,
    ``pb_*``) renamed ``prefix`` + name."""
    pat = re.compile(r"\b(func_\d+|main|pb_helper|pb_global)\b")
    return [pat.sub(lambda m: prefix + m.group(1), line) for line in lines]


def _outside_strings(pat: re.Pattern[str], repl: str, line: str) -> str:
    """Returns ``line`` with ``pat`` replaced outside its string literals (the names
    printed with the checksums stay as they are)."""
    out, at = [], 0
    for m in STRING.finditer(line):
        out += [pat.sub(repl, line[at : m.start()]), m.group(0)]
        at = m.end()
    return "".join([*out, pat.sub(repl, line[at:])])


def oracle_source(original: str, mutant: str, private: frozenset[str] = frozenset()) -> str:
    """Returns one program holding both versions over the same globals: ``csmith_main``
    runs the original's code, or the mutant's while ``pb_use_mutant`` is non-zero (the
    oracle of the mid-run check, switched by the driver at an iteration).

    ``private`` names globals the patch carries as its own copies (the original object
    has none: the compiler folded them, nothing storing to them): the mutant's code uses
    a copy of each (``m_NAME``, initialised alike), as the patched process does; the
    original's code keeps the shared one, which it never writes."""
    o, m = parse(original), parse(mutant)
    head = list(o.lines[: o.first_code])
    if head != list(m.lines[: m.first_code]):
        raise ValueError("the mutant changes the globals: no oracle")
    copies = []
    for g in o.globals:
        if g.name in private:
            copies.append(re.sub(rf"\b{g.name}\b", "m_" + g.name, o.lines[g.line]))
    mutant_code = _renamed(list(m.lines[m.first_code :]), "m_")
    if private:
        names = re.compile(r"\b(" + "|".join(sorted(private)) + r")\b")
        mutant_code = [_outside_strings(names, r"m_\1", line) for line in mutant_code]
    return "\n".join(
        [
            *head,
            *copies,
            "int pb_use_mutant;",
            *_renamed(list(o.lines[o.first_code :]), "o_"),
            *mutant_code,
            "int csmith_main(int argc, char *argv[])",
            "{",
            "    return pb_use_mutant ? m_main(argc, argv) : o_main(argc, argv);",
            "}",
            "",
        ]
    )
