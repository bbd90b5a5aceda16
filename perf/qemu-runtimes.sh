#!/usr/bin/env bash
# QEMU backend, runtimes other than Node.js: the microVM userland image (build
# time, size) beside the Node runtime image, deploy-to-ready of a `provided`
# (shell + curl) and a `python3` function, and restore-to-first-response of each
# against the Node plain fixture, through a real `hearth serve --backend qemu`.
#
# Usage: perf/qemu-runtimes.sh [--rounds N] [--cold N] [--no-build]
#
# Each round starts a server on a fresh state directory, so the Node runtime
# image and the userland image are built anew (the server logs how long the
# userland image took: collecting from the host, copying the tree, mkfs.ext4).
# `--keep-warm-ms 300` lets VMs expire, so each of --cold requests (1.5 s
# apart) restores a VM from the function's snapshot (curl's total time).
# Needs qemu-system-x86_64, the guest kernel (tools/fetch-kernel.sh), node,
# curl, python3 (/usr/bin/python3 is what the image carries).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=3
COLD=5
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --cold) COLD=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
for tool in qemu-system-x86_64 curl python3 node; do
    command -v "$tool" >/dev/null || { echo "qemu-runtimes: $tool is not installed" >&2; exit 1; }
done
if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release --bin hearth >&2 && tools/build-agent.sh release >/dev/null)
    "$ROOT/tools/fetch-kernel.sh" >/dev/null
fi
HEARTH="${CARGO_TARGET_DIR:-$ROOT/target}/release/hearth"
AGENT="$ROOT/target/x86_64-unknown-linux-gnu/release/hearth-agent"
[ -x "$HEARTH" ] && [ -f "$AGENT" ] || { echo "qemu-runtimes: build hearth and tools/build-agent.sh first" >&2; exit 1; }
export HEARTH_AGENT="$AGENT"

TMP=$(mktemp -d /tmp/hearth-qemu-runtimes.XXXXXX)
PID=
cleanup() {
    [ -n "$PID" ] && { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
    rm -rf "$TMP"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Zips of the three functions.
mkdir -p "$TMP/shell" "$TMP/py"
cat >"$TMP/shell/bootstrap" <<'EOF'
#!/bin/sh
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  H="$(mktemp)"
  curl -sS -D "$H" -o /dev/null "$API/invocation/next"
  ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$H" | tr -d '[:space:]' | cut -d: -f2)
  curl -s -o /dev/null -X POST "$API/invocation/$ID/response" -d '{"statusCode":200,"body":"ok"}'
  rm -f "$H"
done
EOF
chmod 755 "$TMP/shell/bootstrap"
printf 'def lambda_handler(event, context):\n    return {"statusCode": 200, "body": "ok"}\n' >"$TMP/py/lambda_function.py"
python3 - "$TMP" "$ROOT/tests/fixtures/plain" <<'EOF'
import os, sys, zipfile
tmp, plain = sys.argv[1], sys.argv[2]
for name, src in [("shell", f"{tmp}/shell"), ("py", f"{tmp}/py"), ("plain", plain)]:
    with zipfile.ZipFile(f"{tmp}/{name}.zip", "w") as z:
        for d, _, files in os.walk(src):
            for f in files:
                p = os.path.join(d, f)
                z.write(p, os.path.relpath(p, src))
EOF

# deploy ZIP QUERY : prints "id deploy_ms"
deploy() {
    curl -sS --max-time 600 -H 'authorization: Bearer perf-bench-admin-token' \
        -H 'content-type: application/zip' --data-binary "@$TMP/$1.zip" \
        "http://$ADDR/deploy?$2" |
        python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["functionId"], v["deploy_ms"])'
}

cold() { # ID -> one restore time per line into $TMP/cold-<id>
    for _ in $(seq "$COLD"); do
        sleep 1.5
        curl -s -o /dev/null -w '%{time_total}\n' "http://$ADDR/f/$1/"
    done
}

median() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.stdin.read().split()]; print(f"{statistics.median(v):.2f}" if v else "-")'; }

: >"$TMP/results"
for round in $(seq "$ROUNDS"); do
    p=$(port)
    ADDR="127.0.0.1:$p"
    "$HEARTH" serve --backend qemu --listen "$ADDR" --state-dir "$TMP/state-$round" --cores 1 \
        --keep-warm-ms 300 --admin-token perf-bench-admin-token >"$TMP/out" 2>"$TMP/err" &
    PID=$!
    for _ in $(seq 900); do grep -q 'listening on' "$TMP/out" 2>/dev/null && break; sleep 0.2; done
    grep -q 'listening on' "$TMP/out" || { cat "$TMP/err" >&2; exit 1; }
    read -r PLAIN PLAIN_MS < <(deploy plain "")
    read -r SHELL SHELL_MS < <(deploy shell "runtime=provided")
    read -r PY PY_MS < <(deploy py "runtime=python3")
    line=$(grep 'built the microVM userland image' "$TMP/err")
    build_ms=$(sed -n 's/.* in \([0-9]*\) ms:.*/\1/p' <<<"$line")
    files_mib=$(sed -n 's/.* \([0-9]*\) MiB of files.*/\1/p' <<<"$line")
    entries=$(sed -n 's/.*: \([0-9]*\) entries.*/\1/p' <<<"$line")
    du_mib() { du -m --apparent-size "$1" | cut -f1; }
    alloc_mib() { du -m "$1" | cut -f1; }
    node_img=$(ls "$TMP/state-$round"/cache/guest/runtime-*.ext4)
    user_img=$(ls "$TMP/state-$round"/cache/guest/userland-*.ext4)
    for id in "$PLAIN" "$SHELL" "$PY"; do cold "$id" >"$TMP/cold-$id"; done
    echo "round $round: userland image built in ${build_ms} ms (${entries} entries, ${files_mib} MiB of files," \
        "$(alloc_mib "$user_img") MiB on disk, $(du_mib "$user_img") MiB apparent); Node image" \
        "$(alloc_mib "$node_img") MiB on disk; deploy plain ${PLAIN_MS} ms, provided ${SHELL_MS} ms," \
        "python3 ${PY_MS} ms; restore-to-first-response medians (s): plain $(median <"$TMP/cold-$PLAIN")," \
        "provided $(median <"$TMP/cold-$SHELL"), python3 $(median <"$TMP/cold-$PY")"
    echo "$build_ms $(alloc_mib "$user_img") $(alloc_mib "$node_img") $PLAIN_MS $SHELL_MS $PY_MS" \
        "$(median <"$TMP/cold-$PLAIN") $(median <"$TMP/cold-$SHELL") $(median <"$TMP/cold-$PY")" >>"$TMP/results"
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
done
python3 - "$TMP/results" <<'EOF'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
cols = list(zip(*rows))
m = lambda i: statistics.median(cols[i])
print(f"medians of {len(rows)} rounds: userland image build {m(0):.0f} ms, {m(1):.0f} MiB on disk "
      f"(Node image {m(2):.0f} MiB); deploy plain {m(3)/1000:.1f} s, provided {m(4)/1000:.1f} s, "
      f"python3 {m(5)/1000:.1f} s; restore-to-first-response plain {m(6):.2f} s, "
      f"provided {m(7):.2f} s ({m(7)/m(6):.2f}x), python3 {m(8):.2f} s ({m(8)/m(6):.2f}x)")
EOF
