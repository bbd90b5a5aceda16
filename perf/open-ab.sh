#!/usr/bin/env bash
# Open-loop A/B of two hearth builds against the bare server, side by side in one run:
# the tail at a fixed share of the bare single-process server's maximum
# (issue 14: hearth's p99 <= 1.5x bare's at 50 %), and how many instances
# each hearth starts and retires while it holds that rate.
#
# Usage: perf/open-ab.sh A_BINARY B_BINARY [--rounds N] [--duration 4s]
#                        [--share 50] [--tests express,trivial] [--conns 10]
#                        [-- SERVE_FLAGS...]
#
# Starts both builds (process backend, own state dirs) and the bare servers
# (perf/functions/bare-express.js with the Express fixture, bare-http.js),
# deploys the Express fixture and perf/functions/trivial to each hearth, finds
# the bare server's closed-loop maximum (`hearth bench -c 10`, 3 runs, median),
# then for N rounds runs `hearth bench -c <conns> --rate <share of it>` against
# bare, A and B in turn (order reversed on even rounds; 1 s warm-up each).
# With few connections the generator itself queues once answers slow down (a
# connection sends its next request only after the last answer): more
# connections (--conns 64) show the servers' own queueing.
# Per run: answered req/s, p50, p99, p99.9 (coordinated-omission corrected),
# and for hearth the instance starts and retirements during the run (from
# /metrics). Prints every run, then medians and ratios to bare. The load
# generator is B's `hearth bench`. HEARTH_AGENT_A / HEARTH_AGENT_B give each
# side its own guest agent (default: HEARTH_AGENT, this tree's release agent).
# Needs root, node, zip, curl.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=3
DURATION=4s
SHARE=50
TESTS=express,trivial
CONNS=10

die() { echo "open-ab: $*" >&2; exit 1; }
# shellcheck source=functions/lib.sh
. "$ROOT/perf/functions/lib.sh"
USAGE_LINES=25 AB_OPTIONS="ROUNDS DURATION SHARE TESTS CONNS" ab_args "$@"
TMP=$(mktemp -d /tmp/hearth-open-ab.XXXXXX)
bench_prepare node zip curl python3
FIXTURE="$ROOT/tests/fixtures/express-app"
HERE="$ROOT/perf/functions"
[ -d "$FIXTURE/node_modules/express" ] || die "run tools/setup.sh first (npm ci in $FIXTURE)"
(cd "$FIXTURE" && zip -qr "$TMP/express.zip" .)
(cd "$HERE/trivial" && zip -qr "$TMP/trivial.zip" .)

# "test system url" lines; the bare server first.
start_node express "$HERE/bare-express.js" "$FIXTURE"
TARGETS="express bare http://127.0.0.1:$REPLY/greet
"
start_node node_http "$HERE/bare-http.js"
TARGETS+="trivial bare http://127.0.0.1:$REPLY/
"
for side in A B; do
    bin_var=${side}_BIN
    HEARTH=${!bin_var}
    start_hearth "$side" "${SERVE_FLAGS[@]}"
    addr=$REPLY
    r=$(deploy_zip "$addr" "$TMP/express.zip"); ex=${r% *}
    r=$(deploy_zip "$addr" "$TMP/trivial.zip"); tr=${r% *}
    TARGETS+="express $side http://$addr/f/$ex/greet
trivial $side http://$addr/f/$tr/
"
done
HEARTH=$B_BIN
TARGETS=$(awk -v tests=",$TESTS," 'NF && index(tests, "," $1 ",")' <<<"$TARGETS")

# One bench run: prints "req/s p50_us p99_us p999_us".
bench() { # test url conns extra...
    local test=$1 url=$2 conns=$3 req=()
    shift 3
    [ "$test" = express ] && req=(-X POST -H 'content-type: application/json' -d '{"name":"John Doe"}')
    "$HEARTH" bench "$url" -c "$conns" --json "${req[@]}" "$@" </dev/null | python3 -c '
import json, sys
r = json.load(sys.stdin)["runs"][0]
l = r["latency_us"]
print(r["throughput_rps"], l["p50"], l["p99"], l["p999"])'
}
# A hearth counter summed over functions, from /metrics.
counter() { # url name
    local rest=${1#http://}
    curl -sS "${AUTH[@]}" "http://${rest%%/*}/metrics" | awk -v n="$2" 'index($1, n "{") == 1 { s += $2 } END { print s + 0 }'
}

echo "# A: $A_BIN"
echo "# B: $B_BIN"
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $SHARE % of the bare server's maximum (closed loop, -c 10), open loop -c $CONNS, $DURATION runs after 1 s warm-up, $ROUNDS rounds, load $(load)"
declare -A RATE
for test in $(awk '{ print $1 }' <<<"$TARGETS" | sort -u); do
    url=$(awk -v t="$test" '$1 == t && $2 == "bare" { print $3 }' <<<"$TARGETS")
    while read -r _ system u; do bench "$test" "$u" 10 --duration 2s >/dev/null; done < <(awk -v t="$test" '$1 == t' <<<"$TARGETS")
    max=$(for _ in 1 2 3; do bench "$test" "$url" 10 --duration 3s | awk '{ print $1 }'; done | median)
    RATE[$test]=$(awk -v m="$max" -v s="$SHARE" 'BEGIN { printf "%d", m * s / 100 + 1 }')
    echo "# $test: bare maximum $max req/s (closed loop, median of 3); open loop at ${RATE[$test]} req/s"
done

RESULTS="$TMP/results"
: >"$RESULTS"
printf '%-8s %-5s %5s %9s %9s %9s %9s %6s %7s  %s\n' test system round req/s p50_us p99_us p999_us starts retired load
for round in $(seq 1 "$ROUNDS"); do
    order=$TARGETS
    [ $((round % 2)) = 0 ] && order=$(tac <<<"$TARGETS")
    while read -r test system url; do
        s0=0 r0=0
        if [ "$system" != bare ]; then
            s0=$(counter "$url" hearth_function_cold_starts_total)
            r0=$(counter "$url" hearth_function_instances_retired_total)
        fi
        read -r rps p50 p99 p999 <<<"$(bench "$test" "$url" "$CONNS" --rate "${RATE[$test]}" --duration "$DURATION" --warmup 1s)"
        starts=- retired=-
        if [ "$system" != bare ]; then
            starts=$(($(counter "$url" hearth_function_cold_starts_total) - s0))
            retired=$(($(counter "$url" hearth_function_instances_retired_total) - r0))
        fi
        printf '%-8s %-5s %5s %9.0f %9s %9s %9s %6s %7s  %s\n' "$test" "$system" "$round" "$rps" "$p50" "$p99" "$p999" \
            "$starts" "$retired" "$(load)"
        echo "$test $system $rps $p50 $p99 $p999 $starts $retired" >>"$RESULTS"
    done <<<"$order"
done

pick() { awk -v t="$1" -v s="$2" -v f="$3" '$1 == t && $2 == s && $f != "-" { print $f }' "$RESULTS" | median; }
echo
echo "| test | rate | bare p99 | A p99 | B p99 | A ÷ bare | B ÷ bare | A starts / run | B starts / run | A req/s | B req/s |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for test in $(awk '{ print $1 }' <<<"$TARGETS" | sort -u); do
    awk -v t="$test" -v rate="${RATE[$test]}" -v b="$(pick "$test" bare 5)" -v a="$(pick "$test" A 5)" \
        -v bb="$(pick "$test" B 5)" -v as="$(pick "$test" A 7)" -v bs="$(pick "$test" B 7)" \
        -v ar="$(pick "$test" A 3)" -v br="$(pick "$test" B 3)" 'BEGIN {
        printf "| %s | %d | %.2f ms | %.2f ms | %.2f ms | %.2f× | %.2f× | %s | %s | %.0f | %.0f |\n",
            t, rate, b / 1000, a / 1000, bb / 1000, a / b, bb / b, as, bs, ar, br }'
done
