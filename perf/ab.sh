#!/usr/bin/env bash
# A/B of two hearth builds on the function benchmarks, side by side in one run.
#
# Usage: perf/ab.sh A_BINARY B_BINARY [--rounds N] [--duration 6s]
#                   [--tests express-greet,express-get,trivial]
#                   [--deploy 'concurrency=1'] [--cores 1] [-- SERVE_FLAGS...]
#
# Starts `A_BINARY serve` and `B_BINARY serve` (process backend, own state
# dirs, the flags after `--` given to both), deploys the Express fixture and
# perf/functions/trivial to each with the defaults (or the settings given as a
# query string with --deploy), warms every target 3 s,
# then runs `wrk -t2 -c10 --latency` against A and B alternately for N rounds
# (default 3 x 6 s). Prints every run with the function's instance count after
# it and the CPU each server's process tree used per request (hearth's
# threads and agents + its Node processes, from /proc; an instance that ends
# during a run takes its ticks with it, so scale-in can make the Node figure
# low, even negative: read the medians), then medians and the B/A ratio. Both servers stay up the whole time; only
# one is under load at once. Both use HEARTH_AGENT, by default the release
# agent of this tree (tools/build-agent.sh release); HEARTH_AGENT_A and
# HEARTH_AGENT_B, when set, give each side its own (to compare agents).
# --cores 1: per core, as perf/functions/one-core.sh: both servers run with
# `--cores 1` (CPU 0) and wrk -t1 on CPU 1. Needs root, wrk, node, zip, curl
# (and taskset for --cores 1).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=3
DURATION=6s
TESTS=express-greet,express-get,trivial
WRK_THREADS=2
WRK_CONNS=10
DEPLOY=
CORES=all

die() { echo "ab: $*" >&2; exit 1; }
# shellcheck source=functions/lib.sh
. "$ROOT/perf/functions/lib.sh"
USAGE_LINES=23 AB_OPTIONS="ROUNDS DURATION TESTS DEPLOY CORES" ab_args "$@"
case "$CORES" in
all) ;;
1)
    SERVE_FLAGS+=(--cores 1)
    WRK_THREADS=1
    wrk() { command taskset -c 1 wrk "$@"; } ;;
*) die "--cores takes 1 (or leave it out: all cores)" ;;
esac
[ "$(id -u)" = 0 ] || die "run as root (the process backend needs it)"
FIXTURE="$ROOT/tests/fixtures/express-app"
HERE="$ROOT/perf/functions"
[ -d "$FIXTURE/node_modules/express" ] || die "run tools/setup.sh first (npm ci in $FIXTURE)"
TMP=$(mktemp -d /tmp/hearth-ab.XXXXXX)

(cd "$FIXTURE" && zip -qr "$TMP/express.zip" .)
(cd "$HERE/trivial" && zip -qr "$TMP/trivial.zip" .)

TARGETS=
for side in A B; do
    bin_var=${side}_BIN
    HEARTH=${!bin_var}
    start_hearth "$side" "${SERVE_FLAGS[@]}"
    addr=$REPLY
    r=$(deploy_zip "$addr" "$TMP/express.zip" "$DEPLOY"); ex=${r% *}
    r=$(deploy_zip "$addr" "$TMP/trivial.zip" "$DEPLOY"); tr=${r% *}
    TARGETS+="express-greet $side http://$addr/f/$ex/greet $HERE/post-greet.lua
express-get $side http://$addr/f/$ex/ -
trivial $side http://$addr/f/$tr/ -
"
done
TARGETS=$(awk -v tests=",$TESTS," 'index(tests, "," $1 ",")' <<<"$TARGETS")

echo "# A: $A_BIN"
echo "# B: $B_BIN"
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), deploy settings: ${DEPLOY:-defaults}, cores: $CORES, wrk -t$WRK_THREADS -c$WRK_CONNS -d$DURATION, $ROUNDS rounds, load $(load)"
RESULTS="$TMP/results"
before_run() { # test side url
    ticks "$(eval echo "\$${2}_PID")" >"$TMP/ticks"
}
# The function's instance count after each run, and the CPU per request of
# the side's process tree (hearth + agents, Node) during it; the CPU figures
# also go to $TMP/cpu as "test side server_us node_us".
after_run() { # test side url req/s
    local rest=${3#http://} addr id
    addr=${rest%%/*}
    id=${rest#*/f/}
    echo "instances=$(instances "$addr" "${id%%/*}") $(cpu_per_request "$1" "$2" "$4" "$(eval echo "\$${2}_PID")")"
}
run_rounds "$TARGETS" "$ROUNDS" "$DURATION"
cpu() { awk -v t="$1" -v s="$2" -v f="$3" '$1 == t && $2 == s { print $f }' "$TMP/cpu" | median; }
echo
echo "| test | A req/s | B req/s | B/A | A p50 µs | B p50 µs | A p99 µs | B p99 µs | A CPU µs/req | B CPU µs/req |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for test in $(awk '!seen[$1]++ { print $1 }' <<<"$TARGETS"); do
    awk -v t="$test" -v ar="$(pick "$test" A 3)" -v br="$(pick "$test" B 3)" \
        -v a5="$(pick "$test" A 4)" -v b5="$(pick "$test" B 4)" \
        -v a9="$(pick "$test" A 5)" -v b9="$(pick "$test" B 5)" \
        -v as="$(cpu "$test" A 3)" -v an="$(cpu "$test" A 4)" \
        -v bs="$(cpu "$test" B 3)" -v bn="$(cpu "$test" B 4)" 'BEGIN {
        printf "| %s | %.0f | %.0f | %.2f× | %.0f | %.0f | %.0f | %.0f | %.1f + %.1f | %.1f + %.1f |\n",
            t, ar, br, br / ar, a5, b5, a9, b9, as, an, bs, bn }'
done
echo "(CPU: medians of hearth's threads and agents + its Node processes, per request)"
