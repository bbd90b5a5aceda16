#!/usr/bin/env bash
# Per-core efficiency: hearth and the bare Node servers each confined to CPU 0,
# wrk confined to CPU 1, so both sides get exactly one core and the load
# generator never competes with them. The ratio hearth/bare here is what one
# core of hearth delivers against the one core a bare Node server can use;
# with N cores for hearth (and the load generator elsewhere) the throughput
# ratio would be about N times it, if the cores scale linearly (a projection,
# not a measurement: this machine has 2 cores).
#
# Usage: perf/functions/one-core.sh [--rounds N] [--duration 10s] [--no-build]
#
# hearth: `serve --cores 1` (its worker and every instance pinned to CPU 0;
# its start/reap threads idle during the runs), the Express fixture and
# perf/functions/trivial deployed with the defaults. Bare: bare-express.js and
# bare-http.js under `taskset -c 0`. wrk -t1 -c10 --latency under `taskset -c 1`;
# each target warmed 3 s, then alternating rounds; medians. Needs root, wrk,
# node, zip, curl, taskset and at least 2 CPUs.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ROUNDS=3
DURATION=10s
BUILD=1
# shellcheck source=lib.sh
. "$ROOT/perf/functions/lib.sh"
USAGE_LINES=17 round_args "$@"
die() { echo "one-core: $*" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || die "needs at least 2 CPUs (one for the servers, one for wrk)"
bench_prepare wrk node zip curl taskset
WRK_THREADS=1
WRK_CONNS=10
TMP=$(mktemp -d /tmp/hearth-onecore.XXXXXX)

(cd "$FIXTURE" && zip -qr "$TMP/express.zip" .)
(cd "$HERE/trivial" && zip -qr "$TMP/trivial.zip" .)
start_hearth H --cores 1
H=$REPLY
r=$(deploy_zip "$H" "$TMP/express.zip"); EX=${r% *}
r=$(deploy_zip "$H" "$TMP/trivial.zip"); TR=${r% *}
NODE_WRAP="taskset -c 0"
start_node BE "$HERE/bare-express.js" "$FIXTURE"
BE=$REPLY
start_node BH "$HERE/bare-http.js"
BH=$REPLY

LUA="$HERE/post-greet.lua"
TARGETS="express-greet hearth http://$H/f/$EX/greet $LUA
express-greet bare http://127.0.0.1:$BE/greet $LUA
trivial hearth http://$H/f/$TR/ -
trivial bare http://127.0.0.1:$BH/ -"
wrk() { command taskset -c 1 wrk "$@"; }

echo "# one core each: $(date -u '+%Y-%m-%d %H:%M UTC'), wrk -t1 -c10 -d$DURATION on CPU 1, load $(load)"
RESULTS="$TMP/results"
# hearth's instance count for the function after each of its runs.
after_run() { # test server url
    [ "$2" = hearth ] || return 0
    local id=${3#*/f/}
    echo "instances=$(instances "$H" "${id%%/*}")"
}
run_rounds "$TARGETS" "$ROUNDS" "$DURATION"
echo
echo "| test | hearth req/s | bare req/s | hearth/bare per core | hearth p50 µs | bare p50 µs | hearth p99 µs | bare p99 µs |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for test in express-greet trivial; do
    awk -v t="$test" -v hr="$(pick "$test" hearth 3)" -v br="$(pick "$test" bare 3)" \
        -v h5="$(pick "$test" hearth 4)" -v b5="$(pick "$test" bare 4)" \
        -v h9="$(pick "$test" hearth 5)" -v b9="$(pick "$test" bare 5)" 'BEGIN {
        printf "| %s | %.0f | %.0f | %.2f× | %.0f | %.0f | %.0f | %.0f |\n", t, hr, br, hr / br, h5, b5, h9, b9 }'
done
