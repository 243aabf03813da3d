#!/usr/bin/python
# Copyright: patchbox developers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only

DOCUMENTATION = r"""
---
module: patch_info
short_description: Patch levels of a host's processes, as facts
version_added: "0.1.0"
description:
  - Lists every process of the managed host with a patchbox agent, with its executable,
    build-id, applied patches, installed patches and sandbox use (what C(patchbox ps --json)
    shows), and the patches of the host's store.
  - Also lists the processes of the same builds (an agent's build, or one the store holds
    patches for) whose agent cannot be reached, with the reason in C(error), since a
    worker without an agent still runs the build's code.
  - The lists are returned and also set as the facts C(patchbox_processes) and
    C(patchbox_installed), for reports and conditions in later tasks and plays.
  - Changes nothing.
author:
  - patchbox developers (!UNKNOWN)
options:
  pids:
    description:
      - Only these processes (pids as the managed host sees them).
    type: list
    elements: int
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.facts
  - patchbox.live.agents
attributes:
  check_mode:
    support: full
    details:
      - Reads only; the same in check mode.
  diff_mode:
    support: none
  platform:
    platforms: posix
    details:
      - Linux only (the agent reads C(/proc)).
  facts:
    support: full
seealso:
  - module: patchbox.live.patch
"""

EXAMPLES = r"""
- name: Read the patch levels
  patchbox.live.patch_info:

- name: Read the patch level of one VM's QEMU
  patchbox.live.patch_info:
    vms: [web-01]

- name: Every process of the fixed build has the fix
  ansible.builtin.assert:
    that:
      - >-
        patchbox_processes
        | selectattr('build_id', 'equalto', fixed_build_id)
        | rejectattr('patches', 'contains', 'cve-2026-1234')
        | list | length == 0
"""

RETURN = r"""
processes:
  description:
    - One entry per process with an agent, and per process of their builds whose agent
      cannot be reached, as C(patchbox ps --json) prints them.
  returned: always
  type: list
  elements: dict
  contains:
    pid:
      description: The process id, as the managed host sees it.
      type: int
      sample: 4711
    exe:
      description: The executable of the process.
      type: str
      sample: /usr/sbin/server
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
    patches:
      description: Names of the patches applied in the process, in the order applied.
      type: list
      elements: str
      sample: [cve-2026-1234]
    installed:
      description: Names of the store's patches for the process's build-id.
      type: list
      elements: str
      sample: [cve-2026-1234]
    sandbox_used:
      description: Bytes of the agent's sandbox in use.
      type: int
      sample: 4096
    sandbox_size:
      description: Bytes of the agent's sandbox.
      type: int
      sample: 524288
    socket:
      description: The agent's socket, as it bound it.
      type: str
      sample: /usr/sbin/sandbox-sock4711
    error:
      description:
        - Why the agent could not be reached (empty when it answered), for example no
          agent loaded, agent present but no socket, the agent refused, no reply in time.
      type: str
      sample: ""
installed:
  description: The patches of the store, in install order.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The patch's name.
      type: str
      sample: cve-2026-1234
    build_id:
      description: The build-id it is installed for.
      type: str
      sample: 3f2a9c0d5e6b7a8190a1b2c3d4e5f60718293a4b
    path:
      description: The file in the store.
      type: str
      sample: /var/lib/patchbox/3f2a.../01780000000000000000-cve-2026-1234.pbx
store:
  description: The store directory read.
  returned: always
  type: str
  sample: /var/lib/patchbox
ansible_facts:
  description: The same lists as facts.
  returned: always
  type: dict
  contains:
    patchbox_processes:
      description: The same as RV(processes).
      type: list
      elements: dict
    patchbox_installed:
      description: The same as RV(installed).
      type: list
      elements: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.patchbox.live.plugins.module_utils.api import (
    PatchboxError,
    require_patchbox,
    run_info,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            pids=dict(type="list", elements="int"),
            vms=dict(type="list", elements="str"),
            store=dict(type="path"),
            timeout=dict(type="float", default=10.0),
        ),
        supports_check_mode=True,
    )
    require_patchbox(module)
    try:
        result = run_info(module.params)
    except PatchboxError as err:
        module.fail_json(msg=str(err))
    result["ansible_facts"] = {
        "patchbox_processes": result["processes"],
        "patchbox_installed": result["installed"],
    }
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
