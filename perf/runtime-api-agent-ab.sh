#!/usr/bin/env bash
# A/B of the guest agent's CPU per Runtime-API request: two hearth servers (release
# build), one per agent binary, each serving the trivial Rust `lambda_runtime` function
# (tests/fixtures/rust-lambda, bin runtime-fn, built by perf/runtime-api-bench.sh or
# tests/rust_clients.rs). Alternating rounds of `wrk -t1 -c1`; per round, time on a CPU
# (/proc/<pid>/schedstat) of the `--runtime-api` agent processes of the function divided
# by the requests completed. Prints each round and the medians.
#
# Usage: perf/runtime-api-agent-ab.sh AGENT_A AGENT_B [--rounds N] [--duration 5s]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 2 ] || { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
AGENT_A=$(realpath "$1")
AGENT_B=$(realpath "$2")
shift 2
ROUNDS=5
DURATION=5s
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
die() { echo "runtime-api-agent-ab: $*" >&2; exit 1; }
BUILD=0
WRK_THREADS=1
WRK_CONNS=1
# shellcheck source=functions/lib.sh
. "$ROOT/perf/functions/lib.sh"
bench_prepare wrk curl zip
RUST_FN="${CARGO_TARGET_DIR:-$ROOT/target}/rust-lambda-fixture/x86_64-unknown-linux-gnu/release/runtime-fn"
[ -x "$RUST_FN" ] || die "$RUST_FN is not built (run perf/runtime-api-bench.sh or tests/rust_clients.rs)"
TMP=$(mktemp -d /tmp/hearth-agentab.XXXXXX)
mkdir -p "$TMP/rust"
cp "$RUST_FN" "$TMP/rust/bootstrap"
(cd "$TMP/rust" && zip -q "$TMP/rust.zip" bootstrap)

# Time on a CPU (ns) of the `--runtime-api` agents under server pid $1.
agent_ns() {
    local p total=0
    for p in $(tree "$1"); do
        if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -e '--runtime-api'; then
            total=$((total + $(awk '{ print $1 }' "/proc/$p/schedstat" 2>/dev/null || echo 0)))
        fi
    done
    echo "$total"
}

declare -A ADDR PID
for side in A B; do
    agent=AGENT_$side
    # The relay process is what is measured: hearth serves the API itself by default.
    HEARTH_AGENT=${!agent} start_hearth "$side" --cores 1 --runtime-api-relay
    ADDR[$side]=$REPLY
    PID[$side]=$(eval echo "\$${side}_PID")
    out=$(curl -sS -X POST -H 'content-type: application/zip' "${AUTH[@]}" --data-binary "@$TMP/rust.zip" \
        "http://${ADDR[$side]}/deploy?runtime=provided")
    id=$(grep -o '"functionId": *"[^"]*"' <<<"$out" | sed 's/.*"\([^"]*\)"$/\1/')
    [ -n "$id" ] || die "deploy on $side failed: $out"
    eval "ID_$side=$id"
    run_wrk 2s "http://${ADDR[$side]}/f/$id/" >/dev/null
done
echo "# agent A: $AGENT_A"
echo "# agent B: $AGENT_B"
echo "# wrk -t1 -c1 -d$DURATION, $ROUNDS alternating rounds, load at start $(load)"
printf '%5s %4s %9s %9s %14s\n' round side req/s p99_us agent_us/req
: >"$TMP/ab"
for round in $(seq 1 "$ROUNDS"); do
    for side in A B; do
        id=$(eval echo "\$ID_$side")
        before=$(agent_ns "${PID[$side]}")
        read -r rps _ p99 _ _ <<<"$(run_wrk "$DURATION" "http://${ADDR[$side]}/f/$id/")"
        after=$(agent_ns "${PID[$side]}")
        per=$(awk -v d="$((after - before))" -v r="$rps" -v s="${DURATION%s}" 'BEGIN { printf "%.2f", d / (r * s) / 1000 }')
        printf '%5s %4s %9s %9s %14s\n' "$round" "$side" "$rps" "$p99" "$per"
        echo "$side $per $rps" >>"$TMP/ab"
    done
done
a=$(awk '$1 == "A" { print $2 }' "$TMP/ab" | median)
b=$(awk '$1 == "B" { print $2 }' "$TMP/ab" | median)
ra=$(awk '$1 == "A" { print $3 }' "$TMP/ab" | median)
rb=$(awk '$1 == "B" { print $3 }' "$TMP/ab" | median)
echo "medians: A $a us/req ($ra req/s), B $b us/req ($rb req/s); B/A $(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", b / a }') (load at end $(load))"
