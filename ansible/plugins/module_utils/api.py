# Copyright: patchbox developers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only
"""What the patchbox.live modules do on the managed host, through the patchbox Python API.

The modules never run the ``patchbox`` command or parse its text: they call
``patchbox.host.ops`` (``apply_all``, ``remove_all``, ``list_processes``) and
``patchbox.store`` (``install``, ``uninstall``) in the Python that runs the module, which
is the Python the patchbox wheel was installed into (``ansible_python_interpreter``).

Every function here returns plain data (lists of dicts) and raises ``PatchboxError``
with the user-facing text; the modules turn that into ``exit_json``/``fail_json``.
"""

from __future__ import annotations

import traceback

try:
    from patchbox import signing, store
    from patchbox.errors import PatchboxError
    from patchbox.format.layout import read_patch_file
    from patchbox.host.ops import Result, already_applied, apply_all, list_processes, remove_all
except ImportError:
    HAS_PATCHBOX = False
    PATCHBOX_IMPORT_ERROR = traceback.format_exc()

    class PatchboxError(Exception):
        """Stands in for patchbox.errors.PatchboxError when patchbox is missing."""

else:
    HAS_PATCHBOX = True
    PATCHBOX_IMPORT_ERROR = None

__all__ = [
    "HAS_PATCHBOX",
    "PatchboxError",
    "require_patchbox",
    "run_patch",
    "run_info",
]

# A process's result, as patchbox.host.ops.Result names it (without patchbox the modules
# fail in require_patchbox before reading one).
RESULTS = tuple(r.value for r in Result) if HAS_PATCHBOX else ()
FAILURES = tuple(r.value for r in Result if r.failure) if HAS_PATCHBOX else ()


def require_patchbox(module):
    """Fails the module unless the patchbox package can be imported."""
    if not HAS_PATCHBOX:
        from ansible.module_utils.basic import missing_required_lib

        module.fail_json(
            msg=missing_required_lib(
                "patchbox",
                reason="the patchbox wheel must be installed into the Python that runs "
                "the module (ansible_python_interpreter)",
            ),
            exception=PATCHBOX_IMPORT_ERROR,
        )


def entry(pid, result, reason="", *, exe="", build_id="", vm=""):
    """Returns one element of the ``processes`` list."""
    return {
        "pid": pid,
        "result": result,
        "reason": reason,
        "exe": exe,
        "build_id": build_id,
        "vm": vm,
    }


def failure_message(processes):
    """Returns the reasons of the failed and unreachable processes, one clause each (""
    if there is none)."""
    parts = []
    for p in processes:
        if p["result"] not in FAILURES:
            continue
        reason = p["reason"]
        prefix = f"pid {p['pid']}"
        if p["result"] == Result.UNREACHABLE:
            prefix += " unreachable"
        parts.append(reason if reason.startswith(prefix) else f"{prefix}: {reason}")
    return "; ".join(parts)


def summary(processes):
    """Returns {result: count} over ``processes`` (every result named, zeros included)."""
    counts = dict.fromkeys(RESULTS, 0)
    for p in processes:
        counts[p["result"]] = counts.get(p["result"], 0) + 1
    return counts


def _rows(pids, vms, timeout):
    rows = list_processes(timeout=timeout, vms=vms)
    return [r for r in rows if pids is None or r.pid in pids]


def _installed_json(e):
    return {"name": e.name, "build_id": e.build_id, "path": str(e.path)}


def store_entries(root, name=None, build_id=None):
    """Returns the store's patches (of ``name`` and ``build_id`` when given) as dicts."""
    store.check_store(root)
    return [
        _installed_json(e)
        for e in store.iter_installed(root, build_id)
        if name is None or e.name == name
    ]


def _same_bytes(path, data):
    try:
        with open(path, "rb") as f:
            return f.read() == data
    except OSError:
        return False


def ensure_installed(pf, src, root, trust, check_mode):
    """Returns (changed, entry, created) after making the store hold exactly the file
    ``src`` for its build-id (nothing written if it already does, or in check mode);
    ``created``: no entry of that name was there for the build before."""
    have = store_entries(root, pf.patch.name, pf.patch.build_id.hex())
    if len(have) == 1 and _same_bytes(have[0]["path"], pf.data):
        return False, have[0], False
    if check_mode:
        entry = {"name": pf.patch.name, "build_id": pf.patch.build_id.hex(), "path": ""}
        return True, entry, not have
    # The bytes read and checked once are the bytes stored (and applied): no second read.
    installed, _pf = store.install(src, root=root, trust=trust, pf=pf)
    return True, _installed_json(installed), not have


def ensure_uninstalled(name, build_id, root, check_mode):
    """Returns the store entries of ``name`` (for ``build_id``, or every build when None)
    that were removed (or would be, in check mode)."""
    gone = store_entries(root, name, build_id)
    if gone and not check_mode:
        store.uninstall(name, root=root, build_id=build_id)
    return gone


def run_patch(params, check_mode):
    """Returns the result of the ``patch`` module (``failed_msg`` set when a process
    failed) for its validated ``params``; raises PatchboxError before anything is
    changed if the patch file, its signature or the store is refused."""
    state = params["state"]
    pids = set(params["pids"]) if params["pids"] is not None else None
    vms = set(params["vms"]) if params["vms"] is not None else None
    timeout = params["timeout"]
    root = store.store_root(params["store"])
    pf = read_patch_file(params["src"]) if params["src"] else None
    name = pf.patch.name if pf is not None else params["name"]
    build_id = pf.patch.build_id.hex() if pf is not None else None
    result = {
        "changed": False,
        "state": state,
        "patch": {"name": name, "build_id": build_id, "src": params["src"]},
        "processes": [],
        "store": None,
        "targets": [],
    }

    if state == "absent":
        outcomes = remove_all(
            name, build_id=build_id, pids=pids, vms=vms, timeout=timeout, dry_run=check_mode
        )
        processes = [o.to_json() for o in outcomes]
        uninstall = params.get("uninstall")
        # Narrowed to some processes, the run leaves the store (every process started
        # later) alone unless told otherwise.
        if uninstall if uninstall is not None else pids is None and vms is None:
            gone = ensure_uninstalled(name, build_id, root, check_mode)
            result["store"] = {"path": str(root), "changed": bool(gone), "removed": gone}
            result["changed"] = bool(gone)
    else:
        # The same trust rule as `patchbox apply`: the bytes checked are the bytes sent.
        signing.check_trust(pf.data, params["src"], signing.trust_dir(params["trust_dir"]))
        if state == "installed":
            changed, installed, created = ensure_installed(
                pf, params["src"], root, signing.trust_dir(params["trust_dir"]), check_mode
            )
            result["store"] = {
                "path": str(root),
                "changed": changed,
                "created": created,
                "entry": installed,
            }
            result["changed"] = changed
        outcomes = apply_all(
            pf,
            pids=pids,
            vms=vms,
            rollback=params["rollback"],
            timeout=timeout,
            dry_run=check_mode,
        )
        processes = [o.to_json() for o in outcomes]
        # The processes of the patch's build that have it now (or would have): what a
        # health check looks at.
        have = already_applied(name)
        result["targets"] = [
            p["pid"]
            for p in processes
            if p["result"] == Result.APPLIED
            or (p["result"] == Result.SKIPPED and p["reason"] == have)
        ]

    result["processes"] = processes
    result["summary"] = summary(processes)
    if any(p["result"] in (Result.APPLIED, Result.REMOVED) for p in processes):
        result["changed"] = True
    result["failed_msg"] = failure_message(processes)
    return result


def run_info(params):
    """Returns the result of the ``patch_info`` module: every agent of the host (as
    ``patchbox ps --json`` lists them) and the store's patches."""
    pids = set(params["pids"]) if params["pids"] is not None else None
    vms = set(params["vms"]) if params["vms"] is not None else None
    root = store.store_root(params["store"])
    processes = [r.to_json() for r in _rows(pids, vms, params["timeout"])]
    return {"processes": processes, "installed": store_entries(root), "store": str(root)}
