#!/usr/bin/env bash
# Instructions hearth's own user space executes per request, counted by
# valgrind's callgrind: load-independent (the same binary and inputs give the
# same counts, whatever else the machine does), so it compares builds on a
# noisy machine where timings cannot. Kernel time, which dominates hearth's
# per-request CPU (perf/functions/cpu-split.sh), is not counted.
#
# Starts `hearth serve --io epoll --cores 1` under callgrind (sandbox launchers
# run natively: HEARTH_LAUNCHER_EXE), deploys the function, warms it with 200
# requests, zeroes the counters, sends N requests on one keep-alive
# connection, dumps, and prints instructions per request and the top
# functions by their own count.
#
# Usage: perf/callgrind-request.sh trivial|express [N] [HEARTH_BINARY]
#   (default N 2000; binary target/release/hearth). Needs valgrind.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
which=${1:?trivial or express}
n=${2:-2000}
H=$(readlink -f "${3:-$ROOT/target/release/hearth}")
case "$which" in
trivial) dir=$ROOT/perf/functions/trivial path=/ method=GET body= ;;
express) dir=$ROOT/tests/fixtures/express-app path=/greet method=POST body='{"name":"John Doe"}' ;;
*) echo "callgrind-request: trivial or express" >&2; exit 2 ;;
esac
command -v valgrind >/dev/null || { echo "callgrind-request: needs valgrind" >&2; exit 1; }
work=$(mktemp -d /tmp/hearth-callgrind.XXXXXX)
port=$((39000 + RANDOM % 1000))
cd "$work"
export HEARTH_AGENT=${HEARTH_AGENT:-$ROOT/target/x86_64-unknown-linux-gnu/release/hearth-agent}
HEARTH_LAUNCHER_EXE=$H valgrind --tool=callgrind --trace-children=no \
  "$H" serve --listen 127.0.0.1:$port --state-dir ./state --io epoll --cores 1 --no-standby \
  >serve.log 2>&1 &
vg=$!
trap 'kill $vg 2>/dev/null; wait $vg 2>/dev/null; [ -n "${KEEP:-}" ] && cp callgrind.out.*.* "$KEEP"/ 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 120); do curl -sf -o /dev/null http://127.0.0.1:$port/healthz && break; sleep 1; done
id=$("$H" deploy "$dir" --server 127.0.0.1:$port --state-dir ./state 2>/dev/null | grep -o '"[0-9a-f]\{16\}"' | head -1 | tr -d '"')
[ -n "$id" ] || { echo "callgrind-request: deploy failed" >&2; tail serve.log >&2; exit 1; }
drive() {
  python3 - "$id" "$path" "$method" "$body" "$1" "$port" <<'PY'
import sys, http.client
id, path, method, body, n, port = sys.argv[1:]
c = http.client.HTTPConnection("127.0.0.1", int(port))
for _ in range(int(n)):
    c.request(method, f"/f/{id}{path}", body=body.encode() or None,
              headers={"content-type": "application/json"})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
}
drive 200
callgrind_control -z "$vg" >/dev/null
drive "$n"
callgrind_control -d "$vg" >/dev/null
sleep 1
out=$(ls -t callgrind.out.*.* | head -1)
total=$(grep '^summary:' "$out" | awk '{print $2}')
echo "$which: $n requests, $total instructions in hearth's user space, $((total / n)) per request"
callgrind_annotate --threshold=100 --auto=no --inclusive=no "$out" 2>/dev/null \
  | grep -E "^ *[0-9,]+ \(" | grep -vE "PROGRAM TOTALS|\((100\.0|99\.[0-9]+)%\)" | head -15 | cut -c1-160
