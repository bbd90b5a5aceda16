#!/usr/bin/env bash
# QEMU backend benchmark: cold start from a snapshot, deploy time, and warm
# invokes beside the process backend, all through a real `hearth serve`.
#
# Usage: perf/qemu-bench.sh [--cold N] [--deploys N] [--duration 10s] [--no-build]
#
# 1. restore-to-first-response: `--keep-warm-ms 300` lets every VM expire, so
#    each of N requests (1.5 s apart) restores a VM from the plain fixture's
#    snapshot; curl's total time per request (QEMU start, device state load,
#    HELLO/READY, the invoke).
# 2. deploy-to-ready of the Express app (tests/fixtures/express-app, after
#    `npm ci` there): the deploy_ms hearth reports (unzip, code image, template
#    boot under QEMU, handler load, snapshot), N deploys.
# 3. warm invokes of the plain fixture: wrk -t1 -c1 (latency) and -t2 -c4
#    (throughput), on --backend qemu and --backend process.
# Needs qemu-system-x86_64, the guest kernel (tools/fetch-kernel.sh), node,
# curl, wrk, python3, and root for the process backend.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
COLD=20
DEPLOYS=3
DURATION=10s
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
    --cold) COLD=$2; shift 2 ;;
    --deploys) DEPLOYS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
for tool in qemu-system-x86_64 curl wrk python3 node; do
    command -v "$tool" >/dev/null || { echo "qemu-bench: $tool is not installed" >&2; exit 1; }
done

if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release --bin hearth >&2 && tools/build-agent.sh release >/dev/null)
    "$ROOT/tools/fetch-kernel.sh" >/dev/null
fi
HEARTH="${CARGO_TARGET_DIR:-$ROOT/target}/release/hearth"
AGENT="$ROOT/target/x86_64-unknown-linux-gnu/release/hearth-agent"
[ -x "$HEARTH" ] && [ -f "$AGENT" ] || { echo "qemu-bench: build hearth and tools/build-agent.sh first" >&2; exit 1; }
export HEARTH_AGENT="$AGENT"

TMP=$(mktemp -d /tmp/hearth-qemu-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start NAME ARGS... : starts a server, sets ADDR
start() {
    local name=$1; shift
    local p; p=$(port)
    "$HEARTH" serve --listen "127.0.0.1:$p" --state-dir "$TMP/$name" --cores 2 \
        --admin-token perf-bench-admin-token "$@" \
        >"$TMP/$name.out" 2>"$TMP/$name.err" &
    PIDS+=($!)
    for _ in $(seq 600); do
        grep -q 'listening on' "$TMP/$name.out" 2>/dev/null && break
        sleep 0.2
    done
    grep -q 'listening on' "$TMP/$name.out" || { cat "$TMP/$name.err" >&2; exit 1; }
    ADDR="127.0.0.1:$p"
}

# deploy FIXTURE : prints "id deploy_ms"
deploy() {
    (cd "$ROOT/tests/fixtures/$1" && python3 - "$ADDR" <<'EOF'
import io, json, os, sys, urllib.request, zipfile
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
    for d, _, files in os.walk("."):
        for f in files:
            z.write(os.path.join(d, f))
req = urllib.request.Request(f"http://{sys.argv[1]}/deploy", data=buf.getvalue(),
                             headers={"content-type": "application/zip",
                                      "authorization": "Bearer perf-bench-admin-token"})
v = json.load(urllib.request.urlopen(req, timeout=600))
print(v["functionId"], v["deploy_ms"])
EOF
    )
}

stats() { python3 -c '
import sys
v = sorted(float(x) for x in sys.stdin.read().split())
q = lambda p: v[min(len(v) - 1, int(p * len(v)))]
print(f"n={len(v)} p50={q(0.5):.3f} p90={q(0.9):.3f} min={v[0]:.3f} max={v[-1]:.3f}")'; }

wrk_line() { # URL THREADS CONNS
    wrk -t"$2" -c"$3" -d"$DURATION" --latency "$1" | python3 -c '
import re, sys
t = sys.stdin.read()
rps = re.search(r"Requests/sec:\s+([\d.]+)", t).group(1)
lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", t, re.M))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
p50, p99 = lat.get("50"), lat.get("99")
extra = f"  NON-2XX {errs.group(1)}" if errs else ""
print(f"{float(rps):9.0f} req/s  p50 {p50}  p99 {p99}{extra}")'
}

echo "== qemu backend ($(qemu-system-x86_64 --version | head -1))"
start qemu --backend qemu --keep-warm-ms 300
grep -o 'accel [a-z]*' "$TMP/qemu.err" | head -1 | sed 's/^/   /'
read -r PLAIN PLAIN_MS < <(deploy plain)
echo "deploy plain: ${PLAIN_MS} ms"
: >"$TMP/cold"
for _ in $(seq "$COLD"); do
    sleep 1.5
    curl -s -o /dev/null -w '%{time_total}\n' "http://$ADDR/f/$PLAIN/" >>"$TMP/cold"
done
echo "restore-to-first-response (s): $(stats <"$TMP/cold")"

if [ -d "$ROOT/tests/fixtures/express-app/node_modules" ]; then
    : >"$TMP/deploys"
    for _ in $(seq "$DEPLOYS"); do
        read -r APP MS < <(deploy express-app)
        echo "$(echo "$MS" | awk '{print $1/1000}')" >>"$TMP/deploys"
    done
    echo "deploy-to-ready express-app (s): $(stats <"$TMP/deploys")"
    : >"$TMP/cold-express"
    for _ in $(seq 5); do
        sleep 1.5
        curl -s -o /dev/null -w '%{time_total}\n' "http://$ADDR/f/$APP/" >>"$TMP/cold-express"
    done
    echo "restore-to-first-response express-app (s): $(stats <"$TMP/cold-express")"
else
    echo "express-app skipped: run npm ci in tests/fixtures/express-app"
fi

curl -s -o /dev/null "http://$ADDR/f/$PLAIN/"
echo "warm plain, qemu  (1 conn):   $(wrk_line "http://$ADDR/f/$PLAIN/" 1 1)"
# Memory per VM, sampled halfway through the next run (idle VMs expire after
# 300 ms): private memory (RssAnon) and pages shared through the RAM file's
# page cache (RssFile).
(
    sleep "$(( ${DURATION%s} / 2 ))"
    for p in $(pgrep -f "qemu-system-x86_64.*$TMP/qemu"); do
        awk '/^RssAnon|^RssFile/ {printf "%s %d MiB  ", $1, $2/1024}' "/proc/$p/status"
        echo
    done >"$TMP/rss"
) &
echo "warm plain, qemu  (4 conns):  $(wrk_line "http://$ADDR/f/$PLAIN/" 2 4)"
wait $!
sed 's/^/   VM: /' "$TMP/rss"


echo "== process backend"
start process --backend process
read -r PPLAIN PMS < <(deploy plain)
echo "deploy plain: ${PMS} ms"
curl -s -o /dev/null "http://$ADDR/f/$PPLAIN/"
echo "warm plain, process (1 conn):  $(wrk_line "http://$ADDR/f/$PPLAIN/" 1 1)"
echo "warm plain, process (4 conns): $(wrk_line "http://$ADDR/f/$PPLAIN/" 2 4)"
