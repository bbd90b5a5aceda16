#!/usr/bin/env bash
# Runtime shims side by side on the shim line: each shim file given is run by
# perf/functions/floor-proxy.c (one Node instance, over a pair of pipes, fixed
# INVOKE frames of the benchmark's request) beside the floor (the same proxy
# with floor-instance.js), all pinned to CPU 0 with wrk -t1 -c10 on CPU 1, in
# alternating rounds. For changes to include/runtime/bootstrap.js: what a
# shim variant costs per request end to end, with the cold caches and
# switches of a real instance, which perf/shim-bench.js (hot, one process
# pair) does not show. Prints each run, then req/s, p99 and Node's CPU µs per
# request (medians) per variant, and each variant against the first.
#
# Usage: perf/functions/shim-ab.sh [--rounds N] [--duration 4s] [--no-build]
#                                  NAME=SHIM.js[@FLAG,FLAG...] [NAME=...]
#        APP=express (default: POST /greet on the Express fixture) or trivial
# Every Node gets hearth's flags (SINGLE_THREADED_GC, NODE_FLAGS in agent/src/runtime.rs); the
# flags after `@` are added for that variant (e.g. to try V8 options:
# big=include/runtime/bootstrap.js@--min-semi-space-size=16).
#
# The spread here is round to round: two copies of one shim differed by up to
# 14 % in a median of three rounds (perf/RESULTS.md, 2026-12-04); use six
# rounds or more and repeat before believing a few per cent. Needs root, gcc,
# wrk, node, taskset and the fixture's node_modules (tools/setup.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ROUNDS=6
DURATION=4s
BUILD=0
VARIANTS=()
die() { echo "shim-ab: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --no-build) shift ;;
    -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *=*) VARIANTS+=("$1"); shift ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[ ${#VARIANTS[@]} -ge 1 ] || die "name at least one shim: NAME=path/to/bootstrap.js (see --help)"
[[ "$DURATION" =~ ^[0-9]+s$ ]] || die "--duration takes whole seconds, e.g. 4s"
# shellcheck source=lib.sh
. "$ROOT/perf/functions/lib.sh"
# Nothing of hearth runs here: no build (BUILD=0 above), only the checks.
bench_prepare wrk node taskset gcc
WRK_THREADS=1
WRK_CONNS=10
wrk() { command taskset -c 1 wrk "$@"; }
TMP=$(mktemp -d /tmp/hearth-shim-ab.XXXXXX)
# What hearth's agent starts Node with on one CPU (SINGLE_THREADED_GC and
# NODE_FLAGS in agent/src/runtime.rs; an instance beside its worker drops the first).
NODE_FLAGS=(--single-threaded-gc --no-allocation-site-pretenuring)

gcc -O2 -o "$TMP/floor-proxy" "$HERE/floor-proxy.c"
META_TAIL='"127.0.0.1","HTTP/1.1","0c6b5a9e-3f1d-4c2a-9b7e-2d4f6a8c0e11",1764547200000,"127.0.0.1:8080",0,4102444800000]'
case "${APP:-express}" in
express)
    TASK_ROOT=$FIXTURE HANDLER=app.handler URL_PATH=/greet LUA="$HERE/post-greet.lua"
    BODY='{ "name": "John Doe" }' FLOOR_REQUEST=(POST /greet)
    META='["POST","/greet","",[["host","127.0.0.1:8080"],["content-type","application/json"],["content-length","22"]],'$META_TAIL ;;
trivial)
    TASK_ROOT="$HERE/trivial" HANDLER=index.handler URL_PATH=/ LUA=- BODY= FLOOR_REQUEST=(GET /)
    META='["GET","/","",[["host","127.0.0.1:8080"]],'$META_TAIL ;;
*) die "APP is express or trivial" ;;
esac

declare -A PID_OF
NODE_WRAP="taskset -c 0" start_server FLOOR env FLOOR_PIPES=1 "$TMP/floor-proxy" 1 \
    node "${NODE_FLAGS[@]}" "$HERE/floor-instance.js" "$TASK_ROOT" "$HANDLER" "${FLOOR_REQUEST[@]}"
TARGETS="shim floor http://127.0.0.1:$REPLY$URL_PATH $LUA"
PID_OF[floor]=$FLOOR_PID
NAMES=()
n=0
for v in "${VARIANTS[@]}"; do
    name=${v%%=*} file=${v#*=} flags=()
    [[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || die "$name: a variant's name is letters, digits, - and _"
    if [[ $file == *@* ]]; then
        IFS=, read -r -a flags <<<"${file#*@}"
        file=${file%%@*}
    fi
    file=$(realpath "$file")
    [ -f "$file" ] || die "$file: no such shim"
    [ -z "${PID_OF[$name]:-}" ] || die "$name is named twice"
    n=$((n + 1))
    NODE_WRAP="taskset -c 0" start_server "V$n" env FLOOR_PIPES=1 FLOOR_HANDLER="$HANDLER" FLOOR_TASK_ROOT="$TASK_ROOT" \
        FLOOR_BODY="$BODY" FLOOR_META="$META" "$TMP/floor-proxy" 1 node "${NODE_FLAGS[@]}" "${flags[@]}" "$file"
    TARGETS+=$'\n'"shim $name http://127.0.0.1:$REPLY$URL_PATH $LUA"
    PID_OF[$name]=$(eval echo "\$V${n}_PID")
    NAMES+=("$name")
done

before_run() { ticks "${PID_OF[$2]}" >"$TMP/ticks"; }
after_run() { cpu_per_request "$1" "$2" "$4" "${PID_OF[$2]}"; }
echo "# shim-ab: $(date -u '+%Y-%m-%d %H:%M UTC'), ${APP:-express}, wrk -t1 -c10 -d$DURATION on CPU 1, proxies and Node on CPU 0, load $(load)"
RESULTS="$TMP/results"
: >"$TMP/cpu"
run_rounds "$TARGETS" "$ROUNDS" "$DURATION"
echo
echo "| shim | req/s | ÷ ${NAMES[0]} | p99 µs | Node CPU µs/req |"
echo "|---|---:|---:|---:|---:|"
first=$(pick shim "${NAMES[0]}" 3)
for s in floor "${NAMES[@]}"; do
    awk -v s="$s" -v r="$(pick shim "$s" 3)" -v f="$first" -v p9="$(pick shim "$s" 5)" \
        -v nc="$(awk -v s="$s" '$2 == s { print $4 }' "$TMP/cpu" | median)" \
        'BEGIN { printf "| %s | %.0f | %.2f× | %.0f | %.1f |\n", s, r, r / f, p9, nc }'
done
