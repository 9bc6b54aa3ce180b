#!/usr/bin/env bash
# TLS load test: shadowgate and NGINX terminating TLS with the same certificate
# (ECDSA P-256), both proxying to one fixed-cost NGINX origin on 127.0.0.1.
#
#   scripts/bench-tls.sh            3 repeats of 4 s runs, about 2 minutes
#   scripts/bench-tls.sh --quick    smoke run: 1 repeat of 1 s runs, under 30 s
#   scripts/bench-tls.sh --help     all options
#
# Scenarios, each run alternately against both proxies (A B, then B A, ...):
#   h1_keepalive   HTTPS HTTP/1.1, 16 keep-alive connections (wrk)
#   h1_new_conn    HTTPS HTTP/1.1, a new TLS connection per request (wrk, Connection: close)
#   h2_keepalive   HTTPS HTTP/2, 16 connections x 10 streams (h2load)
# Results: results/tls-<timestamp>/results.md (median req/s, proxy CPU µs per
# request and per handshake, ratios to NGINX, errors) and runs.tsv with every run. Proxies are pinned to
# --proxy-cpus, the load generator and origin to --load-cpus, as in bench.sh.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE="$REPO/scripts/bench"

SG_NAME=bench-tls
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"

usage() {
    cat <<'EOF'
Usage: scripts/bench-tls.sh [options]

  --quick             smoke run: 1 repeat of 1 s runs
  --repeats N         repeats of every scenario (default 3; quick 1)
  --duration S        seconds per run (default 4; quick 1)
  --threads N         shadowgate threads = NGINX workers (default 1)
  --proxy-cpus LIST   CPUs for the proxies (default 1)
  --load-cpus LIST    CPUs for the load generators and the origin (default 0)
  --no-pin            do not pin with taskset
  --port-base P       first of the loopback ports used (default 18100)
  --binary PATH       shadowgate binary to test (default: build target/release/shadowgate)
  --out DIR           results folder (default results/tls-<timestamp>)
  -h, --help          this help
EOF
}

QUICK=0 REPEATS="" DURATION="" THREADS=1 PROXY_CPUS=1 LOAD_CPUS=0 PIN=1 PORT_BASE=18100 SG="" OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --repeats) REPEATS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --threads) THREADS=$2; shift ;;
        --proxy-cpus) PROXY_CPUS=$2; shift ;;
        --load-cpus) LOAD_CPUS=$2; shift ;;
        --no-pin) PIN=0 ;;
        --port-base) PORT_BASE=$2; shift ;;
        --binary) SG=$2; shift ;;
        --out) OUT=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; sg_die "unknown option $1" ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then : "${REPEATS:=1}" "${DURATION:=1}"; else : "${REPEATS:=3}" "${DURATION:=4}"; fi
for v in REPEATS DURATION THREADS PORT_BASE; do
    [[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -gt 0 ] || sg_die "--${v,,} must be a positive whole number"
done

unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
missing=$(sg_missing_packages nginx:nginx wrk:wrk h2load:nghttp2-client openssl:openssl taskset:util-linux python3:python3)
[ -z "$missing" ] || sg_die "missing tools; install (Debian/Ubuntu): apt-get install ${missing//$'\n'/ }"
if [ "$(nproc)" -lt 2 ]; then PIN=0; fi
if [ "$PIN" = 1 ]; then PIN_PROXY=(taskset -c "$PROXY_CPUS"); PIN_LOAD=(taskset -c "$LOAD_CPUS"); else PIN_PROXY=(); PIN_LOAD=(); fi

if [ -z "$SG" ]; then
    sg_say "building the release binary"
    (cd "$REPO" && cargo build --release --bin shadowgate >&2) || sg_die "cargo build --release failed"
    SG="$REPO/target/release/shadowgate"
fi
[ -x "$SG" ] || sg_die "$SG is not an executable"

[ -n "$OUT" ] || OUT="$REPO/results/tls-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/shadowgate-bench-tls.XXXXXX")
chmod 755 "$WORK"   # NGINX workers started as root drop privileges and must enter it
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    mkdir -p "$OUT/logs"
    find "$WORK" \( -name '*.log' -o -name '*.conf' -o -name '*.yaml' \) -exec cp {} "$OUT/logs/" \; 2>/dev/null || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

P_ORIGIN=$PORT_BASE P_SG=$((PORT_BASE + 1)) P_NG=$((PORT_BASE + 2))
for p in $P_ORIGIN $P_SG $P_NG; do
    ! sg_listening "127.0.0.1:$p" || sg_die "127.0.0.1:$p is in use; pick --port-base"
done

# --- the shared certificate ---------------------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=bench.test -addext subjectAltName=DNS:bench.test \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>"$WORK/openssl.log" || sg_die "openssl failed: $(cat "$WORK/openssl.log")"

# --- origin, shadowgate, NGINX ------------------------------------------------
mkdir -p "$WORK/origin"
# The shared origin template (scripts/bench/origin.conf.in); /json is not used here.
sed -e "s#@WORKERS@#1#; s#@PORT@#$P_ORIGIN#; s#@RETURN@#200 \"hello from the bench origin\\\\n\"#; s#@JSON@#{}#; s#@PREFIX@#$WORK/origin#g" \
    "$HERE/origin.conf.in" > "$WORK/origin/origin.conf"
"${PIN_LOAD[@]}" nginx -p "$WORK/origin" -c "$WORK/origin/origin.conf" -e "$WORK/origin/error.log" \
    >"$WORK/origin/stdout.log" 2>&1 &
PIDS+=($!); PID_ORIGIN=$!

mkdir -m 700 "$WORK/sg"
cat > "$WORK/sg/shadowgate.yaml" <<EOF
threads: $THREADS
pid_file: $WORK/sg/shadowgate.pid
upgrade_sock: $WORK/sg/upgrade.sock
grace_period_seconds: 1
graceful_shutdown_timeout_seconds: 1
listeners:
  - address: "127.0.0.1:$P_SG"
    # As NGINX's keepalive_requests below: no new handshakes within a run.
    client: { keepalive_requests: 1000000 }
    tls:
      certificates:
        - { cert: "$WORK/cert.pem", key: "$WORK/key.pem" }
upstreams:
  primary:
    servers: [{ address: "127.0.0.1:$P_ORIGIN" }]
routes:
  - { name: bench, upstream: primary }
EOF
"$SG" -t -c "$WORK/sg/shadowgate.yaml" >"$WORK/sg/check.log" 2>&1 || sg_die "shadowgate rejects its config: $(cat "$WORK/sg/check.log")"
RUST_LOG=warn "${PIN_PROXY[@]}" "$SG" -c "$WORK/sg/shadowgate.yaml" >"$WORK/sg/shadowgate.log" 2>&1 &
PIDS+=($!); PID_SG=$!

mkdir -p "$WORK/nginx"
cat > "$WORK/nginx/nginx.conf" <<EOF
worker_processes $THREADS;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/client_body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    keepalive_requests 10000000;
    upstream primary { server 127.0.0.1:$P_ORIGIN; keepalive 64; }
    proxy_http_version 1.1;
    server {
        listen 127.0.0.1:$P_NG ssl http2 backlog=4096;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Request-Id \$request_id;
            proxy_pass http://primary;
        }
    }
}
EOF
nginx -t -q -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" 2>"$WORK/nginx/check.log" \
    || sg_die "nginx rejects its config: $(cat "$WORK/nginx/check.log")"
"${PIN_PROXY[@]}" nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" \
    >"$WORK/nginx/stdout.log" 2>&1 &
PIDS+=($!); PID_NG=$!

for url in "http://127.0.0.1:$P_ORIGIN/" "https://127.0.0.1:$P_SG/" "https://127.0.0.1:$P_NG/"; do
    for _ in $(seq 100); do curl -sfk -o /dev/null --max-time 1 "$url" && continue 2; sleep 0.1; done
    sg_die "$url did not answer within 10 s; logs in $OUT/logs"
done

# --- runs -------------------------------------------------------------------------
# CPU seconds (user+system) of a process and its children's threads, from /proc.
cpu_ticks() { # pid...
    local total=0 p
    for p in "$@" $(for q in "$@"; do pgrep -P "$q" 2>/dev/null || true; done); do
        [ -r "/proc/$p/stat" ] || continue
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$total"
}
TICK=$(getconf CLK_TCK)

# One run: prints "requests seconds errors".
run_load() { # scenario url
    local limit=$((DURATION + 30))
    case "$1" in
        h1_keepalive|h1_new_conn)
            local close=0; [ "$1" = h1_new_conn ] && close=1
            BENCH_CONN_CLOSE=$close timeout "$limit" "${PIN_LOAD[@]}" wrk -t1 -c16 -d"${DURATION}s" \
                --timeout 5s -s "$HERE/wrk.lua" "$2" 2>&1 | python3 -c '
import json, sys
line = next((l for l in sys.stdin if l.startswith("BENCHJSON ")), None)
if line is None: print("0 1 1"); sys.exit()
d = json.loads(line[10:]); e = d["errors"]
print(d["requests"], d["duration_us"] / 1e6, sum(e.values()))'
            ;;
        h2_keepalive)
            timeout "$limit" "${PIN_LOAD[@]}" h2load -c16 -m10 -t1 -D "$DURATION" "$2" 2>&1 | python3 -c '
import re, sys
text = sys.stdin.read()
done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
took = re.search(r"finished in ([\d.]+)(m?s)", text)
if not (done and took): print("0 1 1"); sys.exit()
secs = float(took.group(1)) / (1000 if took.group(2) == "ms" else 1)
print(done.group(1), secs, int(done.group(2)) + int(done.group(3)))'
            ;;
    esac
}

SCENARIOS=(h1_keepalive h1_new_conn h2_keepalive)
TARGETS=(shadowgate nginx)
printf 'repeat\tscenario\ttarget\trequests\tseconds\treq_per_s\tproxy_cpu_s\terrors\n' > "$OUT/runs.tsv"
for rep in $(seq "$REPEATS"); do
    for sc in "${SCENARIOS[@]}"; do
        order=("${TARGETS[@]}")
        [ $((rep % 2)) = 0 ] && order=(nginx shadowgate)
        for t in "${order[@]}"; do
            if [ "$t" = shadowgate ]; then url="https://127.0.0.1:$P_SG/bench"; pid=$PID_SG
            else url="https://127.0.0.1:$P_NG/bench"; pid=$PID_NG; fi
            c0=$(cpu_ticks "$pid")
            read -r requests seconds errors < <(run_load "$sc" "$url")
            c1=$(cpu_ticks "$pid")
            cpu=$(python3 -c "print(round(($c1 - $c0) / $TICK, 3))")
            rps=$(python3 -c "print(round($requests / $seconds))")
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$sc" "$t" "$requests" "$seconds" "$rps" "$cpu" "$errors" >> "$OUT/runs.tsv"
            sg_say "rep $rep $sc $t: $rps req/s, proxy CPU ${cpu}s, errors $errors"
            sleep 0.3
        done
    done
done
kill -0 "$PID_SG" 2>/dev/null || sg_say "warning: shadowgate died during the run"
kill -0 "$PID_ORIGIN" 2>/dev/null || sg_say "warning: the origin died during the run"

python3 - "$OUT" "$REPEATS" "$DURATION" "$THREADS" "$PROXY_CPUS" "$LOAD_CPUS" "$PIN" <<'EOF'
import csv, statistics, sys
out, repeats, duration, threads, pcpus, lcpus, pin = sys.argv[1:]
rows = list(csv.DictReader(open(f"{out}/runs.tsv"), delimiter="\t"))
lines = ["# TLS termination: shadowgate vs NGINX", "",
         f"{repeats} repeat(s) of {duration} s runs, alternating targets; {threads} thread(s)/worker(s) each; "
         + (f"proxies on CPUs {pcpus}, load and origin on CPUs {lcpus}." if pin == "1" else "not pinned."),
         "Same ECDSA P-256 certificate; TLS 1.3; origin: NGINX `return 200`.", "",
         "| scenario | target | req/s (median) | [min-max] | proxy CPU µs per request | errors |",
         "|---|---|---|---|---|---|"]
summary = {}
for sc in ("h1_keepalive", "h1_new_conn", "h2_keepalive"):
    for t in ("shadowgate", "nginx"):
        rs = [r for r in rows if r["scenario"] == sc and r["target"] == t]
        if not rs:
            continue
        rps = [float(r["req_per_s"]) for r in rs]
        reqs = sum(int(r["requests"]) for r in rs)
        cpu = sum(float(r["proxy_cpu_s"]) for r in rs)
        us = cpu / reqs * 1e6 if reqs else None
        summary[(sc, t)] = (statistics.median(rps), us)
        errs = sum(int(r["errors"]) for r in rs)
        shown = f"{us:.1f}" if us is not None else "-"
        lines.append(f"| {sc} | {t} | {statistics.median(rps):.0f} | {min(rps):.0f}-{max(rps):.0f} | {shown} | {errs} |")
lines += ["", "Ratios, shadowgate / NGINX (h1_new_conn makes one TLS handshake per request, so its",
          "CPU per request is the CPU per handshake plus one proxied request):", "",
          "| scenario | req/s | CPU per request |", "|---|---|---|"]
for sc in ("h1_keepalive", "h1_new_conn", "h2_keepalive"):
    sg, ng = summary.get((sc, "shadowgate")), summary.get((sc, "nginx"))
    if not sg or not ng or not ng[0] or not sg[1] or not ng[1]:
        continue
    lines.append(f"| {sc} | {sg[0] / ng[0]:.2f}x | {sg[1] / ng[1]:.2f}x |")
open(f"{out}/results.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
sg_say "results: $OUT/results.md  $OUT/runs.tsv"
