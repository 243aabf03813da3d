#!/usr/bin/env bash
# Cross-builds memcached 1.6.18 (Debian bookworm's source package, the corpus's) for
# aarch64 with the flags and the aarch64 agent of an installed patchbox, at the level
# before one fix of its patch series (docs/aarch64.md, "memcached under load").
#
#   memcached.sh DIR [FIX]   # DIR/memcached: the tree, debian/patches applied up to, not
#                            # including, FIX (default 0009-CVE-2023-46852.patch), configured
#                            # with the proxy and built; prints the path of the binary last
#
# patchbox: $PATCHBOX, else `patchbox` on PATH (the installed wheel). The program is
# linked with the cross toolchain's loader path and rpath, to run under qemu-aarch64
# without -L (docs/aarch64.md). libevent (Debian's source package) is cross-built
# statically once into the cache, $PATCHBOX_AARCH64_CACHE (default
# /var/cache/patchbox/aarch64), which also keeps the downloaded source packages;
# memcached itself is built in DIR every time (its link line names the agent objects
# where this patchbox is installed). Needs root for apt-get when something is missing.
set -euo pipefail
cache=${PATCHBOX_AARCH64_CACHE:-/var/cache/patchbox/aarch64}
host=aarch64-linux-gnu
libdir=/usr/$host/lib
mc_version=1.6.18-1+deb12u1
le_version=2.1.12-stable-8+deb12u1
apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@" </dev/null; }
log() { echo "aarch64-memcached: $*" >&2; }
die() {
	log "$*"
	exit 1
}

[ $# -ge 1 ] && [ $# -le 2 ] || {
	echo "usage: $0 DIR [FIX]" >&2
	exit 2
}
dir=$(mkdir -p "$1" && cd "$1" && pwd)
fix=${2:-0009-CVE-2023-46852.patch}
patchbox=${PATCHBOX:-$(command -v patchbox || true)}
[ -n "$patchbox" ] || die "no patchbox command: install the patchbox wheel (patchbox on PATH) or set PATCHBOX"
jobs=$(($(nproc) < 2 ? $(nproc) : 2))

# 1. Tools: the cross toolchain (scripts/bootstrap.sh installs it), source packages,
# libevent's autoreconf (Debian's patches change its Makefile.am).
command -v $host-gcc >/dev/null && [ -f $libdir/ld-linux-aarch64.so.1 ] ||
	die "no $host-gcc or $libdir/ld-linux-aarch64.so.1: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross (scripts/bootstrap.sh)"
missing=()
for p in dpkg-dev autoconf automake libtool patch make; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	log "installing ${missing[*]}"
	apt_get update -qq
	apt_get install -y -qq "${missing[@]}" >/dev/null
fi

# One fetch and libevent build at a time per cache.
mkdir -p "$cache/dl"
exec 9>"$cache/.lock"
flock 9

# source PACKAGE VERSION: the .dsc in the cache (downloaded once; adds a deb-src entry if
# there is none, as scripts/corpus/run.sh does).
source_dsc() {
	local dsc=$cache/dl/${1}_${2#*:}.dsc
	if [ ! -f "$dsc" ]; then
		if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
			log "adding a deb-src entry (/etc/apt/sources.list.d/patchbox-src.sources)"
			sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
				>/etc/apt/sources.list.d/patchbox-src.sources
			apt_get update -qq
		fi
		(cd "$cache/dl" && apt_get source -qq --download-only "$1=$2") >&2
	fi
	echo "$dsc"
}

# 2. libevent for aarch64: Debian's source with its patches, static, without OpenSSL
# (memcached's proxy and daemon use the core and pthreads parts).
libevent=$cache/libevent-$le_version
if [ ! -f "$libevent/.built" ]; then
	log "cross-building libevent $le_version into $libevent"
	src=$cache/libevent-src.tmp
	rm -rf "$src" "$libevent"
	dpkg-source -x --no-check "$(source_dsc libevent "$le_version")" "$src" >/dev/null
	(
		cd "$src"
		autoreconf -fi
		./configure --host=$host --build="$(dpkg-architecture -qDEB_BUILD_GNU_TYPE)" \
			--prefix="$libevent" --disable-shared --enable-static --with-pic \
			--disable-openssl --disable-samples --disable-libevent-regress --disable-debug-mode
		make -j"$jobs"
		make install
	) >"$cache/libevent-build.log" 2>&1 || die "libevent build failed: $cache/libevent-build.log"
	rm -rf "$src"
	date -u +%FT%TZ >"$libevent/.built"
fi

# 3. memcached at the level before FIX: the pristine source, the series up to FIX.
mc_dsc=$(source_dsc memcached "$mc_version")
flock -u 9
tree=$dir/memcached
rm -rf "$tree"
dpkg-source -x --no-check --skip-patches "$mc_dsc" "$tree" >/dev/null
mapfile -t series < <(grep -v '^\s*#' "$tree/debian/patches/series" | awk 'NF { print $1 }')
found=0
for p in "${series[@]}"; do
	if [ "$p" = "$fix" ]; then
		found=1
		break
	fi
	patch -s -p1 -N -f -d "$tree" <"$tree/debian/patches/$p"
done
[ $found = 1 ] || die "$fix is not in memcached's debian/patches/series"

# The proxy's vendored Lua and mcmc name gcc, ar and ranlib themselves: the cross ones.
sed -i "s/^\tgcc /\t$host-gcc /" "$tree/vendor/mcmc/Makefile"
sed -i -e "s/^CC= gcc /CC= $host-gcc /" -e "s/^AR= ar /AR= $host-ar /" \
	-e "s/^RANLIB= ranlib/RANLIB= $host-ranlib/" "$tree/vendor/lua/src/Makefile"

# 4. Configured as the corpus's proxy (its SASL and TLS need libraries for aarch64 this
# recipe does not build), with the patchbox flags of aarch64 and its agent.
cflags=$("$patchbox" config --arch aarch64 --cflags) || die "$patchbox config --arch aarch64 --cflags failed"
libs=$(cd "$tree" && "$patchbox" config --arch aarch64 --libs --app-version "$mc_version") ||
	die "$patchbox config --arch aarch64 --libs failed"
log "configuring and building $tree"
(
	cd "$tree"
	./configure --host=$host --build="$(dpkg-architecture -qDEB_BUILD_GNU_TYPE)" \
		--enable-proxy --with-libevent="$libevent" \
		"CFLAGS=$cflags -g -O2" "LIBS=$libs" \
		"LDFLAGS=-Wl,--dynamic-linker=$libdir/ld-linux-aarch64.so.1 -Wl,-rpath=$libdir"
	make -j"$jobs"
) >"$dir/memcached-build.log" 2>&1 || die "memcached build failed: $dir/memcached-build.log"
file=$(od -An -tx1 -j18 -N2 "$tree/memcached" | tr -d ' ')
[ "$file" = b700 ] || die "$tree/memcached is not an aarch64 ELF file (e_machine $file)"
echo "$tree/memcached"
