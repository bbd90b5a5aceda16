#!/usr/bin/env bash
# Where a hearth function's CPU time goes: runs wrk against one function and
# reports CPU microseconds per request for hearth (server threads), the guest
# agents and the node runtimes, from /proc/<pid>/stat before and after, and
# their context switches per request (voluntary: went to sleep; forced:
# preempted) from /proc/<pid>/task/*/status; with
# --perf also records `perf record -a -g -e cpu-clock` during the run and
# prints the top symbols per component (only this server's processes).
#
# Usage: perf/functions/cpu-split.sh [--fixture DIR] [--path /greet] [--post-greet]
#                                    [--duration 10s] [--concurrency N] [--perf]
# Defaults: perf/functions/trivial, path /, wrk -t2 -c10 -d10s, function
# concurrency 10 (hearth's default). KEEP=1 keeps the temp dir (perf.data).
# Needs root, wrk, curl, zip, and perf for --perf.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
FIXTURE="$ROOT/perf/functions/trivial"
URL_PATH=/
LUA=
DURATION=10s
CONCURRENCY=10
PERF=0
while [ $# -gt 0 ]; do
    case "$1" in
    --fixture) FIXTURE=$2; shift 2 ;;
    --path) URL_PATH=$2; shift 2 ;;
    --post-greet) LUA="$ROOT/perf/functions/post-greet.lua"; shift ;;
    --duration) DURATION=$2; shift 2 ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    --perf) PERF=1; shift ;;
    -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
HEARTH="${CARGO_TARGET_DIR:-$ROOT/target}/release/hearth"
TMP=$(mktemp -d /tmp/hearth-cpusplit.XXXXXX)
HPID=
cleanup() {
    if [ -n "$HPID" ]; then
        kill -TERM "$HPID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$HPID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$HPID" 2>/dev/null || true
        wait "$HPID" 2>/dev/null || true
    fi
    if [ -n "${KEEP:-}" ]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

: >"$TMP/stdout"
TOKEN=perf-bench-admin-token
"$HEARTH" serve --listen 127.0.0.1:0 --state-dir "$TMP/state" --connections-per-core-max 4096 \
    --admin-token "$TOKEN" >"$TMP/stdout" 2>"$TMP/stderr" &
HPID=$!
ADDR=
for _ in $(seq 1 300); do
    ADDR=$(sed -n 's|^hearth: listening on http://||p' "$TMP/stdout")
    [ -n "$ADDR" ] && break
    sleep 0.1
done
[ -n "$ADDR" ] || { cat "$TMP/stderr" >&2; exit 1; }
(cd "$FIXTURE" && zip -qr "$TMP/f.zip" .)
ID=$(curl -sS -X POST -H 'content-type: application/zip' -H "authorization: Bearer $TOKEN" --data-binary "@$TMP/f.zip" \
    "http://$ADDR/deploy?concurrency=$CONCURRENCY" | grep -o '"functionId": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/')
URL="http://$ADDR/f/$ID$URL_PATH"
SCRIPT=()
[ -n "$LUA" ] && SCRIPT=(-s "$LUA")
wrk -t2 -c10 -d3s "${SCRIPT[@]}" "$URL" >/dev/null # start the instances

tree() { local c; echo "$1"; for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do tree "$c"; done; }
# "component ticks" for hearth and every process below it.
ticks() {
    local p comm
    for p in $(tree "$HPID"); do
        comm=$(cat "/proc/$p/comm" 2>/dev/null) || continue
        case "$comm" in hearth*) comm=hearth ;; agent) ;; node) ;; *) comm=other ;; esac
        # Fields after the ")" of comm: utime is the 12th, stime the 13th.
        awk -v c="$comm" '{ sub(/^.*\) /, ""); print c, $12, $13 }' "/proc/$p/stat" 2>/dev/null || true
    done | awk '{ u[$1] += $2; s[$1] += $3 } END { for (c in u) print c, u[c], s[c] }'
}
# "component voluntary involuntary" context switches of the threads alive at
# the time: a thread that exits during the run takes its count along, so a
# component whose processes come and go (instance starts) can read low or
# even negative.
switches() {
    local p comm
    for p in $(tree "$HPID"); do
        comm=$(cat "/proc/$p/comm" 2>/dev/null) || continue
        case "$comm" in hearth*) comm=hearth ;; agent) ;; node) ;; *) comm=other ;; esac
        cat /proc/"$p"/task/*/status 2>/dev/null |
            awk -v c="$comm" '/^voluntary_ctxt_switches/ { v += $2 } /^nonvoluntary_ctxt_switches/ { n += $2 } END { print c, v + 0, n + 0 }'
    done | awk '{ v[$1] += $2; n[$1] += $3 } END { for (c in v) print c, v[c], n[c] }'
}
PIDLIST=$(tree "$HPID" | paste -sd,)
ticks >"$TMP/before"
switches >"$TMP/sw-before"
if [ "$PERF" = 1 ]; then
    perf record -q -a -g -e cpu-clock -o "$TMP/perf.data" -- sleep "${DURATION%s}" >/dev/null 2>&1 &
    PERF_PID=$!
fi
OUT=$(wrk -t2 -c10 -d"$DURATION" --latency "${SCRIPT[@]}" "$URL")
[ "$PERF" = 1 ] && wait "$PERF_PID"
ticks >"$TMP/after"
switches >"$TMP/sw-after"
REQS=$(awk '/requests in/ { print $1 }' <<<"$OUT")
HZ=$(getconf CLK_TCK)
echo "# $URL_PATH on $(basename "$FIXTURE"), concurrency $CONCURRENCY, wrk -t2 -c10 -d$DURATION; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# instances: $(curl -sS -H "authorization: Bearer $TOKEN" "http://$ADDR/functions/$ID" | grep -o '"instances": *[0-9]*' | grep -o '[0-9]*$')," \
    "$(awk '/^Requests\/sec:/ { print $2 }' <<<"$OUT") req/s, p50 $(awk '$1 == "50%" { print $2 }' <<<"$OUT"), p99 $(awk '$1 == "99%" { print $2 }' <<<"$OUT")"
join -a1 -e 0 -o 0,1.2,1.3,2.2,2.3 <(sort "$TMP/after") <(sort "$TMP/before") |
    awk -v n="$REQS" -v hz="$HZ" 'BEGIN { printf "%-8s %10s %10s %10s  (us CPU per request)\n", "", "user", "system", "total" }
        { u = ($2 - $4) / hz * 1e6 / n; s = ($3 - $5) / hz * 1e6 / n; tu += u; ts += s
          printf "%-8s %10.1f %10.1f %10.1f\n", $1, u, s, u + s }
        END { printf "%-8s %10.1f %10.1f %10.1f\n", "total", tu, ts, tu + ts }'
join -a1 -e 0 -o 0,1.2,1.3,2.2,2.3 <(sort "$TMP/sw-after") <(sort "$TMP/sw-before") |
    awk -v n="$REQS" 'BEGIN { printf "%-8s %10s %10s  (context switches per request: sleeps, preemptions)\n", "", "voluntary", "forced" }
        { printf "%-8s %10.2f %10.2f\n", $1, ($2 - $4) / n, ($3 - $5) / n }'
if [ "$PERF" = 1 ]; then
    echo
    echo "## perf: share of all samples on the machine, this server's processes only"
    perf report -i "$TMP/perf.data" --no-children --pid "$PIDLIST" --sort comm --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8 || true
    for comm in hearth-w0 hearth-w1 agent node; do
        echo
        echo "## top symbols: $comm"
        perf report -i "$TMP/perf.data" --no-children --pid "$PIDLIST" --comm "$comm" --sort dso,sym --stdio -g none 2>/dev/null |
            grep -v '^#' | grep -v '^$' | head -25 || true
    done
fi
