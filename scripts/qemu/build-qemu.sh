#!/usr/bin/env bash
# Builds qemu-system-x86_64 7.2 from Debian's source package with the patchbox flags
# and the agent linked in, caching source and build between runs.
#
#   build-qemu.sh                  # prints the path of the built binary last
#   build-qemu.sh --print-flags    # prints the patchbox used, the flags and the configure
#                                  # line, and exits: nothing installed, fetched or built
#
# The flags and the agent come from `patchbox config --cflags/--libs` of: $PATCHBOX, else
# `patchbox` on PATH (the installed wheel: docs/qemu.md), else the .venv of the checkout
# this script lies in (scripts/bootstrap.sh makes it).
# Cache: $PATCHBOX_QEMU_CACHE (default /var/cache/patchbox/qemu, kept by the machine).
# A rerun with nothing changed does nothing; a rebuilt agent only relinks QEMU.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${PATCHBOX_QEMU_CACHE:-/var/cache/patchbox/qemu}
apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@" </dev/null; }
log() { echo "build-qemu: $*" >&2; }
die() {
	log "$*"
	exit 1
}

print_flags=0
case "${1:-}" in
"") ;;
--print-flags) print_flags=1 ;;
*)
	echo "usage: $0 [--print-flags]" >&2
	exit 2
	;;
esac

# 0. The patchbox command, and what it says: the patchable flags only (QEMU's sources need
# none of the agent's headers, and an include path into wherever patchbox is installed
# would tie the cache to that place), and the agent objects its --libs names.
if [ -n "${PATCHBOX:-}" ]; then
	patchbox=$PATCHBOX
elif command -v patchbox >/dev/null; then
	patchbox=$(command -v patchbox)
elif [ -x "$here/../../.venv/bin/patchbox" ]; then
	patchbox=$(cd "$here/../../.venv/bin" && pwd)/patchbox
else
	die "no patchbox command: install the patchbox wheel (patchbox on PATH), set PATCHBOX, or run scripts/bootstrap.sh in the checkout"
fi
out=$("$patchbox" config --cflags) || die "$patchbox config --cflags failed"
read -ra words <<<"$out"
flags=()
for w in "${words[@]}"; do
	[[ $w == -I* ]] || flags+=("$w")
done
cflags=${flags[*]}
version=unknown
dsc=$(ls "$cache"/dl/qemu_7.2*.dsc 2>/dev/null | head -n1) || true
if [ -f "$cache/src/VERSION" ] && [ -n "$dsc" ]; then
	version="$(cat "$cache/src/VERSION") ($(basename "$dsc" .dsc))"
fi
# Link inputs recorded with QEMU's version and flags and the git revision of the source
# (a source package has none: "unknown"). The build-info object goes to PATCHBOX_CACHE.
libs() {
	local dir=$cache/src
	[ -d "$dir" ] || dir=.
	(cd "$dir" && "$patchbox" config --libs --app-version "$version" --app-cflags "$cflags") ||
		die "$patchbox config --libs failed"
}
# Debian's qemu-system-x86 device set (its configure takes the default devices of the
# target) with the features whose code is device or block code that guests reach
# (debian/control's list, less the UI toolkits, audio and remote-storage libraries):
# every feature named, none detected, so a machine with other libraries installed
# configures the same QEMU. The firmware path is Debian's: the source package has no
# firmware, the BIOS comes from Debian's seabios package (and the rest from
# qemu-system-data, ipxe-qemu).
opts=(--target-list=x86_64-softmmu --without-default-features
	--enable-kvm --enable-tcg --enable-fdt=system --enable-slirp --enable-linux-aio
	--enable-linux-io-uring --enable-virtfs --enable-attr --enable-cap-ng --enable-vnc
	--enable-vnc-jpeg --enable-png --enable-gnutls --enable-nettle --enable-zstd
	--enable-seccomp --enable-libusb --enable-usb-redir --enable-tpm --enable-vhost-kernel
	--enable-vhost-net --enable-vhost-user --enable-vhost-vdpa --enable-vhost-crypto
	--firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu
	--disable-docs --disable-tools --disable-werror --meson="$cache/venv/bin/meson")

if [ "$print_flags" = 1 ]; then
	ldflags=$(libs)
	agent=
	for w in $ldflags; do
		[[ $w != */libsandbox.o ]] || agent=$(dirname "$w")
	done
	echo "patchbox   $patchbox"
	echo "agent      $agent"
	echo "cflags     $cflags"
	echo "ldflags    $ldflags"
	echo "configure  ../src/configure ${opts[*]} --extra-cflags='$cflags' --extra-ldflags='$ldflags'"
	exit 0
fi

# One build at a time per cache (tests and a user may run this concurrently).
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# 1. Tools and libraries the configuration needs (Debian names).
pkgs=(dpkg-dev ninja-build pkg-config libglib2.0-dev libpixman-1-dev zlib1g-dev libfdt-dev flex bison
	libslirp-dev libaio-dev liburing-dev libattr1-dev libcap-ng-dev libjpeg-dev libpng-dev
	libgnutls28-dev nettle-dev libzstd-dev libseccomp-dev libusb-1.0-0-dev libusbredirparser-dev
	seabios ipxe-qemu qemu-system-data)
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
# patchbox is installed: a clone elsewhere (a CI run) reuses the build; a changed agent
# relinks. The objects are those `patchbox config --libs` names.
mkdir -p "$cache/agent" "$cache/info"
relink=0
found=0
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
for w in $(PATCHBOX_CACHE=$probe libs); do
	case $w in
	*/libsandbox.o | */sandbox-listen.o) ;;
	*) continue ;;
	esac
	obj=$(basename "$w")
	found=$((found + 1))
	if ! cmp -s "$w" "$cache/agent/$obj"; then
		cp "$w" "$cache/agent/$obj.tmp" && mv "$cache/agent/$obj.tmp" "$cache/agent/$obj"
		relink=1
	fi
done
[ "$found" = 2 ] || die "$patchbox config --libs names no libsandbox.o and sandbox-listen.o"
[ -x "$cache/venv/bin/meson" ] || {
	python3 -m venv "$cache/venv" &&
		"$cache/venv/bin/pip" install -q --disable-pip-version-check meson==1.0.1 </dev/null
}

# 4. Configure once per configuration: the options and the flags (not this script's
# text: an edit elsewhere in it does not rebuild QEMU).
dsc=$(ls "$cache"/dl/qemu_7.2*.dsc | head -n1)
version="$(cat "$cache/src/VERSION") ($(basename "$dsc" .dsc))"
stamp=$(printf '%s\n' "${opts[@]}" "$cflags" | sha256sum | cut -c1-16)
build="$cache/build"
if [ "$(cat "$build/.patchbox-stamp" 2>/dev/null)" != "$stamp" ]; then
	log "configuring in $build"
	rm -rf "$build" && mkdir -p "$build"
	# Build-info object (version, flags, date) kept in the cache so the link finds it,
	# linked with the cache's copies of the agent objects.
	ldflags=$(PATCHBOX_AGENT_DIR="$cache/agent" PATCHBOX_CACHE="$cache/info" libs)
	(cd "$build" && ../src/configure "${opts[@]}" \
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
# Run from its build directory, QEMU looks for firmware only in the bundle beside it
# (qemu-bundle/, the install tree relocated): link Debian's firmware directories there.
for d in /usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu; do
	[ -e "$build/qemu-bundle$d" ] || { mkdir -p "$build/qemu-bundle${d%/*}" && ln -s "$d" "$build/qemu-bundle$d"; }
done
echo "$exe"
