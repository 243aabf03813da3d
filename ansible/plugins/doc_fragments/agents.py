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
