#!/usr/bin/env bash
# The Debian tier's stock program (tests/reach/): memcached from Debian's packages, and
# its symbols from a rebuild of its source package (the debug archive is not reachable;
# the rebuild's loaded bytes are the installed binary's, its build-id may differ:
# docs/reach.md, "Symbols from a rebuild").
# Prints the build directory holding the unstripped `memcached`. Cached in
# /var/cache/patchbox/memcached ($PATCHBOX_REACH_CACHE); a lock keeps runs apart.
set -euo pipefail
cache=${PATCHBOX_REACH_CACHE:-/var/cache/patchbox/memcached}
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
export DEBIAN_FRONTEND=noninteractive
if ! command -v memcached >/dev/null || ! command -v dpkg-buildpackage >/dev/null; then
	apt-get update -qq </dev/null
	apt-get install -y -qq memcached dpkg-dev </dev/null >/dev/null
fi
version=$(dpkg-query -W -f '${Version}' memcached)
dir="$cache/$version"
if [ ! -x "$dir/build/memcached" ]; then
	rm -rf "$dir" && mkdir -p "$dir/src"
	(cd "$dir/src" && apt-get source -qq "memcached=$version" </dev/null >/dev/null 2>&1)
	apt-get build-dep -y -qq "memcached=$version" </dev/null >/dev/null
	tree=$(find "$dir/src" -mindepth 1 -maxdepth 1 -type d | head -1)
	(cd "$tree" && DEB_BUILD_OPTIONS="nocheck parallel=$(nproc)" dpkg-buildpackage -b -uc -us \
		>"$dir/build.log" 2>&1)
	ln -sfn "$tree" "$dir/build"
fi
echo "$dir/build"
