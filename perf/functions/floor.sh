#!/usr/bin/env bash
# A reference floor under hearth's per-core figures: what a server that runs
# each instance in a process of its own pays per request when it does little
# else. Four servers, each confined to CPU 0 with wrk -t1 -c10 on CPU 1 (as in
# one-core.sh), in alternating rounds, for the trivial handler (GET /) and the
# Express fixture's POST /greet:
#   hearth  `serve --cores 1`, both functions deployed with concurrency N
#           (at most N instances);
#   floor   perf/functions/floor-proxy.c with N Node processes running
#           floor-instance.js: sockets, wakeups and context switches, and the
#           handler called with an event built in JavaScript per request; no
#           HTTP parsing, no frames, no scheduler. Node gets hearth's flags
#           (bare Node, as users run it, gets none);
#   shim    the same proxy driving hearth's runtime shim (bootstrap.js) in
#           hearth's frames, a fixed INVOKE of the benchmark's request: the
#           floor plus the shim's event building and answer frames;
#   bare    bare-http.js / bare-express.js, one Node process serving HTTP.
# Prints req/s, p50, p99 and the CPU microseconds per request of the server's
# own process(es) (hearth's threads and agents, the floor's proxy) and of its
# Node processes (from /proc/<pid>/stat; tick-sampled, so the user/system
# split is rough but the sum holds), medians over the rounds. hearth ÷ bare is
# what one-core.sh reports, but with N instances (one-core.sh deploys with the
# defaults, which settle at one instance per core for either handler since
# 2026-12-04; two for the trivial one before); floor ÷ bare is
# where the simplest process-per-instance server stands here (one design, not
# a proven bound); shim − floor is the runtime shim's cost and hearth − shim
# the host's (HTTP, scheduler, sandbox). The proxies answer 500 when the
# handler fails, so a broken setup shows in the errors column.
#
# With CORES=2, everything gets both CPUs and wrk -t2 -c10 shares them (as in
# perf/run-all): hearth on all cores with concurrency 2N, one floor (or shim)
# proxy pinned to each CPU with N instances of its own on one port
# (SO_REUSEPORT, as hearth's workers; the kernel may split the 10 connections
# unevenly, as it does for hearth), and Node `cluster` (cluster.js) beside the
# bare process; wrk, bare and cluster are not pinned.
#
# Usage: perf/functions/floor.sh [--rounds N] [--duration 10s] [--no-build]
#        (--duration in whole seconds)
#        INSTANCES=N (per core; default 1: the fastest setting on one core)
#        CORES=1|2 (default 1)
#        FLOOR_PIPES=1: the floor and shim proxies talk to Node over a pair of
#        pipes, as hearth does since 2026-12-03 (default: a socketpair)
# Needs root, gcc, wrk, node, zip, curl and taskset, and 2 CPUs.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ROUNDS=3
DURATION=10s
BUILD=1
# shellcheck source=lib.sh
. "$ROOT/perf/functions/lib.sh"
USAGE_LINES=40 round_args "$@"
die() { echo "floor: $*" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || die "needs at least 2 CPUs"
CORES=${CORES:-1}
[ "$CORES" = 1 ] || [ "$CORES" = 2 ] || die "CORES must be 1 or 2"
[[ "$DURATION" =~ ^[0-9]+s$ ]] || die "--duration takes whole seconds, e.g. 10s"
bench_prepare wrk node zip curl taskset gcc
WRK_THREADS=$CORES
WRK_CONNS=10
INSTANCES=${INSTANCES:-1}
# What hearth's agent starts Node with on one CPU (SINGLE_THREADED_GC and
# NODE_FLAGS in agent/src/runtime.rs; an instance beside its worker drops the first).
NODE_FLAGS=(--single-threaded-gc --no-allocation-site-pretenuring)
TMP=$(mktemp -d /tmp/hearth-floor.XXXXXX)

gcc -O2 -o "$TMP/floor-proxy" "$HERE/floor-proxy.c"
(cd "$HERE/trivial" && zip -qr "$TMP/trivial.zip" .)
(cd "$FIXTURE" && zip -qr "$TMP/express.zip" .)
if [ "$CORES" = 1 ]; then
    start_hearth H --cores 1
    NODE_WRAP="taskset -c 0"
    wrk() { command taskset -c 1 wrk "$@"; }
else
    start_hearth H
fi
H=$REPLY
r=$(deploy_zip "$H" "$TMP/trivial.zip" "concurrency=$((INSTANCES * CORES))"); TR=${r% *}
r=$(deploy_zip "$H" "$TMP/express.zip" "concurrency=$((INSTANCES * CORES))"); EX=${r% *}
# Starts one proxy per core, each pinned to its CPU, on one port; sets REPLY
# to the port and <name>_PIDS to their pids.
start_floor() { # name command args...
    local name=$1 port= core pids=()
    shift
    for core in $(seq 0 $((CORES - 1))); do
        NODE_WRAP="taskset -c $core" start_server "${name}_$core" env ${port:+FLOOR_PORT=$port} ${FLOOR_PIPES:+FLOOR_PIPES=1} "$@"
        port=$REPLY
        pids+=("$(eval echo "\$${name}_${core}_PID")")
    done
    eval "${name}_PIDS='${pids[*]}'"
    REPLY=$port
}
start_floor FT "$TMP/floor-proxy" "$INSTANCES" node "${NODE_FLAGS[@]}" "$HERE/floor-instance.js" "$HERE/trivial" index.handler GET /
FT=$REPLY
start_floor FE "$TMP/floor-proxy" "$INSTANCES" node "${NODE_FLAGS[@]}" "$HERE/floor-instance.js" "$FIXTURE" app.handler
FE=$REPLY
# What hearth's INVOKE metadata looks like for the two requests (fixed ids
# and times: the shim only copies them into the event).
invoke_meta() { # method path headers
    printf '["%s","%s","",%s,"127.0.0.1","HTTP/1.1",%s]' \
        "$1" "$2" "$3" '"0c6b5a9e-3f1d-4c2a-9b7e-2d4f6a8c0e11",1764547200000,"127.0.0.1:8080",0,4102444800000'
}
GREET='{ "name": "John Doe" }'
# (start_server clears the environment: the proxy's settings go through env.)
start_floor ST FLOOR_HANDLER=index.handler FLOOR_TASK_ROOT="$HERE/trivial" \
    FLOOR_META="$(invoke_meta GET / '[["host","127.0.0.1:8080"]]')" \
    "$TMP/floor-proxy" "$INSTANCES" node "${NODE_FLAGS[@]}" "$ROOT/include/runtime/bootstrap.js"
ST=$REPLY
start_floor SE FLOOR_HANDLER=app.handler FLOOR_TASK_ROOT="$FIXTURE" FLOOR_BODY="$GREET" \
    FLOOR_META="$(invoke_meta POST /greet '[["host","127.0.0.1:8080"],["content-type","application/json"],["content-length","'${#GREET}'"]]')" \
    "$TMP/floor-proxy" "$INSTANCES" node "${NODE_FLAGS[@]}" "$ROOT/include/runtime/bootstrap.js"
SE=$REPLY
start_node BH "$HERE/bare-http.js"
BH=$REPLY
start_node BE "$HERE/bare-express.js" "$FIXTURE"
BE=$REPLY
LUA="$HERE/post-greet.lua"
TARGETS="express-greet hearth http://$H/f/$EX/greet $LUA
express-greet shim http://127.0.0.1:$SE/greet $LUA
express-greet floor http://127.0.0.1:$FE/greet $LUA
express-greet bare http://127.0.0.1:$BE/greet $LUA"
TRIVIAL="trivial hearth http://$H/f/$TR/ -
trivial shim http://127.0.0.1:$ST/ -
trivial floor http://127.0.0.1:$FT/ -
trivial bare http://127.0.0.1:$BH/ -"
SERVERS="hearth shim floor bare"
if [ "$CORES" = 2 ]; then
    start_node CH "$HERE/cluster.js" "$HERE/bare-http.js"
    CH=$REPLY
    start_node CE "$HERE/cluster.js" "$HERE/bare-express.js" "$FIXTURE"
    CE=$REPLY
    TARGETS+=$'\n'"express-greet cluster http://127.0.0.1:$CE/greet $LUA"
    TRIVIAL+=$'\n'"trivial cluster http://127.0.0.1:$CH/ -"
    SERVERS+=" cluster"
fi
TARGETS+=$'\n'$TRIVIAL

pids_of() { # test server
    local t=E
    [ "$1" = trivial ] && t=T
    case "$2" in
    hearth) echo "$H_PID" ;;
    floor) eval echo "\$F${t}_PIDS" ;;
    shim) eval echo "\$S${t}_PIDS" ;;
    bare) [ $t = T ] && echo "$BH_PID" || echo "$BE_PID" ;;
    cluster) [ $t = T ] && echo "$CH_PID" || echo "$CE_PID" ;;
    esac
}
before_run() { # test server url
    # shellcheck disable=SC2046 # a list of pids
    ticks $(pids_of "$1" "$2") >"$TMP/ticks"
}
after_run() { # test server url req/s
    # shellcheck disable=SC2046 # a list of pids
    cpu_per_request "$1" "$2" "$4" $(pids_of "$1" "$2")
}

if [ "$CORES" = 1 ]; then
    echo "# floor: $(date -u '+%Y-%m-%d %H:%M UTC'), wrk -t1 -c10 -d$DURATION on CPU 1, servers on CPU 0," \
        "$INSTANCES instance(s) each, load $(load)"
else
    echo "# floor on 2 cores: $(date -u '+%Y-%m-%d %H:%M UTC'), wrk -t2 -c10 -d$DURATION, servers and wrk on both CPUs," \
        "$INSTANCES instance(s) per core, load $(load)"
fi
RESULTS="$TMP/results"
: >"$TMP/cpu"
run_rounds "$TARGETS" "$ROUNDS" "$DURATION"
echo
echo "| test | server | req/s | ÷ bare | ÷ floor | p50 µs | p99 µs | server CPU µs/req | Node CPU µs/req |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
for test in express-greet trivial; do
    for server in $SERVERS; do
        awk -v t="$test" -v s="$server" -v r="$(pick "$test" "$server" 3)" -v b="$(pick "$test" bare 3)" \
            -v f="$(pick "$test" floor 3)" -v p5="$(pick "$test" "$server" 4)" -v p9="$(pick "$test" "$server" 5)" \
            -v sc="$(awk -v t="$test" -v s="$server" '$1 == t && $2 == s { print $3 }' "$TMP/cpu" | median)" \
            -v nc="$(awk -v t="$test" -v s="$server" '$1 == t && $2 == s { print $4 }' "$TMP/cpu" | median)" 'BEGIN {
            printf "| %s | %s | %.0f | %.2f× | %.2f× | %.0f | %.0f | %.1f | %.1f |\n", t, s, r, r / b, r / f, p5, p9, sc, nc }'
    done
done
