#!/usr/bin/env bash
# Load-test shadowgate side by side with the origin itself and with NGINX
# (plain reverse proxy, and with ngx_http_mirror_module), in one run.
#
#   scripts/bench.sh            full run: 3 repeats, about 15-17 minutes
#   scripts/bench.sh --quick    smoke run: 1 short repeat, about 1-2 minutes
#   scripts/bench.sh --help     all options
#
# What it does: builds the release binary, starts fixed-cost origins on
# 127.0.0.1 (NGINX `return 200` with a body for the origin and one shadow,
# NGINX `return 204` for a keep-alive shadow with no body, and a Python shadow
# that answers after 500 ms; every NGINX origin also answers a fixed 4 KiB JSON
# document on /json, one of them with one value changed), starts every proxy configuration pinned to its
# own CPUs, then measures them alternately (A B C D E, B C D E A, ...) after a
# warm-up. Each mirror target is checked against its shadow's request count.
# Without --only it then runs scripts/bench-tls.sh (TLS termination) into <out>/tls.
# Results go to results/<timestamp>/: results.md (tables, CPU per request and
# per mirrored request, targets), results.json (every raw figure), chart.svg,
# and the logs.
#
# Traffic goes only to 127.0.0.1; every load run has a hard time limit.
# Nothing here touches the system NGINX: each instance has its own prefix,
# configuration and pid file in a temporary directory, removed on exit.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE="$REPO/scripts/bench"

SG_NAME=bench
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"

usage() {
    cat <<'EOF'
Usage: scripts/bench.sh [options]

  --quick               smoke run: 1 repeat of short runs (under 2 minutes)
  --repeats N           repeats of every scenario (default 3; quick 1)
  --duration S          seconds per closed-loop run (default 4; quick 1)
  --rate-duration S     seconds per fixed-rate latency run (default 8; quick 2)
  --rate RPS            fixed rate of the latency scenario (default 2000)
  --slow-rate RPS       fixed rate of the slow-shadow scenario (default 500)
  --slow-delay-ms MS    how long the slow shadow waits before answering (default 500)
  --threads N           shadowgate threads = NGINX worker_processes (default:
                        number of CPUs in --proxy-cpus)
  --proxy-cpus LIST     CPUs for the proxies under test (default: 1)
  --load-cpus LIST      CPUs for the load generator and origins (default: 0)
  --no-pin              do not pin processes with taskset
  --port-base P         first of the loopback ports used (default 18000)
  --settle-max S        wait at most S seconds at start for other CPU load to
                        settle (default 120; quick 10)
  --only LIST           only these scenarios, comma-separated: get_c1,get_c16,
                        get_c64,latency,slow_shadow,post_1mib,no_keepalive,
                        compare_c16
                        (the CPU-per-request targets use get_c1,get_c16,get_c64;
                        the shadow-verdict target uses compare_c16)
  --no-build            use the existing target/release/shadowgate and
                        target/release/examples/bare_pingora
  --pgo                 measure a profile-guided build (scripts/build-pgo.sh,
                        into target/pgo/release) instead of the plain release one
  --bin-dir DIR         use DIR/shadowgate and DIR/examples/bare_pingora (no build)
  --no-install          never install missing tools, only name them
  --out DIR             results folder (default results/<timestamp>)
  -h, --help            this help

Targets: direct (the origin), shadowgate and NGINX plain, each with a 100%
mirror to a shadow answering 200 with a body, to a keep-alive shadow answering
204 with no body (the closed-loop scenarios), and to a shadow answering after
--slow-delay-ms (slow_shadow). In the GET scenarios (get_c1, get_c16, get_c64)
also bare Pingora (examples/bare_pingora.rs: one ProxyHttp that only picks the
origin), the CPU floor of Pingora itself. The report gives CPU µs per request,
the extra CPU per mirrored request, the ratios shadowgate/NGINX against the
targets, and shadowgate/bare Pingora and bare Pingora/NGINX.

compare_c16 (wrk, 16 connections, GET /json, a 4 KiB JSON body) measures
shadow verdicts: shadowgate plain, with a 100% mirror to a shadow answering the
same JSON without `compare`, the same with `compare` (bodies equal: the byte
fast path), and with `compare` to a shadow whose JSON differs in one value
(both bodies parsed and diffed). The report gives the added CPU per compared
request, (compare - mirror without compare) / compared share, in µs and as a
ratio of plain shadowgate's CPU per request (target: under 0.25); the
comparisons are counted from shadowgate_compare_total.

Environment: BENCH_PROXY_CPUS, BENCH_LOAD_CPUS, BENCH_THREADS and OHA (path
to an oha binary) set the same defaults.
EOF
}

# --- options ------------------------------------------------------------------
QUICK=0
REPEATS=""
CLOSED_S=""
RATE_S=""
RATE=2000
SLOW_RATE=500
SLOW_DELAY_MS=500
THREADS="${BENCH_THREADS:-}"
PROXY_CPUS="${BENCH_PROXY_CPUS:-1}"
LOAD_CPUS="${BENCH_LOAD_CPUS:-0}"
PIN=1
PORT_BASE=18000
SETTLE_MAX=""
ONLY=""
BUILD=1
BIN_DIR="$REPO/target/release"
INSTALL=1
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --repeats) REPEATS=$2; shift ;;
        --duration) CLOSED_S=$2; shift ;;
        --rate-duration) RATE_S=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --slow-rate) SLOW_RATE=$2; shift ;;
        --slow-delay-ms) SLOW_DELAY_MS=$2; shift ;;
        --threads) THREADS=$2; shift ;;
        --proxy-cpus) PROXY_CPUS=$2; shift ;;
        --load-cpus) LOAD_CPUS=$2; shift ;;
        --no-pin) PIN=0 ;;
        --port-base) PORT_BASE=$2; shift ;;
        --settle-max) SETTLE_MAX=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --no-build) BUILD=0 ;;
        --pgo) BUILD=pgo ;;
        --bin-dir) BIN_DIR=$2; BUILD=0; shift ;;
        --no-install) INSTALL=0 ;;
        --out) OUT=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; sg_die "unknown option $1" ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    : "${REPEATS:=1}" "${CLOSED_S:=1}" "${RATE_S:=2}" "${SETTLE_MAX:=10}"
else
    : "${REPEATS:=3}" "${CLOSED_S:=4}" "${RATE_S:=8}" "${SETTLE_MAX:=120}"
fi
for v in REPEATS CLOSED_S RATE_S RATE SLOW_RATE SLOW_DELAY_MS PORT_BASE SETTLE_MAX; do
    [[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -gt 0 -o "$v" = SETTLE_MAX ] || sg_die "--${v,,} must be a positive whole number (got '${!v}')"
done

# Traffic stays on loopback: no proxy from the environment may catch it.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
export no_proxy='*' NO_PROXY='*'

STARTED=$(date +%s)
BUILD_S=0

# --- tools --------------------------------------------------------------------
sg_load_cargo_env
OHA="${OHA:-}"
if [ -z "$OHA" ]; then
    OHA=$(command -v oha 2>/dev/null || true)
    [ -z "$OHA" ] && [ -x "$HOME/.cargo/bin/oha" ] && OHA="$HOME/.cargo/bin/oha"
fi

tools=(nginx:nginx wrk:wrk taskset:util-linux python3:python3)
if [ "$BUILD" = 1 ]; then tools+=(cmake:cmake cc:build-essential); fi
SG_NO_INSTALL=$((1 - INSTALL)) sg_ensure_tools "${tools[@]}" \
    || sg_die "missing tools (named above); install them and run again"
if [ -z "$OHA" ]; then
    command -v cargo >/dev/null 2>&1 || sg_die "oha is missing and cargo is not installed to build it; install Rust (rustup) or put oha on PATH (or set OHA=/path/to/oha)"
    if [ "$INSTALL" = 1 ]; then
        sg_say "installing oha with 'cargo install oha --locked' (a one-off, several minutes)"
        cargo install oha --locked >&2 || sg_die "cargo install oha failed; install oha yourself and set OHA=/path/to/oha"
        OHA="$HOME/.cargo/bin/oha"
    else
        sg_die "oha is missing; install it with 'cargo install oha --locked'"
    fi
fi
"$OHA" --help 2>/dev/null | grep -q -- '--latency-correction' \
    || sg_die "$OHA has no --latency-correction option; install a newer oha (cargo install oha --locked)"
"$OHA" --help 2>/dev/null | grep -q -- '--output-format' \
    || sg_die "$OHA has no --output-format option; install oha 1.5 or newer (cargo install oha --locked)"
NGINX=$(command -v nginx)
WRK=$(command -v wrk)

# --- CPUs -----------------------------------------------------------------------
NCPU=$(nproc)
cpu_count() { # number of CPUs in a taskset list like 0, 1-3, 0,2
    python3 -c 'import sys
n=0
for part in sys.argv[1].split(","):
    a,_,b=part.partition("-"); n += (int(b)-int(a)+1) if b else 1
print(n)' "$1"
}
if [ "$NCPU" -lt 2 ] && [ "$PIN" = 1 ]; then
    sg_say "warning: only $NCPU CPU: not pinning; proxy and load generator share the CPU"
    PIN=0
fi
if [ "$PIN" = 1 ]; then
    taskset -c "$PROXY_CPUS" true 2>/dev/null || sg_die "--proxy-cpus $PROXY_CPUS is not a valid CPU list here ($NCPU CPUs)"
    taskset -c "$LOAD_CPUS" true 2>/dev/null || sg_die "--load-cpus $LOAD_CPUS is not a valid CPU list here ($NCPU CPUs)"
    PIN_PROXY=(taskset -c "$PROXY_CPUS")
    PIN_LOAD=(taskset -c "$LOAD_CPUS")
    PROXY_CPU_COUNT=$(cpu_count "$PROXY_CPUS")
    LOAD_CPU_COUNT=$(cpu_count "$LOAD_CPUS")
else
    PIN_PROXY=()
    PIN_LOAD=()
    PROXY_CPUS="all"; LOAD_CPUS="all"
    PROXY_CPU_COUNT=$NCPU
    LOAD_CPU_COUNT=$NCPU
fi
: "${THREADS:=$PROXY_CPU_COUNT}"

# --- build --------------------------------------------------------------------
if [ "$BUILD" = pgo ]; then
    BIN_DIR="$REPO/target/pgo/release"
fi
SG="$BIN_DIR/shadowgate"
# Bare Pingora, the CPU floor of Pingora itself: same release profile and allocator.
BARE="$BIN_DIR/examples/bare_pingora"
if [ "$BUILD" = pgo ]; then
    sg_say "building profile-guided binaries (scripts/build-pgo.sh)"
    BUILD_T0=$(date +%s)
    bash "$REPO/scripts/build-pgo.sh" >&2 || sg_die "scripts/build-pgo.sh failed"
    BUILD_S=$(( $(date +%s) - BUILD_T0 ))
elif [ "$BUILD" = 1 ]; then
    command -v cargo >/dev/null 2>&1 || sg_die "cargo not found; install Rust with rustup (https://rustup.rs) or pass --no-build with a built target/release/shadowgate"
    sg_say "building the release binaries (cargo build --release --bin shadowgate --example bare_pingora)"
    BUILD_T0=$(date +%s)
    (cd "$REPO" && cargo build --release --bin shadowgate --example bare_pingora >&2) || sg_die "cargo build --release failed"
    BUILD_S=$(( $(date +%s) - BUILD_T0 ))
fi
[ -x "$SG" ] || sg_die "$SG not found; run without --no-build"
[ -x "$BARE" ] || sg_die "$BARE not found; run without --no-build (or: cargo build --release --example bare_pingora)"

# --- results and work folders -------------------------------------------------
STAMP=$(date +%Y%m%d-%H%M%S)
[ -n "$OUT" ] || OUT="$REPO/results/$STAMP"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/shadowgate-bench.XXXXXX")
# NGINX workers drop to an unprivileged user when started as root: they must be
# able to enter the folder. shadowgate's own run folders below are 0700.
chmod 755 "$WORK"

CHILD=""         # the runner, while it runs
PIDS=()          # every process we started, in start order
SG_PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "${CHILD:-}" ]; then
        kill -TERM "$CHILD" 2>/dev/null || true
        wait "$CHILD" 2>/dev/null || true
    fi
    # shadowgate: SIGINT stops at once (SIGTERM would drain for the grace period).
    for pid in "${SG_PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    # NGINX masters and the Python shadow: SIGTERM is a fast stop.
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    local deadline=$((SECONDS + 5))
    for pid in "${PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ -d "$WORK" ]; then
        mkdir -p "$OUT/logs"
        find "$WORK" -name '*.log' -o -name '*.conf' -o -name '*.yaml' | while read -r f; do
            rel=${f#"$WORK"/}
            cp "$f" "$OUT/logs/${rel//\//_}" 2>/dev/null || true
        done
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'sg_say "interrupted"; exit 130' INT TERM

P_ORIGIN=$PORT_BASE
P_SHADOW=$((PORT_BASE + 1))
P_SLOW=$((PORT_BASE + 2))
P_SHADOW_204=$((PORT_BASE + 3))
P_SHADOW_DIFF=$((PORT_BASE + 4))
P_SG_MJ=$((PORT_BASE + 14)); P_SG_CJ=$((PORT_BASE + 15)); P_SG_CJD=$((PORT_BASE + 16))
P_MET_MJ=$((PORT_BASE + 24)); P_MET_CJ=$((PORT_BASE + 25)); P_MET_CJD=$((PORT_BASE + 26))
P_SG=$((PORT_BASE + 10)); P_SG_M=$((PORT_BASE + 11)); P_SG_MS=$((PORT_BASE + 12)); P_SG_M204=$((PORT_BASE + 13))
P_MET=$((PORT_BASE + 20)); P_MET_M=$((PORT_BASE + 21)); P_MET_MS=$((PORT_BASE + 22)); P_MET_M204=$((PORT_BASE + 23))
P_NG=$((PORT_BASE + 30)); P_NG_M=$((PORT_BASE + 31)); P_NG_MS=$((PORT_BASE + 32)); P_NG_M204=$((PORT_BASE + 33))
P_BARE=$((PORT_BASE + 40))
for p in $P_ORIGIN $P_SHADOW $P_SLOW $P_SHADOW_204 $P_SHADOW_DIFF $P_SG_MJ $P_SG_CJ $P_SG_CJD $P_MET_MJ $P_MET_CJ $P_MET_CJD $P_SG $P_SG_M $P_SG_MS $P_SG_M204 $P_MET $P_MET_M $P_MET_MS \
    $P_MET_M204 $P_NG $P_NG_M $P_NG_MS $P_NG_M204 $P_BARE; do
    ! sg_listening "127.0.0.1:$p" || sg_die "127.0.0.1:$p is already in use; pick other ports with --port-base"
done

render() { # template output KEY=VALUE...
    local tpl=$1 out=$2; shift 2
    local args=()
    for kv in "$@"; do
        local k=${kv%%=*} v=${kv#*=}
        v=${v//\\/\\\\}; v=${v//#/\\#}; v=${v//&/\\&}
        args+=(-e "s#@${k}@#${v}#g")
    done
    sed "${args[@]}" "$tpl" > "$out"
    if grep -q '@[A-Z_]*@' "$out"; then sg_die "unfilled placeholder in $out: $(grep -o '@[A-Z_]*@' "$out" | head -1)"; fi
}

wait_http() { # url seconds: until it answers 200
    local url=$1 limit=$2 deadline=$((SECONDS + $2))
    while [ $SECONDS -lt $deadline ]; do
        if python3 - "$url" <<'EOF' 2>/dev/null; then return 0; fi
import sys, urllib.request
o = urllib.request.build_opener(urllib.request.ProxyHandler({}))
sys.exit(0 if o.open(sys.argv[1], timeout=1).status == 200 else 1)
EOF
        sleep 0.2
    done
    sg_die "$url did not answer 200 within ${limit}s"
}

start_nginx() { # name conf-template pin... -- KEY=VALUE...
    local name=$1 tpl=$2; shift 2
    local pin=()
    while [ "$1" != "--" ]; do pin+=("$1"); shift; done
    shift
    local dir="$WORK/$name"
    mkdir -p "$dir"
    render "$tpl" "$dir/nginx.conf" PREFIX="$dir" "$@"
    "$NGINX" -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" 2>"$dir/check.log" \
        || sg_die "nginx rejects $dir/nginx.conf: $(cat "$dir/check.log")"
    "${pin[@]}" "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout.log" 2>&1 &
    PIDS+=($!)
    eval "PID_${name//-/_}=$!"
}

start_sg() { # name port metrics-port shadow-port mirrors-yaml
    local name=$1 port=$2 mport=$3 sport=$4 mirrors=$5
    local dir="$WORK/$name"
    mkdir -p "$dir"
    mkdir -m 700 "$dir/run"
    render "$HERE/shadowgate.yaml.in" "$dir/shadowgate.yaml" THREADS="$THREADS" RUNDIR="$dir/run" \
        PORT="$port" METRICS_PORT="$mport" ORIGIN_PORT="$P_ORIGIN" SHADOW_PORT="$sport" MIRRORS="$mirrors"
    RUST_LOG=warn "$SG" -t -c "$dir/shadowgate.yaml" >"$dir/check.log" 2>&1 \
        || sg_die "shadowgate rejects $dir/shadowgate.yaml: $(cat "$dir/check.log")"
    RUST_LOG=warn "${PIN_PROXY[@]}" "$SG" -c "$dir/shadowgate.yaml" >"$dir/shadowgate.log" 2>&1 &
    PIDS+=($!)
    SG_PIDS+=($!)
    eval "PID_${name//-/_}=$!"
}

start_bare() { # name port: bare Pingora to the origin, pinned and threaded like shadowgate
    local name=$1 port=$2
    local dir="$WORK/$name"
    mkdir -p "$dir"
    RUST_LOG=warn "${PIN_PROXY[@]}" "$BARE" --listen "127.0.0.1:$port" --origin "127.0.0.1:$P_ORIGIN" \
        --threads "$THREADS" >"$dir/bare_pingora.log" 2>&1 &
    PIDS+=($!)
    SG_PIDS+=($!)  # Pingora's SIGINT is a fast stop too
    eval "PID_${name//-/_}=$!"
}

MIRROR_TIMEOUT_MS=2000
MIRRORS="[{ upstream: shadow, percentage: 100, methods: [GET, POST], max_body_bytes: 2097152, queue_bytes: 2097152, timeout_ms: $MIRROR_TIMEOUT_MS, max_in_flight: 1024 }]"
# Shadow verdicts: a 100% mirror of GET, without and with `compare`.
MIRRORS_JSON="[{ upstream: shadow, percentage: 100, methods: [GET], timeout_ms: $MIRROR_TIMEOUT_MS, max_in_flight: 1024 }]"
MIRRORS_COMPARE="[{ upstream: shadow, percentage: 100, methods: [GET], timeout_ms: $MIRROR_TIMEOUT_MS, max_in_flight: 1024, compare: { max_body_bytes: 262144 } }]"

# The JSON document of /json (~4 KiB, no ' or $ so that NGINX takes it as a
# single-quoted string), and the same with one value changed for the "diff" shadow.
make_json() { # VALUE-OF-ONE-FIELD
    python3 - "$1" <<'EOF'
import json, sys
items = [{"id": i, "sku": f"SKU-{i:05d}", "name": f"bench item number {i}", "price_cents": 1000 + 37 * i,
          "in_stock": i % 3 != 0, "tags": ["bench", "json", f"t{i % 7}"]} for i in range(32)]
doc = {"order": {"id": "ord-000123", "status": sys.argv[1], "currency": "EUR", "items": items},
       "meta": {"generated_by": "shadowgate bench", "version": 1}}
print(json.dumps(doc, separators=(",", ":")))
EOF
}
JSON_BODY=$(make_json shipped)
JSON_BODY_DIFF=$(make_json pending)

sg_say "results in $OUT"
sg_say "proxies on CPUs $PROXY_CPUS with $THREADS thread(s)/worker(s) each; load generator and origins on CPUs $LOAD_CPUS"

# --- origins -------------------------------------------------------------------
start_nginx origin "$HERE/origin.conf.in" "${PIN_LOAD[@]}" -- WORKERS=1 PORT="$P_ORIGIN" \
    RETURN='200 "hello from the bench origin\n"' JSON="$JSON_BODY"
start_nginx shadow "$HERE/origin.conf.in" "${PIN_LOAD[@]}" -- WORKERS=1 PORT="$P_SHADOW" \
    RETURN='200 "hello from the bench shadow\n"' JSON="$JSON_BODY"
# The same JSON with one value changed: every comparison parses and diffs both bodies.
start_nginx shadow-json-diff "$HERE/origin.conf.in" "${PIN_LOAD[@]}" -- WORKERS=1 PORT="$P_SHADOW_DIFF" \
    RETURN='200 "hello from the bench diff shadow\n"' JSON="$JSON_BODY_DIFF"
# The cheapest shadow there is: keep-alive, 204 with no body. Mirroring to it
# measures what the mirror itself costs the proxy.
start_nginx shadow-204 "$HERE/origin.conf.in" "${PIN_LOAD[@]}" -- WORKERS=1 PORT="$P_SHADOW_204" \
    RETURN='204' JSON="$JSON_BODY"
mkdir -p "$WORK/slow-shadow"
"${PIN_LOAD[@]}" python3 "$HERE/slow_shadow.py" --port "$P_SLOW" --delay-ms "$SLOW_DELAY_MS" \
    >"$WORK/slow-shadow/slow-shadow.log" 2>&1 &
PIDS+=($!)
PID_slow_shadow=$!
wait_http "http://127.0.0.1:$P_ORIGIN/__bench_status" 10
wait_http "http://127.0.0.1:$P_SHADOW/__bench_status" 10
wait_http "http://127.0.0.1:$P_SHADOW_204/__bench_status" 10
wait_http "http://127.0.0.1:$P_SHADOW_DIFF/__bench_status" 10
wait_http "http://127.0.0.1:$P_SLOW/__bench_status" 10

# --- proxies ---------------------------------------------------------------------
start_sg sg "$P_SG" "$P_MET" "$P_SHADOW" "[]"
start_sg sg-mirror "$P_SG_M" "$P_MET_M" "$P_SHADOW" "$MIRRORS"
start_sg sg-mirror-slow "$P_SG_MS" "$P_MET_MS" "$P_SLOW" "$MIRRORS"
start_sg sg-mirror-204 "$P_SG_M204" "$P_MET_M204" "$P_SHADOW_204" "$MIRRORS"
start_sg sg-mirror-json "$P_SG_MJ" "$P_MET_MJ" "$P_SHADOW" "$MIRRORS_JSON"
start_sg sg-compare-json "$P_SG_CJ" "$P_MET_CJ" "$P_SHADOW" "$MIRRORS_COMPARE"
start_sg sg-compare-json-diff "$P_SG_CJD" "$P_MET_CJD" "$P_SHADOW_DIFF" "$MIRRORS_COMPARE"
ng_common=(WORKERS="$THREADS" ORIGIN_PORT="$P_ORIGIN" MIRROR_TIMEOUT_MS="$MIRROR_TIMEOUT_MS")
start_nginx nginx "$HERE/nginx-proxy.conf.in" "${PIN_PROXY[@]}" -- "${ng_common[@]}" PORT="$P_NG" \
    SHADOW_PORT="$P_SHADOW" MIRROR=""
start_nginx nginx-mirror "$HERE/nginx-proxy.conf.in" "${PIN_PROXY[@]}" -- "${ng_common[@]}" PORT="$P_NG_M" \
    SHADOW_PORT="$P_SHADOW" MIRROR="mirror /__bench_mirror;"
start_nginx nginx-mirror-slow "$HERE/nginx-proxy.conf.in" "${PIN_PROXY[@]}" -- "${ng_common[@]}" PORT="$P_NG_MS" \
    SHADOW_PORT="$P_SLOW" MIRROR="mirror /__bench_mirror;"
start_nginx nginx-mirror-204 "$HERE/nginx-proxy.conf.in" "${PIN_PROXY[@]}" -- "${ng_common[@]}" PORT="$P_NG_M204" \
    SHADOW_PORT="$P_SHADOW_204" MIRROR="mirror /__bench_mirror;"
start_bare pingora-bare "$P_BARE"

for p in $P_SG $P_SG_M $P_SG_MS $P_SG_M204 $P_SG_MJ $P_SG_CJ $P_SG_CJD $P_NG $P_NG_M $P_NG_MS $P_NG_M204 $P_BARE; do
    wait_http "http://127.0.0.1:$p/bench" 15
done
for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || sg_die "process $pid exited early; see the logs in $OUT/logs"
done

# --- manifest for the runner ------------------------------------------------------
ONLY_PY=None
[ -n "$ONLY" ] && ONLY_PY=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1].split(",")))' "$ONLY")
python3 - "$OUT/manifest.in.json" <<EOF
import json, sys
pin_load = $(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "${PIN_LOAD[@]}")
def t(kind, port, pids, path="/bench", **kw):
    d = {"kind": kind, "url": f"http://127.0.0.1:{port}{path}", "pids": pids}
    d.update(kw)
    return d
m = {
  "out": "$OUT", "quick": bool($QUICK), "cpu_count": $NCPU,
  "proxy_cpus": "$PROXY_CPUS", "load_cpus": "$LOAD_CPUS", "pinned": bool($PIN),
  "load_cpu_count": $LOAD_CPU_COUNT, "threads": $THREADS,
  "pin_load": pin_load, "wrk": "$WRK", "oha": "$OHA", "wrk_lua": "$HERE/wrk.lua",
  "versions": {
    "shadowgate": """$("$SG" --version 2>&1 | head -1)""",
    "git": """$(cd "$REPO" && git describe --always --dirty 2>/dev/null || echo unknown)""",
    "build": "$([ "$BUILD" = pgo ] && echo "profile-guided (scripts/build-pgo.sh)" || echo "release, $BIN_DIR")",
    "nginx": """$("$NGINX" -v 2>&1 | head -1)""",
    "wrk": """$("$WRK" -v 2>&1 | head -1 | sed "s/ \[.*//")""",
    "oha": """$("$OHA" --version 2>&1 | head -1)""",
    "kernel": """$(uname -r)""",
    "cpu": """$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')""",
  },
  "origins": {
    "origin": {"status_url": "http://127.0.0.1:$P_ORIGIN/__bench_status", "pids": [$PID_origin]},
    "shadow": {"status_url": "http://127.0.0.1:$P_SHADOW/__bench_status", "pids": [$PID_shadow]},
    "slow_shadow": {"status_url": "http://127.0.0.1:$P_SLOW/__bench_status", "pids": [$PID_slow_shadow]},
    "shadow_204": {"status_url": "http://127.0.0.1:$P_SHADOW_204/__bench_status", "pids": [$PID_shadow_204]},
    "shadow_json_diff": {"status_url": "http://127.0.0.1:$P_SHADOW_DIFF/__bench_status", "pids": [$PID_shadow_json_diff]},
  },
  "targets": {
    "direct": t("direct", $P_ORIGIN, []),
    "shadowgate": t("shadowgate", $P_SG, [$PID_sg], threads=$THREADS, metrics_url="http://127.0.0.1:$P_MET/metrics"),
    "shadowgate_mirror": t("shadowgate", $P_SG_M, [$PID_sg_mirror], threads=$THREADS, shadow="shadow", metrics_url="http://127.0.0.1:$P_MET_M/metrics"),
    "shadowgate_mirror_204": t("shadowgate", $P_SG_M204, [$PID_sg_mirror_204], threads=$THREADS, shadow="shadow_204", metrics_url="http://127.0.0.1:$P_MET_M204/metrics"),
    "shadowgate_mirror_slow": t("shadowgate", $P_SG_MS, [$PID_sg_mirror_slow], threads=$THREADS, shadow="slow_shadow", metrics_url="http://127.0.0.1:$P_MET_MS/metrics"),
    "shadowgate_json": t("shadowgate", $P_SG, [$PID_sg], path="/json", threads=$THREADS, metrics_url="http://127.0.0.1:$P_MET/metrics"),
    "shadowgate_mirror_json": t("shadowgate", $P_SG_MJ, [$PID_sg_mirror_json], path="/json", threads=$THREADS, shadow="shadow", metrics_url="http://127.0.0.1:$P_MET_MJ/metrics"),
    "shadowgate_compare_json": t("shadowgate", $P_SG_CJ, [$PID_sg_compare_json], path="/json", threads=$THREADS, shadow="shadow", metrics_url="http://127.0.0.1:$P_MET_CJ/metrics"),
    "shadowgate_compare_json_diff": t("shadowgate", $P_SG_CJD, [$PID_sg_compare_json_diff], path="/json", threads=$THREADS, shadow="shadow_json_diff", metrics_url="http://127.0.0.1:$P_MET_CJD/metrics"),
    "nginx": t("nginx", $P_NG, [$PID_nginx], threads=$THREADS),
    "nginx_mirror": t("nginx", $P_NG_M, [$PID_nginx_mirror], threads=$THREADS, shadow="shadow"),
    "nginx_mirror_204": t("nginx", $P_NG_M204, [$PID_nginx_mirror_204], threads=$THREADS, shadow="shadow_204"),
    "nginx_mirror_slow": t("nginx", $P_NG_MS, [$PID_nginx_mirror_slow], threads=$THREADS, shadow="slow_shadow"),
    "pingora_bare": t("pingora", $P_BARE, [$PID_pingora_bare], threads=$THREADS),
  },
  "params": {
    "repeats": $REPEATS, "closed_s": $CLOSED_S, "rate_s": $RATE_S, "warmup_s": $([ "$QUICK" = 1 ] && echo 1 || echo 3),
    "rate": $RATE, "latency_conns": 32, "slow_rate": $SLOW_RATE, "slow_conns": 64,
    "slow_delay_ms": $SLOW_DELAY_MS, "post_bytes": 1048576, "post_conns": 16,
    "mirror_timeout_ms": $MIRROR_TIMEOUT_MS,
    "gap_s": 0.3, "busy_threshold": 0.10, "noisy_share": 0.10,
    "settle_budget_s": $([ "$QUICK" = 1 ] && echo 10 || echo 60),
    "initial_settle_max_s": $SETTLE_MAX,
    "only": $ONLY_PY,
  },
}
json.dump(m, open(sys.argv[1], "w"), indent=1)
EOF

# --- quiet machine? ---------------------------------------------------------------
{
    echo "== uptime"; uptime
    echo "== top (before the run)"; top -bn1 -w 200 2>/dev/null | head -20 || true
} >"$OUT/machine-before.txt" 2>&1
# The runner goes in the background so that a signal reaches our trap at once
# (bash runs traps only between foreground commands); cleanup stops it.
run_child() { "$@" & CHILD=$!; wait "$CHILD"; CHILD=""; }
run_child python3 "$HERE/runner.py" --wait-idle "$OUT/manifest.in.json"

# --- measure ----------------------------------------------------------------------------
run_child python3 "$HERE/runner.py" "$OUT/manifest.in.json"
{ echo "== uptime (after)"; uptime; } >>"$OUT/machine-before.txt" 2>&1
for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || sg_say "warning: process $pid died during the run; see $OUT/logs"
done

# --- report -----------------------------------------------------------------------------
ELAPSED=$(( $(date +%s) - STARTED ))
python3 "$HERE/report.py" "$OUT" --elapsed "$ELAPSED" --build "$BUILD_S"
sg_say "results: $OUT/results.md  $OUT/results.json  $OUT/chart.svg"

# --- TLS termination ---------------------------------------------------------------------
# scripts/bench-tls.sh with the same binary, threads and pinning, in the same
# invocation (skipped with --only): HTTPS keep-alive, a handshake per request, HTTP/2.
if [ -z "$ONLY" ]; then
    tls_args=(--binary "$SG" --out "$OUT/tls" --threads "$THREADS" --port-base $((PORT_BASE + 100)))
    if [ "$PIN" = 1 ]; then
        tls_args+=(--proxy-cpus "$PROXY_CPUS" --load-cpus "$LOAD_CPUS")
    else
        tls_args+=(--no-pin)
    fi
    [ "$QUICK" = 1 ] && tls_args+=(--quick)
    bash "$REPO/scripts/bench-tls.sh" "${tls_args[@]}" \
        || sg_say "warning: the TLS scenarios failed; see $OUT/tls"
fi
ELAPSED=$(( $(date +%s) - STARTED ))
sg_say "took ${ELAPSED}s in all, of which ${BUILD_S}s building"
