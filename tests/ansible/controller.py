"""The Ansible controller of the tests: ansible.cfg, inventory and keys of the managed hosts,
and runs of ``ansible`` (ad-hoc, one JSON result per host) and ``ansible-playbook``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet import Fleet, run

from helpers import BIN

__all__ = ["Controller", "Adhoc"]


@dataclass
class Adhoc:
    """The outcome of one ad-hoc ``ansible`` run."""

    rc: int
    results: dict[str, dict[str, Any]]  # host -> the module's result
    output: str

    def __getitem__(self, host: str) -> dict[str, Any]:
        return self.results[host]


class Controller:
    """Runs Ansible against the fleet with a configuration of its own (nothing read from
    or written to the user's ~/.ansible or ~/.ssh)."""

    def __init__(self, base: Path, fleet: Fleet, host_python: Path, collections: Path) -> None:
        self.base = base
        self.fleet = fleet
        self.key = base / "id_ed25519"
        self.authorized_keys = base / "authorized_keys"
        self.known_hosts = base / "known_hosts"
        self.inventory = base / "inventory.ini"
        self.config = base / "ansible.cfg"
        self.host_python = host_python
        self.collections = collections
        self.counter = 0

    def make_keys(self) -> None:
        """Creates the controller's key pair and the hosts' authorized_keys."""
        if not self.key.exists():
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "controller", "-f", self.key)
        shutil.copy(self.key.with_suffix(".pub"), self.authorized_keys)

    def configure(self) -> None:
        """Writes known_hosts (the hosts' real keys: strict checking stays on), the
        inventory and ansible.cfg."""
        lines = []
        for h in self.fleet.hosts:
            pub = (h.root / "ssh_host_ed25519_key.pub").read_text().split()
            lines.append(f"{h.address} {pub[0]} {pub[1]}")
        self.known_hosts.write_text("\n".join(lines) + "\n")
        hosts = "\n".join(f"{h.name} ansible_host={h.address}" for h in self.fleet.hosts)
        self.inventory.write_text(
            f"[fleet]\n{hosts}\n\n[fleet:vars]\nansible_user=root\n"
            f"ansible_python_interpreter={self.host_python}\n"
            f"ansible_ssh_private_key_file={self.key}\n"
        )
        ssh_args = " ".join(
            [
                "-F /dev/null",
                "-o ControlMaster=auto -o ControlPersist=30s",
                f"-o UserKnownHostsFile={self.known_hosts}",
                "-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes",
                "-o IdentitiesOnly=yes",
            ]
        )
        (self.base / "cp").mkdir(exist_ok=True)
        self.config.write_text(
            "[defaults]\n"
            f"inventory = {self.inventory}\n"
            f"collections_path = {self.collections}\n"
            "collections_scan_sys_path = false\n"
            "retry_files_enabled = false\n"
            "forks = 10\n"
            "timeout = 30\n"
            "remote_tmp = /var/tmp/.ansible-tmp\n"
            "deprecation_warnings = false\n"
            "\n[ssh_connection]\n"
            f"ssh_args = {ssh_args}\n"
            f"control_path_dir = {self.base / 'cp'}\n"
            "pipelining = true\n"
        )

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env["ANSIBLE_CONFIG"] = str(self.config)
        env["ANSIBLE_HOME"] = str(self.base / "ansible-home")
        env["ANSIBLE_NOCOLOR"] = "1"
        env["ANSIBLE_FORCE_COLOR"] = "0"
        return env

    def _run(self, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args,
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )

    def adhoc(
        self,
        pattern: str,
        module: str,
        args: dict[str, Any] | None = None,
        check: bool = False,
        extra: list[str] | None = None,
    ) -> Adhoc:
        """Runs ``module`` on the hosts of ``pattern``; returns each host's result (the
        JSON the ``tree`` callback writes)."""
        self.counter += 1
        tree = self.base / f"tree{self.counter}"
        cmd = [str(BIN / "ansible"), pattern, "-m", module, "-t", str(tree)]
        if args:
            cmd += ["-a", json.dumps(args)]
        if check:
            cmd.append("--check")
        proc = self._run(cmd + (extra or []))
        results = {}
        if tree.is_dir():
            for f in tree.iterdir():
                results[f.name] = json.loads(f.read_text())
        return Adhoc(proc.returncode, results, proc.stdout + proc.stderr)

    def playbook(
        self, playbook: str | Path, extra_vars: dict[str, Any], *args: str
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``ansible-playbook`` (a file, or a collection playbook by its FQCN)."""
        self.counter += 1
        vars_file = self.base / f"vars{self.counter}.json"
        vars_file.write_text(json.dumps(extra_vars))
        return self._run(
            [str(BIN / "ansible-playbook"), str(playbook), "-e", f"@{vars_file}", *args]
        )
