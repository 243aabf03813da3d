#!/usr/bin/env bash
# Reproduces the corpus of real security fixes (docs/corpus.md):
#
#   scripts/corpus/run.sh                       # every program: dnsmasq memcached openssh qemu
#   scripts/corpus/run.sh memcached dnsmasq     # some of them
#   scripts/corpus/run.sh memcached --fix CVE-2023-46852 --table
#   scripts/corpus/run.sh --ci                  # the CI subset (tests/corpus, -m corpus)
#
# Installs what it needs (Debian build dependencies and tools, a deb-src entry, the
# project's venv with its test extra), then runs the package scripts/corpus (`python -m
# corpus`), which fetches the source packages, builds the levels and runs every fix. Runs as
# root (apt-get, daemons that drop privileges), without a terminal. Cache:
# $PATCHBOX_CORPUS_CACHE (default /var/cache/patchbox/corpus); results in its results/ directory.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@" </dev/null; }

# Build dependencies (dnsmasq with DNSSEC; memcached with SASL, TLS and its proxy;
# OpenSSH), tools of the load generators and probes (gdb reads a QEMU probe's answer),
# QEMU's guest firmware.
pkgs=(dpkg-dev autoconf automake nettle-dev libgmp-dev libevent-dev libsasl2-dev libssl-dev
	zlib1g-dev openssh-client libnbd-bin seabios iproute2 gdb)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "corpus: installing ${missing[*]}" >&2
	apt_get update -qq
	apt_get install -y -qq "${missing[@]}" >/dev/null
fi
if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
	echo "corpus: adding a deb-src entry (/etc/apt/sources.list.d/patchbox-src.sources)" >&2
	sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
		>/etc/apt/sources.list.d/patchbox-src.sources
	apt_get update -qq
fi
"$root/scripts/bootstrap.sh"
# scripts/ on the path for `-m corpus` only: the harness takes it out of what it starts.
PYTHONPATH="$root/scripts" exec "$root/.venv/bin/python" -m corpus "$@"
