#!/usr/bin/env bash
# Runtime API benchmark: functions of the `provided` and `python3` runtimes (the guest
# agent serving the Lambda Runtime API inside each sandbox) on the process backend,
# side by side with the Node function they are measured against, in one run.
#
# Usage: perf/runtime-api-bench.sh [--rounds N] [--duration 10s] [--cold-runs N] [--no-build]
#
#  1. Trivial Rust function built with the `lambda_runtime` crate
#     (tests/fixtures/rust-lambda, bin runtime-fn, path "/": 200 "ok") vs the trivial
#     Node function (perf/functions/trivial: 200 "hello"), both on hearth, GET through
#     the function URL. wrk -t2 -c10 --latency, each warmed up 3 s, then N alternating
#     rounds; medians.                    Target: Rust >= 1.0x Node req/s, p99 <= 1 ms.
#  2. The agent's CPU per Runtime-API request during the Rust runs of 1: time on a CPU
#     (/proc/<pid>/schedstat, first field, ns) of the runtime-API agent process
#     (`hearth-agent --runtime-api provided`, which relays between hearth's frames and the
#     bootstrap's HTTP), summed over the function's instances, divided by the requests
#     wrk completed. Also the Rust bootstrap's own CPU per request, for scale.
#                                                                   Target: < 10 us.
#  3. Cold start of a Python function (perf/functions/python-app, runtime python3) with
#     --keep-warm-ms 500: wait until it has no instance (+1 s for the standby refill),
#     time one curl; interleaved with `env -i python3 -c 'import app'` in that
#     directory.                                           Target: hearth p50 <= 0.5x.
#
# Needs root, wrk, curl, zip, node, /usr/bin/python3; builds hearth, the static agent
# and the Rust fixture (static, as the tests build it) unless --no-build.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=3
DURATION=10s
COLD_RUNS=15
BUILD=1
WRK_THREADS=2
WRK_CONNS=10

while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --cold-runs) COLD_RUNS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "runtime-api-bench: $*" >&2; exit 1; }
# shellcheck source=functions/lib.sh
. "$ROOT/perf/functions/lib.sh"
bench_prepare wrk node zip curl
[ -x /usr/bin/python3 ] || die "/usr/bin/python3 is missing"
FIXTURE_TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/rust-lambda-fixture"
RUST_FN="$FIXTURE_TARGET/x86_64-unknown-linux-gnu/release/runtime-fn"
if [ "$BUILD" = 1 ]; then
    # The same build as tests/rust_clients.rs.
    CARGO_TARGET_DIR="$FIXTURE_TARGET" RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --locked -q --target x86_64-unknown-linux-gnu \
        --manifest-path "$ROOT/tests/fixtures/rust-lambda/Cargo.toml" >&2
fi
[ -x "$RUST_FN" ] || die "$RUST_FN is not built"
TMP=$(mktemp -d /tmp/hearth-rapibench.XXXXXX)

mkdir -p "$TMP/rust"
cp "$RUST_FN" "$TMP/rust/bootstrap"
ZIP_RUST="$TMP/rust.zip"
ZIP_NODE="$TMP/node.zip"
ZIP_PY="$TMP/python.zip"
(cd "$TMP/rust" && zip -q "$ZIP_RUST" bootstrap)
(cd "$HERE/trivial" && zip -qr "$ZIP_NODE" .)
(cd "$HERE/python-app" && zip -qr "$ZIP_PY" app.py)
# The reference imports a copy, so its bytecode cache lands in $TMP (and is used after run 1).
cp -r "$HERE/python-app" "$TMP/python-app"

# POSTs a zip to /deploy with a query; prints the function id.
deploy_q() { # addr zip query
    local out id
    out=$(curl -sS -X POST -H 'content-type: application/zip' "${AUTH[@]}" --data-binary "@$2" \
        "http://$1/deploy?$3")
    id=$(grep -o '"functionId": *"[^"]*"' <<<"$out" | sed 's/.*"\([^"]*\)"$/\1/')
    [ -n "$id" ] || die "deploy ($3) failed: $out"
    echo "$id"
}

echo "# Runtime API functions vs Node on hearth: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "# $(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), kernel $(uname -r)," \
    "node $(node --version), $(/usr/bin/python3 --version), hearth $("$HEARTH" --version | awk '{ print $2 }')"
echo "# load average at start: $(load)"

# ---------------------------------------------------------------- 1 + 2: throughput, agent CPU

start_hearth H
H_ADDR=$REPLY
RUST_ID=$(deploy_q "$H_ADDR" "$ZIP_RUST" "runtime=provided.al2023")
NODE_ID=$(deploy_q "$H_ADDR" "$ZIP_NODE" "")
[ "$(curl -sS -f "http://$H_ADDR/f/$RUST_ID/")" = ok ] || die "the Rust function does not answer ok"
[ "$(curl -sS -f "http://$H_ADDR/f/$NODE_ID/")" = hello ] || die "the Node function does not answer hello"

# Time on a CPU (ns) of the function's processes whose command line has `$2`, summed.
cpu_ns() { # function-id pattern
    local agent cg p total=0
    for agent in $(cat /proc/"$H_PID"/task/*/children 2>/dev/null); do
        cg=$(awk -F: '$2 == "memory" { m = $3 } $1 == 0 && $2 == "" { u = $3 } END { print (m != "" ? m : u) }' \
            "/proc/$agent/cgroup" 2>/dev/null || true)
        case "${cg##*/}" in "$1"-*) ;; *) continue ;; esac
        for p in $(tree "$agent"); do
            if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -e "$2"; then
                total=$((total + $(awk '{ print $1 }' "/proc/$p/schedstat" 2>/dev/null || echo 0)))
            fi
        done
    done
    echo "$total"
}
CPU="$TMP/cpu"
: >"$CPU"
# Before and after each Rust run: the agent's and the bootstrap's CPU, and the requests.
before_run() { A0=$(cpu_ns "$RUST_ID" --runtime-api); B0=$(cpu_ns "$RUST_ID" bootstrap); }
after_run() { # test server url
    [ "$1" = rust ] || return 0
    local a1 b1 n
    a1=$(cpu_ns "$RUST_ID" --runtime-api)
    b1=$(cpu_ns "$RUST_ID" bootstrap)
    n=$(awk '$1 == "rust" { n = $3 } END { print n }' "$RESULTS") # req/s of this run
    n=$(awk -v r="$n" -v d="${DURATION%s}" 'BEGIN { printf "%d", r * d }')
    awk -v a="$((a1 - A0))" -v b="$((b1 - B0))" -v n="$n" \
        'BEGIN { printf "agent %.2f us/req, bootstrap %.2f us/req", a / n / 1000, b / n / 1000 }'
    echo "$((a1 - A0)) $((b1 - B0)) $n" >>"$CPU"
}

echo
echo "## Throughput: wrk -t$WRK_THREADS -c$WRK_CONNS -d$DURATION --latency, $ROUNDS alternating rounds (load $(load))"
RESULTS="$TMP/results"
TARGETS="rust hearth http://$H_ADDR/f/$RUST_ID/ -
node hearth http://$H_ADDR/f/$NODE_ID/ -"
# As run_rounds in lib.sh, with the CPU sampled around each Rust run.
run_wrk 3s "http://$H_ADDR/f/$RUST_ID/" >/dev/null
run_wrk 3s "http://$H_ADDR/f/$NODE_ID/" >/dev/null
: >"$RESULTS"
printf '%-6s %5s %10s %9s %9s %7s  %-16s %s\n' test round req/s p50_us p99_us errors load ""
for round in $(seq 1 "$ROUNDS"); do
    while read -r test server url _; do
        before_run
        read -r rps p50 p99 errors detail <<<"$(run_wrk "$DURATION" "$url")"
        echo "$test $server $rps $p50 $p99 $errors" >>"$RESULTS"
        extra=$(after_run "$test" "$server" "$url")
        [ "$detail" = - ] || extra="$extra ($detail)"
        printf '%-6s %5s %10s %9s %9s %7s  %-16s %s\n' "$test" "$round" "$rps" "$p50" "$p99" "$errors" "$(load)" "$extra"
    done <<<"$TARGETS"
done
stop "$H_PID"

# ---------------------------------------------------------------- 3: Python cold start

echo
echo "## Cold start, Python GET / (--keep-warm-ms 500), $COLD_RUNS interleaved runs (load $(load))"
start_hearth S --keep-warm-ms 500
S_ADDR=$REPLY
PY_ID=$(deploy_q "$S_ADDR" "$ZIP_PY" "runtime=python3&handler=app.handler")
COLD="$TMP/cold"
: >"$COLD"
printf '%4s %12s %16s\n' run standby_s python_import_s
for run in $(seq 1 "$COLD_RUNS"); do
    for _ in $(seq 1 200); do
        [ "$(instances "$S_ADDR" "$PY_ID")" = 0 ] && break
        sleep 0.1
    done
    [ "$(instances "$S_ADDR" "$PY_ID")" = 0 ] || die "instances of $PY_ID did not go away"
    sleep 1 # the standby refill finishes
    s=$(curl -sS -f -o /dev/null -w '%{time_total}' "http://$S_ADDR/f/$PY_ID/")
    t0=$(now_s)
    (cd "$TMP/python-app" && env -i PATH="$PATH" /usr/bin/python3 -c 'import app')
    t1=$(now_s)
    r=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", b - a }')
    printf '%4s %12s %16s\n' "$run" "$s" "$r"
    echo "$s $r" >>"$COLD"
done

# ---------------------------------------------------------------- summary

echo
echo "## Summary (medians; load average at end: $(load))"
echo
pick() { awk -v t="$1" -v f="$2" '$1 == t { print $f }' "$RESULTS" | median; }
RR=$(pick rust 3); NR=$(pick node 3); R9=$(pick rust 5); N9=$(pick node 5); R5=$(pick rust 4); N5=$(pick node 4)
AG=$(awk '{ print $1 / $3 / 1000 }' "$CPU" | median); BS=$(awk '{ print $2 / $3 / 1000 }' "$CPU" | median)
S50=$(awk '{ print $1 }' "$COLD" | median); S90=$(awk '{ print $1 }' "$COLD" | pct 90)
P50=$(awk '{ print $2 }' "$COLD" | median)
echo "| benchmark | measured | reference | ratio | target | verdict |"
echo "|---|---:|---:|---:|---|---|"
awk -v rr="$RR" -v nr="$NR" -v r9="$R9" -v n9="$N9" -v r5="$R5" -v n5="$N5" -v ag="$AG" -v bs="$BS" \
    -v s5="$S50" -v s9="$S90" -v p5="$P50" 'BEGIN {
    printf "| trivial Rust lambda_runtime fn, req/s | %.0f | Node trivial fn %.0f | %.2f× | ≥ 1.0× | %s |\n",
        rr, nr, rr / nr, (rr / nr >= 1 ? "met" : sprintf("NOT met (%.2f×)", rr / nr))
    printf "| trivial Rust fn, p50 / p99 at c=10 | %.0f / %.0f µs | Node %.0f / %.0f µs | - | p99 ≤ 1 ms | %s |\n",
        r5, r9, n5, n9, (r9 <= 1000 ? "met" : sprintf("NOT met (%.2f ms)", r9 / 1000))
    printf "| runtime-API agent CPU per request | %.2f µs | bootstrap %.2f µs | - | < 10 µs | %s |\n",
        ag, bs, (ag < 10 ? "met" : "NOT met")
    printf "| Python cold start, standby (p50 / p90) | %.1f / %.1f ms | python3 -c import app %.1f ms | %.2f× | ≤ 0.5× | %s |\n",
        s5 * 1000, s9 * 1000, p5 * 1000, s5 / p5, (s5 / p5 <= 0.5 ? "met" : sprintf("NOT met (%.2f×)", s5 / p5))
}'
