#!/usr/bin/python
# Copyright: patchbox developers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only

DOCUMENTATION = r"""
---
module: patch
short_description: Apply, remove or install a live patch on every matching process of a host
version_added: "0.1.0"
description:
  - Applies a patchbox live patch to every running process of the managed host that runs
    the patch's build (its executable has the patch's build-id or, for a library's patch,
    it maps that library), removes it from every process, or installs it in the host's
    patch store (for processes started later) and applies it to the running ones.
  - Every process of the build counts, whether or not its agent answers. One whose agent
    cannot be reached (none loaded, no socket, the agent refused) is reported as
    C(unreachable) with the reason, and the module fails.
  - Works through the patchbox Python API on the managed host (the same calls as
    C(patchbox apply --all), C(patchbox remove --all) and C(patchbox install --apply));
    no command output is parsed.
  - Processes of other builds are reported as C(skipped); so is a process that already has
    the patch (O(state=present)) or does not have it (O(state=absent)). A second run with
    the same arguments therefore reports C(changed=false).
  - The module fails when a process fails (the agent refused, the process exited, the
    agent did not answer) or is unreachable; the message carries the reason for each one.
  - The trust rule of C(patchbox apply) holds. When the trust directory
    C(/etc/patchbox/trusted-keys) (or O(trust_dir)) exists, only patches signed by one of
    its keys are applied or installed. The signature is checked here, by the module; the
    agents never see it.
  - The trust directory, every directory above it and every key in it must be owned by
    root (or the user the module runs as) and writable by nobody else, and no symbolic
    link is followed on the way; otherwise the module fails, naming the path, its owner
    and mode, before any process is touched.
author:
  - patchbox developers (!UNKNOWN)
options:
  src:
    description:
      - Path of the patch file (C(.pbx)) on the managed host.
      - Required for O(state=present) and O(state=installed). For O(state=absent) the patch
        name and build-id are read from it; O(name) can be given instead.
    type: path
  name:
    description:
      - Name of the patch to remove, when the patch file is not at hand.
      - Only with O(state=absent). Without O(src), processes of every build lose the patch
        of that name, and the store entries of every build-id are removed.
    type: str
  state:
    description:
      - V(present) applies the patch to every running process whose build-id matches.
      - V(absent) removes it from every process that has it and, unless O(pids) or O(vms)
        is given, from the store.
      - V(installed) puts it into the store (every process of its build started later
        applies it) and applies it to the running processes, as V(present) does.
    type: str
    choices: [present, absent, installed]
    default: present
  pids:
    description:
      - Only these processes (pids as the managed host sees them). Others are left alone
        and not listed.
      - With O(state=absent) the store is then left alone (unless O(uninstall)); with
        O(state=installed) it is written all the same (it concerns the processes started
        later). The same holds for O(vms).
    type: list
    elements: int
  uninstall:
    description:
      - With O(state=absent), whether to take the patch out of the store too.
      - By default, when neither O(pids) nor O(vms) is given. The rollout's rollback sets
        it to whether its own run made the store entry, so that an entry that was there
        before stays.
    type: bool
  rollback:
    description:
      - With O(state=present) or O(state=installed), if any process failed, remove the
        patch again from every process this run applied it to (as
        C(patchbox apply --all --rollback-on-failure)). Those processes are reported as
        C(removed).
    type: bool
    default: false
  trust_dir:
    description:
      - Directory of trusted public keys (C(*.pub)). When given it must exist. Default
        C($PATCHBOX_TRUST_DIR), else C(/etc/patchbox/trusted-keys) when it exists.
    type: path
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - patchbox.live.agents
attributes:
  check_mode:
    support: full
    details:
      - Asks every agent for its patches (the same questions as C(patchbox ps)) and reports
        what would be applied or removed; nothing is sent that changes a process, and the
        store is not written.
  diff_mode:
    support: none
  platform:
    platforms: posix
    details:
      - Linux only (the agent reads C(/proc)).
seealso:
  - module: patchbox.live.patch_info
"""

EXAMPLES = r"""
- name: Apply the fix to every running process of its build
  patchbox.live.patch:
    src: /var/lib/patchbox-staging/cve-2026-1234.pbx
    state: present

- name: Apply it and keep it for processes started later
  patchbox.live.patch:
    src: /var/lib/patchbox-staging/cve-2026-1234.pbx
    state: installed

- name: Apply to two processes only, all of them or none
  patchbox.live.patch:
    src: /var/lib/patchbox-staging/cve-2026-1234.pbx
    pids: [4711, 4712]
    rollback: true

- name: Apply it to the QEMUs of two VMs (libvirt's domain names)
  patchbox.live.patch:
    src: /var/lib/patchbox-staging/cve-2026-1234.pbx
    vms: [web-01, db-02]

- name: Take it out of every process and out of the store
  patchbox.live.patch:
    name: cve-2026-1234
    state: absent
"""

RETURN = r"""
processes:
  description:
    - One entry per process the run concerned (every process of the patch's build, and
      agents of other builds, skipped).
  returned: always
  type: list
  elements: dict
  contains:
    pid:
      description: The process id, as the managed host sees it.
      type: int
      sample: 4711
    result:
      description:
        - C(applied), C(removed), C(skipped) (other build, already applied, not applied,
          no agent to hold the patch), C(failed) or C(unreachable) (a process of the build
          whose agent cannot be reached, because none is loaded, it has no socket or it
          refused). In check mode, what would happen.
      type: str
      sample: applied
    reason:
      description:
        - Why it was skipped or failed (the agent's text, with its error code), or
          C(check mode) for a predicted result; empty when the change was made.
      type: str
      sample: "agent refused: expected bytes differ at use_helper [EXPECTED_MISMATCH]"
    exe:
      description: The executable of the process.
      type: str
      sample: /usr/bin/qemu-system-x86_64
    build_id:
      description: The build-id of the executable (hex).
      type: str
      sample: 3f2a9c0d5e6b7a8190a1b2c3d4e5f60718293a4b
    vm:
      description:
        - The VM name of a QEMU process (its C(-name guest=NAME)); empty for other
          processes.
      type: str
      sample: web-01
  sample:
    - pid: 4711
      result: applied
      reason: ""
      exe: /usr/bin/qemu-system-x86_64
      build_id: 3f2a9c0d5e6b7a8190a1b2c3d4e5f60718293a4b
      vm: web-01
patch:
  description: The patch the run was about.
  returned: always
  type: dict
  contains:
    name:
      description: The patch's name.
      type: str
      sample: cve-2026-1234
    build_id:
      description: The build-id the patch is for (null when only O(name) was given).
      type: str
      sample: 3f2a9c0d5e6b7a8190a1b2c3d4e5f60718293a4b
    src:
      description: The patch file, as given.
      type: str
      sample: /var/lib/patchbox-staging/cve-2026-1234.pbx
summary:
  description: How many processes had each result.
  returned: always
  type: dict
  sample: {applied: 2, removed: 0, skipped: 1, failed: 0, unreachable: 0}
targets:
  description:
    - With O(state=present) or O(state=installed), the pids of the processes of the
      patch's build that have the patch after the run (applied now, or already), or would
      have in check mode. What the rollout's health check looks at.
  returned: always
  type: list
  elements: int
  sample: [4711, 4712]
store:
  description:
    - What happened in the store. Null when the store was not concerned
      (O(state=present), or O(state=absent) with O(pids) and without O(uninstall)).
    - With O(state=installed), C(created) says whether this run made the entry (no entry
      of that name was there for the build before).
  returned: always
  type: dict
  sample:
    path: /var/lib/patchbox
    changed: true
    created: true
    entry:
      name: cve-2026-1234
      build_id: 3f2a9c0d5e6b7a8190a1b2c3d4e5f60718293a4b
      path: /var/lib/patchbox/3f2a.../01780000000000000000-cve-2026-1234.pbx
state:
  description: The state asked for.
  returned: always
  type: str
  sample: present
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.patchbox.live.plugins.module_utils.api import (
    PatchboxError,
    require_patchbox,
    run_patch,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            src=dict(type="path"),
            name=dict(type="str"),
            state=dict(type="str", default="present", choices=["present", "absent", "installed"]),
            pids=dict(type="list", elements="int"),
            vms=dict(type="list", elements="str"),
            rollback=dict(type="bool", default=False),
            uninstall=dict(type="bool"),
            store=dict(type="path"),
            trust_dir=dict(type="path"),
            timeout=dict(type="float", default=10.0),
        ),
        mutually_exclusive=[("src", "name")],
        required_if=[
            ("state", "present", ("src",)),
            ("state", "installed", ("src",)),
            ("state", "absent", ("src", "name"), True),
        ],
        supports_check_mode=True,
    )
    state = module.params["state"]
    if module.params["name"] is not None and state != "absent":
        module.fail_json(msg=f"name goes with state=absent; give src for state={state}")
    if module.params["uninstall"] is not None and state != "absent":
        module.fail_json(msg=f"uninstall goes with state=absent, not state={state}")
    require_patchbox(module)
    try:
        result = run_patch(module.params, module.check_mode)
    except PatchboxError as err:
        module.fail_json(msg=str(err), changed=False, processes=[])
    failed_msg = result.pop("failed_msg")
    if failed_msg:
        module.fail_json(msg=failed_msg, **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
