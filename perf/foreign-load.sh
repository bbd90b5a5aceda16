#!/usr/bin/env bash
# hearth against bare Node, with and without foreign CPU load on the same cores.
#
#   perf/foreign-load.sh [--rounds R] [--duration D] [--hogs-per-core K] [-- extra hearth flags]
#
# The foreign load: K busy loops (`yes >/dev/null`) per online core, started
# before and killed after each loaded run; reproducible on any host. For the
# trivial handler (perf/functions/trivial) and bare Node's http server
# (bare-http.js), runs wrk (-t2 -c10) alternately, quiet then loaded, R rounds
# of D each, and prints req/s, p50 and p99 per run, the medians, and how many
# instances hearth started during each run (hearth_function_cold_starts_total:
# a steady load that keeps restarting instances shows here).
#
# Needs root, wrk, node, zip, curl; builds hearth (release) unless BUILD=0.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "foreign-load.sh: $*" >&2; exit 1; }
# shellcheck source=functions/lib.sh
. "$ROOT/perf/functions/lib.sh"

ROUNDS=3
DURATION=10s
HOGS=2
while [ $# -gt 0 ]; do
    case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --hogs-per-core) HOGS=$2; shift 2 ;;
    --) shift; break ;;
    *) die "unknown argument $1" ;;
    esac
done
WRK_THREADS=2
WRK_CONNS=10
bench_prepare wrk node zip curl
TMP=$(mktemp -d /tmp/hearth-foreign.XXXXXX)
ZIP="$TMP/trivial.zip"
(cd "$HERE/trivial" && zip -qr "$ZIP" .)

echo "# foreign CPU load: $HOGS x yes per core, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "# $(nproc) cores, kernel $(uname -r), node $(node --version), extra hearth flags: ${*:-none}"
echo "# load average at start: $(load)"

start_hearth H "$@"
H_ADDR=$REPLY
r=$(deploy_zip "$H_ADDR" "$ZIP"); ID=${r% *}
start_node BH "$HERE/bare-http.js"
BH_PORT=$REPLY
[ "$(curl -sS "http://$H_ADDR/f/$ID/")" = hello ] || die "hearth does not answer hello"

HOG_PIDS=()
hogs_on() {
    local i
    for i in $(seq 1 $(($(nproc) * HOGS))); do
        yes >/dev/null &
        HOG_PIDS+=($!)
    done
    PIDS+=("${HOG_PIDS[@]}")
    sleep 1
}
hogs_off() {
    [ ${#HOG_PIDS[@]} -gt 0 ] && kill "${HOG_PIDS[@]}" 2>/dev/null || true
    for p in "${HOG_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    HOG_PIDS=()
}
cold_starts() {
    curl -sS "${AUTH[@]}" "http://$H_ADDR/metrics" |
        awk '$1 ~ /^hearth_function_cold_starts_total/ { n += $2 } END { print n + 0 }'
}

RESULTS="$TMP/results"
: >"$RESULTS"
printf '%-8s %-7s %10s %9s %9s %7s %s\n' load server req/s p50_us p99_us errors starts
for round in $(seq 1 "$ROUNDS"); do
    for mode in quiet loaded; do
        [ "$mode" = loaded ] && hogs_on
        for server in hearth bare; do
            if [ $server = hearth ]; then url="http://$H_ADDR/f/$ID/"; else url="http://127.0.0.1:$BH_PORT/"; fi
            before=$(cold_starts)
            read -r rps p50 p99 errors _ < <(run_wrk "$DURATION" "$url")
            starts=-
            [ $server = hearth ] && starts=$(($(cold_starts) - before))
            printf '%-8s %-7s %10s %9s %9s %7s %s\n' "$mode" "$server" "$rps" "$p50" "$p99" "$errors" "$starts"
            echo "$mode $server $rps $p50 $p99 $starts" >>"$RESULTS"
        done
        [ "$mode" = loaded ] && hogs_off
    done
done
echo "# medians over $ROUNDS rounds (req/s, p50 us, p99 us, instance starts per run):"
for mode in quiet loaded; do
    for server in hearth bare; do
        awk -v m=$mode -v s=$server '$1 == m && $2 == s' "$RESULTS" >"$TMP/sel"
        printf '%-8s %-7s %10s %9s %9s %s\n' "$mode" "$server" \
            "$(awk '{ print $3 }' "$TMP/sel" | median)" "$(awk '{ print $4 }' "$TMP/sel" | median)" \
            "$(awk '{ print $5 }' "$TMP/sel" | median)" "$(awk '{ print $6 }' "$TMP/sel" | median)"
    done
done
echo "# load average at end: $(load)"
