#!/usr/bin/env bash
# Is `hearth bench` fast enough not to be the bottleneck? Runs nginx serving a
# 2-byte answer (perf/nginx.conf) and drives it alternately with wrk and with
# `hearth bench` (closed loop), same connections, threads and duration; prints
# every round, then the medians and the hearth-bench/wrk throughput ratio.
#
# Usage: perf/bench-vs-wrk.sh [--rounds N] [--duration 5] [--threads 2]
#                             [--connections "10 256"] [--no-build]
#
# --duration is in seconds. Needs wrk, nginx and python3 (for ports and JSON).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=3
DURATION=5
THREADS=2
CONNECTIONS="10 256"
BUILD=1

while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

for tool in wrk nginx python3; do
    command -v "$tool" >/dev/null || { echo "bench-vs-wrk: $tool is not installed" >&2; exit 1; }
done
if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release --bin hearth >&2)
fi
HEARTH="${CARGO_TARGET_DIR:-$ROOT/target}/release/hearth"
[ -x "$HEARTH" ] || { echo "bench-vs-wrk: $HEARTH not built" >&2; exit 1; }

TMP=$(mktemp -d /tmp/hearth-bench-vs-wrk.XXXXXX)
NGINX_PID=
cleanup() {
    [ -n "$NGINX_PID" ] && kill -TERM "$NGINX_PID" 2>/dev/null && wait "$NGINX_PID" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$TMP/nginx/tmp"
sed "s/@PORT@/$PORT/" "$ROOT/perf/nginx.conf" >"$TMP/nginx/nginx.conf"
nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx/" -g 'daemon off;' 2>"$TMP/nginx/stderr" &
NGINX_PID=$!
URL="http://127.0.0.1:$PORT/healthz"
for _ in $(seq 1 100); do
    python3 -c "import urllib.request; urllib.request.urlopen('$URL', timeout=1)" 2>/dev/null && break
    sleep 0.1
done

# Each prints "req_per_s p50_us p99_us errors".
run_wrk() { # connections
    local out
    out=$(wrk -t"$THREADS" -c"$1" -d"${DURATION}s" --latency "$URL")
    python3 - "$out" <<'EOF'
import re, sys
out = sys.argv[1]
def us(v):
    n = float(re.match(r"[\d.]+", v).group())
    return n * {"us": 1, "ms": 1e3, "s": 1e6}[re.search(r"(us|ms|s)$", v).group()]
rps = re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)
p50 = us(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
p99 = us(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
errors += int(m.group(1)) if m else 0
print(rps, round(p50), round(p99), errors)
EOF
}
run_hearth() { # connections
    "$HEARTH" bench -t "$THREADS" -c "$1" --duration "${DURATION}s" --json "$URL" | python3 -c '
import json, sys
r = json.load(sys.stdin)["runs"][0]
e = r["errors"]
print(round(r["throughput_rps"], 2), r["latency_us"]["p50"], r["latency_us"]["p99"], sum(e.values()))'
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "# hearth bench vs wrk against nginx GET /healthz: -t$THREADS, ${DURATION}s runs, $ROUNDS alternating rounds"
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), kernel $(uname -r)"
echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure)"
echo "# $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); $(nginx -v 2>&1 | sed 's/^nginx version: //') worker_processes 2"

# Warm-up: one short run of each.
for c in $CONNECTIONS; do
    wrk -t"$THREADS" -c"$c" -d1s "$URL" >/dev/null
    "$HEARTH" bench -t "$THREADS" -c "$c" --duration 1s --json "$URL" >/dev/null
done

RESULTS="$TMP/results"
: >"$RESULTS"
printf '%-12s %5s %6s %12s %8s %8s %7s\n' tool conns round req/s p50_us p99_us errors
for round in $(seq 1 "$ROUNDS"); do
    for c in $CONNECTIONS; do
        # Alternate which tool goes first, so drift in the machine's load hits both alike.
        if [ $((round % 2)) = 1 ]; then order="wrk hearth"; else order="hearth wrk"; fi
        for tool in $order; do
            read -r rps p50 p99 errors < <("run_$tool" "$c")
            name=$tool; [ "$tool" = hearth ] && name=hearth-bench
            printf '%-12s %5s %6s %12s %8s %8s %7s\n' "$name" "$c" "$round" "$rps" "$p50" "$p99" "$errors"
            echo "$tool $c $rps $p50 $p99" >>"$RESULTS"
        done
    done
done

echo
echo "# load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "## Medians of $ROUNDS rounds"
echo
echo "| conns | wrk req/s | hearth bench req/s | ratio | wrk p50 µs | hearth bench p50 µs | wrk p99 µs | hearth bench p99 µs |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
for c in $CONNECTIONS; do
    pick() { awk -v t="$1" -v c="$c" -v f="$2" '$1 == t && $2 == c { print $f }' "$RESULTS" | median; }
    awk -v c="$c" -v wr="$(pick wrk 3)" -v hr="$(pick hearth 3)" -v w5="$(pick wrk 4)" \
        -v h5="$(pick hearth 4)" -v w9="$(pick wrk 5)" -v h9="$(pick hearth 5)" 'BEGIN {
        printf "| %d | %.0f | %.0f | %.2f× | %.0f | %.0f | %.0f | %.0f |\n", c, wr, hr, hr / wr, w5, h5, w9, h9
    }'
done
