#!/usr/bin/env bash
# Function benchmark: hearth running Node functions (process backend) side by
# side with the same code served bare by Node, in one run.
#
# Usage: perf/functions-bench.sh [--rounds N] [--duration 10s] [--cold-runs N]
#                                [--deploys N] [--no-build]
#
#  1. Express (tests/fixtures/express-app) POST /greet {"name":"John Doe"} and
#     GET /: hearth /f/<id>/... vs perf/functions/bare-express.js (same routes,
#     same node_modules, app.listen).            Target: >= 1.25x req/s, p99 <=.
#  2. Trivial async handler returning "hello" (perf/functions/trivial) vs
#     perf/functions/bare-http.js (http.createServer). Target: >= 2x, p99 <= 1 ms.
#     1 and 2: wrk -t2 -c10 --latency; every target warmed up (3 s, discarded),
#     then hearth and bare alternate for N rounds; medians are reported.
#  3. Cold start of the Express app (--keep-warm-ms 500): wait until the
#     function has no instance (+1 s for the standby refill), time one curl.
#     With the standby (default) and with --no-standby, interleaved with
#     `env -i PATH=$PATH node -e "require('<fixture>/app.js')"` (clean env: no
#     inherited NODE_* variables).          Target: hearth p50 <= 0.5x node.
#  4. Deploy to ready: POST the Express zip (built once, node_modules included)
#     to /deploy, timed by curl.                          Target: p50 <= 1 s.
#  5. Memory per warm Express instance: VmRSS summed over the instance's
#     processes (agent + node), median over instances (the standby, the one
#     not pinned to a core, is left out) and over samples taken right after
#     each hearth Express run in 1, plus memory cgroup usage and Pss; vs VmRSS
#     of the bare Express process right after each of its runs. Target: <= 1.1x.
#     Also sampled once more after both sat idle >= 20 s (info: V8 gives the
#     bare process's young generation back ~15 s after load).
#
# Prints each run, then a markdown table of medians, ratios and verdicts.
# Needs root (process sandboxes), wrk, node, zip and curl; builds hearth and
# the static agent (tools/build-agent.sh) unless --no-build. Takes ~5 minutes.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=3
DURATION=10s
COLD_RUNS=15
DEPLOYS=7
BUILD=1
WRK_THREADS=2
WRK_CONNS=10

while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --cold-runs) COLD_RUNS=$2; shift 2 ;;
    --deploys) DEPLOYS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "functions-bench: $*" >&2; exit 1; }
# shellcheck source=functions/lib.sh
. "$ROOT/perf/functions/lib.sh"
bench_prepare wrk node zip curl
TMP=$(mktemp -d /tmp/hearth-fbench.XXXXXX)

# ---------------------------------------------------------------- setup

ZIP_EXPRESS="$TMP/express.zip"
ZIP_TRIVIAL="$TMP/trivial.zip"
(cd "$FIXTURE" && zip -qr "$ZIP_EXPRESS" .)
(cd "$HERE/trivial" && zip -qr "$ZIP_TRIVIAL" .)

echo "# hearth functions vs bare Node: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "# $(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), kernel $(uname -r)," \
    "node $(node --version), hearth $("$HEARTH" --version | awk '{ print $2 }')"
echo "# load average at start: $(load)"

start_hearth H
H_ADDR=$REPLY
r=$(deploy_zip "$H_ADDR" "$ZIP_EXPRESS"); EXPRESS_ID=${r% *}
r=$(deploy_zip "$H_ADDR" "$ZIP_TRIVIAL"); TRIVIAL_ID=${r% *}
start_node BE "$HERE/bare-express.js" "$FIXTURE"
BE_PORT=$REPLY
start_node BH "$HERE/bare-http.js"
BH_PORT=$REPLY

LUA="$HERE/post-greet.lua"
# name | url | lua
TARGETS="express-greet hearth http://$H_ADDR/f/$EXPRESS_ID/greet $LUA
express-greet bare http://127.0.0.1:$BE_PORT/greet $LUA
express-get hearth http://$H_ADDR/f/$EXPRESS_ID/ -
express-get bare http://127.0.0.1:$BE_PORT/ -
trivial hearth http://$H_ADDR/f/$TRIVIAL_ID/ -
trivial bare http://127.0.0.1:$BH_PORT/ -"

# Sanity: every target answers 200 with the expected body.
while read -r test server url lua; do
    if [ "$lua" = - ]; then
        body=$(curl -sS -f "$url")
    else
        body=$(curl -sS -f -X POST -H 'content-type: application/json' -d '{ "name": "John Doe" }' "$url")
    fi
    case "$test:$body" in
    express-greet:*'Hello, John Doe'* | express-get:'Hello from hearth' | trivial:hello) ;;
    *) die "$server $test answered: $body" ;;
    esac
done <<<"$TARGETS"

# ---------------------------------------------------------------- 5: memory sampling

# Memory of every warm instance of the Express function: agents (children of
# hearth) whose memory cgroup is named after the function; the standby (the
# one not pinned to a core) is left out. Appends "tag agent cgroup_kib rss_kib
# pss_kib" per instance to $MEM.
MEM="$TMP/memory"
: >"$MEM"
mem_hearth() { # tag
    local agent cg cpus rss pss usage p f hcpus
    hcpus=$(awk '$1 == "Cpus_allowed_list:" { print $2 }' "/proc/$H_PID/status")
    for agent in $(cat /proc/"$H_PID"/task/*/children 2>/dev/null); do
        # The memory cgroup (v1), else the unified one (v2).
        cg=$(awk -F: '$2 == "memory" { m = $3 } $1 == 0 && $2 == "" { u = $3 } END { print (m != "" ? m : u) }' \
            "/proc/$agent/cgroup" 2>/dev/null || true)
        case "${cg##*/}" in "$EXPRESS_ID"-*) ;; *) continue ;; esac
        cpus=$(awk '$1 == "Cpus_allowed_list:" { print $2 }' "/proc/$agent/status" 2>/dev/null || true)
        [ "$cpus" = "$hcpus" ] && [ "$(nproc)" -gt 1 ] && continue # the standby
        rss=0
        pss=0
        for p in $(tree "$agent"); do
            rss=$((rss + $(status_kib "$p" VmRSS)))
            pss=$((pss + $(pss_kib "$p")))
        done
        usage=nan
        for f in "/sys/fs/cgroup/memory$cg/memory.usage_in_bytes" "/sys/fs/cgroup$cg/memory.current" \
            "/sys/fs/cgroup/unified$cg/memory.current"; do
            [ -r "$f" ] && { usage=$(($(cat "$f") / 1024)); break; }
        done
        echo "$1 $agent $usage $rss $pss" >>"$MEM"
    done
}
mem_bare() { # tag
    echo "$1 bare nan $(status_kib "$BE_PID" VmRSS) $(pss_kib "$BE_PID")" >>"$MEM"
}

# ---------------------------------------------------------------- 1 + 2: throughput

echo
echo "## Throughput: wrk -t$WRK_THREADS -c$WRK_CONNS -d$DURATION --latency, $ROUNDS alternating rounds (load $(load))"
RESULTS="$TMP/results"
# Memory right after each Express run (V8 gives memory back ~15 s after load).
after_run() { # test server url
    case "$1:$2" in
    express-*:hearth) mem_hearth run ;;
    express-*:bare) mem_bare run ;;
    esac
}
run_rounds "$TARGETS" "$ROUNDS" "$DURATION"
# And once more after the Express servers sat idle (through the trivial runs and 20 s).
sleep 20
mem_hearth idle
mem_bare idle

# Medians of one column over the hearth instances or the bare process, per tag.
mem_med() { # tag hearth|bare column
    awk -v t="$1" -v w="$2" -v c="$3" '$1 == t && (w == "bare") == ($2 == "bare") { print $c }' "$MEM" | median
}
echo
echo "## Memory per warm Express instance, medians in KiB (run: right after each Express run; idle: >= 20 s later)"
printf '%-5s %-7s %8s %12s %10s %10s\n' when server samples cgroup_usage rss pss
for tag in run idle; do
    printf '%-5s %-7s %8s %12s %10s %10s\n' "$tag" hearth "$(awk -v t="$tag" '$1 == t && $2 != "bare"' "$MEM" | wc -l)" \
        "$(mem_med "$tag" hearth 3)" "$(mem_med "$tag" hearth 4)" "$(mem_med "$tag" hearth 5)"
    printf '%-5s %-7s %8s %12s %10s %10s\n' "$tag" bare "$(awk -v t="$tag" '$1 == t && $2 == "bare"' "$MEM" | wc -l)" \
        - "$(mem_med "$tag" bare 4)" "$(mem_med "$tag" bare 5)"
done
N_INST=$(awk '$1 == "idle" && $2 != "bare"' "$MEM" | wc -l)
INST_RSS=$(mem_med run hearth 4); INST_PSS=$(mem_med run hearth 5); INST_CG=$(mem_med run hearth 3)
BARE_RSS=$(mem_med run bare 4); BARE_PSS=$(mem_med run bare 5)
IDLE_RSS=$(mem_med idle hearth 4); IDLE_BARE=$(mem_med idle bare 4)

stop "$H_PID" "$BE_PID" "$BH_PID"

# ---------------------------------------------------------------- 3: cold start

echo
echo "## Cold start, Express GET / (--keep-warm-ms 500), $COLD_RUNS interleaved runs (load $(load))"
start_hearth S --keep-warm-ms 500
S_ADDR=$REPLY
start_hearth N --keep-warm-ms 500 --no-standby
N_ADDR=$REPLY
r=$(deploy_zip "$S_ADDR" "$ZIP_EXPRESS"); S_ID=${r% *}
r=$(deploy_zip "$N_ADDR" "$ZIP_EXPRESS"); N_ID=${r% *}
COLD="$TMP/cold"
: >"$COLD"
wait_cold() { # addr id
    for _ in $(seq 1 200); do
        [ "$(instances "$1" "$2")" = 0 ] && return 0
        sleep 0.1
    done
    die "instances of $2 did not go away"
}
printf '%4s %12s %12s %12s\n' run standby_s no_standby_s node_require_s
for run in $(seq 1 "$COLD_RUNS"); do
    wait_cold "$S_ADDR" "$S_ID"
    wait_cold "$N_ADDR" "$N_ID"
    sleep 1 # the standby refill (a fresh instance initialising) finishes
    s=$(curl -sS -f -o /dev/null -w '%{time_total}' "http://$S_ADDR/f/$S_ID/")
    sleep 0.2
    n=$(curl -sS -f -o /dev/null -w '%{time_total}' "http://$N_ADDR/f/$N_ID/")
    t0=$(now_s)
    env -i PATH="$PATH" node -e "require('$FIXTURE/app.js')"
    t1=$(now_s)
    r=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", b - a }')
    printf '%4s %12s %12s %12s\n' "$run" "$s" "$n" "$r"
    echo "$s $n $r" >>"$COLD"
done

# ---------------------------------------------------------------- 4: deploy

echo
echo "## Deploy to ready: POST $(($(stat -c %s "$ZIP_EXPRESS") / 1024)) KiB Express zip, $DEPLOYS runs (load $(load))"
DEP="$TMP/deploys"
: >"$DEP"
for run in $(seq 1 "$DEPLOYS"); do
    r=$(deploy_zip "$S_ADDR" "$ZIP_EXPRESS")
    id=${r% *}
    secs=${r#* }
    printf '%4s %10s\n' "$run" "$secs"
    echo "$secs" >>"$DEP"
    curl -sS -o /dev/null "${AUTH[@]}" -X DELETE "http://$S_ADDR/functions/$id"
done

# ---------------------------------------------------------------- summary

LOAD_END=$(load)
echo
echo "## Summary (medians; load average at end: $LOAD_END)"
echo
echo "| benchmark | hearth req/s | bare req/s | ratio | hearth p50 µs | bare p50 µs | hearth p99 µs | bare p99 µs | errors (h/b) | target | verdict |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
for test in express-greet express-get trivial; do
    hr=$(pick "$test" hearth 3); br=$(pick "$test" bare 3)
    h5=$(pick "$test" hearth 4); b5=$(pick "$test" bare 4)
    h9=$(pick "$test" hearth 5); b9=$(pick "$test" bare 5)
    he=$(awk -v t="$test" '$1 == t && $2 == "hearth" { n += $6 } END { print n + 0 }' "$RESULTS")
    be=$(awk -v t="$test" '$1 == t && $2 == "bare" { n += $6 } END { print n + 0 }' "$RESULTS")
    awk -v t="$test" -v hr="$hr" -v br="$br" -v h5="$h5" -v b5="$b5" -v h9="$h9" -v b9="$b9" \
        -v he="$he" -v be="$be" 'BEGIN {
        r = hr / br
        if (t == "trivial") {
            target = "≥ 2× req/s, p99 ≤ 1 ms"
            v = (r >= 2 ? "req/s met" : sprintf("req/s NOT met (%.2f× of 2×)", r)) ", " \
                (h9 <= 1000 ? "p99 met" : sprintf("p99 NOT met (%.2f ms)", h9 / 1000))
        } else {
            target = "≥ 1.25× req/s, p99 ≤ bare"
            v = (r >= 1.25 ? "req/s met" : sprintf("req/s NOT met (%.2f× of 1.25×)", r)) ", " \
                (h9 <= b9 ? "p99 met" : sprintf("p99 NOT met (%.1f× bare)", h9 / b9))
        }
        printf "| %s | %.0f | %.0f | %.2f× | %.0f | %.0f | %.0f | %.0f | %d/%d | %s | %s |\n",
            t, hr, br, r, h5, b5, h9, b9, he, be, target, v
    }'
done
echo
echo "| benchmark | hearth | reference | ratio | target | verdict |"
echo "|---|---:|---:|---:|---|---|"
S50=$(awk '{ print $1 }' "$COLD" | median); S90=$(awk '{ print $1 }' "$COLD" | pct 90)
N50=$(awk '{ print $2 }' "$COLD" | median); N90=$(awk '{ print $2 }' "$COLD" | pct 90)
R50=$(awk '{ print $3 }' "$COLD" | median)
D50=$(median <"$DEP"); D90=$(pct 90 <"$DEP")
awk -v s5="$S50" -v s9="$S90" -v n5="$N50" -v n9="$N90" -v r5="$R50" -v d5="$D50" -v d9="$D90" \
    -v ir="$INST_RSS" -v ip="$INST_PSS" -v ic="$INST_CG" -v br="$BARE_RSS" -v bp="$BARE_PSS" -v ni="$N_INST" \
    -v dr="$IDLE_RSS" -v db="$IDLE_BARE" 'BEGIN {
    printf "| cold start, standby (p50 / p90) | %.1f / %.1f ms | node require %.1f ms | %.2f× | ≤ 0.5× | %s |\n",
        s5 * 1000, s9 * 1000, r5 * 1000, s5 / r5, (s5 / r5 <= 0.5 ? "met" : sprintf("NOT met (%.2f×)", s5 / r5))
    printf "| cold start, --no-standby (p50 / p90) | %.1f / %.1f ms | node require %.1f ms | %.2f× | (info) | raw sandbox + node + require |\n",
        n5 * 1000, n9 * 1000, r5 * 1000, n5 / r5
    printf "| deploy to ready (p50 / p90) | %.0f / %.0f ms | - | - | p50 ≤ 1 s | %s |\n",
        d5 * 1000, d9 * 1000, (d5 <= 1 ? "met" : "NOT met")
    printf "| memory per warm instance, VmRSS after load (%d instances) | %.1f MiB | bare Express %.1f MiB | %.2f× | ≤ 1.1× | %s |\n",
        ni, ir / 1024, br / 1024, ir / br, (ir / br <= 1.1 ? "met" : sprintf("NOT met (%.2f×)", ir / br))
    printf "| memory per warm instance, cgroup usage / Pss after load | %.1f / %.1f MiB | bare Pss %.1f MiB | %.2f× (Pss) | (info) | agent + node; cgroup counts page cache too |\n",
        ic / 1024, ip / 1024, bp / 1024, ip / bp
    printf "| memory per warm instance, VmRSS after >= 20 s idle | %.1f MiB | bare Express %.1f MiB | %.2f× | (info) | V8 may give idle heap back (bare: sometimes) |\n",
        dr / 1024, db / 1024, dr / db
}'
