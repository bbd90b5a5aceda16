# Shared by the function benchmarks (perf/functions-bench.sh, perf/ab.sh,
# perf/functions/one-core.sh, perf/functions/concurrency-one.sh,
# perf/functions/floor.sh and others): checks and build, starting and stopping
# servers, deploying, running wrk, medians. Expects ROOT (the repository), a
# `die` function, and before servers start HEARTH (the binary), TMP (a
# scratch dir) and WRK_THREADS / WRK_CONNS; defines PIDS and an EXIT trap
# that stops every server started here and removes TMP.
# shellcheck shell=bash

PIDS=()
# Stops servers started here: TERM (hearth kills its instances), KILL after 10 s.
stop() { # pid...
    local pid left
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    for _ in $(seq 1 100); do
        left=
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && left=1; done
        [ -z "$left" ] && break
        sleep 0.1
    done
    kill -KILL "$@" 2>/dev/null || true
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}
cleanup() {
    stop "${PIDS[@]}"
    [ -z "${TMP:-}" ] || rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- helpers

# Options of the round-based benchmarks: --rounds N, --duration D, --no-build
# (into ROUNDS, DURATION, BUILD; the caller sets the defaults) and --help
# (prints the script's header comment, lines 2 to $USAGE_LINES).
round_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h | --help) sed -n "2,${USAGE_LINES}p" "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
        esac
    done
}

# Arguments of the A/B scripts: "A_BINARY B_BINARY [--option value]...
# [-- SERVE_FLAGS...]". Sets A_BIN and B_BIN (absolute, executable),
# SERVE_FLAGS, and for each --option the variable of that name in upper case
# (dashes as underscores), which must be one of the names in $AB_OPTIONS.
# With fewer than two arguments, prints the script's header comment (lines
# 2 to $USAGE_LINES) and exits 2. Points HEARTH_AGENT at this tree's release
# agent unless set (copied binaries do not find it next to them).
ab_args() {
    [ $# -ge 2 ] || { sed -n "2,${USAGE_LINES}p" "$0" | sed 's/^# \{0,1\}//'; exit 2; }
    A_BIN=$(realpath "$1")
    B_BIN=$(realpath "$2")
    shift 2
    SERVE_FLAGS=()
    local name
    while [ $# -gt 0 ]; do
        case "$1" in
        --) shift; SERVE_FLAGS=("$@"); break ;;
        --*)
            name=${1#--}; name=${name//-/_}; name=${name^^}
            [[ " $AB_OPTIONS " == *" $name "* ]] && [ $# -ge 2 ] || die "unknown argument: $1"
            printf -v "$name" '%s' "$2"
            shift 2 ;;
        *) die "unknown argument: $1" ;;
        esac
    done
    [ -x "$A_BIN" ] && [ -x "$B_BIN" ] || die "both binaries must be executable"
    use_tree_agent
}

# Exports HEARTH_AGENT as this tree's static release agent unless one was
# chosen (older hearth builds, run by the A/B scripts, read an empty
# HEARTH_AGENT as a path).
use_tree_agent() {
    local agent="${CARGO_TARGET_DIR:-$ROOT/target}/x86_64-unknown-linux-gnu/release/hearth-agent"
    [ -n "${HEARTH_AGENT:-}" ] || { [ -x "$agent" ] && export HEARTH_AGENT=$agent; }
    return 0
}

# Checks for root, the tools named and the Express fixture's node_modules;
# builds hearth and the static agent unless BUILD=0; sets FIXTURE, HERE, HEARTH
# and (unless set) HEARTH_AGENT.
bench_prepare() { # tools...
    local tool
    [ "$(id -u)" = 0 ] || die "run as root (the process backend needs it)"
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "$tool is not installed"
    done
    FIXTURE="$ROOT/tests/fixtures/express-app"
    HERE="$ROOT/perf/functions"
    [ -d "$FIXTURE/node_modules/express" ] || die "run tools/setup.sh first (npm ci in $FIXTURE)"
    if [ "${BUILD:-1}" = 1 ]; then
        (cd "$ROOT" && cargo build --release -q --bin hearth && tools/build-agent.sh release >/dev/null) >&2
    fi
    HEARTH="${CARGO_TARGET_DIR:-$ROOT/target}/release/hearth"
    [ -x "$HEARTH" ] || die "$HEARTH is not built"
    use_tree_agent
}

# The admin token every server started here runs with (older builds accept the
# flag too, so A/B runs work across the change that made the token the default).
BENCH_TOKEN=perf-bench-admin-token
AUTH=(-H "authorization: Bearer $BENCH_TOKEN")

# Starts `$HEARTH serve` with extra flags and its own state dir; sets REPLY to
# its address. HEARTH_AGENT_<name> (e.g. HEARTH_AGENT_B), when set, is its
# guest agent instead of HEARTH_AGENT.
start_hearth() { # name flags...
    local name=$1 dir="$TMP/$1" addr= pid
    shift
    mkdir -p "$dir"
    : >"$dir/stdout"
    local agent_var="HEARTH_AGENT_$name"
    HEARTH_AGENT=${!agent_var:-${HEARTH_AGENT:-}} "$HEARTH" serve --listen 127.0.0.1:0 --state-dir "$dir/state" \
        --connections-per-core-max 4096 --admin-token "$BENCH_TOKEN" "$@" >"$dir/stdout" 2>"$dir/stderr" &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 1 300); do
        addr=$(sed -n 's|^hearth: listening on http://||p' "$dir/stdout")
        [ -n "$addr" ] && break
        kill -0 "$pid" 2>/dev/null || { cat "$dir/stderr" >&2; die "hearth ($name) exited"; }
        sleep 0.1
    done
    [ -n "$addr" ] || { cat "$dir/stderr" >&2; die "hearth ($name) did not start"; }
    eval "${name}_PID=$pid"
    REPLY=$addr
}

# Starts a bare Node server that prints "listening <port>"; sets REPLY to its port.
start_node() { # name script args...
    local name=$1
    shift
    start_server "$name" node "$@"
}

# Starts a server command that prints "listening <port>", under NODE_WRAP;
# sets REPLY to its port and <name>_PID to its pid.
start_server() { # name command args...
    local name=$1 out="$TMP/$1.out" port= pid
    shift
    : >"$out"
    # shellcheck disable=SC2086 # NODE_WRAP: an optional command prefix, e.g. "taskset -c 0"
    env -i PATH="$PATH" ${NODE_WRAP:-} "$@" >"$out" 2>"$TMP/$name.err" &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 1 100); do
        port=$(awk '/^listening / { print $2 }' "$out")
        [ -n "$port" ] && break
        kill -0 "$pid" 2>/dev/null || { cat "$TMP/$name.err" >&2; die "$name exited"; }
        sleep 0.1
    done
    [ -n "$port" ] || die "$name did not start"
    eval "${name}_PID=$pid"
    REPLY=$port
}

# POSTs a zip to /deploy, with settings as a query string if given; prints "functionId seconds".
deploy_zip() { # addr zip [settings]
    local out
    out=$(curl -sS -w '\n%{http_code} %{time_total}' -X POST -H 'content-type: application/zip' "${AUTH[@]}" \
        --data-binary "@$2" "http://$1/deploy${3:+?$3}")
    local status=${out##*$'\n'}
    [ "${status%% *}" = 200 ] || [ "${status%% *}" = 201 ] || die "deploy failed: $out"
    local id
    id=$(grep -o '"functionId": *"[^"]*"' <<<"$out" | sed 's/.*"\([^"]*\)"$/\1/')
    [ -n "$id" ] || die "no functionId in: $out"
    echo "$id ${status#* }"
}

instances() { # addr id
    curl -sS "${AUTH[@]}" "http://$1/functions/$2" | grep -o '"instances": *[0-9]*' | grep -o '[0-9]*$'
}

# Latency text from wrk (412.00us, 1.20ms, 2.00s) in microseconds.
to_us() {
    awk -v v="$1" 'BEGIN { n = v + 0
        if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000
        else if (v ~ /m$/) print n * 60000000; else if (v ~ /s$/) print n * 1000000; else print n }'
}

# Runs wrk; prints "req_per_s p50_us p99_us errors".
run_wrk() { # duration url [lua]
    local out rps p50 p99 errors detail script=()
    [ -n "${3:-}" ] && script=(-s "$3")
    out=$(wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$1" --latency "${script[@]}" "$2")
    rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    p50=$(to_us "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99=$(to_us "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    errors=$(awk '/Non-2xx or 3xx responses:/ { n += $NF } /Socket errors:/ {
        for (i = 3; i <= NF; i += 2) n += $(i + 1) + 0 } END { print n + 0 }' <<<"$out")
    # What the errors were, e.g. "non2xx=3,timeout=2", kept as a fifth field.
    detail=$(awk '/Non-2xx or 3xx responses:/ { printf "%snon2xx=%s", sep, $NF; sep = "," }
        /Socket errors:/ { for (i = 3; i <= NF; i += 2) if ($(i + 1) + 0 > 0) {
            k = $i; sub(/ *$/, "", k); printf "%s%s=%d", sep, k, $(i + 1) + 0; sep = "," } }' <<<"$out")
    echo "$rps $p50 $p99 $errors ${detail:--}"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# Nearest-rank percentile.
pct() { sort -g | awk -v p="$1" '{ v[NR] = $1 } END { i = int((p * NR + 99) / 100); if (i < 1) i = 1; print v[i] }'; }
load() { awk '{ print $1 " " $2 " " $3 }' /proc/loadavg; }
now_s() { echo "${EPOCHREALTIME/,/.}"; }

# A /proc/<pid>/status field in KiB (0 when the process is gone).
status_kib() { awk -v k="$2:" '$1 == k { n = $2 } END { print n + 0 }' "/proc/$1/status" 2>/dev/null || echo 0; }
pss_kib() { awk '$1 == "Pss:" { n = $2 } END { print n + 0 }' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }
# A process and all its descendants.
tree() { # pid
    local p=$1 c
    echo "$p"
    for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do tree "$c"; done
}

# "server_ticks node_ticks" (user + system) of process trees, their Node
# processes apart from the rest.
ticks() { # root pid...
    local p
    for p in $(for r in "$@"; do tree "$r"; done); do
        awk -v c="$(cat "/proc/$p/comm" 2>/dev/null)" '{ sub(/^.*\) /, ""); print (c == "node" ? "node" : "server"), $12 + $13 }' \
            "/proc/$p/stat" 2>/dev/null || true
    done | awk '{ t[$1] += $2 } END { print t["server"] + 0, t["node"] + 0 }'
}
HZ=$(getconf CLK_TCK)

# The run that just ended, given its req/s and the trees measured: appends
# "test server server_us node_us" (CPU per request, from $TMP/ticks taken by
# `ticks` before the run) to $TMP/cpu and prints "cpu_us=<server>+<node>".
# Uses DURATION (whole seconds).
cpu_per_request() { # test server req/s root_pid...
    local t=$1 s=$2 rps=$3
    shift 3
    awk -v t="$t" -v s="$s" -v a="$(ticks "$@")" -v hz="$HZ" -v secs="${DURATION%s}" -v rps="$rps" '{
        split(a, n, " "); r = rps * secs
        if (r == 0) { printf "%s %s nan nan\n", t, s; exit }
        printf "%s %s %.1f %.1f\n", t, s, (n[1] - $1) / hz * 1e6 / r, (n[2] - $2) / hz * 1e6 / r }' \
        "$TMP/ticks" | tee -a "$TMP/cpu" | awk '{ printf "cpu_us=%s+%s", $3, $4 }'
}

# Warms every target up (3 s, discarded), then runs `rounds` alternating
# rounds of wrk over them. `targets`: one "test server url lua|-" per line.
# Calls `before_run test server url` before each run if the caller defines it;
# prints each run (with the output of `after_run test server url req/s`, if the
# caller defines it, as a last column) and appends "test server req/s p50_us
# p99_us errors" to $RESULTS.
run_rounds() { # targets rounds duration
    local targets=$1 rounds=$2 duration=$3 test server url lua round rps p50 p99 errors detail extra
    while read -r test server url lua; do
        [ "$lua" = - ] && lua=
        run_wrk 3s "$url" "$lua" >/dev/null
    done <<<"$targets"
    : >"$RESULTS"
    printf '%-14s %-7s %5s %10s %9s %9s %7s  %-16s %s\n' test server round req/s p50_us p99_us errors load ""
    local order
    for round in $(seq 1 "$rounds"); do
        # Even rounds run the list backwards, so no system always goes first
        # or last (measured: the second of two identical builds loses 3-7 %).
        order=$targets
        [ $((round % 2)) = 0 ] && order=$(tac <<<"$targets")
        while read -r test server url lua; do
            [ "$lua" = - ] && lua=
            if declare -F before_run >/dev/null; then before_run "$test" "$server" "$url"; fi
            read -r rps p50 p99 errors detail <<<"$(run_wrk "$duration" "$url" "$lua")"
            extra=
            if declare -F after_run >/dev/null; then extra=$(after_run "$test" "$server" "$url" "$rps"); fi
            [ "$detail" = - ] || extra="$extra ($detail)"
            printf '%-14s %-7s %5s %10s %9s %9s %7s  %-16s %s\n' "$test" "$server" "$round" "$rps" "$p50" "$p99" \
                "$errors" "$(load)" "$extra"
            echo "$test $server $rps $p50 $p99 $errors" >>"$RESULTS"
        done <<<"$order"
    done
}

# The median of field `field` (3 req/s, 4 p50, 5 p99) of one test and server in $RESULTS.
pick() { awk -v t="$1" -v s="$2" -v f="$3" '$1 == t && $2 == s { print $f }' "$RESULTS" | median; }
