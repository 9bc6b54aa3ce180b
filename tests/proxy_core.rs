//! The edge proxy without mirrors: routing, load balancing, health checks, retries and error statuses.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_then_path_then_method_and_404s_the_rest() {
    let by_host = Origin::start(OriginOptions::named("by-host")).await;
    let by_path = Origin::start(OriginOptions::named("by-path")).await;
    let by_method = Origin::start(OriginOptions::named("by-method")).await;
    let proxy = Proxy::start(&format!(
        "upstreams:\n{}{}{}\
routes:
  - name: host
    match: {{ host: \"*.example.com\" }}
    upstream: h
  - name: path
    match: {{ path_prefix: /static }}
    upstream: p
  - name: method
    match: {{ methods: [DELETE] }}
    upstream: m
",
        pool("h", &[by_host.addr], ""),
        pool("p", &[by_path.addr], ""),
        pool("m", &[by_method.addr], ""),
    ))
    .await;
    let client = client();
    let send = |method: reqwest::Method, host: &str, path: &str| {
        client
            .request(method, proxy.url(path))
            .header("host", host)
            .send()
    };

    let resp = send(reqwest::Method::GET, "api.example.com", "/static/x")
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["x-origin"],
        "by-host",
        "host route comes first"
    );
    let resp = send(reqwest::Method::GET, "example.com", "/static/x")
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["x-origin"],
        "by-path",
        "apex is not *.example.com"
    );
    let resp = send(reqwest::Method::DELETE, "other", "/x").await.unwrap();
    assert_eq!(resp.headers()["x-origin"], "by-method");
    let resp = send(reqwest::Method::GET, "other", "/x").await.unwrap();
    assert_eq!(resp.status(), 404, "no route matches GET /x on host other");

    wait_responses(&proxy, "no_route", 404, 1.0).await;
}

/// Routes match the path as an upstream resolves it (escapes decoded, `//`, `.` and `..`
/// resolved), as NGINX matches locations, so `/public/../admin` cannot reach the
/// `/public` route's pool as `/admin`; the path goes upstream as the client sent it.
#[tokio::test]
async fn routes_match_the_resolved_path_and_forward_it_as_sent() {
    let public = Origin::start(OriginOptions::named("public")).await;
    let proxy = Proxy::start(&format!(
        "upstreams:\n{}routes:\n  - {{ name: public, match: {{ path_prefix: /public/ }}, upstream: pub }}\n",
        pool("pub", &[public.addr], ""),
    ))
    .await;
    let status_of = async |path: &str| {
        let request = format!("GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(proxy.addr, request.as_bytes()).await;
        answer
            .get(9..12)
            .and_then(|code| code.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("{path}: no status in {answer:?}"))
    };
    for path in ["/public/../admin", "/public/%2e%2E/admin", "/publi%63"] {
        assert_eq!(status_of(path).await, 404, "{path}");
    }
    for path in [
        "/../public/x",
        "/public/%zz",
        "/public/a%00",
        "/public/../../x",
    ] {
        assert_eq!(status_of(path).await, 400, "{path}");
    }
    assert_eq!(public.count(), 0);
    let sent = ["/%70ublic/x", "//public//x?q=/../", "/admin/../public/./x"];
    for path in sent {
        assert_eq!(status_of(path).await, 200, "{path}");
    }
    let seen: Vec<String> = public
        .wait_for(3, WAIT)
        .await
        .into_iter()
        .map(|r| r.uri)
        .collect();
    assert_eq!(seen, sent);
}

/// `upstream_host` replaces the client's Host on the way to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_host_rewrites_the_host_sent_to_the_primary() {
    let origin = Origin::start(OriginOptions::named("app")).await;
    let proxy = Proxy::start(&format!(
        "upstreams:\n{}routes:\n  - {{ name: all, upstream: app, upstream_host: \"app.internal:8080\" }}\n",
        pool("app", &[origin.addr], "")
    ))
    .await;
    client()
        .get(proxy.url("/x"))
        .header("host", "shop.example")
        .send()
        .await
        .unwrap();
    let seen = &origin.wait_for(1, WAIT).await[0];
    assert_eq!(seen.header("host"), Some("app.internal:8080"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_host_and_adds_forwarding_headers() {
    let origin = Origin::start(OriginOptions::named("app")).await;
    let proxy = proxy_to_pool(&[origin.addr], "").await;
    client()
        .get(proxy.url("/hello?x=1"))
        .header("host", "shop.example")
        .header("x-forwarded-for", "10.1.2.3")
        .send()
        .await
        .unwrap();
    let seen = &origin.wait_for(1, WAIT).await[0];
    assert_eq!(seen.uri, "/hello?x=1");
    assert_eq!(seen.header("host"), Some("shop.example"));
    assert_eq!(seen.header("x-forwarded-for"), Some("10.1.2.3, 127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("via"), Some("1.1 shadowgate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_gets_the_get_header_without_a_body_over_http1_and_h2c_upstreams() {
    for protocol in ["", "    protocol: h2c\n"] {
        let origin = Origin::start(OriginOptions::named("app")).await;
        let proxy = proxy_to_pool(&[origin.addr], protocol).await;
        let client = client();
        let (status, _, _) = get(&client, &proxy.url("/h")).await;
        assert_eq!(status, 200);
        let head = client.head(proxy.url("/h")).send().await.expect("HEAD");
        assert_eq!(head.status(), 200, "{protocol}");
        // The length of the body a GET would get (the origin's "NAME METHOD URI LEN").
        let would_be = "app HEAD /h 0\n".len();
        let length = head.headers().get("content-length").map(|v| v.as_bytes());
        assert_eq!(length, Some(would_be.to_string().as_bytes()), "{protocol}");
        assert_eq!(head.bytes().await.expect("HEAD body").len(), 0);
        // Counted as answered, not as a failure behind the client's back.
        wait_responses(&proxy, "all", 200, 2.0).await;
        assert!(
            !proxy.log().contains("Fail to proxy"),
            "{protocol}: {}",
            proxy.log()
        );
    }
}

/// How many responses of `status` the proxy counted for `route`.
/// Wait until the proxy has counted `n` responses of `status` for `route`.
/// Metrics are recorded after the response is sent, so a client can be faster.
async fn wait_responses(proxy: &Proxy, route: &str, status: u16, n: f64) {
    proxy
        .wait_for_metric(
            "shadowgate_requests_total",
            &[("route", route), ("status", &status.to_string())],
            |v| v == n,
            WAIT,
        )
        .await;
}

async fn spread(proxy: &Proxy, n: usize, header: Option<(&str, String)>) -> HashMap<String, usize> {
    let client = client();
    let mut counts = HashMap::new();
    for _ in 0..n {
        let mut req = client.get(proxy.url("/"));
        if let Some((k, v)) = &header {
            req = req.header(*k, v);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let origin = resp.headers()["x-origin"].to_str().unwrap().to_string();
        *counts.entry(origin).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_follows_weights_exactly() {
    let a = Origin::start(OriginOptions::named("a")).await;
    let b = Origin::start(OriginOptions::named("b")).await;
    let proxy = Proxy::start(&format!(
        "upstreams:
  app:
    servers:
      - {{ address: \"{}\", weight: 1 }}
      - {{ address: \"{}\", weight: 3 }}
routes:
  - {{ name: all, upstream: app }}
",
        a.addr, b.addr
    ))
    .await;
    let counts = spread(&proxy, 40, None).await;
    assert_eq!(counts.get("a"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&30), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_selection_uses_every_server() {
    let a = Origin::start(OriginOptions::named("a")).await;
    let b = Origin::start(OriginOptions::named("b")).await;
    let proxy = proxy_to_pool(&[a.addr, b.addr], "    selection: random\n").await;
    let counts = spread(&proxy, 200, None).await;
    // Binomial(200, 0.5): 60..140 is more than 5 standard deviations wide.
    for name in ["a", "b"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!((60..=140).contains(&n), "{counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_each_key_on_one_server() {
    let origins = [
        Origin::start(OriginOptions::named("a")).await,
        Origin::start(OriginOptions::named("b")).await,
        Origin::start(OriginOptions::named("c")).await,
    ];
    let addrs: Vec<_> = origins.iter().map(|o| o.addr).collect();
    let proxy = proxy_to_pool(
        &addrs,
        "    selection: consistent_hash\n    hash_key: header:x-user\n",
    )
    .await;
    let mut servers_used = std::collections::HashSet::new();
    for user in 0..30 {
        let counts = spread(&proxy, 4, Some(("x-user", format!("user-{user}")))).await;
        assert_eq!(
            counts.len(),
            1,
            "user-{user} moved between servers: {counts:?}"
        );
        servers_used.extend(counts.into_keys());
    }
    assert!(
        servers_used.len() >= 2,
        "30 keys all hashed to {servers_used:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_check_ejects_a_failing_server_and_readmits_it() {
    let a = Origin::start(OriginOptions::named("a")).await;
    let b = Origin::start(OriginOptions::named("b")).await;
    let proxy = proxy_to_pool(
        &[a.addr, b.addr],
        "    health_check: { type: http, path: /healthz, interval_ms: 100, timeout_ms: 500 }\n",
    )
    .await;
    let a_health = [("upstream", "app"), ("server", &*a.addr.to_string())];

    a.set_healthy(false);
    proxy
        .wait_for_metric(
            "shadowgate_upstream_server_healthy",
            &a_health,
            |v| v == 0.0,
            WAIT,
        )
        .await;
    let counts = spread(&proxy, 20, None).await;
    assert_eq!(
        counts.get("b"),
        Some(&20),
        "an unhealthy server got traffic: {counts:?}"
    );

    a.set_healthy(true);
    proxy
        .wait_for_metric(
            "shadowgate_upstream_server_healthy",
            &a_health,
            |v| v == 1.0,
            WAIT,
        )
        .await;
    let counts = spread(&proxy, 20, None).await;
    assert_eq!(
        counts.get("a"),
        Some(&10),
        "a recovered server gets its share: {counts:?}"
    );
    proxy.wait_for_log("is healthy again", WAIT).await;
}

/// The check request is built from the parsed path and Host at load: it must carry
/// exactly what the config says. (The origin does not record `/healthz`, hence `/check`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_check_sends_the_configured_path_and_host() {
    let origin = Origin::start(OriginOptions::named("a")).await;
    let _proxy = proxy_to_pool(
        &[origin.addr],
        "    health_check: { type: http, path: \"/check?deep=1\", host: \"health.internal:8080\", interval_ms: 100 }\n",
    )
    .await;
    let check = &origin.wait_for(1, WAIT).await[0];
    assert_eq!(check.method, "GET");
    assert_eq!(check.uri, "/check?deep=1");
    assert_eq!(check.header("host"), Some("health.internal:8080"));
    assert_eq!(check.header("user-agent"), Some("shadowgate-health-check"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_health_check_follows_a_server_that_goes_away_and_returns() {
    let a = Origin::start(OriginOptions::named("a")).await;
    let b = Origin::start(OriginOptions::named("b")).await;
    let proxy = proxy_to_pool(&[a.addr, b.addr], "    health_check: { type: tcp, interval_ms: 100, timeout_ms: 300 }\n    connect_retries: 0\n").await;
    let a_health = [("upstream", "app"), ("server", &*a.addr.to_string())];

    let a_addr = a.stop().await;
    proxy
        .wait_for_metric(
            "shadowgate_upstream_server_healthy",
            &a_health,
            |v| v == 0.0,
            WAIT,
        )
        .await;
    let counts = spread(&proxy, 10, None).await;
    assert_eq!(counts.get("b"), Some(&10), "{counts:?}");

    let _a = Origin::start_on(a_addr, OriginOptions::named("a")).await;
    proxy
        .wait_for_metric(
            "shadowgate_upstream_server_healthy",
            &a_health,
            |v| v == 1.0,
            WAIT,
        )
        .await;
    let counts = spread(&proxy, 10, None).await;
    assert_eq!(counts.get("a"), Some(&5), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_retried_on_another_server() {
    let dead = refusing_address();
    let live = Origin::start(OriginOptions::named("live")).await;
    let proxy = proxy_to_pool(&[dead, live.addr], "    connect_retries: 1\n").await;
    let counts = spread(&proxy, 20, None).await;
    assert_eq!(counts.get("live"), Some(&20), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_server_is_a_502() {
    let dead = refusing_address();
    let proxy = proxy_to_pool(
        &[dead],
        "    health_check: { type: tcp, interval_ms: 100, timeout_ms: 300 }\n",
    )
    .await;
    proxy
        .wait_for_metric(
            "shadowgate_upstream_server_healthy",
            &[("server", &*dead.to_string())],
            |v| v == 0.0,
            WAIT,
        )
        .await;
    let (status, _, _) = get(&client(), &proxy.url("/")).await;
    assert_eq!(status, 502);
    proxy
        .wait_for_log("no healthy server in upstream app", WAIT)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_past_the_retries_are_a_502() {
    let dead = [refusing_address(), refusing_address()];
    let proxy = proxy_to_pool(&dead, "    connect_retries: 3\n").await;
    let (status, _, _) = get(&client(), &proxy.url("/")).await;
    assert_eq!(status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_read_timeout_is_a_504() {
    let slow =
        Origin::start(OriginOptions::named("slow").response_delay(Duration::from_secs(3))).await;
    let proxy = proxy_to_pool(&[slow.addr], "    read_timeout_ms: 300\n").await;
    let (status, _, _) = get(&client(), &proxy.url("/")).await;
    assert_eq!(status, 504);
    wait_responses(&proxy, "all", 504, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_gets_400() {
    let origin = Origin::start(OriginOptions::named("app")).await;
    let proxy = proxy_to_pool(&[origin.addr], "").await;
    let answer = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Without Colon\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(origin.count(), 0);
}
