#!/usr/bin/env bash
# Restore-to-first-response of the Express app in the nested KVM host
# (tests/nested_kvm.rs boots L1 under QEMU/TCG once): Firecracker with the File
# memory backend (file-lazy: plain; file: the working set read ahead), Uffd
# served lazily, and Uffd with the working set installed before resume, and
# the QEMU backend (-accel kvm -M microvm) on the same L1: ROUNDS restores
# each, interleaved (hearth restarted with each backend, so every restore
# starts from no instance). HEARTH_NESTED_PERF_COLD=1 drops L1's page cache
# before each restore (a snapshot not restored lately).
# Absolute figures are emulation-bound (L1 and L2 run under TCG); compare ratios.
#
# Usage: perf/nested-restore.sh [ROUNDS]     (default 7)
# Prints the medians as a Markdown table; the full log goes to
# target/nested-restore.log.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-7}
log=target/nested-restore.log
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
HEARTH_NESTED_PERF=$rounds cargo test --release --test nested_kvm -- --nocapture >"$log" 2>&1 || {
  tail -n 60 "$log"; exit 1; }
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
grep -E '^perf: ' "$log"
echo '| backend | median restore to first response | vs file-lazy | each restore (ms) |'
echo '|---|---|---|---|'
grep -E '^perf-table: ' "$log" | sed 's/^perf-table: //'
grep -E '^perf-trace: ' "$log" | sed 's/^perf-trace: //' > target/nested-restore.trace || true
