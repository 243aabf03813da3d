"""Long stress run: apply/remove cycles while 8 threads call the function flat out.

    .venv/bin/python -m benchmarks.stress_cycles [--cycles N] [--sandbox BYTES]

The program is tests/e2e/stress_target.c (8 callers checking every result is the old or
the new one, a 9th thread parked mid-function in the original code), linked with an agent
built with SANDBOX_ALLOC=--sandbox. Prints one table row: cycles, calls made, bad results,
the largest sandbox_used (sampled after an apply every 50 cycles) and
sandbox_retired (after a remove, every 50 cycles), elapsed time.
Exits 1 if any call returned something else, the target died, or the parked call's
result is neither old nor new.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from patchbox.config import libs
from patchbox.extract import extract_patch
from patchbox.flags import LINK_FLAGS, PATCH_CFLAGS
from patchbox.format.layout import encode_apply_body
from patchbox.protocol.client import Client

from .common import ROOT, print_table

SOURCE = ROOT / "tests" / "e2e" / "stress_target.c"


def build(tmp: Path, sandbox: int) -> tuple[Path, Path]:
    agent = tmp / "agent"
    subprocess.run(
        ["make", "-s", "-C", str(ROOT / "agent"), f"OUT={agent}", f"SANDBOX_ALLOC={sandbox}"],
        check=True,
        capture_output=True,
    )
    os.environ["PATCHBOX_AGENT_DIR"] = str(agent)
    out = {}
    for k, kind in ((3, "exe"), (5, "obj")):
        d = tmp / kind
        d.mkdir()
        src = d / "stress_target.c"
        src.write_text(SOURCE.read_text().replace("@K@", str(k)))
        cmd = ["gcc", "-O2", "-fPIE", *PATCH_CFLAGS]
        if kind == "obj":
            cmd += ["-c", str(src), "-o", str(d / "stress_target.o")]
            out[kind] = d / "stress_target.o"
        else:
            cmd += [
                "-pie",
                str(src),
                "-o",
                str(d / "stress_target"),
                *LINK_FLAGS,
                *shlex.split(libs(app_version="stress")),
            ]
            out[kind] = d / "stress_target"
        subprocess.run(cmd, check=True)
    return out["exe"], out["obj"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=20_000)
    ap.add_argument("--sandbox", type=int, default=524288, help="SANDBOX_ALLOC of the agent")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        exe, obj = build(Path(tmpdir), args.sandbox)
        body = encode_apply_body(extract_patch(obj, exe, ["work"], name="k5"))
        proc = subprocess.Popen(
            [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None  # a pipe (Popen above)
        used_max = retired_max = 0
        failure = ""
        t0 = time.monotonic()
        try:
            proc.stdout.readline()
            with Client(exe.parent / f"sandbox-sock{proc.pid}") as client:
                for i in range(args.cycles):
                    client.apply(body)
                    if i % 50 == 0:
                        s = client.info()
                        used_max = max(used_max, int(s["sandbox_used"]))
                        retired_max = max(retired_max, int(s["sandbox_retired"]))
                    client.remove("k5")
                    if i % 50 == 25:
                        retired_max = max(retired_max, int(client.info()["sandbox_retired"]))
                    if i % 1000 == 0 and proc.poll() is not None:
                        failure = f"target died at cycle {i}"
                        break
            elapsed = time.monotonic() - t0
            out, _ = proc.communicate("stop\n", timeout=120) if not failure else ("", "")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    fields = out.split()
    r = dict(zip(fields[0::2], (int(v) for v in fields[1::2]))) if fields else {}
    header = (
        "cycles",
        "calls made",
        "old",
        "new",
        "bad results",
        "parked result",
        "max sandbox_used",
        "max sandbox_retired",
        "sandbox size",
        "elapsed",
        "exit",
    )
    row = (
        f"{args.cycles:,}",
        f"{r.get('calls', 0):,}",
        f"{r.get('old', 0):,}",
        f"{r.get('new', 0):,}",
        str(r.get("bad", "?")),
        str(r.get("parked", "?")),
        str(used_max),
        str(retired_max),
        str(args.sandbox),
        f"{elapsed:.1f} s",
        str(proc.returncode),
    )
    print_table(header, [row])
    ok = not failure and proc.returncode == 0 and r.get("bad") == 0 and r.get("parked") in (22, 36)
    if not ok:
        print(f"FAILED: {failure or out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
