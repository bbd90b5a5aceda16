#!/usr/bin/env bash
# Soak (a benchmark, not a CI test): SOAK_MINUTES (default 30) of mixed load at about 70 % of
# capacity against a release build, then a table of the server's resources per minute and a
# verdict: 0 unexpected errors, and RSS, open fds, instances, cgroups and processes flat.
#
# Usage: SOAK_MINUTES=30 perf/soak.sh [--no-build]
#
# One `hearth serve` (process backend, defaults) runs five functions:
#   trivial   perf/functions/trivial                           expected: 200 only
#   express   tests/fixtures/express-app, POST /greet          expected: 200 only
#   crasher   process.exit(1) in every 20th request of an instance  200 or 502
#   sleeper   timeout_ms 200, the handler sleeps 1 s                504
#   hog       memory_mb 64, the handler allocates 256 MiB           502
# plus a churn loop on the control plane: deploy a function, invoke it, deploy the same code
# again (an update is a new deploy), invoke that, delete both, pause SOAK_CHURN_PAUSE_S (5 s);
# any answer other than 201 for a deploy, 200 for an invoke or a delete is unexpected. Control
# requests and /metrics carry the admin token the server runs with (perf/functions/lib.sh).
#
# Load: capacity is measured first (wrk -t2 -c10, 3 s warm-up then 5 s, on trivial and on
# express). The soak then drives trivial and express at 30 % of their capacity each and the
# others at a request or so per second (each crash, timeout and OOM costs a cold start, the
# churn two deploys; together about the last tenth), with wrk and perf/soak.lua: each
# connection pauses a fixed delay() between requests, so this is a paced closed loop per
# connection (Debian's wrk has no constant-rate mode), and the achieved rate is what is printed.
# Load runs in one-minute rounds; after each round the server's RSS, open fds
# (/proc/<pid>/fd), instances (sum of hearth_function_instances in /metrics), hearth cgroup
# directories (named <function>-<server pid>-<n>) and processes under the server are sampled.
# Flat: the last sample within 10 % plus a small constant (RSS 32 MiB, fds 64, instances 8,
# cgroups 24, processes 24) of the first sample after the warm-up minute.
# Needs root, wrk, node, zip and curl; builds hearth and the static agent unless --no-build.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MINUTES=${SOAK_MINUTES:-30}
CHURN_PAUSE_S=${SOAK_CHURN_PAUSE_S:-5}
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
die() { echo "soak: $*" >&2; exit 1; }
[[ "$MINUTES" =~ ^[0-9]+$ ]] && [ "$MINUTES" -ge 2 ] || die "SOAK_MINUTES must be 2 or more, got '$MINUTES'"
# shellcheck source=functions/lib.sh
. "$ROOT/perf/functions/lib.sh"
bench_prepare wrk node zip curl
TMP=$(mktemp -d /tmp/hearth-soak.XXXXXX)
LUA="$ROOT/perf/soak.lua"
GREET='{ "name": "John Doe" }'

# ---------------------------------------------------------------- functions

mkdir -p "$TMP/src/crasher" "$TMP/src/sleeper" "$TMP/src/hog"
cat >"$TMP/src/crasher/index.js" <<'EOF'
'use strict';
// Exits the whole runtime on every 20th request this instance serves.
let served = 0;
exports.handler = async () => {
  served += 1;
  if (served % 20 === 0) process.exit(1);
  return { statusCode: 200, body: 'ok' };
};
EOF
cat >"$TMP/src/sleeper/index.js" <<'EOF'
'use strict';
// Sleeps past the function's 200 ms timeout.
exports.handler = () => new Promise((resolve) => setTimeout(() => resolve({ statusCode: 200, body: 'late' }), 1000));
EOF
cat >"$TMP/src/hog/index.js" <<'EOF'
'use strict';
// Touches 256 MiB, four times the function's 64 MiB memory limit.
exports.handler = async () => {
  const kept = [];
  for (let i = 0; i < 16; i++) kept.push(Buffer.alloc(16 << 20, i + 1));
  return { statusCode: 200, body: String(kept.length) };
};
EOF
(cd "$FIXTURE" && zip -qr "$TMP/express.zip" .)
(cd "$HERE/trivial" && zip -qr "$TMP/trivial.zip" .)
for f in crasher sleeper hog; do (cd "$TMP/src/$f" && zip -qr "$TMP/$f.zip" .); done

start_hearth H
ADDR=$REPLY
SERVER=$H_PID

# ---------------------------------------------------------------- control plane

# Every control request (and /metrics) goes through here, with the admin token the
# server was started with (lib.sh's start_hearth).
control() { # curl args...
    curl -sS --max-time 120 "${AUTH[@]}" "$@"
}

# POSTs a zip to /deploy with query settings; prints "status functionId".
deploy() { # zip [query]
    local out status id
    out=$(control -w '\n%{http_code}' -X POST -H 'content-type: application/zip' \
        --data-binary "@$1" "http://$ADDR/deploy${2:+?$2}") || out=$'\n000'
    status=${out##*$'\n'}
    id=$(grep -o '"functionId": *"[^"]*"' <<<"$out" | sed 's/.*"\([^"]*\)"$/\1/' || true)
    echo "$status ${id:--}"
}

deploy_ok() { # zip [query]
    local r
    r=$(deploy "$@")
    [ "${r% *}" = 201 ] || die "deploy of $1 answered ${r% *}"
    echo "${r#* }"
}

TRIVIAL=$(deploy_ok "$TMP/trivial.zip")
EXPRESS=$(deploy_ok "$TMP/express.zip")
CRASHER=$(deploy_ok "$TMP/crasher.zip")
SLEEPER=$(deploy_ok "$TMP/sleeper.zip" timeout_ms=200)
HOG=$(deploy_ok "$TMP/hog.zip" memory_mb=64)

# ---------------------------------------------------------------- capacity

WRK_THREADS=2
WRK_CONNS=10
run_wrk 3s "http://$ADDR/f/$TRIVIAL/" >/dev/null
read -r CAP_TRIVIAL _ <<<"$(run_wrk 5s "http://$ADDR/f/$TRIVIAL/")"
run_wrk 3s "http://$ADDR/f/$EXPRESS/greet" "$ROOT/perf/functions/post-greet.lua" >/dev/null
read -r CAP_EXPRESS _ <<<"$(run_wrk 5s "http://$ADDR/f/$EXPRESS/greet" "$ROOT/perf/functions/post-greet.lua")"

# Paced load: connections for `rate` req/s at a 10 ms pause per connection (+ ~0.3 ms answer).
PAUSE_MS=10
conns_for() { awk -v r="$1" -v p="$PAUSE_MS" 'BEGIN { c = int(r * (p + 0.3) / 1000 + 0.5); print (c < 1 ? 1 : c) }'; }
RATE_TRIVIAL=$(awk -v c="$CAP_TRIVIAL" 'BEGIN { printf "%d", c * 0.30 }')
RATE_EXPRESS=$(awk -v c="$CAP_EXPRESS" 'BEGIN { printf "%d", c * 0.30 }')
C_TRIVIAL=$(conns_for "$RATE_TRIVIAL")
C_EXPRESS=$(conns_for "$RATE_EXPRESS")

echo "# hearth soak: $(date -u '+%Y-%m-%d %H:%M UTC'), $MINUTES minutes, $(nproc) cores, kernel $(uname -r)," \
    "node $(node --version), hearth $("$HEARTH" --version | awk '{ print $2 }')"
echo "# capacity (wrk -t2 -c10, 5 s): trivial $CAP_TRIVIAL req/s, express POST /greet $CAP_EXPRESS req/s"
echo "# load: trivial ~$RATE_TRIVIAL req/s ($C_TRIVIAL conns), express ~$RATE_EXPRESS req/s ($C_EXPRESS conns)," \
    "crasher ~10/s, sleeper ~0.5/s, hog ~0.3/s (1 connection each, 100/2000/3000 ms pauses)," \
    "churn every ${CHURN_PAUSE_S}s; $PAUSE_MS ms pause per connection"
echo "# load average at start: $(load)"

# ---------------------------------------------------------------- churn

CHURN="$TMP/churn"
: >"$CHURN"
# Appends "kind status" lines; stops when $TMP/stop exists.
churn_loop() {
    local a b id
    while [ ! -e "$TMP/stop" ]; do
        a=$(deploy "$TMP/trivial.zip")
        echo "deploy ${a% *}" >>"$CHURN"
        churn_invoke "${a#* }"
        b=$(deploy "$TMP/trivial.zip")
        echo "deploy ${b% *}" >>"$CHURN"
        churn_invoke "${b#* }"
        for id in "${a#* }" "${b#* }"; do
            [ "$id" = - ] && continue
            echo "delete $(control -o /dev/null -w '%{http_code}' -X DELETE "http://$ADDR/functions/$id" || true)" >>"$CHURN"
        done
        sleep "$CHURN_PAUSE_S"
    done
}
churn_invoke() { # id
    [ "$1" = - ] && return 0
    echo "invoke $(curl -s -o /dev/null -w '%{http_code}' --max-time 30 "http://$ADDR/f/$1/" || true)" >>"$CHURN"
}
churn_loop &
CHURN_PID=$!
PIDS+=("$CHURN_PID")

# ---------------------------------------------------------------- rounds

# One loader: wrk for a minute at `conns` connections pausing `pause` ms between requests;
# output in $TMP/<name>.<round>. `count`: 1 to count answers by status.
loader() { # name round conns pause url count [post-json]
    SOAK_DELAY_MS=$4 SOAK_COUNT=$6 SOAK_POST_JSON=${7:-} \
        wrk -t1 -c"$3" -d60s --timeout 30s -s "$LUA" "$5" >"$TMP/$1.$2" 2>&1 || true
}

metrics() { control --max-time 10 "http://$ADDR/metrics" 2>/dev/null || true; }
sample() { # -> "rss_mib fds instances cgroups procs"
    local rss fds inst cg procs
    rss=$(($(status_kib "$SERVER" VmRSS) / 1024))
    fds=$(find "/proc/$SERVER/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    inst=$(metrics | awk '/^hearth_function_instances[{ ]/ { n += $NF } END { print n + 0 }')
    cg=$(find /sys/fs/cgroup -mindepth 2 -maxdepth 6 -type d -path "*/hearth/*-$SERVER-*" 2>/dev/null | wc -l)
    procs=$(($(tree "$SERVER" | wc -l) - 1))
    echo "$rss $fds $inst $cg $procs"
}

# Requests and unexpected answers of one loader's round: "requests unexpected detail".
tally() { # file expected-statuses(comma list, empty: any 2xx)
    awk -v ok="$2" '
        BEGIN { n = split(ok, list, ","); for (i = 1; i <= n; i++) allowed[list[i]] = 1 }
        /requests in/ { requests = $1 }
        /Non-2xx or 3xx responses:/ { non2xx = $NF }
        /Socket errors:/ { for (i = 3; i <= NF; i += 2) { k = $i; sub(/ *$/, "", k); v = $(i + 1) + 0
            if (v > 0) { bad += v; detail = detail sep k "=" v; sep = "," } } }
        $1 == "status" && ok != "" { if (!($2 in allowed)) { bad += $3; detail = detail sep $2 "=" $3; sep = "," } }
        END {
            if (ok == "" && non2xx > 0) { bad += non2xx; detail = detail sep "non2xx=" non2xx; sep = "," }
            printf "%d %d %s\n", requests, bad, (detail == "" ? "-" : detail)
        }' "$1"
}

TABLE="$TMP/table"
UNEXPECTED=0
DETAILS=""
ROW='%-6s %9s %9s %7s %7s %5s %5s %5s %7s %5s %5s %7s %5s %5s\n'
# shellcheck disable=SC2059 # the format is $ROW
printf "$ROW" minute trivial/s express/s crash/s sleep/s hog/s churn unexp rss_mib fds inst cgroups procs load1
for round in $(seq 1 "$MINUTES"); do
    churn_before=$(wc -l <"$CHURN")
    loader trivial "$round" "$C_TRIVIAL" "$PAUSE_MS" "http://$ADDR/f/$TRIVIAL/" 0 &
    l1=$!
    loader express "$round" "$C_EXPRESS" "$PAUSE_MS" "http://$ADDR/f/$EXPRESS/greet" 0 "$GREET" &
    l2=$!
    loader crasher "$round" 1 100 "http://$ADDR/f/$CRASHER/" 1 &
    l3=$!
    loader sleeper "$round" 1 2000 "http://$ADDR/f/$SLEEPER/" 1 &
    l4=$!
    loader hog "$round" 1 3000 "http://$ADDR/f/$HOG/" 1 &
    l5=$!
    wait "$l1" "$l2" "$l3" "$l4" "$l5"
    kill -0 "$SERVER" 2>/dev/null || { tail -20 "$TMP/H/stderr" >&2; die "hearth exited during minute $round"; }
    bad=0
    rates=()
    for spec in trivial: express: crasher:200,502 sleeper:504 hog:502; do
        name=${spec%%:*}
        read -r requests u detail <<<"$(tally "$TMP/$name.$round" "${spec#*:}")"
        rates+=("$(awk -v n="$requests" 'BEGIN { printf (n < 600 ? "%.1f" : "%.0f"), n / 60 }')")
        bad=$((bad + u))
        [ "$detail" = - ] || DETAILS="$DETAILS minute $round $name: $detail;"
    done
    churn_round=$(tail -n +"$((churn_before + 1))" "$CHURN")
    churn_ops=$(grep -c . <<<"$churn_round" || true)
    churn_bad=$(awk '($1 == "deploy" && $2 != 201) || ($1 != "deploy" && $2 != 200)' <<<"$churn_round" | sort | uniq -c |
        awk '{ printf "%s%s %s x%d", sep, $2, $3, $1; sep = "," }')
    if [ -n "$churn_bad" ]; then
        bad=$((bad + $(awk '($1 == "deploy" && $2 != 201) || ($1 != "deploy" && $2 != 200)' <<<"$churn_round" | wc -l)))
        DETAILS="$DETAILS minute $round churn: $churn_bad;"
    fi
    UNEXPECTED=$((UNEXPECTED + bad))
    read -r rss fds inst cg procs <<<"$(sample)"
    echo "$round $rss $fds $inst $cg $procs" >>"$TABLE"
    # shellcheck disable=SC2059
    printf "$ROW" "$round" "${rates[@]}" "$churn_ops" "$bad" "$rss" "$fds" "$inst" "$cg" "$procs" \
        "$(cut -d' ' -f1 /proc/loadavg)"
done
touch "$TMP/stop"
wait "$CHURN_PID" 2>/dev/null || true

# ---------------------------------------------------------------- verdict

echo "# unexpected answers: $UNEXPECTED${DETAILS:+ (${DETAILS% })}"
# First sample after the warm-up minute against the last one.
verdict=$(awk '
    NR == 1 { next }
    NR == 2 { for (i = 2; i <= 6; i++) base[i] = $i }
    { for (i = 2; i <= 6; i++) last[i] = $i }
    END {
        split("rss_mib fds instances cgroups procs", name, " ")
        split("32 64 8 24 24", slack, " ")
        flat = 1
        for (i = 2; i <= 6; i++) {
            limit = base[i] * 1.10 + slack[i - 1]
            ok = last[i] <= limit
            if (!ok) flat = 0
            printf "# %-9s minute 2: %6d  last: %6d  limit: %8.0f  %s\n", name[i - 1], base[i], last[i], limit, ok ? "flat" : "GROWING"
        }
        print (flat ? "FLAT" : "GROWING")
    }' "$TABLE")
echo "${verdict%$'\n'*}"
state=${verdict##*$'\n'}
if [ "$UNEXPECTED" = 0 ] && [ "$state" = FLAT ]; then
    echo "VERDICT: pass (0 unexpected answers, resources flat)"
else
    echo "VERDICT: FAIL ($UNEXPECTED unexpected answers, resources $state)"
    exit 1
fi
