#!/usr/bin/env bash
# The README demo: build a service with a visible bug, start it, live-patch the fix in,
# watch the answers change, take the patch out again. Nothing is restarted.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$root/.venv/bin:$PATH"
cd "$root/examples/leapyear"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
# Shows the next 4 answers the service gives (one full cycle of years) after this point.
show_answers() {
	local start=$(wc -l <service.out)
	for _ in $(seq 200); do
		[ "$(wc -l <service.out)" -ge $((start + 4)) ] && break
		sleep 0.05
	done
	tail -n +$((start + 1)) service.out | head -n 4 | sed 's/^/   service> /'
}

say "Build the service with the agent linked (make uses patchbox config --cflags/--libs)"
make -s clean all
./service 0.25 >service.out 2>service.err &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "sandbox-sock$pid" ] && break; sleep 0.05; done

say "The running service (pid $pid) has a bug: 1900 is not a leap year"
show_answers

say "Extract the fixed describe_year() from fix/leap.o (leap.c with the fix) and look at the patch"
run extract-patch --function describe_year --name leapfix fix/leap.o ./service -o leapfix.pbx
run patchbox show leapfix.pbx

say "Apply it to the running process"
run patchbox apply -p "$pid" leapfix.pbx
run patchbox list -p "$pid"
answers=$(show_answers)
echo "$answers"
grep -q "1900 is not a leap year" <<<"$answers" && echo "   -> fixed, without a restart"

say "Remove it: the original code is back"
run patchbox remove -p "$pid" leapfix
show_answers

say "What the agent knows about the process"
run patchbox info -p "$pid"
run patchbox test -p "$pid"
kill "$pid"
echo
echo "demo done: the service ran throughout as pid $pid"
