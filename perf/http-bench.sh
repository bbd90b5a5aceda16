#!/usr/bin/env bash
# HTTP engine benchmark: hearth's GET /healthz against nginx serving the same
# 2-byte answer (perf/nginx.conf), both with 2 workers, driven by wrk.
#
# Usage: perf/http-bench.sh [--io uring|epoll|both] [--rounds N] [--duration 10s]
#                           [--connections "10 256"] [--no-build]
#
# For each I/O mode: starts `hearth serve --cores 2` (release build) and nginx
# side by side, warms both up, then for each round and connection count runs
# wrk on hearth and then on nginx (alternating, so drift hits both alike).
# Prints every run (req/s, p50, p99, server CPU time per request), then the
# medians and hearth/nginx ratios, plus hearth's idle RSS.
# Needs wrk, nginx and python3 (to pick free ports).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
IO_MODES="uring epoll"
ROUNDS=3
DURATION=10s
CONNECTIONS="10 256"
WRK_THREADS=2
CORES=2
BUILD=1

while [ $# -gt 0 ]; do
    case "$1" in
    --io)
        case "$2" in
        both) IO_MODES="uring epoll" ;;
        uring | epoll) IO_MODES="$2" ;;
        *) echo "--io takes uring, epoll or both" >&2; exit 2 ;;
        esac
        shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

for tool in wrk nginx python3; do
    command -v "$tool" >/dev/null || { echo "http-bench: $tool is not installed" >&2; exit 1; }
done

if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release --bin hearth >&2)
fi
HEARTH="${CARGO_TARGET_DIR:-$ROOT/target}/release/hearth"
[ -x "$HEARTH" ] || { echo "http-bench: $HEARTH not built" >&2; exit 1; }

# The process backend builds a runtime root holding the agent at start-up; no
# function runs here, so any file will do when the static agent is not built.
AGENT="$ROOT/target/x86_64-unknown-linux-gnu/release/hearth-agent"
[ -f "$AGENT" ] || AGENT=/usr/bin/true

TMP=$(mktemp -d /tmp/hearth-bench.XXXXXX)
HEARTH_PID=
NGINX_PID=
cleanup() {
    for pid in $HEARTH_PID $NGINX_PID; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $HEARTH_PID $NGINX_PID; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() { # url
    for _ in $(seq 1 100); do
        if python3 - "$1" <<'EOF' 2>/dev/null; then return 0; fi
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=1).read()
EOF
        sleep 0.1
    done
    echo "http-bench: $1 did not come up" >&2
    exit 1
}

# Resident set of a process and its children, KiB.
rss_kib() { # pid...
    local total=0 pid kib
    for pid in "$@"; do
        kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + ${kib:-0}))
    done
    echo "$total"
}

start_nginx() {
    local port
    port=$(free_port)
    mkdir -p "$TMP/nginx/tmp"
    sed "s/@PORT@/$port/" "$ROOT/perf/nginx.conf" >"$TMP/nginx/nginx.conf"
    nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx/" -g 'daemon off;' 2>"$TMP/nginx/stderr" &
    NGINX_PID=$!
    NGINX_URL="http://127.0.0.1:$port/healthz"
    wait_for "$NGINX_URL"
}

start_hearth() { # io mode
    local state="$TMP/hearth-$1"
    mkdir -p "$state"
    HEARTH_AGENT="$AGENT" "$HEARTH" serve --listen 127.0.0.1:0 --state-dir "$state/state" \
        --cores "$CORES" --io "$1" >"$state/stdout" 2>"$state/stderr" &
    HEARTH_PID=$!
    local addr=
    for _ in $(seq 1 300); do
        addr=$(sed -n 's|^hearth: listening on http://||p' "$state/stdout")
        [ -n "$addr" ] && break
        kill -0 "$HEARTH_PID" 2>/dev/null || { cat "$state/stderr" >&2; exit 1; }
        sleep 0.1
    done
    [ -n "$addr" ] || { echo "http-bench: hearth did not start" >&2; cat "$state/stderr" >&2; exit 1; }
    HEARTH_URL="http://$addr/healthz"
    wait_for "$HEARTH_URL"
}

stop_hearth() {
    local status=0
    kill -TERM "$HEARTH_PID"
    wait "$HEARTH_PID" 2>/dev/null || status=$?
    [ "$status" = 0 ] || echo "http-bench: hearth exited with status $status" >&2
    HEARTH_PID=
}

# Latency text from wrk (e.g. 412.00us, 1.20ms, 2.00s) in microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) print n
        else if (v ~ /ms$/) print n * 1000
        else if (v ~ /s$/) print n * 1000000
        else print n
    }'
}

# CPU time (user + system) used so far by the given processes, in clock ticks.
cpu_ticks() { # pid...
    local pid total=0
    for pid in "$@"; do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
    done
    echo "$total"
}

# Runs wrk; prints "req_per_s p50_us p99_us errors cpu_us_per_request", the last
# from the CPU time the server processes (remaining arguments) used meanwhile:
# a measure of the server's own cost that contention for the cores skews less
# than throughput does.
run_wrk() { # url connections duration server-pid...
    local out rps p50 p99 errors requests cpu_before cpu_after
    local url=$1 conns=$2 duration=$3
    shift 3
    cpu_before=$(cpu_ticks "$@")
    out=$(wrk -t"$WRK_THREADS" -c"$conns" -d"$duration" --latency "$url")
    cpu_after=$(cpu_ticks "$@")
    requests=$(awk '/ requests in / { print $1 }' <<<"$out")
    rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    p50=$(to_us "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99=$(to_us "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    errors=$(awk '/Non-2xx or 3xx responses:/ { n += $NF } /Socket errors:/ {
        for (i = 3; i <= NF; i += 2) n += $(i + 1) } END { print n + 0 }' <<<"$out")
    awk -v r="$rps" -v p50="$p50" -v p99="$p99" -v e="$errors" -v n="$requests" \
        -v t=$((cpu_after - cpu_before)) -v hz="$(getconf CLK_TCK)" \
        'BEGIN { printf "%s %s %s %s %.2f\n", r, p50, p99, e, (n > 0 ? t / hz * 1e6 / n : 0) }'
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "# hearth HTTP engine vs nginx: GET /healthz, wrk -t$WRK_THREADS -d$DURATION --latency"
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), kernel $(uname -r)"
echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure)"
echo "# hearth $("$HEARTH" --version | awk '{ print $2 }') --cores $CORES; $(nginx -v 2>&1 | sed 's/^nginx version: //') worker_processes 2"

start_nginx
RESULTS="$TMP/results"
: >"$RESULTS"
for io in $IO_MODES; do
    start_hearth "$io"
    sleep 1
    echo
    echo "## --io $io: hearth idle RSS $(rss_kib "$HEARTH_PID") KiB" \
        "(nginx master + workers: $(rss_kib "$NGINX_PID" $(pgrep -P "$NGINX_PID" | tr '\n' ' ')) KiB)"
    NGINX_WORKERS=$(pgrep -P "$NGINX_PID" | tr '\n' ' ')
    for c in $CONNECTIONS; do
        run_wrk "$HEARTH_URL" "$c" 2s "$HEARTH_PID" >/dev/null
        run_wrk "$NGINX_URL" "$c" 2s $NGINX_WORKERS >/dev/null
    done
    printf '%-6s %-6s %5s %6s %12s %9s %9s %7s %11s\n' io server conns round req/s p50_us p99_us errors cpu_us/req
    for round in $(seq 1 "$ROUNDS"); do
        for c in $CONNECTIONS; do
            for server in hearth nginx; do
                if [ "$server" = hearth ]; then
                    read -r rps p50 p99 errors cpu < <(run_wrk "$HEARTH_URL" "$c" "$DURATION" "$HEARTH_PID")
                else
                    read -r rps p50 p99 errors cpu < <(run_wrk "$NGINX_URL" "$c" "$DURATION" $NGINX_WORKERS)
                fi
                printf '%-6s %-6s %5s %6s %12s %9s %9s %7s %11s\n' "$io" "$server" "$c" "$round" "$rps" "$p50" "$p99" "$errors" "$cpu"
                echo "$io $server $c $rps $p50 $p99 $cpu" >>"$RESULTS"
            done
        done
    done
    stop_hearth
done

echo
echo "# load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "## Medians of $ROUNDS rounds"
echo
echo "| io | conns | hearth req/s | nginx req/s | ratio | hearth p50 µs | nginx p50 µs | hearth p99 µs | nginx p99 µs | p99 ratio | hearth CPU µs/req | nginx CPU µs/req |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for io in $IO_MODES; do
    for c in $CONNECTIONS; do
        pick() { awk -v io="$io" -v s="$1" -v c="$c" -v f="$2" '$1 == io && $2 == s && $3 == c { print $f }' "$RESULTS" | median; }
        h_rps=$(pick hearth 4); n_rps=$(pick nginx 4)
        h_p50=$(pick hearth 5); n_p50=$(pick nginx 5)
        h_p99=$(pick hearth 6); n_p99=$(pick nginx 6)
        h_cpu=$(pick hearth 7); n_cpu=$(pick nginx 7)
        awk -v io="$io" -v c="$c" -v hr="$h_rps" -v nr="$n_rps" -v h5="$h_p50" -v n5="$n_p50" \
            -v h9="$h_p99" -v n9="$n_p99" -v hc="$h_cpu" -v nc="$n_cpu" 'BEGIN {
            printf "| %s | %d | %.0f | %.0f | %.2f× | %.0f | %.0f | %.0f | %.0f | %.2f× | %.2f | %.2f |\n",
                io, c, hr, nr, hr / nr, h5, n5, h9, n9, h9 / n9, hc, nc
        }'
    done
done
