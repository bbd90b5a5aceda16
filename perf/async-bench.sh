#!/usr/bin/env bash
# Lambda service API and asynchronous invocation benchmarks (issue 12 targets).
#
# Usage: perf/async-bench.sh [--duration 10s] [--accept-conns 100]
#
# One hearth server (release build, process backend), the trivial function
# (perf/functions/trivial) deployed under the name "trivial" with concurrency 20:
#  1. sync: wrk -c10 on its function URL (/f/trivial/) and on the service API
#     Invoke (POST /2015-03-31/functions/trivial/invocations, RequestResponse),
#     alternately; prints both and the Invoke/URL ratio (target >= 0.9).
#  2. async accept: wrk -c<accept-conns> of Event invocations for the duration:
#     accepted/s (every 202 is fsynced first; target >= 5,000/s); then, with
#     nothing else running, events run per second over DRAIN_WINDOW (10) s,
#     against the sync URL rate of step 1 (target: the same).
#  3. code update under load: wrk -c10 for 20 s on the function URL with one
#     UpdateFunctionCode (same zip) at 10 s: failed requests (target 0).
# Needs root, wrk, curl, zip, base64.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=10s
ACCEPT_CONNS=100
WRK_THREADS=2
WRK_CONNS=10
die() { echo "async-bench: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --accept-conns) ACCEPT_CONNS=$2; shift 2 ;;
    *) die "unknown argument: $1" ;;
    esac
done
TMP=$(mktemp -d /tmp/hearth-async-bench.XXXXXX)
# shellcheck source=functions/lib.sh
. "$ROOT/perf/functions/lib.sh"
bench_prepare wrk curl zip base64
AGENT="${CARGO_TARGET_DIR:-$ROOT/target}/x86_64-unknown-linux-gnu/release/hearth-agent"
[ -n "${HEARTH_AGENT:-}" ] || { [ -x "$AGENT" ] && export HEARTH_AGENT=$AGENT; }
LUA="$ROOT/perf/async/post.lua"

(cd "$HERE/trivial" && zip -qr "$TMP/trivial.zip" .)
start_hearth srv
ADDR=$REPLY
out=$(curl -sS -X POST -H 'content-type: application/zip' "${AUTH[@]}" --data-binary "@$TMP/trivial.zip" \
    "http://$ADDR/deploy?name=trivial&concurrency=20")
grep -q '"functionId"' <<<"$out" || die "deploy failed: $out"
URL="http://$ADDR/f/trivial/"
INVOKE="http://$ADDR/2015-03-31/functions/trivial/invocations"
metric() { # series
    curl -sS "${AUTH[@]}" "http://$ADDR/metrics" |
        awk -v s="$1" 'index($1, s "{function=\"trivial\"}") == 1 { print $2 }'
}

echo "== 1. sync throughput: function URL vs service API Invoke (wrk -t$WRK_THREADS -c$WRK_CONNS -d$DURATION, load $(load))"
run_wrk 3s "$URL" >/dev/null
export EXTRA_HEADERS="authorization: Bearer $BENCH_TOKEN"
run_wrk 3s "$INVOKE" "$LUA" >/dev/null
: >"$TMP/sync"
for round in 1 2 3; do
    read -r u _ _ ue _ <<<"$(run_wrk "$DURATION" "$URL")"
    read -r i _ _ ie _ <<<"$(run_wrk "$DURATION" "$INVOKE" "$LUA")"
    echo "round $round: url $u req/s ($ue errors), invoke $i req/s ($ie errors)"
    echo "$u $i" >>"$TMP/sync"
done
URL_RPS=$(awk '{ print $1 }' "$TMP/sync" | median)
INV_RPS=$(awk '{ print $2 }' "$TMP/sync" | median)
echo "median: url $URL_RPS, invoke $INV_RPS, invoke/url $(awk -v a="$INV_RPS" -v b="$URL_RPS" 'BEGIN { printf "%.2f", a / b }')"

echo "== 2. async: Event accepts (wrk -t$WRK_THREADS -c$ACCEPT_CONNS -d$DURATION), then drain (load $(load))"
export EXTRA_HEADERS="authorization: Bearer $BENCH_TOKEN;x-amz-invocation-type: Event"
read -r a _ a99 ae ad <<<"$(WRK_CONNS=$ACCEPT_CONNS run_wrk "$DURATION" "$INVOKE" "$LUA")"
echo "accepted: $a events/s, p99 ${a99} us, errors $ae ($ad); queue depth $(metric hearth_async_queue_depth)"
# The drain alone: events run over DRAIN_WINDOW seconds with nothing else loading the server.
DRAIN_WINDOW=${DRAIN_WINDOW:-10}
d0=$(metric hearth_async_events_succeeded_total); t1=$(now_s)
sleep "$DRAIN_WINDOW"
d1=$(metric hearth_async_events_succeeded_total); t2=$(now_s); left=$(metric hearth_async_queue_depth)
drain=$(awk -v n="$((d1 - d0))" -v a="$t1" -v b="$t2" 'BEGIN { printf "%.0f", n / (b - a) }')
echo "drain: $((d1 - d0)) events in $(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", b - a }') s = $drain events/s, $(awk -v a="$drain" -v b="$URL_RPS" 'BEGIN { printf "%.2f", a / b }') x the sync URL rate (async uses at most half the concurrency); $left still queued"
[ "${left:-0}" -gt 0 ] || echo "warning: the queue emptied within the window; the drain rate is a lower bound"
echo "failed: $(metric hearth_async_events_failed_total), queue depth now: $(metric hearth_async_queue_depth)"

echo "== 3. code update under load (wrk -c10 20 s, UpdateFunctionCode at 10 s, load $(load))"
ZIP64=$(base64 -w0 "$TMP/trivial.zip")
printf '{"ZipFile": "%s"}' "$ZIP64" >"$TMP/update.json"
(sleep 10; curl -sS -o "$TMP/update.out" -w '%{http_code}\n' -X PUT "${AUTH[@]}" \
    -H 'content-type: application/json' --data-binary "@$TMP/update.json" \
    "http://$ADDR/2015-03-31/functions/trivial/code" >"$TMP/update.status") &
upd=$!
read -r r _ r99 re rd <<<"$(run_wrk 20s "$URL")"
wait "$upd"
echo "update answered $(cat "$TMP/update.status"); $r req/s, p99 $r99 us, failed requests: $re ($rd)"
