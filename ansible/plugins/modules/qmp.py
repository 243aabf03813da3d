#!/usr/bin/python
# Copyright: patchbox developers
# GNU General Public License v2.0 only (see https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)
# SPDX-License-Identifier: GPL-2.0-only

DOCUMENTATION = r"""
---
module: qmp
short_description: Run one QMP command against a QEMU process, as a health check
version_added: "0.1.0"
description:
  - Connects to a QEMU monitor socket (C(-qmp unix:PATH,server=on,wait=off)), negotiates
    capabilities, runs one command and returns its answer.
  - For a QEMU that libvirt runs (libvirt keeps its only monitor), O(domain) sends the
    command through libvirt instead (C(virsh qemu-monitor-command)).
  - Fails when the socket cannot be reached, QEMU answers with an error, or the answer does
    not hold the values of O(expect). The health check of the rollout playbook uses it for
    QEMU hosts.
  - Changes nothing by itself; commands that change the VM are the caller's choice and are
    not run in check mode.
author:
  - patchbox developers (!UNKNOWN)
options:
  socket:
    description:
      - Path of the QMP Unix socket on the managed host.
      - Exactly one of O(socket) and O(domain) is required.
    type: path
  domain:
    description:
      - Name of a libvirt domain whose QEMU to ask, through libvirt's own monitor
        (C(virsh -c URI qemu-monitor-command DOMAIN)). libvirt marks the domain
        C(custom-monitor) in its log when this is used.
    type: str
  libvirt_uri:
    description:
      - The libvirt connection URI for O(domain).
    type: str
    default: qemu:///system
  command:
    description:
      - The QMP command.
    type: str
    default: query-status
  arguments:
    description:
      - The command's arguments.
    type: dict
  expect:
    description:
      - Keys and values the answer must hold (a dict answer), for example
        C(status) V(running) for C(query-status).
    type: dict
  read_only:
    description:
      - Whether the command only reads (C(query-*) commands do). Commands that are not
        read-only are skipped in check mode.
    type: bool
    default: true
  timeout:
    description:
      - Seconds to wait for the socket and for each answer.
    type: float
    default: 10.0
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: partial
    details:
      - Runs O(command) when O(read_only) is true, else reports it as skipped.
  diff_mode:
    support: none
  platform:
    platforms: posix
"""

EXAMPLES = r"""
- name: The VM still runs
  patchbox.live.qmp:
    socket: /run/qemu/vm1.qmp
    command: query-status
    expect:
      status: running

- name: A libvirt domain still runs
  patchbox.live.qmp:
    domain: web-01
    command: query-status
    expect:
      status: running

- name: Which QEMU answers
  patchbox.live.qmp:
    socket: /run/qemu/vm1.qmp
    command: query-version
  register: version
"""

RETURN = r"""
response:
  description: The C(return) value of the command.
  returned: success
  type: raw
  sample: {status: running, running: true}
qemu_version:
  description: The QEMU version from the QMP greeting.
  returned: success
  type: dict
  sample: {major: 7, minor: 2, micro: 0}
"""

import json
import socket
import time

from ansible.module_utils.basic import AnsibleModule


class QMPError(Exception):
    """The monitor cannot be reached or answered with an error."""


class Session:
    """One QMP session over a Unix socket: greeting, capabilities, then commands."""

    def __init__(self, path, timeout):
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(path)
                break
            except OSError as err:
                self.sock.close()
                if time.monotonic() >= deadline:
                    raise QMPError(f"cannot connect to {path}: {err.strerror or err}") from err
                time.sleep(0.1)
        self.file = self.sock.makefile("rwb")
        self.greeting = self.read()
        if "QMP" not in self.greeting:
            raise QMPError(f"{path} is not a QMP monitor (greeting {self.greeting!r})")
        self.execute("qmp_capabilities")

    def read(self):
        while True:
            try:
                line = self.file.readline()
            except OSError as err:
                raise QMPError(f"reading the monitor: {err.strerror or err}") from err
            if not line:
                raise QMPError("the monitor closed the connection")
            try:
                msg = json.loads(line)
            except ValueError as err:
                raise QMPError(f"the monitor sent no JSON: {line[:200]!r}") from err
            if "event" not in msg:  # events are not answers
                return msg

    def execute(self, command, arguments=None):
        req = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        try:
            self.file.write(json.dumps(req).encode() + b"\n")
            self.file.flush()
        except OSError as err:
            raise QMPError(f"writing to the monitor: {err.strerror or err}") from err
        reply = self.read()
        return reply_return(command, reply)

    def close(self):
        self.file.close()
        self.sock.close()


def reply_return(command, reply):
    """Returns the C(return) of a QMP ``reply`` to ``command``; QMPError for an error or
    an answer without one."""
    if "error" in reply:
        error = reply["error"]
        desc, cls = error.get("desc", error), error.get("class", "")
        raise QMPError(f"{command}: {desc} ({cls})")
    if "return" not in reply:
        raise QMPError(f"{command}: unexpected answer {reply!r}")
    return reply["return"]


def virsh_execute(module, uri, domain, command, arguments=None):
    """Returns the C(return) of QMP ``command`` sent through libvirt's monitor of ``domain``."""
    req = {"execute": command}
    if arguments:
        req["arguments"] = arguments
    argv = ["virsh", "-c", uri, "qemu-monitor-command", domain, json.dumps(req)]
    rc, out, err = module.run_command(argv, environ_update={"LC_ALL": "C"})
    if rc != 0:
        raise QMPError(f"virsh qemu-monitor-command: {(err or out).strip()}")
    try:
        reply = json.loads(out)
    except ValueError as error:
        raise QMPError(f"virsh sent no JSON: {out[:200]!r}") from error
    return reply_return(command, reply)


def mismatches(response, expect):
    """Returns one line per key of ``expect`` whose value the response does not hold."""
    if not isinstance(response, dict):
        return [f"the answer is not a dict: {response!r}"]
    out = []
    for key, want in expect.items():
        if key not in response:
            out.append(f"{key} missing")
        elif response[key] != want:
            out.append(f"{key} is {response[key]!r}, expected {want!r}")
    return out


def main():
    module = AnsibleModule(
        argument_spec=dict(
            socket=dict(type="path"),
            domain=dict(type="str"),
            libvirt_uri=dict(type="str", default="qemu:///system"),
            command=dict(type="str", default="query-status"),
            arguments=dict(type="dict"),
            expect=dict(type="dict"),
            read_only=dict(type="bool", default=True),
            timeout=dict(type="float", default=10.0),
        ),
        supports_check_mode=True,
        mutually_exclusive=[("socket", "domain")],
        required_one_of=[("socket", "domain")],
    )
    p = module.params
    if module.check_mode and not p["read_only"]:
        module.exit_json(changed=False, skipped=True, msg=f"check mode: {p['command']} not run")
    where = f"domain {p['domain']}" if p["domain"] else p["socket"]
    try:
        if p["domain"]:
            response = virsh_execute(
                module, p["libvirt_uri"], p["domain"], p["command"], p["arguments"]
            )
            version = virsh_execute(module, p["libvirt_uri"], p["domain"], "query-version")
            version = version.get("qemu", {})
        else:
            session = Session(p["socket"], p["timeout"])
            try:
                response = session.execute(p["command"], p["arguments"])
                version = session.greeting["QMP"].get("version", {}).get("qemu", {})
            finally:
                session.close()
    except QMPError as err:
        module.fail_json(msg=f"QMP {p['command']} on {where}: {err}")
    if p["expect"]:
        bad = mismatches(response, p["expect"])
        if bad:
            module.fail_json(
                msg=f"QMP {p['command']}: {'; '.join(bad)}",
                response=response,
                qemu_version=version,
            )
    module.exit_json(changed=not p["read_only"], response=response, qemu_version=version)


if __name__ == "__main__":
    main()
