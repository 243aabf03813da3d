#!/usr/bin/env bash
# Builds qemu-system-x86_64 7.2 from Debian's source package with the patchbox flags
# and the agent linked in, caching source and build between runs.
#
#   scripts/qemu/build-qemu.sh            # prints the path of the built binary last
#
# Cache: $PATCHBOX_QEMU_CACHE (default /var/cache/patchbox/qemu, kept by the machine).
# A rerun with nothing changed does nothing; a rebuilt agent only relinks QEMU.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${PATCHBOX_QEMU_CACHE:-/var/cache/patchbox/qemu}
export PATH="$root/.venv/bin:$PATH"
apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@" </dev/null; }
log() { echo "build-qemu: $*" >&2; }

# One build at a time per cache (tests and a user may run this concurrently).
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# 1. Tools and libraries QEMU's minimal configuration needs (Debian names).
pkgs=(dpkg-dev ninja-build pkg-config libglib2.0-dev libpixman-1-dev zlib1g-dev libfdt-dev flex bison)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	log "installing ${missing[*]}"
	apt_get update -qq
	apt_get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. Source: Debian's qemu source package (adds a deb-src entry if there is none).
mkdir -p "$cache/dl"
if [ ! -f "$cache/src/VERSION" ]; then
	if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
		log "adding a deb-src entry (/etc/apt/sources.list.d/patchbox-src.sources)"
		sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
			>/etc/apt/sources.list.d/patchbox-src.sources
		apt_get update -qq
	fi
	(cd "$cache/dl" && ls qemu_7.2*.dsc >/dev/null 2>&1 || apt_get source -qq --download-only qemu=1:7.2* ||
		apt_get source -qq --download-only qemu)
	rm -rf "$cache/src.tmp"
	dpkg-source -x --no-check "$(ls "$cache"/dl/qemu_7.2*.dsc | head -n1)" "$cache/src.tmp" >/dev/null
	mv "$cache/src.tmp" "$cache/src"
fi

# 3. The agent objects and meson live in the cache, at paths that do not depend on where
# this checkout is: a clone elsewhere (a CI run) reuses the build; a changed agent relinks.
mkdir -p "$cache/agent"
agent_dir=$("$root/.venv/bin/python" -c 'from patchbox.config import agent_dir; print(agent_dir())')
relink=0
for obj in libsandbox.o sandbox-listen.o; do
	if ! cmp -s "$agent_dir/$obj" "$cache/agent/$obj"; then
		cp "$agent_dir/$obj" "$cache/agent/$obj.tmp" && mv "$cache/agent/$obj.tmp" "$cache/agent/$obj"
		relink=1
	fi
done
[ -x "$cache/venv/bin/meson" ] || {
	python3 -m venv "$cache/venv" &&
		"$cache/venv/bin/pip" install -q --disable-pip-version-check meson==1.0.1 </dev/null
}

# 4. Configure once per (flags, script) combination. The flags are the patchable ones
# only: QEMU's sources need none of the agent's headers.
cflags=$("$root/.venv/bin/python" -c 'from patchbox.flags import PATCH_CFLAGS; print(" ".join(PATCH_CFLAGS))')
version="$(cat "$cache/src/VERSION") ($(basename "$(ls "$cache"/dl/qemu_7.2*.dsc | head -n1)" .dsc))"
stamp=$(printf '%s\n' "$cflags" "$(sha256sum <"$0")" | sha256sum | cut -c1-16)
build="$cache/build"
if [ "$(cat "$build/.patchbox-stamp" 2>/dev/null)" != "$stamp" ]; then
	log "configuring in $build"
	rm -rf "$build" && mkdir -p "$build"
	# Build-info object (version, flags, date) kept in the cache so the link finds it.
	ldflags=$(cd "$cache/src" && PATCHBOX_CACHE="$cache/info" PATCHBOX_AGENT_DIR="$cache/agent" \
		patchbox config --libs --app-version "$version" --app-cflags "$cflags")
	(cd "$build" && ../src/configure --target-list=x86_64-softmmu \
		--without-default-features --without-default-devices \
		--disable-docs --disable-tools --disable-werror \
		--meson="$cache/venv/bin/meson" \
		--extra-cflags="$cflags" --extra-ldflags="$ldflags") >"$cache/configure.log" 2>&1 ||
		{ tail -20 "$cache/configure.log" >&2; exit 1; }
	echo "$stamp" >"$build/.patchbox-stamp"
fi

# 5. Build (ninja is incremental).
exe="$build/qemu-system-x86_64"
[ "$relink" = 0 ] || rm -f "$exe"
log "building (ninja -C $build qemu-system-x86_64)"
ninja -C "$build" -j"$(nproc)" qemu-system-x86_64 >"$cache/build.log" 2>&1 ||
	{ tail -30 "$cache/build.log" >&2; exit 1; }
echo "$exe"
