#!/usr/bin/env bash
# Installs what patchbox needs on a fresh Debian machine: apt packages, a venv with the
# pinned Python dependencies, and the agent build. Idempotent and quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for tool in gcc make git patch pkg-config; do
	command -v "$tool" >/dev/null || need_apt+=("$tool")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# The agent's fuzz harness (make -C agent fuzz, tests/fuzz/test_libfuzzer.py): clang with libFuzzer
# and the sanitizer runtimes.
command -v clang >/dev/null || need_apt+=(clang)
compgen -G '/usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a' >/dev/null ||
	need_apt+=(libclang-rt-14-dev)
# The Ansible tier (tests/ansible): managed hosts in network namespaces (ip, from
# iproute2), each running its own sshd from openssh-server (the tests start those; where
# an init system runs, the package also starts the distribution's ssh service), reached
# with ssh (openssh-client).
command -v ip >/dev/null || need_apt+=(iproute2)
# The fault matrix (tests/e2e/test_fault_matrix.py) kills commands at each system call
# with strace's fault injection.
command -v strace >/dev/null || need_apt+=(strace)
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh >/dev/null || need_apt+=(openssh-client)
# The walls test preloads jemalloc beside the agent (tests/e2e/test_walls.py).
[ -f /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ] || need_apt+=(libjemalloc2)
# The differential tiers (tests/diff, scripts/difftest): Csmith's generator and the
# headers its programs include (/usr/include/csmith).
command -v csmith >/dev/null || need_apt+=(csmith)
[ -f /usr/include/csmith/csmith.h ] || need_apt+=(libcsmith-dev)
# aarch64 (issue 22; docs/aarch64.md): the cross toolchain the arch tests build and link
# with (tests/arch, tests/elf/test_aarch64_elf.py: objects and executables for aarch64,
# checked against the relocation table), its C library, and qemu-user to run what it builds.
command -v aarch64-linux-gnu-gcc >/dev/null || need_apt+=(gcc-aarch64-linux-gnu)
command -v aarch64-linux-gnu-ld >/dev/null || need_apt+=(binutils-aarch64-linux-gnu)
[ -f /usr/aarch64-linux-gnu/include/stdio.h ] || need_apt+=(libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
# The guest tier (tests/guest, scripts/guest): Debian's QEMU boots the test guest (the
# project's own QEMU build has no disk or network devices), without its recommended GUI,
# firmware and tools; the guest's kernel and busybox are fetched by scripts/guest itself.
need_norec=()
command -v qemu-system-x86_64 >/dev/null || need_norec+=(qemu-system-x86)
# The libvirt tier (tests/qemu/test_qemu_libvirt.py, scripts/libvirtd): Debian's libvirt
# daemon with its QEMU driver and virsh; libvirt-daemon-system makes the libvirt-qemu
# user QEMU runs as. The tests start a daemon of their own (no init system needed);
# where an init system runs, the package also starts the host's libvirtd.
[ -x /usr/sbin/libvirtd ] && getent passwd libvirt-qemu >/dev/null ||
	need_norec+=(libvirt-daemon-system libvirt-daemon-driver-qemu)
command -v virsh >/dev/null || need_norec+=(libvirt-clients)
if [ ${#need_apt[@]} -gt 0 ] || [ ${#need_norec[@]} -gt 0 ]; then
	echo "bootstrap: installing ${need_apt[*]} ${need_norec[*]} with apt-get"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq </dev/null
	apt-get install -y -qq build-essential "${need_apt[@]}" </dev/null >/dev/null
	if [ ${#need_norec[@]} -gt 0 ]; then
		apt-get install -y -qq --no-install-recommends "${need_norec[@]}" </dev/null >/dev/null
	fi
fi

# The security tests run programs, this project's commands among them, as an
# unprivileged user (docs/security.md): the venv's interpreter must be one every user
# can run. A python3 installed under a private home (/root/.pyenv with /root 0700) is
# not; Debian's /usr/bin/python3 is.
py=$(command -v python3)
runs_as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$1" -c 'import venv, ensurepip' 2>/dev/null </dev/null; }
if command -v setpriv >/dev/null && [ "$(id -u)" = 0 ] && ! runs_as_nobody "$py"; then
	if ! runs_as_nobody /usr/bin/python3; then
		apt-get install -y -qq python3-venv </dev/null >/dev/null
	fi
	runs_as_nobody /usr/bin/python3 && py=/usr/bin/python3
fi
real=$("$py" -c 'import os, sys; print(os.path.realpath(sys.executable))')
if [ -x .venv/bin/python ] && ! grep -qxF "executable = $real" .venv/pyvenv.cfg; then
	rm -rf .venv	# made from another interpreter
fi
if [ ! -x .venv/bin/python ]; then
	"$py" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.patchbox-installed
sum=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
	.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' </dev/null
	echo "$sum" >"$stamp"
fi

# The agent, its headers and patchbox.pc inside the package, as a wheel has them
# (src/patchbox/_agent, not tracked); make rebuilds only what changed.
.venv/bin/python tools/install_agent.py src/patchbox/_agent
