#!/usr/bin/env bash
# Runtime API benchmark: functions of the `provided` and `python3` runtimes (hearth's
# cores serving the Lambda Runtime API of each sandbox; with --runtime-api-relay among the
# server flags, or an older build, the agent's relay process) on the process backend,
# side by side with the Node function they are measured against, in one run.
#
# Usage: perf/runtime-api-bench.sh [--rounds N] [--duration 10s] [--cold-runs N] [--no-build]
#                                  [--hearth PATH] [-- server flags...]
#  --hearth PATH: the hearth binary to measure (default: this tree's release build; set
#  HEARTH_AGENT to the static agent of the same build). Flags after `--` go to `hearth serve`.
#
#  1. Trivial Rust function built with the `lambda_runtime` crate
#     (tests/fixtures/rust-lambda, bin runtime-fn, path "/": 200 "ok") vs the trivial
#     Node function (perf/functions/trivial: 200 "hello"), both on hearth, GET through
#     the function URL. wrk -t2 -c10 --latency, each warmed up 3 s, then N alternating
#     rounds; medians.                    Target: Rust >= 1.0x Node req/s, p99 <= 1 ms.
#  2. The agent's CPU per Runtime-API request during the Rust runs of 1: time on a CPU
#     (/proc/<pid>/schedstat, first field, ns) of the sandbox's agent processes (PID 1,
#     `--channel-fd`, and where the relay path runs, `hearth-agent --runtime-api provided`,
#     which relays between hearth's frames and the bootstrap's HTTP), summed over the
#     function's instances, divided by the requests wrk completed. Also the Rust
#     bootstrap's own CPU per request, for scale, and hearth's (all its threads) per
#     request during the Rust and the Node runs.                    Target: < 10 us.
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
HEARTH_BIN=
SERVER_FLAGS=()
WRK_THREADS=2
WRK_CONNS=10

while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --cold-runs) COLD_RUNS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --hearth) HEARTH_BIN=$2; shift 2 ;;
    --) shift; SERVER_FLAGS=("$@"); break ;;
    -h | --help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "runtime-api-bench: $*" >&2; exit 1; }
# shellcheck source=functions/lib.sh
. "$ROOT/perf/functions/lib.sh"
bench_prepare wrk node zip curl
[ -z "$HEARTH_BIN" ] || HEARTH=$HEARTH_BIN
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
echo "# load average at start: $(load); binary $HEARTH; server flags: ${SERVER_FLAGS[*]:-none}"

# ---------------------------------------------------------------- 1 + 2: throughput, agent CPU

start_hearth H "${SERVER_FLAGS[@]}"
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
# Time on a CPU (ns) of all of hearth's threads.
hearth_ns() {
    cat /proc/"$H_PID"/task/*/schedstat 2>/dev/null | awk '{ t += $1 } END { printf "%.0f", t }'
}
CPU="$TMP/cpu"
: >"$CPU"
# The sandbox's agents: PID 1 and, on the relay path, the relay process.
AGENTS='--runtime-api\|--channel-fd'
# Before and after each run: the agents', the bootstrap's and hearth's CPU, and the requests.
before_run() { A0=$(cpu_ns "$RUST_ID" "$AGENTS"); B0=$(cpu_ns "$RUST_ID" bootstrap); H0=$(hearth_ns); }
after_run() { # test server url
    local a1 b1 h1 n
    a1=$(cpu_ns "$RUST_ID" "$AGENTS")
    b1=$(cpu_ns "$RUST_ID" bootstrap)
    h1=$(hearth_ns)
    n=$(awk -v t="$1" '$1 == t { n = $3 } END { print n }' "$RESULTS") # req/s of this run
    n=$(awk -v r="$n" -v d="${DURATION%s}" 'BEGIN { printf "%d", r * d }')
    if [ "$1" = rust ]; then
        awk -v a="$((a1 - A0))" -v b="$((b1 - B0))" -v h="$((h1 - H0))" -v n="$n" \
            'BEGIN { printf "agent %.2f us/req, bootstrap %.2f, hearth %.2f", a / n / 1000, b / n / 1000, h / n / 1000 }'
        echo "$((a1 - A0)) $((b1 - B0)) $n $((h1 - H0))" >>"$CPU"
    else
        awk -v h="$((h1 - H0))" -v n="$n" 'BEGIN { printf "hearth %.2f us/req", h / n / 1000 }'
        echo "$((h1 - H0)) $n" >>"$CPU.node"
    fi
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
start_hearth S --keep-warm-ms 500 "${SERVER_FLAGS[@]}"
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
HR=$(awk '{ print $4 / $3 / 1000 }' "$CPU" | median); HN=$(awk '{ print $1 / $2 / 1000 }' "$CPU.node" | median)
S50=$(awk '{ print $1 }' "$COLD" | median); S90=$(awk '{ print $1 }' "$COLD" | pct 90)
P50=$(awk '{ print $2 }' "$COLD" | median)
echo "| benchmark | measured | reference | ratio | target | verdict |"
echo "|---|---:|---:|---:|---|---|"
awk -v rr="$RR" -v nr="$NR" -v r9="$R9" -v n9="$N9" -v r5="$R5" -v n5="$N5" -v ag="$AG" -v bs="$BS" \
    -v hr="$HR" -v hn="$HN" \
    -v s5="$S50" -v s9="$S90" -v p5="$P50" 'BEGIN {
    printf "| trivial Rust lambda_runtime fn, req/s | %.0f | Node trivial fn %.0f | %.2f× | ≥ 1.0× | %s |\n",
        rr, nr, rr / nr, (rr / nr >= 1 ? "met" : sprintf("NOT met (%.2f×)", rr / nr))
    printf "| trivial Rust fn, p50 / p99 at c=10 | %.0f / %.0f µs | Node %.0f / %.0f µs | - | p99 ≤ 1 ms | %s |\n",
        r5, r9, n5, n9, (r9 <= 1000 ? "met" : sprintf("NOT met (%.2f ms)", r9 / 1000))
    printf "| runtime-API agent CPU per request | %.2f µs | bootstrap %.2f µs | - | < 10 µs | %s |\n",
        ag, bs, (ag < 10 ? "met" : "NOT met")
    printf "| hearth CPU per request (all threads) | Rust fn %.2f µs | Node fn %.2f µs | %.2f× | - | - |\n",
        hr, hn, hr / hn
    printf "| Python cold start, standby (p50 / p90) | %.1f / %.1f ms | python3 -c import app %.1f ms | %.2f× | ≤ 0.5× | %s |\n",
        s5 * 1000, s9 * 1000, p5 * 1000, s5 / p5, (s5 / p5 <= 0.5 ? "met" : sprintf("NOT met (%.2f×)", s5 / p5))
}'
