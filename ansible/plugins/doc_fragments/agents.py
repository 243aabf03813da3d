# Copyright: patchbox developers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only
"""Documentation shared by the modules that talk to the agents of a host's processes."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
requirements:
  - The patchbox wheel installed into the Python that runs the module on the managed host
    (set C(ansible_python_interpreter) to it).
  - Root on the managed host, or the user that owns the target processes.
options:
  vms:
    description:
      - Only the QEMU processes whose VM name is one of these (the guest name of QEMU's
        C(-name) option, C(-name guest=NAME,debug-threads=on) as libvirt starts QEMU; a
        comma doubled there is one comma of the name).
      - A process is QEMU by the file name of its executable (C(qemu-system-*),
        C(qemu-kvm), C(kvm)); other processes have no VM name and are left out.
      - The name is read from the process's command line, which the process could
        rewrite; it selects processes, it does not authenticate them.
    type: list
    elements: str
  store:
    description:
      - The patch store directory. Default C($PATCHBOX_STORE), else C(/var/lib/patchbox).
    type: path
  timeout:
    description:
      - Seconds to wait for each agent to connect and answer.
    type: float
    default: 10.0
notes:
  - A host whose processes run in several PID namespaces (containers) lists them with the
    pids of the namespace the module runs in.
"""
