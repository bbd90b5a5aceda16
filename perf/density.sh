#!/usr/bin/env bash
# Density: many trivial functions on one server, each used once, then idle.
#
#   perf/density.sh [--functions N] [--parallel P] [--keep-warm-ms MS] [-- extra hearth flags]
#
# Deploys N copies of perf/functions/trivial through the API (P deploys in
# flight), invokes each once, waits past the keep-warm period, then measures:
#   - memory: the sum of Pss and of RSS over hearth and every process below it
#     (agents, Node), and the number of those processes and of hearth's threads
#     and open fds;
#   - `GET /functions` (the whole list): median and max of 10, by curl;
#   - the next request of 20 idle functions (p50 and max), by curl;
#   - deploy time (p50 and max over the N deploys) and disk used by the state dir.
# Issue 14's target: <= 4 GiB, <= 50 ms, <= 150 ms for N = 1000.
#
# Needs root, node, zip, curl; builds hearth (release) unless BUILD=0.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "density.sh: $*" >&2; exit 1; }
# shellcheck source=functions/lib.sh
. "$ROOT/perf/functions/lib.sh"

N=1000
PAR=8
KEEP_WARM_MS=5000
while [ $# -gt 0 ]; do
    case $1 in
    --functions) N=$2; shift 2 ;;
    --parallel) PAR=$2; shift 2 ;;
    --keep-warm-ms) KEEP_WARM_MS=$2; shift 2 ;;
    --) shift; break ;;
    *) die "unknown argument $1" ;;
    esac
done
bench_prepare node zip curl
TMP=$(mktemp -d /tmp/hearth-density.XXXXXX)
ZIP="$TMP/trivial.zip"
(cd "$HERE/trivial" && zip -qr "$ZIP" .)

echo "# density: $N trivial functions, keep-warm $KEEP_WARM_MS ms, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "# $(nproc) cores, kernel $(uname -r), node $(node --version), hearth $("$HEARTH" --version | awk '{ print $2 }'), extra flags: ${*:-none}"
echo "# load average at start: $(load)"

start_hearth D --keep-warm-ms "$KEEP_WARM_MS" "$@"
ADDR=$REPLY
HPID=$D_PID

# Deploys in parallel; each line of $TMP/deploys: "id seconds" or "FAIL status body".
deploy_one() {
    local out status
    out=$(curl -sS -w '\n%{http_code} %{time_total}' -X POST -H 'content-type: application/zip' "${AUTH[@]}" \
        --data-binary "@$ZIP" "http://$ADDR/deploy" 2>&1) || true
    status=${out##*$'\n'}
    if [ "${status%% *}" = 201 ] || [ "${status%% *}" = 200 ]; then
        echo "$(grep -o '"functionId": *"[^"]*"' <<<"$out" | sed 's/.*"\([^"]*\)"$/\1/') ${status#* }"
    else
        echo "FAIL ${status%% *} $(head -c 300 <<<"${out%$'\n'*}" | tr '\n' ' ')"
    fi
}
export -f deploy_one
export ADDR ZIP BENCH_TOKEN
t0=$(now_s)
seq 1 "$N" | xargs -P "$PAR" -I{} bash -c 'AUTH=(-H "authorization: Bearer $BENCH_TOKEN"); deploy_one' >"$TMP/deploys"
t1=$(now_s)
ok=$(grep -vc '^FAIL' "$TMP/deploys" || true)
fail=$(grep -c '^FAIL' "$TMP/deploys" || true)
echo "deploys: $ok ok, $fail failed in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s;" \
    "per deploy p50 $(grep -v '^FAIL' "$TMP/deploys" | awk '{ print $2 * 1000 }' | median) ms," \
    "max $(grep -v '^FAIL' "$TMP/deploys" | awk '{ print $2 * 1000 }' | sort -g | tail -1) ms"
[ "$fail" = 0 ] || { echo "first failures:"; grep '^FAIL' "$TMP/deploys" | sort | uniq -c | sort -rn | head -3; }
grep -v '^FAIL' "$TMP/deploys" | awk '{ print $1 }' >"$TMP/ids"

# Invokes each once (P in flight); counts answers other than 200 "hello".
invoke_one() { # id
    local body
    body=$(curl -sS -m 30 "http://$ADDR/f/$1/" 2>&1) || true
    [ "$body" = hello ] && echo ok || echo "FAIL $1 $body"
}
export -f invoke_one
xargs -P "$PAR" -I{} bash -c 'invoke_one {}' <"$TMP/ids" >"$TMP/invokes"
echo "first invocations: $(grep -c '^ok' "$TMP/invokes" || true) ok, $(grep -c '^FAIL' "$TMP/invokes" || true) failed"
grep '^FAIL' "$TMP/invokes" | head -3 || true

snapshot() { # label
    local pids pss=0 rss=0 p
    pids=$(tree "$HPID")
    for p in $pids; do
        pss=$((pss + $(pss_kib "$p")))
        rss=$((rss + $(status_kib "$p" VmRSS)))
    done
    echo "$1: $(wc -w <<<"$pids") processes (hearth + below), Pss $((pss / 1024)) MiB, RSS $((rss / 1024)) MiB;" \
        "hearth: $(status_kib "$HPID" VmRSS | awk '{ print int($1 / 1024) }') MiB RSS," \
        "$(ls /proc/"$HPID"/task | wc -l) threads, $(ls /proc/"$HPID"/fd | wc -l) fds"
}
snapshot "after first invocations"
# Past keep-warm: instances are reaped on the next tick after it.
sleep "$(awk -v ms="$KEEP_WARM_MS" 'BEGIN { print ms / 1000 + 3 }')"
snapshot "idle past keep-warm"
echo "state dir: $(du -sm "$TMP/D/state" | awk '{ print $1 }') MiB"

: >"$TMP/list"
for _ in $(seq 1 10); do
    curl -sS -o /dev/null -w '%{time_total}\n' "${AUTH[@]}" "http://$ADDR/functions" | awk '{ print $1 * 1000 }' >>"$TMP/list"
done
echo "GET /functions: median $(median <"$TMP/list") ms, max $(sort -g "$TMP/list" | tail -1) ms (10 runs)"

: >"$TMP/next"
: >"$TMP/nextfail"
for id in $(shuf -n 20 "$TMP/ids"); do
    out=$(curl -sS -m 30 -w '\n%{time_total}' "http://$ADDR/f/$id/" 2>&1) || true
    [ "${out%$'\n'*}" = hello ] || echo "$id ${out%$'\n'*}" >>"$TMP/nextfail"
    awk '{ print $1 * 1000 }' <<<"${out##*$'\n'}" >>"$TMP/next"
done
echo "idle function's next request: p50 $(median <"$TMP/next") ms, max $(sort -g "$TMP/next" | tail -1) ms" \
    "(20 functions, one at a time), $(wc -l <"$TMP/nextfail") not answered hello"
head -3 "$TMP/nextfail"
snapshot "after the next requests"
echo "# load average at end: $(load)"
