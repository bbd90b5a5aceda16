#!/usr/bin/env bash
# Fuzzes the byte-level decoders an outsider can reach, every target for the given time:
#   http_parse  the HTTP/1.1 head parser and body decoder    (src/http/parse.rs)
#   multipart   the deploy form parser                       (src/control/multipart.rs)
#   zip_check   the deploy archive checks and extraction     (src/control/archive.rs)
#   frames      both frame decoders of the guest channel     (crates/protocol, agent/src/frames.rs)
#
# Usage: tools/fuzz.sh [seconds per target, default 60] [target...]
#
# Picks the first engine that works here, and says which:
#  1. cargo-fuzz on a nightly toolchain (`cargo +nightly fuzz run`, AddressSanitizer), when
#     both are installed;
#  2. libFuzzer built by the stable compiler: the fuzz/ crate with the coverage
#     instrumentation cargo-fuzz uses (sancov: inline 8-bit counters, pc table, compare
#     tracing), plus AddressSanitizer if RUSTC_BOOTSTRAP=1 lets stable take -Zsanitizer
#     (otherwise without it: Rust code is memory-safe, the sanitizer mostly guards unsafe code);
#  3. the property tests (tests/fuzz_props.rs) with PROPTEST_CASES raised to fill the time.
# Prints the runs (libFuzzer executions, or proptest cases) and libFuzzer's coverage (edges
# reached) per target. A crash stops with the
# failing input under fuzz/artifacts/<target>/ (reproduce: pass that file to the target binary
# or to `cargo +nightly fuzz run <target> <file>`). Runs under `nice -n 19`: the machine is
# shared. Corpora grow in fuzz/corpus/<target>/ (git-ignored) and are reused by later runs.
# FUZZ_ENGINE=cargo-fuzz|stable|proptest forces an engine.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECONDS_PER_TARGET=${1:-60}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(http_parse multipart zip_check frames)
die() { echo "fuzz: $*" >&2; exit 1; }
[[ "$SECONDS_PER_TARGET" =~ ^[0-9]+$ ]] && [ "$SECONDS_PER_TARGET" -gt 0 ] ||
    die "seconds must be a positive number, got '$SECONDS_PER_TARGET'"
cd "$ROOT/fuzz"
LOGS=$(mktemp -d /tmp/hearth-fuzz.XXXXXX)
trap 'rm -rf "$LOGS"' EXIT

# What cargo-fuzz passes to rustc for coverage-guided fuzzing (cargo-fuzz's BuildOptions).
SANCOV_FLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
STABLE_DIR="$ROOT/fuzz/target/stable"

have_cargo_fuzz() {
    rustup toolchain list 2>/dev/null | grep -q '^nightly' && cargo +nightly fuzz --version >/dev/null 2>&1
}

# Builds every target with the stable compiler; sets STABLE_BIN. ASan first, then without.
build_stable() {
    local host
    host=$(rustc -vV | sed -n 's/^host: //p')
    STABLE_BIN="$STABLE_DIR/$host/release"
    if RUSTC_BOOTSTRAP=1 RUSTFLAGS="$SANCOV_FLAGS -Zsanitizer=address" CARGO_TARGET_DIR="$STABLE_DIR" \
        nice -n 19 cargo +stable build --release --target "$host" --bins >"$LOGS/build" 2>&1; then
        SANITIZER="AddressSanitizer (RUSTC_BOOTSTRAP=1)"
    elif RUSTFLAGS="$SANCOV_FLAGS" CARGO_TARGET_DIR="$STABLE_DIR" \
        nice -n 19 cargo +stable build --release --target "$host" --bins >"$LOGS/build" 2>&1; then
        SANITIZER="none"
    else
        tail -20 "$LOGS/build" >&2
        return 1
    fi
}

ENGINE=${FUZZ_ENGINE:-}
if [ -z "$ENGINE" ]; then
    if have_cargo_fuzz; then ENGINE=cargo-fuzz; else ENGINE=stable; fi
fi
if [ "$ENGINE" = cargo-fuzz ] && ! nice -n 19 cargo +nightly fuzz build >"$LOGS/build" 2>&1; then
    tail -20 "$LOGS/build" >&2
    echo "fuzz: cargo-fuzz could not build the targets; trying the stable compiler" >&2
    ENGINE=stable
fi
if [ "$ENGINE" = stable ] && ! build_stable; then
    echo "fuzz: libFuzzer does not build with the stable compiler here; running the property tests" >&2
    ENGINE=proptest
fi
case "$ENGINE" in
cargo-fuzz) echo "fuzz: engine cargo-fuzz ($(cargo +nightly fuzz --version)), $(rustc +nightly --version)" ;;
stable) echo "fuzz: engine libFuzzer built by $(rustc +stable --version), sanitizer: $SANITIZER" ;;
proptest) echo "fuzz: engine proptest (tests/fuzz_props.rs), $(rustc --version)" ;;
*) die "FUZZ_ENGINE must be cargo-fuzz, stable or proptest" ;;
esac
echo "fuzz: ${SECONDS_PER_TARGET}s per target, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"

# Runs one libFuzzer target; prints its final line and leaves its log in $LOGS/<target>.
run_libfuzzer() { # target command...
    local target=$1
    shift
    mkdir -p "corpus/$target" "artifacts/$target"
    nice -n 19 "$@" -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="artifacts/$target/" "corpus/$target" \
        >"$LOGS/$target" 2>&1
}

# The proptest properties for a target (test name filters in tests/fuzz_props.rs).
proptest_filter() {
    case "$1" in
    http_parse) echo "body head_parser" ;;
    multipart) echo multipart ;;
    zip_check) echo zip ;;
    frames) echo "frame agent" ;;
    *) die "unknown target $1" ;;
    esac
}

# Runs the target's properties with PROPTEST_CASES doubling until they fill the time; prints
# the cases run, summed over the properties.
run_proptest() { # target
    local target=$1 cases=256 total=0 start now filters properties
    read -ra filters <<<"$(proptest_filter "$target")"
    (cd "$ROOT" && cargo test -q --test fuzz_props --no-run >/dev/null 2>&1) || die "tests/fuzz_props.rs does not build"
    start=$(date +%s)
    while :; do
        for f in "${filters[@]}"; do
            (cd "$ROOT" && PROPTEST_CASES=$cases nice -n 19 cargo test --test fuzz_props "$f" -- --test-threads 1) \
                >"$LOGS/$target.last" 2>&1 || { cat "$LOGS/$target.last" >>"$LOGS/$target"; return 1; }
            cat "$LOGS/$target.last" >>"$LOGS/$target"
            # Properties are the top-level tests (the agent modules' own unit tests have paths).
            properties=$(grep -c '^test [a-z0-9_]* \.\.\. ok$' "$LOGS/$target.last" || true)
            total=$((total + cases * properties))
        done
        now=$(date +%s)
        [ $((now - start)) -ge "$SECONDS_PER_TARGET" ] && break
        cases=$((cases * 2))
    done
    echo "$total"
}

FAILED=0
printf '%-12s %14s %10s %8s  %s\n' target runs seconds coverage result
for target in "${TARGETS[@]}"; do
    [ -f "fuzz_targets/$target.rs" ] || die "no target fuzz/fuzz_targets/$target.rs"
    : >"$LOGS/$target"
    start=$(date +%s)
    status=ok
    case "$ENGINE" in
    cargo-fuzz)
        run_libfuzzer "$target" cargo +nightly fuzz run "$target" -- || status=CRASH
        ;;
    stable)
        run_libfuzzer "$target" "$STABLE_BIN/$target" || status=CRASH
        ;;
    proptest)
        runs=$(run_proptest "$target") || status=FAIL
        ;;
    esac
    elapsed=$(($(date +%s) - start))
    cov=-
    if [ "$ENGINE" != proptest ]; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOGS/$target" | tail -1)
        # libFuzzer's last status line: "#<runs> DONE cov: <edges> ft: <features> corp: ...".
        cov=$(sed -n 's/.* cov: \([0-9]*\) .*/\1/p' "$LOGS/$target" | tail -1)
    fi
    if [ "$status" != ok ]; then
        FAILED=1
        echo "---- $target log (tail)" >&2
        tail -40 "$LOGS/$target" >&2
    fi
    printf '%-12s %14s %10s %8s  %s\n' "$target" "${runs:-?}" "$elapsed" "${cov:-?}" "$status"
done
if [ "$FAILED" = 1 ]; then
    echo "fuzz: failures above; crashing inputs are in fuzz/artifacts/<target>/" >&2
    exit 1
fi
