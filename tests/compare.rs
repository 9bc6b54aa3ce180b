//! Shadow verdicts against real origins on loopback: the proxy compares each mirrored
//! response with the primary's (and a control's), and reports per field what differs beyond noise.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use common::proxy::private_dir;
use common::{Misbehavior, Origin, OriginOptions, Proxy, RawOrigin, Reply, WAIT, pool};

/// What each origin answers by default: a JSON document that depends only on the path.
fn item(uri: &str) -> Value {
    json!({"path": uri, "price": 10, "items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 2}]})
}

fn same_json() -> impl Fn(u64, &str) -> Reply + Send + Sync + 'static {
    |_, uri| Reply::json(&item(uri))
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines()
        .map(|l| format!("{pad}{l}\n"))
        .collect::<String>()
}

/// A primary, a candidate mirrored at 100% with `compare` and, if set, a control.
struct Fleet {
    proxy: Proxy,
    primary: Origin,
    candidate: Origin,
    control: Option<Origin>,
}

/// What a test changes about a fleet: every side answers `item` unless told otherwise.
struct FleetSpec {
    primary: OriginOptions,
    candidate: OriginOptions,
    control: Option<OriginOptions>,
    compare: String,
    top: String,
    mirror: String,
}

/// A fleet where every side answers `item`, with no control and no compare options.
fn fleet() -> FleetSpec {
    FleetSpec {
        primary: OriginOptions::named("primary").reply(same_json()),
        candidate: OriginOptions::named("candidate").reply(same_json()),
        control: None,
        compare: String::new(),
        top: String::new(),
        mirror: String::new(),
    }
}

impl FleetSpec {
    fn primary(mut self, reply: impl Fn(u64, &str) -> Reply + Send + Sync + 'static) -> Self {
        self.primary = self.primary.reply(reply);
        self
    }

    fn candidate(mut self, reply: impl Fn(u64, &str) -> Reply + Send + Sync + 'static) -> Self {
        self.candidate = self.candidate.reply(reply);
        self
    }

    /// The candidate answers only after `delay`.
    fn candidate_delay(mut self, delay: Duration) -> Self {
        self.candidate = self.candidate.response_delay(delay);
        self
    }

    /// Add a control (pool `ctrl`) answering with `reply`.
    fn control(mut self, reply: impl Fn(u64, &str) -> Reply + Send + Sync + 'static) -> Self {
        self.control = Some(OriginOptions::named("control").reply(reply));
        self
    }

    /// Lines added under the mirror's `compare:`.
    fn compare(mut self, yaml: &str) -> Self {
        self.compare = yaml.to_string();
        self
    }

    /// Top-level config lines (before `upstreams:`).
    fn top(mut self, yaml: &str) -> Self {
        self.top = yaml.to_string();
        self
    }

    /// Lines added to the mirror itself.
    fn mirror(mut self, yaml: &str) -> Self {
        self.mirror = yaml.to_string();
        self
    }

    async fn start(self) -> Fleet {
        let primary = Origin::start(self.primary).await;
        let candidate = Origin::start(self.candidate).await;
        let control = match self.control {
            Some(options) => Some(Origin::start(options).await),
            None => None,
        };
        let mut pools = pool("app", &[primary.addr], "") + &pool("cand", &[candidate.addr], "");
        let mut compare = String::new();
        if let Some(control) = &control {
            pools += &pool("ctrl", &[control.addr], "");
            compare += "control: ctrl\n";
        }
        compare += &self.compare;
        if compare.trim().is_empty() {
            compare = "{}".into();
        }
        let yaml = format!(
            "{}upstreams:\n{pools}routes:\n  - name: api\n    upstream: app\n    mirrors:\n      - upstream: cand\n        percentage: 100\n{}        compare:\n{}",
            self.top,
            indent(&self.mirror, 8),
            indent(&compare, 10)
        );
        let proxy = Proxy::start(&yaml).await;
        Fleet {
            proxy,
            primary,
            candidate,
            control,
        }
    }
}

/// `n` GETs through the proxy, `concurrency` at a time; returns the statuses the clients saw.
async fn load(
    proxy: &Proxy,
    n: usize,
    concurrency: usize,
    path: impl Fn(usize) -> String,
) -> Vec<u16> {
    let client = common::client();
    futures_util::stream::iter((0..n).map(|i| {
        let request = client.get(proxy.url(&path(i)));
        async move {
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            let _ = response.bytes().await.expect("body");
            status
        }
    }))
    .buffer_unordered(concurrency)
    .collect()
    .await
}

/// Wait until `n` comparisons of route `api` have an outcome (equal, different or skipped).
async fn wait_compared(proxy: &Proxy, n: usize) {
    proxy
        .wait_for_metric(
            "shadowgate_compare_total",
            &[("route", "api")],
            |v| v >= n as f64,
            WAIT * 3,
        )
        .await;
}

/// `n` GETs of `/items/{i}`, `concurrency` at a time, all answered 200 by the primary;
/// returns once `n` comparisons have an outcome.
async fn compare_items(proxy: &Proxy, n: usize, concurrency: usize) {
    let statuses = load(proxy, n, concurrency, |i| format!("/items/{i}")).await;
    assert_eq!(statuses, vec![200; n]);
    wait_compared(proxy, n).await;
}

async fn outcome(proxy: &Proxy, mirror: &str, outcome: &str) -> f64 {
    proxy
        .metric(
            "shadowgate_compare_total",
            &[("route", "api"), ("mirror", mirror), ("outcome", outcome)],
        )
        .await
}

async fn compare_report(metrics_addr: SocketAddr) -> Value {
    let text = reqwest::get(format!("http://{metrics_addr}/compare"))
        .await
        .expect("GET /compare")
        .text()
        .await
        .expect("body");
    serde_json::from_str(&text).expect("/compare is JSON")
}

/// Every field of every endpoint of mirror `mirror`: (endpoint path, field).
fn fields(report: &Value, mirror: &str) -> Vec<(String, Value)> {
    let mirrors = report["mirrors"].as_array().expect("mirrors");
    let m = mirrors
        .iter()
        .find(|m| m["mirror"] == mirror)
        .unwrap_or_else(|| panic!("no mirror {mirror} in {report}"));
    m["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .flat_map(|e| {
            let path = e["path"].as_str().unwrap_or("").to_string();
            e["fields"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |f| (path.clone(), f))
        })
        .collect()
}

fn flagged_paths(report: &Value, mirror: &str) -> Vec<String> {
    fields(report, mirror)
        .into_iter()
        .filter(|(_, f)| f["flagged"] == true)
        .map(|(_, f)| f["path"].as_str().unwrap_or("").to_string())
        .collect()
}

fn field(report: &Value, mirror: &str, path: &str) -> Value {
    fields(report, mirror)
        .into_iter()
        .map(|(_, f)| f)
        .find(|f| f["path"] == path)
        .unwrap_or_else(|| panic!("no field {path} in {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_origins_flag_nothing_over_two_thousand_requests() {
    let f = fleet().control(same_json()).start().await;
    compare_items(&f.proxy, 2000, 16).await;
    assert_eq!(outcome(&f.proxy, "cand", "equal").await, 2000.0);
    assert_eq!(outcome(&f.proxy, "cand", "different").await, 0.0);
    assert_eq!(outcome(&f.proxy, "cand", "skipped").await, 0.0);
    let report = compare_report(f.proxy.metrics_addr).await;
    // One comparing mirror: the control is a side of it, not a mirror of its own.
    assert_eq!(report["mirrors"].as_array().map(Vec::len), Some(1));
    assert_eq!(report["mirrors"][0]["compared"], 2000);
    assert_eq!(report["mirrors"][0]["control"], "ctrl");
    let endpoint = &report["mirrors"][0]["endpoints"][0];
    assert_eq!(endpoint["method"], "GET");
    assert_eq!(endpoint["path"], "/items/{n}");
    assert_eq!(endpoint["compared"], 2000);
    assert!(fields(&report, "cand").is_empty(), "{report}");
    assert_eq!(
        f.proxy
            .metric("shadowgate_compare_flagged_fields", &[("mirror", "cand")])
            .await,
        0.0
    );
    // Every side got every request, and the control exactly what the candidate got.
    assert_eq!(f.primary.count(), 2000);
    let by_uri = |origin: &Origin| {
        let mut seen: Vec<_> = origin
            .requests()
            .into_iter()
            .map(|r| {
                (
                    r.uri.clone(),
                    r.method.clone(),
                    r.headers.clone(),
                    r.body_sha256,
                )
            })
            .collect();
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        seen
    };
    let control = f.control.as_ref().expect("control");
    assert_eq!(by_uri(&f.candidate).len(), 2000);
    assert_eq!(by_uri(&f.candidate), by_uri(control));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_field_changed_on_five_percent_is_flagged_with_its_exact_count() {
    let candidate = |index: u64, uri: &str| {
        let mut body = item(uri);
        if index.is_multiple_of(20) {
            body["items"][1]["qty"] = json!(3);
        }
        Reply::json(&body)
    };
    let f = fleet()
        .candidate(candidate)
        .control(same_json())
        .start()
        .await;
    compare_items(&f.proxy, 2000, 16).await;
    assert_eq!(outcome(&f.proxy, "cand", "different").await, 100.0);
    assert_eq!(outcome(&f.proxy, "cand", "equal").await, 1900.0);
    let report = compare_report(f.proxy.metrics_addr).await;
    assert_eq!(flagged_paths(&report, "cand"), vec!["$.items[*].qty"]);
    let qty = field(&report, "cand", "$.items[*].qty");
    assert_eq!(qty["candidate_diffs"], 100);
    assert_eq!(qty["control_diffs"], 0);
    assert_eq!(qty["volatile"], false);
    assert_eq!(fields(&report, "cand").len(), 1, "{report}");
    assert_eq!(
        f.proxy
            .metric("shadowgate_compare_flagged_fields", &[("mirror", "cand")])
            .await,
        1.0
    );
    // The examples say what changed, side by side.
    let example = &report["mirrors"][0]["examples"][0];
    assert_eq!(example["fields"][0]["path"], "$.items[*].qty");
    assert_eq!(example["fields"][0]["primary"], "2");
    assert_eq!(example["fields"][0]["candidate"], "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timestamp_that_differs_with_the_control_too_is_noise() {
    let stamped = |name: &'static str| {
        move |index: u64, uri: &str| {
            let mut body = item(uri);
            body["generated_at"] = json!(format!("{name}-{index}"));
            Reply::json(&body)
        }
    };
    let f = fleet()
        .primary(stamped("p"))
        .candidate(stamped("c"))
        .control(stamped("k"))
        .compare("min_samples: 50\n")
        .start()
        .await;
    compare_items(&f.proxy, 300, 16).await;
    let report = compare_report(f.proxy.metrics_addr).await;
    let stamp = field(&report, "cand", "$.generated_at");
    assert_eq!(stamp["candidate_diffs"], 300);
    assert_eq!(stamp["control_diffs"], 300);
    assert_eq!(stamp["volatile"], true);
    assert_eq!(stamp["flagged"], false);
    assert!(flagged_paths(&report, "cand").is_empty(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_header_only_difference_is_reported_on_that_header() {
    let tagged = |etag: &'static str| {
        move |_: u64, uri: &str| {
            Reply::json(&item(uri))
                .header("etag", etag)
                .header("x-served-by", "node-1")
        }
    };
    let f = fleet()
        .primary(tagged("\"v1\""))
        .candidate(tagged("\"v2\""))
        .control(tagged("\"v1\""))
        .compare("min_samples: 20\nignore_headers: [x-served-by]\n")
        .start()
        .await;
    compare_items(&f.proxy, 60, 8).await;
    let report = compare_report(f.proxy.metrics_addr).await;
    assert_eq!(flagged_paths(&report, "cand"), vec!["header:etag"]);
    assert_eq!(field(&report, "cand", "header:etag")["candidate_diffs"], 60);
    assert_eq!(fields(&report, "cand").len(), 1, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_status_difference_is_flagged_and_the_primary_status_is_unchanged() {
    let candidate = |_: u64, uri: &str| {
        let reply = Reply::json(&item(uri));
        if uri.starts_with("/fail/") {
            reply.status(503)
        } else {
            reply
        }
    };
    let f = fleet()
        .candidate(candidate)
        .compare("min_samples: 10\n")
        .start()
        .await;
    let statuses = load(&f.proxy, 60, 8, |i| {
        if i.is_multiple_of(3) {
            format!("/fail/{i}")
        } else {
            format!("/ok/{i}")
        }
    })
    .await;
    // The client sees the primary's answer, always.
    assert_eq!(statuses, vec![200; 60]);
    wait_compared(&f.proxy, 60).await;
    let report = compare_report(f.proxy.metrics_addr).await;
    assert_eq!(flagged_paths(&report, "cand"), vec!["status"]);
    assert_eq!(field(&report, "cand", "status")["candidate_diffs"], 20);
    let pair = |shadow: &'static str| {
        let proxy = &f.proxy;
        async move {
            proxy
                .metric(
                    "shadowgate_compare_status_pairs_total",
                    &[
                        ("side", "candidate"),
                        ("primary", "2xx"),
                        ("shadow", shadow),
                    ],
                )
                .await
        }
    };
    assert_eq!(pair("5xx").await, 20.0);
    assert_eq!(pair("2xx").await, 40.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_over_the_cap_compare_by_length_and_hash() {
    let text = |flip: bool| {
        move |index: u64, _: &str| {
            let mut body = vec![b'x'; 4096];
            if flip && index.is_multiple_of(2) {
                // Past the 1 KiB cap: only the hash can see it.
                body[3000] = b'y';
            }
            Reply {
                status: 200,
                headers: vec![("content-type".into(), "text/plain".into())],
                body,
            }
        }
    };
    let f = fleet()
        .primary(text(false))
        .candidate(text(true))
        .compare("max_body_bytes: 1024\nmin_samples: 10\n")
        .start()
        .await;
    load(&f.proxy, 40, 8, |i| format!("/blob/{i}")).await;
    wait_compared(&f.proxy, 40).await;
    let report = compare_report(f.proxy.metrics_addr).await;
    assert_eq!(field(&report, "cand", "body")["candidate_diffs"], 20);
    assert_eq!(
        f.proxy
            .metric(
                "shadowgate_compare_body_degraded_total",
                &[("reason", "over_cap")]
            )
            .await,
        40.0
    );
}

fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gzip_bodies_are_decoded_and_compared_field_by_field() {
    let gzipped = |level: u32, change: bool| {
        move |index: u64, uri: &str| {
            let mut body = item(uri);
            body["notes"] = json!("x".repeat(2000));
            if change && index.is_multiple_of(4) {
                body["price"] = json!(12);
            }
            Reply {
                status: 200,
                headers: vec![
                    ("content-type".into(), "application/json".into()),
                    ("content-encoding".into(), "gzip".into()),
                ],
                body: gzip(body.to_string().as_bytes(), level),
            }
        }
    };
    let f = fleet()
        .primary(gzipped(1, false))
        .candidate(gzipped(9, true))
        .compare("min_samples: 10\n")
        .start()
        .await;
    compare_items(&f.proxy, 40, 8).await;
    let report = compare_report(f.proxy.metrics_addr).await;
    // Different compression, same document: only the changed field differs.
    assert_eq!(field(&report, "cand", "$.price")["candidate_diffs"], 10);
    assert_eq!(fields(&report, "cand").len(), 1, "{report}");
    assert_eq!(
        f.proxy
            .metric("shadowgate_compare_body_degraded_total", &[])
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exhausted_budget_degrades_to_hash_only_and_says_so() {
    let big = |_: u64, uri: &str| {
        let mut body = item(uri);
        body["notes"] = json!("x".repeat(8192));
        Reply::json(&body)
    };
    let f = fleet()
        .primary(big)
        .candidate(big)
        .top("mirror_budget_bytes: 4096\n")
        .mirror("queue_bytes: 1024\n")
        .start()
        .await;
    // Each side's 8 KiB body alone is more than the whole budget.
    compare_items(&f.proxy, 20, 4).await;
    assert_eq!(outcome(&f.proxy, "cand", "equal").await, 20.0);
    assert_eq!(
        f.proxy
            .metric(
                "shadowgate_compare_body_degraded_total",
                &[("reason", "budget")]
            )
            .await,
        20.0
    );
    // Every held byte went back.
    f.proxy
        .wait_for_metric("shadowgate_mirror_queued_bytes", &[], |v| v == 0.0, WAIT)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_diff_log_redacts_secrets_and_carries_the_request_id() {
    let secretive = |sid: &'static str, token: &'static str| {
        move |_: u64, uri: &str| {
            let mut body = item(uri);
            body["session"] = json!({"token": token, "user": "ann"});
            Reply::json(&body).header("set-cookie", sid)
        }
    };
    let logs = private_dir();
    let log_path = logs.path().join("diffs.jsonl");
    let f = fleet()
        .primary(secretive("sid=PRIMARY-SECRET", "tok-PRIMARY"))
        .candidate(secretive("sid=CAND-SECRET", "tok-CAND"))
        .compare(&format!(
            "diff_log: {}\ndiff_log_per_second: 1000\n",
            log_path.display()
        ))
        .start()
        .await;
    let client = common::client();
    for i in 0..5 {
        let response = client
            .get(f.proxy.url(&format!("/items/{i}?key=QUERY-SECRET")))
            .header("x-request-id", format!("req-{i}"))
            .header("authorization", "Bearer AUTH-SECRET")
            .header("cookie", "sid=REQ-SECRET")
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
    }
    wait_compared(&f.proxy, 5).await;
    f.proxy
        .wait_for_metric(
            "shadowgate_compare_diff_log_lines_total",
            &[("result", "written")],
            |v| v >= 5.0,
            WAIT,
        )
        .await;
    let text = std::fs::read_to_string(&log_path).expect("diff log");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 5);
    for secret in ["SECRET", "tok-"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    let mut ids: Vec<&str> = lines.iter().filter_map(|l| l["id"].as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["req-0", "req-1", "req-2", "req-3", "req-4"]);
    let line = &lines[0];
    assert_eq!(line["route"], "api");
    assert_eq!(line["status"]["primary"], 200);
    let paths: Vec<&str> = line["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .filter_map(|x| x["path"].as_str())
        .collect();
    assert_eq!(paths, ["header:set-cookie", "$.session.token"]);
    for x in line["fields"].as_array().expect("fields") {
        assert_eq!(x["primary"], "[redacted]");
        assert_eq!(x["candidate"], "[redacted]");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shadows_that_are_down_slow_or_garbage_are_counted_skips() {
    let primary = Origin::start(OriginOptions::named("primary").reply(same_json())).await;
    let good = Origin::start(OriginOptions::named("good").reply(same_json())).await;
    let slow = Origin::start(
        OriginOptions::named("slow")
            .reply(same_json())
            .response_delay(Duration::from_secs(3)),
    )
    .await;
    let garbage = RawOrigin::start(Misbehavior::Garbage).await;
    let down = common::refusing_address();
    let yaml = format!(
        "upstreams:\n{}{}{}{}{}routes:\n  - name: api\n    upstream: app\n    mirrors:\n\
         \x20     - {{ upstream: down, percentage: 100, compare: {{}} }}\n\
         \x20     - {{ upstream: garbage, percentage: 100, compare: {{}} }}\n\
         \x20     - {{ upstream: slow, percentage: 100, timeout_ms: 300, compare: {{}} }}\n\
         \x20     - {{ upstream: good, percentage: 100, methods: [GET, POST], compare: {{ control: down }} }}\n",
        pool("app", &[primary.addr], ""),
        pool("down", &[down], ""),
        pool("garbage", &[garbage.addr], ""),
        pool("slow", &[slow.addr], ""),
        pool("good", &[good.addr], ""),
    );
    let proxy = Proxy::start(&yaml).await;
    let client = common::client();
    for i in 0..4 {
        let response = client
            .get(proxy.url(&format!("/items/{i}")))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        assert_eq!(
            serde_json::from_slice::<Value>(&response.bytes().await.expect("body")).expect("json"),
            item(&format!("/items/{i}"))
        );
    }
    let response = client
        .post(proxy.url("/items/9"))
        .body("x")
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 200);
    let skipped = |mirror: &'static str, reason: &'static str| {
        let proxy = &proxy;
        async move {
            proxy
                .wait_for_metric(
                    "shadowgate_compare_skipped_total",
                    &[("mirror", mirror), ("reason", reason)],
                    |v| v >= 4.0,
                    WAIT,
                )
                .await
        }
    };
    assert_eq!(skipped("down", "candidate_failed").await, 4.0);
    assert_eq!(skipped("garbage", "candidate_failed").await, 4.0);
    assert_eq!(skipped("slow", "candidate_failed").await, 4.0);
    assert_eq!(skipped("good", "control_failed").await, 4.0);
    assert_eq!(
        proxy
            .metric(
                "shadowgate_compare_skipped_total",
                &[("mirror", "good"), ("reason", "method")]
            )
            .await,
        1.0
    );
    for mirror in ["down", "garbage", "slow", "good"] {
        assert_eq!(outcome(&proxy, mirror, "equal").await, 0.0);
        assert_eq!(outcome(&proxy, mirror, "different").await, 0.0);
    }
    assert_eq!(
        proxy
            .metric(
                "shadowgate_requests_total",
                &[("route", "api"), ("status", "200")]
            )
            .await,
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_report_page_and_metrics_share_the_metrics_listener() {
    let f = fleet()
        .candidate(|i, uri| {
            let mut body = item(uri);
            if i.is_multiple_of(2) {
                body["price"] = json!("10");
            }
            Reply::json(&body)
        })
        .compare("min_samples: 5\n")
        .start()
        .await;
    compare_items(&f.proxy, 10, 2).await;
    let page = reqwest::get(format!("http://{}/compare.html", f.proxy.metrics_addr))
        .await
        .expect("GET /compare.html");
    assert_eq!(page.status(), 200);
    assert_eq!(
        page.headers()["content-type"].to_str().expect("type"),
        "text/html; charset=utf-8"
    );
    let html = page.text().await.expect("page");
    assert!(
        html.contains("$.price") && html.contains("flagged"),
        "{html}"
    );
    let missing = reqwest::get(format!("http://{}/nope", f.proxy.metrics_addr))
        .await
        .expect("GET /nope");
    assert_eq!(missing.status(), 404);
    let gzipped = common::client()
        .get(format!("http://{}/metrics", f.proxy.metrics_addr))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(gzipped.headers()["content-encoding"], "gzip");
    let metrics = f.proxy.metrics_text().await;
    assert!(metrics.contains("shadowgate_compare_latency_delta_seconds_bucket"));
    assert!(metrics.contains("shadowgate_requests_total"));
    // Field paths never become label values.
    assert!(!metrics.contains("$.price"));
}

/// Run `shadowgate -t` (or, with `test` false, start it) on a config whose mirror has `compare`.
fn check_config(compare: &str) -> (bool, String) {
    run_config(compare, true)
}

fn run_config(compare: &str, test: bool) -> (bool, String) {
    let dir = private_dir();
    let config = format!(
        "pid_file: {d}/p.pid\nupgrade_sock: {d}/u.sock\nlisteners: [{{ address: \"127.0.0.1:18080\" }}]\n\
         upstreams:\n  app: {{ servers: [{{ address: \"127.0.0.1:9001\" }}] }}\n  v2: {{ servers: [{{ address: \"127.0.0.1:9002\" }}] }}\n\
         routes:\n  - name: api\n    upstream: app\n    mirrors:\n      - upstream: v2\n        percentage: 10\n        compare: {compare}\n",
        d = dir.path().display()
    );
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, config).expect("write");
    let mut command = std::process::Command::new(common::proxy::binary());
    command
        .args(if test { &["-t"][..] } else { &[] })
        .arg("-c")
        .arg(&path)
        .env("XDG_RUNTIME_DIR", dir.path());
    // A refused config exits at once; one that starts a server fails the test at the deadline.
    let out = common::proxy::finish(command, || false);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn compare_config_errors_name_the_field() {
    let at = "routes[0].mirrors[0].compare";
    for (compare, path) in [
        ("{ control: nope }", format!("{at}.control")),
        ("{ control: app }", format!("{at}.control")),
        (
            "{ ignore_fields: [timestamp] }",
            format!("{at}.ignore_fields[0]"),
        ),
        (
            "{ ignore_headers: [\"bad header\"] }",
            format!("{at}.ignore_headers[0]"),
        ),
        ("{ methods: [POST] }", format!("{at}.methods[0]")),
        (
            "{ max_body_bytes: 99999999999 }",
            format!("{at}.max_body_bytes"),
        ),
        ("{ absolute_margin: 2 }", format!("{at}.absolute_margin")),
        (
            "{ diff_log: /no/such/dir/d.jsonl }",
            format!("{at}.diff_log"),
        ),
        ("{ min_samples: 500, window: 100 }", format!("{at}.window")),
        ("{ colour: red }", at.to_string()),
    ] {
        let (ok, stderr) = check_config(compare);
        assert!(!ok, "{compare} was accepted");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{compare}: {stderr}");
        assert!(lines[0].contains(&path), "{compare}: {stderr}");
    }
    // The same line at startup as from -t.
    let message = |(ok, stderr): (bool, String)| {
        assert!(!ok);
        stderr.split_once("c.yaml: ").map(|(_, m)| m.to_string())
    };
    let at_start = message(run_config("{ control: nope }", false));
    assert!(at_start.is_some());
    assert_eq!(at_start, message(check_config("{ control: nope }")));
    let (ok, stderr) = check_config(
        "{ ignore_fields: [\"$..timestamp\", \"$.meta.trace\"], ignore_headers: [x-request-id] }",
    );
    assert!(ok, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodiless_responses_are_compared_over_http1_and_http2() {
    let reply = |_: u64, uri: &str| {
        let empty = |status| Reply {
            status,
            headers: vec![],
            body: vec![],
        };
        if uri.starts_with("/empty") {
            empty(200)
        } else if uri.starts_with("/none") {
            empty(204)
        } else {
            Reply::json(&item(uri))
        }
    };
    for protocol in ["", "    protocol: h2c\n"] {
        let primary = Origin::start(OriginOptions::named("primary").reply(reply)).await;
        let candidate = Origin::start(OriginOptions::named("candidate").reply(reply)).await;
        let proxy = Proxy::start(&format!(
            "upstreams:\n{}{}routes:\n  - name: api\n    upstream: app\n    mirrors:\n      - {{ upstream: cand, percentage: 100, compare: {{}} }}\n",
            pool("app", &[primary.addr], protocol),
            pool("cand", &[candidate.addr], protocol),
        ))
        .await;
        let client = common::client();
        // HEAD over an h2c upstream fails on the primary itself, mirror or not
        // (Pingora 0.9.1 reads a body that is not there), so HTTP/1 only.
        let head = (reqwest::Method::HEAD, "/items/1");
        let get = (reqwest::Method::GET, "/items/2");
        for (method, path) in [
            (reqwest::Method::GET, "/empty/1"),
            (reqwest::Method::GET, "/none/1"),
            if protocol.is_empty() { head } else { get },
            (reqwest::Method::GET, "/items/1"),
        ] {
            let response = match client.request(method, proxy.url(path)).send().await {
                Ok(r) => r,
                Err(e) => panic!("{protocol} {path}: {e:?}\n{}", proxy.log()),
            };
            assert!(response.status().is_success(), "{path}");
        }
        wait_compared(&proxy, 4).await;
        assert_eq!(outcome(&proxy, "cand", "equal").await, 4.0, "{protocol}");
        assert_eq!(outcome(&proxy, "cand", "skipped").await, 0.0, "{protocol}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fixed_regression_stops_being_flagged() {
    // The candidate gets the price wrong on its first 100 answers, then is fixed.
    let candidate = |index: u64, uri: &str| {
        let mut body = item(uri);
        if index < 100 {
            body["price"] = json!(11);
        }
        Reply::json(&body)
    };
    let f = fleet()
        .candidate(candidate)
        .control(same_json())
        .compare("min_samples: 20\nwindow: 100\n")
        .start()
        .await;
    let flagged = "shadowgate_compare_flagged_fields";
    compare_items(&f.proxy, 100, 8).await;
    assert_eq!(f.proxy.metric(flagged, &[("mirror", "cand")]).await, 1.0);
    load(&f.proxy, 100, 8, |i| format!("/items/{i}")).await;
    wait_compared(&f.proxy, 200).await;
    assert_eq!(f.proxy.metric(flagged, &[("mirror", "cand")]).await, 0.0);
    let report = compare_report(f.proxy.metrics_addr).await;
    let price = field(&report, "cand", "$.price");
    assert_eq!(price["flagged"], false);
    assert_eq!(price["candidate_diffs"], 100);
    assert_eq!(price["candidate_rate"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_candidate_delays_the_verdict_never_the_primary() {
    let f = fleet()
        .candidate_delay(Duration::from_millis(1500))
        .mirror("timeout_ms: 10000\n")
        .start()
        .await;
    let client = common::client();
    let started = std::time::Instant::now();
    for i in 0..4 {
        let response = client
            .get(f.proxy.url(&format!("/items/{i}")))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        let _ = response.bytes().await.expect("body");
    }
    // Four primaries answered well before one candidate could.
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(outcome(&f.proxy, "cand", "equal").await, 0.0);
    wait_compared(&f.proxy, 4).await;
    assert_eq!(outcome(&f.proxy, "cand", "equal").await, 4.0);
}
