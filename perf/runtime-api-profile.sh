#!/usr/bin/env bash
# Where one Runtime-API request's cost goes in the guest agent, per request: its CPU time
# (/proc/<pid>/schedstat), wake-ups (voluntary context switches, /proc/<pid>/status) and
# system calls by name (`perf record` of the raw_syscalls and sched_switch tracepoints),
# for one agent binary serving the trivial Rust `lambda_runtime` function
# (tests/fixtures/rust-lambda, bin runtime-fn) on one hearth (`--cores 1`) under
# `wrk -t1 -c1`; also the bootstrap's and hearth's CPU time. The counts depend on the machine's load
# far less than the CPU time does, and the CPU time less than throughput does.
#
# Usage: perf/runtime-api-profile.sh AGENT [--duration 5s] [--syscalls] [--record FILE]
#   --syscalls     a second wrk run under `perf record` of the syscall tracepoints
#   --record FILE  a third run under `perf record -e cpu-clock -g` of the agent (FILE.data)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] || { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
AGENT=$(realpath "$1")
shift
DURATION=5s
SYSCALLS=0
RECORD=
while [ $# -gt 0 ]; do
    case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --syscalls) SYSCALLS=1; shift ;;
    --record) RECORD=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
die() { echo "runtime-api-profile: $*" >&2; exit 1; }
BUILD=0
WRK_THREADS=1
WRK_CONNS=1
# shellcheck source=functions/lib.sh
. "$ROOT/perf/functions/lib.sh"
bench_prepare wrk curl zip
RUST_FN="${CARGO_TARGET_DIR:-$ROOT/target}/rust-lambda-fixture/x86_64-unknown-linux-gnu/release/runtime-fn"
[ -x "$RUST_FN" ] || die "$RUST_FN is not built (run perf/runtime-api-bench.sh or tests/rust_clients.rs)"
TMP=$(mktemp -d /tmp/hearth-rapiprof.XXXXXX)
mkdir -p "$TMP/rust"
cp "$RUST_FN" "$TMP/rust/bootstrap"
(cd "$TMP/rust" && zip -q "$TMP/rust.zip" bootstrap)

# The relay process is what is profiled: hearth serves the API itself by default.
HEARTH_AGENT=$AGENT start_hearth S --cores 1 --keep-warm-ms 600000 --runtime-api-relay
ADDR=$REPLY
out=$(curl -sS -X POST -H 'content-type: application/zip' "${AUTH[@]}" --data-binary "@$TMP/rust.zip" \
    "http://$ADDR/deploy?runtime=provided")
id=$(grep -o '"functionId": *"[^"]*"' <<<"$out" | sed 's/.*"\([^"]*\)"$/\1/')
[ -n "$id" ] || die "deploy failed: $out"
URL="http://$ADDR/f/$id/"
run_wrk 2s "$URL" >/dev/null
# The one warm instance's `--runtime-api` agent (wrk -c1 keeps a single instance busy).
agent_pid() {
    local p
    for p in $(tree "$S_PID"); do
        if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -e '--runtime-api'; then echo "$p"; fi
    done
}
PIDS_A=$(agent_pid | tr '\n' ' ')
[ -n "$PIDS_A" ] || die "no --runtime-api agent running"
sum() { # field-printer over every agent pid
    local p t=0
    for p in $PIDS_A; do t=$((t + $("$@" "$p"))); done
    echo "$t"
}
# Time on a CPU (ns) of every thread of process $1.
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ t += $1 } END { printf "%.0f\n", t }'; }
# The runtime processes (the bootstrap) the agents started.
PIDS_R=$(for p in $PIDS_A; do tree "$p" | tail -n +2; done | tr '\n' ' ')
vcs() { awk '$1 == "voluntary_ctxt_switches:" { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
ivcs() { awk '$1 == "nonvoluntary_ctxt_switches:" { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
echo "# agent $AGENT (pids $PIDS_A), wrk -t1 -c1 -d$DURATION, load at start $(load)"
sum_r() { local p t=0; for p in $PIDS_R; do t=$((t + $(cpu_ns "$p"))); done; echo "$t"; }
c0=$(sum cpu_ns); v0=$(sum vcs); i0=$(sum ivcs); r0=$(sum_r); h0=$(cpu_ns "$S_PID")
read -r rps p50 p99 errors _ <<<"$(run_wrk "$DURATION" "$URL")"
c1=$(sum cpu_ns); v1=$(sum vcs); i1=$(sum ivcs); r1=$(sum_r); h1=$(cpu_ns "$S_PID")
n=$(awk -v r="$rps" -v s="${DURATION%s}" 'BEGIN { printf "%d", r * s }')
awk -v n="$n" -v c="$((c1 - c0))" -v v="$((v1 - v0))" -v i="$((i1 - i0))" -v r="$rps" -v p50="$p50" -v p99="$p99" -v e="$errors" -v b="$((r1 - r0))" -v h="$((h1 - h0))" 'BEGIN {
    printf "req/s %s  p50 %s us  p99 %s us  errors %s\n", r, p50, p99, e
    printf "per request: agent CPU %.2f us, voluntary switches %.2f, involuntary %.2f\n", c / n / 1000, v / n, i / n
    printf "per request: runtime (bootstrap) CPU %.2f us\n", b / n / 1000
    printf "per request: hearth CPU %.2f us (all its threads: the HTTP of wrk and the instance channel)\n", h / n / 1000 }'
echo "load at end $(load)"
if [ "$SYSCALLS" = 1 ]; then
    # Tracepoints, not strace: the agent runs at nearly its own pace, so the counts are
    # those of the untraced run (strace's stops give the bootstrap time it never has).
    perf record -q -e raw_syscalls:sys_enter -e sched:sched_switch -p "$(echo $PIDS_A | tr ' ' ',')" \
        -o "$TMP/sc.data" -- sleep "$((${DURATION%s} + 2))" >/dev/null 2>&1 &
    tracer=$!
    sleep 1 # perf attaches
    read -r rps _ <<<"$(run_wrk "$DURATION" "$URL")"
    wait "$tracer" || true
    n=$(awk -v r="$rps" -v s="${DURATION%s}" 'BEGIN { printf "%d", r * s }')
    echo "# system calls and switches of the agent over $n requests (traced run: $rps req/s)"
    perf script -i "$TMP/sc.data" 2>/dev/null | awk -v n="$n" '
        BEGIN { split("0 read 1 write 3 close 7 poll 16 ioctl 20 writev 24 sched_yield 44 sendto " \
            "45 recvfrom 54 setsockopt 61 wait4 232 epoll_wait 233 epoll_ctl 281 epoll_pwait " \
            "288 accept4 318 getrandom", m, " "); for (i = 1; i < length(m); i += 2) name[m[i]] = m[i + 1] }
        / raw_syscalls:sys_enter: / { for (i = 1; i <= NF; i++) if ($i == "NR") nr = $(i + 1)
            c[nr in name ? name[nr] : "nr" nr]++; t++ }
        / sched:sched_switch: / { if ($0 ~ /prev_state=R/) inv++; else vol++ }
        END { for (k in c) printf "%-14s %8.2f / request\n", k, c[k] / n
            printf "%-14s %8.2f / request\n", "total", t / n
            printf "switches out: %.2f / request asleep (wake-ups), %.2f preempted\n", vol / n, inv / n }' | sort -k2 -rn
fi
if [ -n "$RECORD" ]; then
    perf record -e cpu-clock -g -p "$(echo $PIDS_A | tr ' ' ',')" -o "$RECORD.data" -- sleep "${DURATION%s}" >/dev/null 2>&1 &
    rec=$!
    run_wrk "$DURATION" "$URL" >/dev/null
    wait "$rec" || true
    echo "# perf data: $RECORD.data (perf report -i $RECORD.data --no-children)"
fi
