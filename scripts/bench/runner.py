#!/usr/bin/env python3
"""Measurement loop of scripts/bench.sh (standard library only).

Reads the manifest bench.sh writes (targets, pids, CPUs, tools, parameters),
warms every target up, then runs every scenario REPEATS times, alternating the
targets inside each scenario (A B C D E, then B C D E A, ...). Each run records
throughput or latency, errors, CPU time (and CPU µs per request) and peak RSS of
the proxy under test, how many requests reached the origin and the shadow,
shadowgate's own mirror counters, and how much CPU time processes outside the
benchmark took meanwhile.
One JSON object per run is appended to raw-runs.jsonl in the results folder.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an env proxy

# Fixed-rate latency: the proxies plain and with a 100% mirror to the shadow with a body.
LATENCY = ["direct", "shadowgate", "shadowgate_mirror", "nginx", "nginx_mirror"]
# Closed loop: the same, plus a 100% mirror to the keep-alive 204 shadow, whose
# CPU cost against the plain proxy is the extra CPU per mirrored request.
MAIN = ["direct", "shadowgate", "shadowgate_mirror", "shadowgate_mirror_204",
        "nginx", "nginx_mirror", "nginx_mirror_204"]
# GET keep-alive: the same, plus bare Pingora (examples/bare_pingora.rs), the CPU
# floor of Pingora itself under shadowgate.
GET = MAIN + ["pingora_bare"]
SLOW = ["shadowgate", "shadowgate_mirror_slow", "nginx", "nginx_mirror_slow"]
# Shadow verdicts on a 4 KiB JSON body: plain, 100% mirror without compare, with
# compare (bodies equal), with compare against a shadow whose JSON differs.
COMPARE = ["shadowgate_json", "shadowgate_mirror_json", "shadowgate_compare_json",
           "shadowgate_compare_json_diff"]


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --- processes -------------------------------------------------------------

def processes_and_parents():
    """(pid, parent pid) of every process, read from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        yield int(entry), int(stat[stat.rfind(")") + 2:].split()[1])


def children_of(pid):
    return [child for child, parent in processes_and_parents() if parent == pid]


def process_tree(root):
    """The root pid and its children (an NGINX master and its workers)."""
    return [root] + children_of(root)


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def system_busy_ticks():
    """Busy and total ticks of all CPUs together, from /proc/stat."""
    with open("/proc/stat") as f:
        line = f.readline().split()
    vals = [int(x) for x in line[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = vals
    # With tick-based accounting a process's stime includes the softirq ticks
    # (loopback TCP) taken in its context, so they count as busy here too. The
    # rest, busy minus our processes' CPU time, is what other processes took,
    # plus a little softirq work run from idle or ksoftirqd.
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def children_cpu_seconds():
    """CPU time of the generators we ran and waited for, plus this runner's own."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime + me.ru_utime + me.ru_stime


# --- counters of the origins and shadowgate --------------------------------

def http_get(url, timeout=2.0):
    with OPENER.open(url, timeout=timeout) as resp:
        return resp.read().decode("utf-8", "replace")


def stub_counts(url):
    """Counters of an NGINX stub_status page ({requests, accepts}) or of the slow
    shadow's status page ({requests}); None if unreadable. "own" is how many
    requests and connections the page counts for its own reading."""
    try:
        text = http_get(url)
    except Exception:
        return None
    lines = text.splitlines()
    if lines and lines[0].startswith("Active connections"):
        # "server accepts handled requests" / " A H R", this status request included.
        accepts, _, requests = (int(x) for x in lines[2].split())
        return {"requests": requests, "accepts": accepts, "own": 1}
    for line in lines:
        if line.startswith("started "):
            return {"requests": int(line.split()[1]), "accepts": None, "own": 0}
    return None


def count_diff(before, after, key):
    """What the server counted between two readings, without the later reading itself
    (the earlier one counts itself in its own figure)."""
    if not before or not after or before[key] is None or after[key] is None:
        return None
    return after[key] - before[key] - after["own"]


def sg_mirror_counters(url):
    """shadowgate's mirror and comparison counters, summed over routes and mirrors."""
    out = {"sampled": 0, "completed": 0, "abandoned": {},
           "compare": {"equal": 0, "different": 0, "skipped": 0}}
    try:
        text = http_get(url)
    except Exception:
        return None
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            v = int(float(value))
        except ValueError:
            continue
        if name.startswith("shadowgate_mirror_sampled_total"):
            out["sampled"] += v
        elif name.startswith("shadowgate_mirror_completed_total"):
            out["completed"] += v
        elif name.startswith("shadowgate_mirror_abandoned_total"):
            reason = name.split('reason="', 1)[1].split('"', 1)[0] if 'reason="' in name else "?"
            out["abandoned"][reason] = out["abandoned"].get(reason, 0) + v
        elif name.startswith("shadowgate_compare_total{"):
            outcome = name.split('outcome="', 1)[1].split('"', 1)[0] if 'outcome="' in name else "?"
            out["compare"][outcome] = out["compare"].get(outcome, 0) + v
    return out


def diff_counters(a, b):
    if a is None or b is None:
        return None
    ab = {}
    for k in set(a["abandoned"]) | set(b["abandoned"]):
        d = b["abandoned"].get(k, 0) - a["abandoned"].get(k, 0)
        if d:
            ab[k] = d
    compare = {k: b["compare"].get(k, 0) - a["compare"].get(k, 0) for k in b["compare"]}
    return {"sampled": b["sampled"] - a["sampled"], "completed": b["completed"] - a["completed"],
            "abandoned": ab, "compare": compare}


# --- load generators -------------------------------------------------------

CURRENT = []  # the generator running now, killed if we are stopped


def on_signal(signum, _frame):
    for p in CURRENT:
        try:
            p.kill()
        except OSError:
            pass
    log(f"stopped by signal {signum}")
    sys.exit(128 + signum)


def run_bounded(cmd, env, limit_s):
    """Run a generator with a hard time limit; returns (rc, stdout, stderr)."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    CURRENT.append(p)
    try:
        out, err = p.communicate(timeout=limit_s)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        return -9, out or "", f"killed after {limit_s}s (time limit)"
    finally:
        CURRENT.remove(p)


def run_wrk(m, url, conns, duration, body_bytes=0, close=False):
    env = dict(os.environ, BENCH_BODY_BYTES=str(body_bytes), BENCH_CONN_CLOSE="1" if close else "0")
    threads = max(1, min(m["load_cpu_count"], conns))
    cmd = m["pin_load"] + [m["wrk"], f"-t{threads}", f"-c{conns}", f"-d{duration}s",
                           "--timeout", "5s", "-s", m["wrk_lua"], url]
    rc, out, err = run_bounded(cmd, env, duration + 30)
    res = {"generator": "wrk", "cmd": " ".join(cmd)}
    line = next((l for l in out.splitlines() if l.startswith("BENCHJSON ")), None)
    if rc != 0 or line is None:
        res.update(ok=False, failure=f"wrk exited {rc}: {err.strip()[-300:]}", requests=0, rps=0.0)
        return res
    d = json.loads(line[len("BENCHJSON "):])
    e = d["errors"]
    errors = {k: v for k, v in e.items() if v}
    secs = d["duration_us"] / 1e6
    res.update(
        requests=d["requests"], seconds=secs, rps=d["requests"] / secs if secs else 0.0,
        errors=errors, error_count=sum(errors.values()),
        # wrk counts every status >= 400 as a status error; 2xx/3xx pass.
        status={"non_2xx_3xx": e["status"]},
        latency_ms={k: v / 1000.0 for k, v in d["latency_us"].items()},
        ok=not errors,
    )
    if errors:
        res["failure"] = "errors: " + ", ".join(f"{k}={v}" for k, v in errors.items())
    return res


def run_oha(m, url, conns, duration, rate):
    cmd = m["pin_load"] + [m["oha"], "--no-tui", "--output-format", "json", "--worker-threads",
                           str(m["load_cpu_count"]), "-c", str(conns), "-q", str(rate),
                           "--latency-correction", "-z", f"{duration}s", "-t", "10s", url]
    rc, out, err = run_bounded(cmd, dict(os.environ), duration + 40)
    res = {"generator": "oha", "cmd": " ".join(cmd), "target_rate": rate}
    try:
        d = json.loads(out)
    except ValueError:
        res.update(ok=False, failure=f"oha exited {rc}: {err.strip()[-300:]}", requests=0, rps=0.0)
        return res
    status = d.get("statusCodeDistribution", {}) or {}
    errs = dict(d.get("errorDistribution", {}) or {})
    # Requests still open when -z runs out are cut off by oha itself: not proxy errors.
    aborted = errs.pop("aborted due to deadline", 0)
    requests = sum(status.values())
    bad_status = {k: v for k, v in status.items() if not k.startswith("2")}
    errors = dict(errs)
    if bad_status:
        errors["status"] = sum(bad_status.values())
    secs = d["summary"]["total"]
    p = d.get("latencyPercentiles", {}) or {}
    res.update(
        requests=requests, seconds=secs, rps=requests / secs if secs else 0.0,
        status=status, errors=errors, error_count=sum(errors.values()),
        aborted_at_deadline=aborted,
        latency_ms={"p50": (p.get("p50") or 0) * 1e3, "p90": (p.get("p90") or 0) * 1e3,
                    "p99": (p.get("p99") or 0) * 1e3, "p999": (p.get("p99.9") or 0) * 1e3,
                    "max": (d["summary"].get("slowest") or 0) * 1e3},
        ok=not errors and requests > 0,
    )
    if errors:
        res["failure"] = "errors: " + ", ".join(f"{k}={v}" for k, v in errors.items())
    # Below the requested rate means the target saturated: latency then includes queueing.
    res["saturated"] = res["rps"] < 0.95 * rate
    return res


# --- one measured run ------------------------------------------------------

def our_pids(m):
    """Every process of the benchmark: proxies, origins, and NGINX workers under their masters."""
    roots = []
    for t in m["targets"].values():
        roots += t["pids"]
    for o in m["origins"].values():
        roots += o["pids"]
    roots = set(roots)
    pids = set(roots)
    pids.update(child for child, parent in processes_and_parents() if parent in roots)
    return sorted(pids)


def settle(m, state, quiet_s):
    """Pause between runs; wait longer (bounded) while other processes keep CPUs busy."""
    budget = state["settle_budget_s"]
    waited = 0.0
    while True:
        b0, t0 = system_busy_ticks()
        ours0 = cpu_ticks(our_pids(m))
        time.sleep(quiet_s)
        b1, t1 = system_busy_ticks()
        ours1 = cpu_ticks(our_pids(m))
        total = max(1, t1 - t0)
        foreign = max(0, (b1 - b0) - (ours1 - ours0)) / total  # share of all CPUs
        waited += quiet_s
        if foreign < m["params"]["busy_threshold"] or budget - waited <= 0 or quiet_s == 0:
            break
        quiet_s = 1.0
    if waited > 0.5:
        state["settle_budget_s"] = max(0.0, budget - (waited - 0.5))
    return foreign


def measure(m, scenario, name, repeat, state, warmup=False):
    t = m["targets"][name]
    P = m["params"]
    pids = process_tree(t["pids"][0]) if t["kind"] == "nginx" else list(t["pids"])
    # The shadow this target mirrors to (if any), and the primary origin.
    shadow = m["origins"][t["shadow"]] if t.get("shadow") else None
    origin = m["origins"]["origin"]

    pre_idle_foreign = settle(m, state, 0.0 if warmup else P["gap_s"])
    o0 = stub_counts(origin["status_url"])
    s0 = stub_counts(shadow["status_url"]) if shadow else None
    sg0 = sg_mirror_counters(t["metrics_url"]) if t.get("metrics_url") else None
    cpu0 = cpu_ticks(pids)
    gen0 = children_cpu_seconds()
    b0, tot0 = system_busy_ticks()
    ours0 = cpu_ticks(our_pids(m))
    wall0 = time.monotonic()

    url = t["url"]
    kind = scenario["kind"]
    dur = scenario["duration"]
    if kind == "closed":
        res = run_wrk(m, url, scenario["conns"], dur, scenario.get("body", 0), scenario.get("close", False))
    else:
        res = run_oha(m, url, scenario["conns"], dur, scenario["rate"])

    wall = time.monotonic() - wall0
    b1, tot1 = system_busy_ticks()
    ours1 = cpu_ticks(our_pids(m))
    gen1 = children_cpu_seconds()
    cpu1 = cpu_ticks(pids)
    # Let in-flight shadow requests land before counting them (the slow one needs its delay).
    time.sleep(scenario.get("drain_s", 0.2))
    # CPU per request counts the shadow work still in flight when the load
    # ended; busy (below) is over the load alone. Idle proxies take ~0 ticks.
    cpu2 = cpu_ticks(pids)
    o1 = stub_counts(origin["status_url"])
    s1 = stub_counts(shadow["status_url"]) if shadow else None
    sg1 = sg_mirror_counters(t["metrics_url"]) if t.get("metrics_url") else None

    ncpu = m["cpu_count"]
    gen_s = gen1 - gen0
    busy_s = (b1 - b0) / CLK_TCK
    ours_s = (ours1 - ours0) / CLK_TCK
    foreign_s = max(0.0, busy_s - ours_s - gen_s)
    cpu_s = (cpu1 - cpu0) / CLK_TCK
    cpu_s_with_drain = (cpu2 - cpu0) / CLK_TCK
    proxied = t["kind"] != "direct" and res.get("requests")
    rec = {
        "scenario": scenario["id"], "target": name, "repeat": repeat, "warmup": warmup,
        "time": time.strftime("%H:%M:%S"), "wall_s": round(wall, 3),
        **res,
        "proxy_cpu_s": round(cpu_s, 3) if t["kind"] != "direct" else None,
        "proxy_cpu_util": round(cpu_s / wall / t.get("threads", 1), 3) if t["kind"] != "direct" and wall else None,
        "proxy_cpu_s_with_drain": round(cpu_s_with_drain, 3) if t["kind"] != "direct" else None,
        "cpu_s_per_10k": round(cpu_s_with_drain / res["requests"] * 1e4, 4) if proxied else None,
        "cpu_us_per_req": round(cpu_s_with_drain / res["requests"] * 1e6, 3) if proxied else None,
        "generator_cpu_s": round(gen_s, 3),
        "foreign_cpu_s": round(foreign_s, 3),
        "foreign_cpu_share": round(foreign_s / (wall * ncpu), 4) if wall else 0,
        "foreign_share_before": round(pre_idle_foreign, 4),
        "origin_requests": count_diff(o0, o1, "requests"),
        "shadow_requests": count_diff(s0, s1, "requests"),
        # New connections the shadow accepted: near 0 when the proxy keeps them alive.
        "shadow_connections": count_diff(s0, s1, "accepts"),
    }
    if t["kind"] == "nginx":
        rec["rss_hwm_kb_sum"] = sum(status_kb(p, "VmHWM") for p in pids)
        rec["rss_hwm_kb_max_worker"] = max([status_kb(p, "VmHWM") for p in pids[1:]] or [0])
        rec["rss_hwm_kb"] = rec["rss_hwm_kb_sum"]
    elif t["kind"] in ("shadowgate", "pingora"):
        rec["rss_hwm_kb"] = status_kb(pids[0], "VmHWM")
    if sg0 is not None and sg1 is not None:
        rec["sg_mirror"] = diff_counters(sg0, sg1)
    cmp = (rec.get("sg_mirror") or {}).get("compare") or {}
    if any(cmp.values()):
        rec["sg_compare"] = cmp
        if res.get("requests"):
            # Verdicts reached (equal or different) per request the client completed.
            rec["compared_share"] = round((cmp.get("equal", 0) + cmp.get("different", 0)) / res["requests"], 4)
    if shadow and res.get("requests") and rec["shadow_requests"] is not None:
        rec["mirrored_share"] = round(rec["shadow_requests"] / res["requests"], 4)
    rec["noisy"] = rec["foreign_cpu_share"] > P["noisy_share"]
    return rec


def scenarios(P):
    s = [
        {"id": "get_c1", "kind": "closed", "conns": 1, "targets": GET},
        {"id": "get_c16", "kind": "closed", "conns": 16, "targets": GET},
        {"id": "get_c64", "kind": "closed", "conns": 64, "targets": GET},
        {"id": "latency", "kind": "rate", "conns": P["latency_conns"], "rate": P["rate"], "targets": LATENCY},
        {"id": "slow_shadow", "kind": "rate", "conns": P["slow_conns"], "rate": P["slow_rate"],
         "targets": SLOW, "drain_s": P["slow_delay_ms"] / 1000.0 + 0.3},
        {"id": "post_1mib", "kind": "closed", "conns": P["post_conns"], "body": P["post_bytes"], "targets": MAIN},
        {"id": "no_keepalive", "kind": "closed", "conns": 16, "close": True, "targets": MAIN},
        {"id": "compare_c16", "kind": "closed", "conns": 16, "targets": COMPARE},
    ]
    for sc in s:
        sc["duration"] = P["closed_s"] if sc["kind"] == "closed" else P["rate_s"]
    if P.get("only"):
        unknown = set(P["only"]) - {sc["id"] for sc in s}
        if unknown:
            sys.exit(f"bench: unknown scenario(s) {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(sc['id'] for sc in s)}")
        s = [sc for sc in s if sc["id"] in P["only"]]
    return s


def wait_idle(m):
    """Before measuring: wait (bounded) until other processes leave the CPUs mostly idle."""
    limit = m["params"]["initial_settle_max_s"]
    threshold = m["params"]["busy_threshold"]
    start = time.monotonic()
    samples = []
    while True:
        b0, t0 = system_busy_ticks()
        ours0 = cpu_ticks(our_pids(m))
        time.sleep(2.0)
        b1, t1 = system_busy_ticks()
        ours1 = cpu_ticks(our_pids(m))
        foreign = max(0, (b1 - b0) - (ours1 - ours0)) / max(1, t1 - t0)
        samples.append(round(foreign, 3))
        waited = time.monotonic() - start
        if foreign < threshold:
            log(f"machine quiet: other processes use {foreign:.0%} of the CPUs")
            break
        if waited >= limit:
            log(f"warning: other processes still use {foreign:.0%} of the CPUs after {waited:.0f}s; "
                "measuring anyway (noisy runs are flagged)")
            break
        log(f"waiting for other processes to settle: they use {foreign:.0%} of the CPUs "
            f"({waited:.0f}/{limit}s)")
    with open(os.path.join(m["out"], "settle.json"), "w") as f:
        json.dump({"foreign_share_samples": samples, "waited_s": round(time.monotonic() - start, 1),
                   "loadavg": open("/proc/loadavg").read().split()[:3]}, f)


def main():
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if sys.argv[1] == "--wait-idle":
        with open(sys.argv[2]) as f:
            wait_idle(json.load(f))
        return
    manifest_path = sys.argv[1]
    with open(manifest_path) as f:
        m = json.load(f)
    P = m["params"]
    out = os.path.join(m["out"], "raw-runs.jsonl")
    state = {"settle_budget_s": P["settle_budget_s"]}
    scen = scenarios(P)
    m["scenarios"] = scen
    with open(os.path.join(m["out"], "manifest.json"), "w") as f:
        json.dump(m, f, indent=1)

    with open(out, "a") as sink:
        # Warm-up: every target, closed loop, results kept only as warm-up records.
        names = sorted({n for sc in scen for n in sc["targets"]}, key=list(m["targets"]).index)
        for name in names:
            wsc = {"id": "warmup", "kind": "closed", "conns": 16, "duration": P["warmup_s"]}
            rec = measure(m, wsc, name, 0, state, warmup=True)
            sink.write(json.dumps(rec) + "\n")
            flag = "" if rec["ok"] else f"  !! {rec.get('failure')}"
            log(f"warm-up {name:24s} {rec['rps']:10.0f} req/s{flag}")
        total = P["repeats"] * sum(len(sc["targets"]) for sc in scen)
        done = 0
        for rep in range(1, P["repeats"] + 1):
            for sc in scen:
                order = sc["targets"][(rep - 1) % len(sc["targets"]):] + sc["targets"][:(rep - 1) % len(sc["targets"])]
                for name in order:
                    rec = measure(m, sc, name, rep, state)
                    sink.write(json.dumps(rec) + "\n")
                    sink.flush()
                    done += 1
                    lat = rec.get("latency_ms", {})
                    extra = f" p99 {lat.get('p99', 0):8.2f} ms" if sc["kind"] == "rate" else ""
                    if rec.get("cpu_us_per_req") is not None:
                        extra += f" {rec['cpu_us_per_req']:7.1f} µs CPU/req"
                    if rec.get("mirrored_share") is not None:
                        extra += f" mirrored {rec['mirrored_share']:.0%}"
                    if rec.get("sg_compare"):
                        c = rec["sg_compare"]
                        extra += (f" compared {rec.get('compared_share', 0):.0%} (equal {c.get('equal', 0)},"
                                  f" different {c.get('different', 0)}, skipped {c.get('skipped', 0)})")
                    flags = []
                    if not rec["ok"]:
                        flags.append(f"ERRORS {rec.get('failure')}")
                    if rec.get("saturated"):
                        flags.append("below target rate")
                    if rec["noisy"]:
                        flags.append(f"noisy: other processes took {rec['foreign_cpu_share']:.0%} of CPU")
                    log(f"[{done:3d}/{total}] rep {rep} {sc['id']:13s} {name:24s} "
                        f"{rec['rps']:10.0f} req/s{extra}" + ("  " + "; ".join(flags) if flags else ""))


if __name__ == "__main__":
    main()
