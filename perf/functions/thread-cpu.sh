#!/usr/bin/env bash
# CPU per request of every thread under a running server: runs wrk against URL
# for the duration and reads user and system time of each thread of PID and of
# every process below it (/proc/<pid>/task/<tid>/stat) before and after; prints
# one line per thread that ran, in µs per request. With hearth's PID this splits
# its workers (hearth-w<N>) from the instances' Node processes and agents, and
# shows which core's worker served a function (a function limited to fewer
# instances than there are cores is served by the worker holding its instance).
# Tick-based accounting (USER_HZ, usually 100 per second): run for seconds, not
# milliseconds, and read shares of a few µs as approximate.
#
# Usage: perf/functions/thread-cpu.sh PID URL [DURATION] [WRK_ARGS...]
#        (defaults: 5s, -t2 -c10; e.g. `... 5s -t2 -c10 -s perf/functions/post-greet.lua`)
# Needs wrk; the server must be running and warm.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
root=$1 url=$2
shift 2
duration=${1:-5s}
[ $# -gt 0 ] && shift
[ $# -gt 0 ] || set -- -t2 -c10
command -v wrk >/dev/null || { echo "thread-cpu: needs wrk" >&2; exit 1; }
kill -0 "$root" 2>/dev/null || { echo "thread-cpu: no process $root" >&2; exit 1; }
hz=$(getconf CLK_TCK)
tmp=$(mktemp -d /tmp/hearth-thread-cpu.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

tree() { # pid: it and every process below it
    local p=$1 c
    echo "$p"
    for c in $(pgrep -P "$p" || true); do tree "$c"; done
}
# "pid/tid name user_ticks system_ticks" for every thread of the tree.
snapshot() {
    local p t
    for p in $(tree "$root"); do
        for t in /proc/"$p"/task/*; do
            awk -v id="$p/${t##*/}" '{
                name = $0; sub(/^[^(]*\(/, "", name); sub(/\).*$/, "", name); gsub(/ /, "_", name)
                rest = $0; sub(/^.*\) /, "", rest); split(rest, f, " ")
                print id, name, f[12], f[13] }' "$t/stat" 2>/dev/null || true
        done
    done | sort
}
snapshot >"$tmp/before"
wrk -d"$duration" "$@" "$url" >"$tmp/wrk.txt"
snapshot >"$tmp/after"
rps=$(awk '/Requests\/sec/ { print $2 }' "$tmp/wrk.txt")
secs=$(awk '/requests in/ { d = $4; sub(/,$/, "", d); if (d ~ /ms$/) { sub(/ms$/, "", d); d /= 1000 } else if (d ~ /m$/) { sub(/m$/, "", d); d *= 60 } else sub(/s$/, "", d); print d }' "$tmp/wrk.txt")
echo "wrk: $rps req/s over ${secs}s"
printf '%-16s %-18s %12s %12s\n' pid/tid thread "user µs/req" "system µs/req"
join "$tmp/before" "$tmp/after" | awk -v hz="$hz" -v n="$(awk -v r="$rps" -v s="$secs" 'BEGIN { print r * s }')" '{
    u = $6 - $3; s = $7 - $4
    if (n > 0 && (u + s) / hz * 1e6 / n >= 0.05) printf "%-16s %-18s %12.1f %12.1f\n", $1, $2, u / hz * 1e6 / n, s / hz * 1e6 / n }'
