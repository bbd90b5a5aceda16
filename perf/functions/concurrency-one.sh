#!/usr/bin/env bash
# A function limited to one concurrent execution (Lambda's reserved
# concurrency 1) against the same code served bare by one Node process, in
# one run: the issue's "concurrency 1" target (>= 0.9x bare single-process
# Express, p99 <= 2x its p99).
#
# Usage: perf/functions/concurrency-one.sh [--rounds N] [--duration 6s] [--no-build]
#
# One hearth server on all cores (process backend) with the Express fixture
# and perf/functions/trivial deployed with concurrency=1, driven three times
# per round: as it is (`moves`: connections accepted by a core without the
# instance move to the one holding it, and the instance runs on the next
# core's CPU, beside that worker), through a second server started with
# --instances-on-own-cpu (`own-cpu`: the same, the instance on its worker's
# CPU) and through a third started with --no-connection-moves (`turns`: the
# instance is handed between the cores in turns). Bare: bare-express.js and
# bare-http.js (one process each).
# wrk -t2 -c10 --latency, every target warmed 3 s, alternating rounds,
# medians. Prints each run (with the function's hand-overs and connection
# moves so far), then a table. Needs root, wrk, node, zip and curl.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ROUNDS=3
DURATION=6s
BUILD=1
# shellcheck source=lib.sh
. "$ROOT/perf/functions/lib.sh"
USAGE_LINES=20 round_args "$@"
die() { echo "concurrency-one: $*" >&2; exit 1; }
bench_prepare wrk node zip curl
agent="${CARGO_TARGET_DIR:-$ROOT/target}/x86_64-unknown-linux-gnu/release/hearth-agent"
[ -n "${HEARTH_AGENT:-}" ] || { [ -x "$agent" ] && export HEARTH_AGENT=$agent; }
WRK_THREADS=2
WRK_CONNS=10
TMP=$(mktemp -d /tmp/hearth-conc1.XXXXXX)

(cd "$FIXTURE" && zip -qr "$TMP/express.zip" .)
(cd "$HERE/trivial" && zip -qr "$TMP/trivial.zip" .)
start_hearth M
M=$REPLY
start_hearth O --instances-on-own-cpu
O=$REPLY
start_hearth T --no-connection-moves
T=$REPLY
for s in M O T; do
    addr=${!s}
    r=$(deploy_zip "$addr" "$TMP/express.zip" concurrency=1); eval "${s}_EX=${r% *}"
    r=$(deploy_zip "$addr" "$TMP/trivial.zip" concurrency=1); eval "${s}_TR=${r% *}"
done
start_node BE "$HERE/bare-express.js" "$FIXTURE"
BE=$REPLY
start_node BH "$HERE/bare-http.js"
BH=$REPLY

LUA="$HERE/post-greet.lua"
TARGETS="express-greet moves http://$M/f/$M_EX/greet $LUA
express-greet own-cpu http://$O/f/$O_EX/greet $LUA
express-greet turns http://$T/f/$T_EX/greet $LUA
express-greet bare http://127.0.0.1:$BE/greet $LUA
trivial moves http://$M/f/$M_TR/ -
trivial own-cpu http://$O/f/$O_TR/ -
trivial turns http://$T/f/$T_TR/ -
trivial bare http://127.0.0.1:$BH/ -"

# The function's hand-overs and connection moves so far.
after_run() { # test server url
    [ "$2" = bare ] || {
        local rest=${3#http://} addr id m
        addr=${rest%%/*}
        id=${rest#*/f/}
        id=${id%%/*}
        m=$(curl -sS "${AUTH[@]}" "http://$addr/metrics")
        printf 'handovers=%s moves=%s' \
            "$(awk -v k="hearth_function_instance_handovers_total{function=\"$id\"}" '$1 == k { print $2 }' <<<"$m")" \
            "$(awk -v k="hearth_function_connections_moved_total{function=\"$id\"}" '$1 == k { print $2 }' <<<"$m")"
    }
}

echo "# concurrency 1: $(date -u '+%Y-%m-%d %H:%M UTC'), wrk -t$WRK_THREADS -c$WRK_CONNS -d$DURATION, load $(load)"
RESULTS="$TMP/results"
run_rounds "$TARGETS" "$ROUNDS" "$DURATION"
echo
echo "| test | server | req/s | ÷ bare | p50 µs | p99 µs | p99 ÷ bare |"
echo "|---|---|---:|---:|---:|---:|---:|"
for test in express-greet trivial; do
    br=$(pick "$test" bare 3)
    b9=$(pick "$test" bare 5)
    for server in moves own-cpu turns bare; do
        awk -v t="$test" -v s="$server" -v r="$(pick "$test" "$server" 3)" -v br="$br" \
            -v p5="$(pick "$test" "$server" 4)" -v p9="$(pick "$test" "$server" 5)" -v b9="$b9" 'BEGIN {
            printf "| %s | %s | %.0f | %.2f× | %.0f | %.0f | %.2f× |\n", t, s, r, r / br, p5, p9, p9 / b9 }'
    done
done
