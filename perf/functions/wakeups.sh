#!/usr/bin/env bash
# Who wakes whom, per request: runs wrk against URL and, for 3 s in the middle
# of the run, records the scheduler's wake-ups and context switches and the
# reschedule IPIs on all CPUs (`perf record -a`, tracepoints), then prints per
# request: wake-ups by waker -> wakee command and whether the wakee was on the
# waker's CPU or another one, switches out per command, IPIs per CPU. Command
# names lose trailing digits (hearth-w0 and hearth-w1 count together).
#
# The tracepoints cost: throughput under this script is lower than without it
# (on the 2026-12-03 VM hearth lost more than the floor proxy), so read the
# counts, not the req/s, and compare servers with floor.sh or ab.sh.
#
# Usage: perf/functions/wakeups.sh URL [WRK_ARGS...]
#        (default wrk arguments: -t2 -c10; e.g. `-t1 -c10 -s perf/functions/post-greet.lua`)
# Needs root, perf and wrk; the server must be running and warm.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
url=$1
shift
[ $# -gt 0 ] || set -- -t2 -c10
for tool in perf wrk python3; do
    command -v "$tool" >/dev/null || { echo "wakeups: needs $tool" >&2; exit 1; }
done
tmp=$(mktemp -d /tmp/hearth-wakeups.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
wrk -d7s "$@" "$url" >"$tmp/wrk.txt" &
wrk_pid=$!
sleep 2
perf record -q -o "$tmp/perf.data" -a \
    -e sched:sched_wakeup,sched:sched_switch,irq_vectors:reschedule_entry \
    -- sleep 3 2>/dev/null
wait "$wrk_pid"
rps=$(awk '/Requests\/sec/ { print $2 }' "$tmp/wrk.txt")
echo "wrk: $rps req/s over the whole run"
perf script -i "$tmp/perf.data" -F comm,cpu,event,trace 2>/dev/null >"$tmp/script.txt"
python3 - "$rps" "$tmp/script.txt" <<'PY'
import collections, re, sys

requests = float(sys.argv[1]) * 3  # the recording's 3 s
strip = lambda comm: re.sub(r"\d+$", "", comm)
wakes, switches, ipis = collections.Counter(), collections.Counter(), collections.Counter()
for line in open(sys.argv[2]):
    m = re.match(r"\s*(\S.*?)\s+\[(\d+)\]\s+(\S+):\s*(.*)", line)
    if not m:
        continue
    comm, cpu, event, trace = m.groups()
    if event.endswith("sched_wakeup"):
        t = re.search(r"comm=(\S+).*target_cpu=(\d+)", trace)
        where = "same CPU" if int(t.group(2)) == int(cpu) else "other CPU"
        wakes[(strip(comm), strip(t.group(1)), where)] += 1
    elif event.endswith("sched_switch"):
        switches[strip(comm)] += 1
    else:
        ipis[int(cpu)] += 1
print(f"per request (~{requests:.0f} requests while recording):")
print("wake-ups, waker -> wakee:")
for (waker, wakee, where), n in wakes.most_common(12):
    if n / requests >= 0.005:
        print(f"  {n / requests:6.3f}  {waker} -> {wakee} ({where})")
print("switches out:")
for comm, n in switches.most_common(8):
    if n / requests >= 0.005:
        print(f"  {n / requests:6.3f}  {comm}")
print("reschedule IPIs received:")
for cpu, n in sorted(ipis.items()):
    print(f"  {n / requests:6.3f}  CPU {cpu}")
PY
