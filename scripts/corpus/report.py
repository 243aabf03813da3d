"""What the results say: one verdict per fix, the headline numbers and the table of
docs/corpus.md."""

from __future__ import annotations

import re
from typing import Any

from .fixes import Fix

__all__ = ["summarize", "table", "verdict"]


def verdict(fix: Fix | str, r: dict[str, Any]) -> str:
    """Returns one word for the table: live, refused, no-function, applied (applies, but
    not a working live patch: init-time code, or another program's code linked in),
    unexercised (function-only, applies and is removed cleanly, but nothing in the run
    calls the fixed code: ``r["unexercised"]`` says why, and no probe passed), failed."""
    b = r.get("build", {}).get("result")
    if b == "no function":
        return "no-function"
    if b != "built":
        return "refused" if b == "refused" else "failed"
    a = r.get("apply", {})
    if a.get("apply") != "applied":
        return "failed"
    failed = [x.get("failed") for x in (a.get("load_apply", {}), a.get("load_remove", {})) if x]
    if any(f != 0 for f in failed) or not a.get("alive_after_apply", True):
        return "failed"
    if a.get("probe_passed") is False:
        return "failed"
    shape = fix if isinstance(fix, str) else fix.shape
    if shape != "function" and not r.get("adapted"):
        return "applied"  # applies, but the fixed code never runs in this process
    if r.get("unexercised") and not a.get("probe_passed"):
        return "unexercised"  # the fixed code could run again, but nothing here calls it
    return "live"


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Returns the headline numbers: function-only fixes, working live patches, ratio."""
    orig = [r for r in rows if not r.get("adapted")]
    fn = [r for r in orig if r["shape"] == "function"]
    live = [r for r in fn if r["verdict"] == "live"]
    failed = sum(
        (r.get("apply", {}).get(k) or {}).get("failed") or 0
        for r in orig
        for k in ("load_apply", "load_remove")
    )
    requests = sum(
        (r.get("apply", {}).get(k) or {}).get("requests") or 0
        for r in orig
        for k in ("load_apply", "load_remove")
    )
    probes = [r for r in fn if r.get("probe") and r["verdict"] in ("live", "failed")]
    return {
        "fixes": len(orig),
        "by_shape": {
            s: sum(1 for r in orig if r["shape"] == s) for s in sorted({r["shape"] for r in orig})
        },
        "function_only": len(fn),
        "working_live": len(live),
        "unexercised": sum(1 for r in fn if r["verdict"] == "unexercised"),
        "ratio": round(len(live) / len(fn), 3) if fn else None,
        "requests_during_apply_remove": requests,
        "failed_requests": failed,
        "probes_passed": sum(1 for r in probes if r.get("apply", {}).get("probe_passed")),
        "probes": len(probes),
        "data_refused": sum(1 for r in orig if r["shape"] == "data" and r["verdict"] == "refused"),
        "data": sum(1 for r in orig if r["shape"] == "data"),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Returns the markdown table of docs/corpus.md."""
    head = (
        "| program | fix | patch | shape | `patchbox build` | apply under load (failed/requests) "
        "| regression probe | verdict |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        b = r.get("build", {})
        if "error" in r:
            build = f"error: {r['error'][:200]}"
        elif b.get("result") == "built":
            fns = b.get("functions", [])
            shown = ", ".join(f"`{f}`" for f in fns[:4]) + (
                f" +{len(fns) - 4}" if len(fns) > 4 else ""
            )
            build = f"{len(fns)} fn: {shown}"
        else:
            msg = _first(b.get("message", "")).removeprefix("refused: ")
            build = f"{b.get('result')}: `{_md(msg)[:400]}`"
        a = r.get("apply", {})
        if a.get("apply") == "applied":
            la, lr = a.get("load_apply") or {}, a.get("load_remove") or {}
            applied = f"applied {la.get('failed')}/{la.get('requests')}"
            if a.get("remove") == "removed":
                applied += f"; removed {lr.get('failed')}/{lr.get('requests')}"
        elif a:
            applied = f"refused: `{_md(a.get('apply_message', ''))[:300]}`"
        else:
            applied = "—"
        if a.get("probe_after") is not None:
            probe = ("passed" if a.get("probe_passed") else "FAILED") + (
                f": before `{_md(a['probe_before'])[:80]}`" if "probe_before" in a else ""
            )
            probe += f"; live `{_md(a['probe_after'])[:100]}`"
            if "probe_removed" in a:
                probe += f"; removed `{_md(a['probe_removed'])[:80]}`"
        else:
            probe = "none" if not r.get("probe") else "not run"
        lines.append(
            f"| {r['program']} | {r['ident']}{' (adapted)' if r.get('adapted') else ''} "
            f"| {r['patch']} | {r['shape']} | {build} | {applied} | {probe} | **{r['verdict']}** |"
        )
    return head + "\n".join(lines) + "\n"


def _first(msg: str) -> str:
    """Returns the first refusal of a message listing one per object (a struct of a header
    is refused in every object that includes it), with how many more there are."""
    if not msg.startswith("refused: "):
        return msg
    parts = msg.removeprefix("refused: ").split("; other data changes:")[0].split("; ")
    heads = [p for p in parts if re.match(r"^[\w./+-]+\.o: ", p)]
    if len(heads) <= 1:
        return msg
    first = parts[: parts.index(heads[1])]
    return "refused: " + "; ".join(first) + f" (and {len(heads) - 1} more refusals)"


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ").replace("`", "'")
