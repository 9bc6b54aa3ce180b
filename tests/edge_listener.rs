//! The edge listener against real clients: TLS termination with SNI, HTTP/2 by ALPN and by
//! prior knowledge (h2c), request ids, the access log, and the TLS configuration errors.

mod common;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::proxy::{free_port, run_to_end};
use common::tls::{Curl, TestCa, TestCert, Validity, curl, presented_cn, tls_connect};
use common::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A CA and two leaves: `site` (site.test, the default) and `other` (other.test, *.wild.test).
struct Certs {
    _dir: tempfile::TempDir,
    ca: TestCa,
    site: TestCert,
    other: TestCert,
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::tempdir().expect("cert dir");
        let ca = TestCa::new(dir.path());
        let site = ca.issue("site", &["site.test"], Validity::Current);
        let other = ca.issue("other", &["other.test", "*.wild.test"], Validity::Current);
        Certs {
            _dir: dir,
            ca,
            site,
            other,
        }
    }

    fn ca_path(&self) -> &str {
        self.ca.cert.to_str().expect("utf-8 path")
    }

    /// The proxy listener's `tls` section with `certificates` and extra keys.
    fn listener(&self, certificates: &[&TestCert], extra: &str) -> String {
        let list: Vec<String> = certificates
            .iter()
            .map(|c| format!("        - {}", c.yaml()))
            .collect();
        format!(
            "    tls:\n      certificates:\n{}\n{extra}",
            list.join("\n")
        )
    }
}

/// Route `api` (path /api) to `primary`, mirroring `mirror_yaml` (if any) to `shadow`;
/// the access log in the proxy's directory.
fn sections(primary: SocketAddr, shadow: SocketAddr, mirrors: &str) -> String {
    format!(
        "upstreams:\n{}{}routes:\n  - name: api\n    match: {{ path_prefix: /api }}\n    upstream: app\n{mirrors}\naccess_log:\n  path: RUNTIME/access.log\n",
        pool("app", &[primary], ""),
        pool("shadow", &[shadow], ""),
    )
}

fn access_log(proxy: &Proxy) -> std::path::PathBuf {
    proxy.dir().join("access.log")
}

/// curl over TLS to `name` (resolved to the proxy) with `flags`; stdout ends with
/// `\n<http_version> <status>`.
async fn curl_tls(certs: &Certs, proxy: &Proxy, name: &str, path: &str, flags: &[&str]) -> Curl {
    let port = proxy.addr.port();
    let resolve = format!("{name}:{port}:127.0.0.1");
    let url = format!("https://{name}:{port}{path}");
    let mut args = vec!["--cacert", certs.ca_path(), "--resolve", &resolve];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["-w", "\n%{http_version} %{http_code}", &url]);
    curl(&args).await
}

fn assert_answered(out: &Curl, version: &str) {
    assert!(out.success, "{out:?}");
    assert!(
        out.stdout.ends_with(&format!("\n{version} 200")),
        "expected HTTP/{version} 200: {out:?}"
    );
}

/// Origins `primary` and `shadow` behind a proxy (with `listener_extra` lines) that mirrors
/// every GET and POST under /api to the shadow.
async fn mirroring_posts(listener_extra: &str) -> (Origin, Origin, Proxy) {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    let proxy = Proxy::start_with_listener(
        listener_extra,
        &sections(primary.addr, shadow.addr, MIRROR_POSTS),
    )
    .await;
    (primary, shadow, proxy)
}

/// A TLS listener with the `site` certificate (plus `listener_extra` lines) in front of
/// one origin, `primary`, which is also the mirror's shadow.
async fn tls_to_primary(listener_extra: &str) -> (Certs, Origin, Proxy) {
    let certs = Certs::new();
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let proxy = Proxy::start_with_listener(
        &certs.listener(&[&certs.site], listener_extra),
        &sections(primary.addr, primary.addr, ""),
    )
    .await;
    (certs, primary, proxy)
}

/// Wait until `addr` accepts connections (a second listener may bind a moment after the first).
async fn wait_port(addr: SocketAddr) {
    eventually(WAIT, Duration::from_millis(20), || async move {
        match TcpStream::connect(addr).await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("{addr} never listened: {e}")),
        }
    })
    .await
}

// ---------------------------------------------------------------- TLS and ALPN

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_http1_and_http2_by_alpn_with_tls_1_2_and_1_3() {
    let certs = Certs::new();
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    let proxy = Proxy::start_with_listener(
        &certs.listener(&[&certs.site], ""),
        &sections(primary.addr, shadow.addr, ""),
    )
    .await;

    let h1 = curl_tls(&certs, &proxy, "site.test", "/api/one", &["--http1.1"]).await;
    assert_answered(&h1, "1.1");
    assert!(h1.stdout.starts_with("primary GET /api/one"), "{h1:?}");
    let h2 = curl_tls(&certs, &proxy, "site.test", "/api/two", &["--http2"]).await;
    assert_answered(&h2, "2");
    let tls12 = curl_tls(
        &certs,
        &proxy,
        "site.test",
        "/api/three",
        &["--http2", "--tlsv1.2", "--tls-max", "1.2"],
    )
    .await;
    assert_answered(&tls12, "2");

    for seen in primary.wait_for(3, WAIT).await {
        assert_eq!(seen.header("x-forwarded-proto"), Some("https"), "{seen:?}");
    }
    let lines = wait_for_json_lines(&access_log(&proxy), 3).await;
    let got: Vec<(&str, &str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["path"].as_str().unwrap(),
                l["protocol"].as_str().unwrap(),
                l["tls"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("/api/one", "HTTP/1.1", "TLSv1.3"),
            ("/api/two", "HTTP/2", "TLSv1.3"),
            ("/api/three", "HTTP/2", "TLSv1.2"),
        ]
    );
}

/// HTTP/1.1 over TLS keeps the connection: the second request rides the first
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_http1_connections_are_kept_alive() {
    let (certs, primary, proxy) = tls_to_primary("").await;
    let port = proxy.addr.port();
    let resolve = format!("site.test:{port}:127.0.0.1");
    let url = format!("https://site.test:{port}/api/a");
    let out = curl(&[
        "--cacert",
        certs.ca_path(),
        "--resolve",
        &resolve,
        "--http1.1",
        "-w",
        "%{http_code} %{num_connects}\n",
        "-o",
        "/dev/null",
        &url,
        "-o",
        "/dev/null",
        &url,
        "-o",
        "/dev/null",
        &url,
    ])
    .await;
    assert!(out.success, "{out:?}");
    assert_eq!(out.stdout, "200 1\n200 0\n200 0\n", "{out:?}");
    assert_eq!(primary.count(), 3);
}

/// A GET of /api/a for site.test over `tls`, padded with a header field to `size` bytes
/// when `size` is given.
fn tls_get(size: Option<usize>) -> Vec<u8> {
    let head = "GET /api/a HTTP/1.1\r\nHost: site.test\r\n";
    let mut request = head.as_bytes().to_vec();
    if let Some(size) = size {
        let pad = size - head.len() - "X-Pad: \r\n\r\n".len();
        request.extend_from_slice(format!("X-Pad: {}\r\n", "p".repeat(pad)).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    request
}

async fn assert_ok_on(stream: &mut (impl tokio::io::AsyncRead + Unpin), what: &str) {
    let (head, _) = read_response(stream)
        .await
        .unwrap_or_else(|| panic!("{what}: no response"));
    assert!(head.starts_with("HTTP/1.1 200"), "{what}: {head}");
}

/// A kept-alive HTTP/1.1 connection over TLS waits for its next request as a cleartext
/// one does: idle time is keep-alive time, not header time; a slow header is timed from
/// its first byte; an idle connection closes at the keep-alive timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_keepalive_has_the_deadlines_of_cleartext() {
    for read_buffer in READ_BUFFERS {
        let (certs, _primary, proxy) = tls_to_primary(&format!(
            "    client: {{ header_timeout_ms: 300, keepalive_timeout_ms: 3000{read_buffer} }}"
        ))
        .await;
        let mut tls = tls_connect(&certs.ca, proxy.addr, "site.test").await;
        tls.write_all(&tls_get(None)).await.expect("write");
        assert_ok_on(&mut tls, "first request").await;
        // Idle for longer than the header deadline, shorter than keep-alive, and long
        // enough for the connection to give back its buffers (after 1 s).
        tokio::time::sleep(Duration::from_millis(1200)).await;
        tls.write_all(&tls_get(None)).await.expect("write");
        assert_ok_on(&mut tls, &format!("after 1200 ms idle ({read_buffer})")).await;
        // A slow header, a byte every 100 ms: cut off 300 ms after its first byte (when
        // the idle wait was part of the header deadline, after 3.3 s).
        let took = slow_header_lasts(&mut tls, b"GET /api/a HTTP/1.1\r\n").await;
        assert!(
            took < Duration::from_millis(1200),
            "closed after {took:?} ({read_buffer})"
        );
    }

    // Idle after a response: closed at the keep-alive timeout, the header's time unused.
    let (certs, _primary, proxy) =
        tls_to_primary("    client: { header_timeout_ms: 3000, keepalive_timeout_ms: 500 }").await;
    let mut tls = tls_connect(&certs.ca, proxy.addr, "site.test").await;
    tls.write_all(&tls_get(None)).await.expect("write");
    assert_ok_on(&mut tls, "request before idling").await;
    let idle = time_to_close(&mut tls, WAIT)
        .await
        .expect("the idle connection stayed open");
    assert!(
        idle >= Duration::from_millis(400) && idle < Duration::from_millis(2500),
        "closed {idle:?} after the response; keepalive_timeout_ms is 500"
    );
}

/// Requests pipelined over TLS, of several sizes around Pingora's 4 KiB reads, are all
/// answered at once: between requests the connection must not wait on the socket for
/// bytes already read. (Bytes the TLS session holds decrypted but unread are covered by
/// pingora-core's unit test of `wait_for_data`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_tls_requests_are_answered_at_once() {
    for read_buffer in READ_BUFFERS {
        let (certs, primary, proxy) = tls_to_primary(&format!(
            "    client: {{ keepalive_timeout_ms: 5000{read_buffer} }}"
        ))
        .await;
        let mut tls = tls_connect(&certs.ca, proxy.addr, "site.test").await;
        let requests = [
            tls_get(Some(4096)),
            tls_get(Some(10000)),
            tls_get(Some(3000)),
            tls_get(Some(7000)),
            tls_get(None),
        ]
        .concat();
        let started = std::time::Instant::now();
        tls.write_all(&requests).await.expect("write");
        for i in 0..5 {
            assert_ok_on(&mut tls, &format!("pipelined request {i} ({read_buffer})")).await;
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "answered after {took:?} ({read_buffer})"
        );
        assert_eq!(primary.count(), 5, "{read_buffer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_falls_back_to_the_first() {
    let certs = Certs::new();
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let proxy = Proxy::start_with_listener(
        &certs.listener(&[&certs.site, &certs.other], ""),
        &sections(primary.addr, primary.addr, ""),
    )
    .await;

    for (name, cn) in [
        ("site.test", "site.test"),
        ("other.test", "other.test"),
        ("a.wild.test", "other.test"),
        ("OTHER.test", "other.test"),
    ] {
        let out = curl_tls(&certs, &proxy, name, "/api/", &["-v"]).await;
        assert_answered(&out, "2");
        assert_eq!(
            presented_cn(&out.stderr).as_deref(),
            Some(cn),
            "{name}: {out:?}"
        );
    }
    // An unknown name and no SNI at all (an IP address) both get the default.
    for name in ["unknown.test", "b.a.wild.test"] {
        let out = curl_tls(&certs, &proxy, name, "/api/", &["-v", "--insecure"]).await;
        assert_answered(&out, "2");
        assert_eq!(
            presented_cn(&out.stderr).as_deref(),
            Some("site.test"),
            "{name}"
        );
    }
    let url = format!("https://{}/api/", proxy.addr);
    let out = curl(&[
        "-v",
        "--insecure",
        "-w",
        "\n%{http_version} %{http_code}",
        &url,
    ])
    .await;
    assert_answered(&out, "2");
    assert_eq!(presented_cn(&out.stderr).as_deref(), Some("site.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_false_offers_only_http1() {
    let (certs, _primary, proxy) = tls_to_primary("      h2: false").await;
    let out = curl_tls(&certs, &proxy, "site.test", "/api/", &["--http2"]).await;
    assert_answered(&out, "1.1");
}

/// The start of a TLS record carrying a handshake message, and then nothing: a ClientHello
/// that never finishes.
const STALLED_CLIENT_HELLO: &[u8] = b"\x16\x03\x01";

async fn tls_handshake_failures(proxy: &Proxy, reason: &str) -> f64 {
    proxy
        .metric(
            "shadowgate_tls_handshake_failures_total",
            &[("listener", &proxy.addr.to_string()), ("reason", reason)],
        )
        .await
}

/// Handshakes that stall are counted against the caps from the first byte (without it the
/// kernel holds the connection back, `TCP_DEFER_ACCEPT`), so they cannot pile up past
/// them; over a cap a connection is closed before any TLS work; and a stalled handshake
/// ends at the listener's header deadline instead of Pingora's 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_are_capped_and_end_at_the_header_deadline() {
    let (certs, _primary, proxy) =
        tls_to_primary("    client: { max_connections_per_ip: 2, header_timeout_ms: 1000 }").await;
    // The harness's readiness probe may still hold a slot of 127.0.0.1: an address of its own.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut stream = connect_from("127.0.0.5", proxy.addr).await;
        stream.write_all(STALLED_CLIENT_HELLO).await.expect("write");
        stalled.push(stream);
    }
    let started = std::time::Instant::now();
    wait_for_open(&proxy, 2.0).await;

    let mut over = connect_from("127.0.0.5", proxy.addr).await;
    over.write_all(STALLED_CLIENT_HELLO).await.expect("write");
    let closed_in = time_to_close(&mut over, Duration::from_millis(900)).await;
    assert!(
        closed_in.is_some(),
        "a third stalled handshake from one address was kept"
    );
    assert_eq!(
        proxy
            .metric(
                "shadowgate_client_connections_refused_total",
                &[("limit", "max_connections_per_ip")]
            )
            .await,
        1.0
    );

    for stream in &mut stalled {
        let waited = time_to_close(stream, WAIT)
            .await
            .expect("closed at the deadline");
        let since_start = started.elapsed();
        assert!(
            since_start >= Duration::from_millis(900),
            "closed early: {since_start:?}"
        );
        assert!(waited < Duration::from_secs(5), "closed late: {waited:?}");
    }
    wait_for_open(&proxy, 0.0).await;
    assert_eq!(tls_handshake_failures(&proxy, "timeout").await, 2.0);
    // The slots are back: the address is served again.
    let out = curl_tls(
        &certs,
        &proxy,
        "site.test",
        "/api/",
        &["--interface", "127.0.0.5"],
    )
    .await;
    assert!(out.success && out.stdout.ends_with(" 200"), "{out:?}");
    assert!(
        !proxy.log().contains("Downstream handshake"),
        "handshake failures are counted, not logged as errors:\n{}",
        proxy.log()
    );
}

/// Clients speaking cleartext HTTP to a TLS port fail their handshakes: each connection is
/// closed, counted, and gives its slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tls_handshakes_are_counted_and_free_their_slots() {
    let (_certs, _primary, proxy) = tls_to_primary("").await;
    // The harness's readiness probe (a connection closed at once) may fail a handshake
    // too, before or after this reading: three of ours can only be seen if they count.
    let before = tls_handshake_failures(&proxy, "failed").await;
    for _ in 0..3 {
        let mut stream = connect_from("127.0.0.6", proxy.addr).await;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n")
            .await
            .expect("write");
        assert!(time_to_close(&mut stream, WAIT).await.is_some());
    }
    proxy
        .wait_for_metric(
            "shadowgate_tls_handshake_failures_total",
            &[("listener", &proxy.addr.to_string()), ("reason", "failed")],
            |v| v >= before + 3.0,
            WAIT,
        )
        .await;
    wait_for_open(&proxy, 0.0).await;
}

// ---------------------------------------------------------------- h2c

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_by_prior_knowledge_shares_its_port_with_http1_and_only_where_enabled() {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let plain = free_port();
    let proxy = Proxy::start_with_listener(
        &format!("    h2c: true\n  - address: \"{plain}\""),
        &sections(primary.addr, primary.addr, ""),
    )
    .await;
    wait_port(plain).await;
    let mut services = proxy_services(&proxy);
    services.sort();
    assert_eq!(services, ["shadowgate proxy", "shadowgate proxy (h2c)"]);
    let fmt = ["-w", "\n%{http_version} %{http_code}"];
    let url = proxy.url("/api/x");
    let h2c = curl(&[&fmt[..], &["--http2-prior-knowledge", url.as_str()]].concat()).await;
    assert_answered(&h2c, "2");
    let h1 = curl(&[&fmt[..], &["--http1.1", url.as_str()]].concat()).await;
    assert_answered(&h1, "1.1");

    // The listener without h2c speaks HTTP/1.1 only.
    let plain_url = format!("http://{plain}/api/x");
    let refused =
        curl(&[&fmt[..], &["--http2-prior-knowledge", plain_url.as_str()]].concat()).await;
    assert!(!refused.stdout.ends_with("2 200"), "{refused:?}");
    let h1 = curl(&[&fmt[..], &["--http1.1", plain_url.as_str()]].concat()).await;
    assert_answered(&h1, "1.1");
    // And cleartext says so upstream.
    for seen in primary.wait_for(3, WAIT).await {
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_beside_an_h2c_one_still_negotiates_by_alpn() {
    let certs = Certs::new();
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let cleartext = free_port();
    let listeners = format!(
        "{}\n  - address: \"{cleartext}\"\n    h2c: true",
        certs.listener(&[&certs.site], "")
    );
    let proxy =
        Proxy::start_with_listener(&listeners, &sections(primary.addr, primary.addr, "")).await;
    wait_port(cleartext).await;
    // One proxy service serves both (TLS connections ignore h2c).
    assert_eq!(proxy_services(&proxy), ["shadowgate proxy (h2c)"]);
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = curl_tls(&certs, &proxy, "site.test", "/api/", &[flag]).await;
        assert_answered(&out, version);
    }
    let url = format!("http://{cleartext}/api/");
    let h2c = curl(&[
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_version} %{http_code}",
        &url,
    ])
    .await;
    assert_answered(&h2c, "2");
    let h1 = curl(&["--http1.1", "-w", "\n%{http_version} %{http_code}", &url]).await;
    assert_answered(&h1, "1.1");
}

/// The proxy services Pingora started, from its log.
fn proxy_services(proxy: &Proxy) -> Vec<String> {
    proxy
        .log()
        .lines()
        .filter_map(|l| {
            l.split_once("Starting service: ")
                .map(|(_, name)| name.to_string())
        })
        .filter(|name| name.starts_with("shadowgate proxy"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_balancing_and_metrics_work_for_http2_requests() {
    let a = Origin::start(OriginOptions::named("a")).await;
    let b = Origin::start(OriginOptions::named("b")).await;
    let other = Origin::start(OriginOptions::named("other")).await;
    let proxy = Proxy::start_with_listener(
        "    h2c: true",
        &format!(
            "upstreams:\n{}{}routes:\n  - {{ name: api, match: {{ path_prefix: /api }}, upstream: app }}\n  - {{ name: rest, upstream: other }}\n",
            pool("app", &[a.addr, b.addr], "    selection: round_robin\n"),
            pool("other", &[other.addr], ""),
        ),
    )
    .await;
    let client = h2c_client();
    let mut origins = Vec::new();
    for _ in 0..4 {
        let resp = client.get(proxy.url("/api/x")).send().await.unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        origins.push(resp.headers()["x-origin"].to_str().unwrap().to_string());
    }
    origins.sort();
    assert_eq!(origins, ["a", "a", "b", "b"]);
    let (status, origin, _) = get(&client, &proxy.url("/elsewhere")).await;
    assert_eq!((status, origin.as_str()), (200, "other"));
    proxy
        .wait_for_metric(
            "shadowgate_requests_total",
            &[("route", "api"), ("status", "200")],
            |v| v == 4.0,
            WAIT,
        )
        .await;
    proxy
        .wait_for_metric(
            "shadowgate_requests_total",
            &[("route", "rest"), ("status", "200")],
            |v| v == 1.0,
            WAIT,
        )
        .await;
}

/// An HTTP/2 connection with no stream open is closed at the listener's keep-alive
/// timeout (Pingora keeps one for ever unless told), after its last request as before its
/// first: over h2c once a request was answered, over TLS when the client never sends its
/// connection preface.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed_at_the_keepalive_timeout() {
    let certs = Certs::new();
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let cleartext = free_port();
    let proxy = Proxy::start_with_listener(
        &format!(
            "{}    client: {{ keepalive_timeout_ms: 500 }}\n  - address: \"{cleartext}\"\n    h2c: true\n    client: {{ keepalive_timeout_ms: 500 }}",
            certs.listener(&[&certs.site], "")
        ),
        &sections(primary.addr, primary.addr, ""),
    )
    .await;
    wait_port(cleartext).await;

    // h2c: one request, then nothing.
    let (mut client, connection) = h2c_connect(cleartext).await;
    let request = http::Request::get(format!("http://{cleartext}/api/idle"))
        .body(())
        .expect("request");
    let (response, _) = client.send_request(request, true).expect("send");
    assert_eq!(response.await.expect("response").status(), 200);
    let answered = std::time::Instant::now();
    // The connection's end, clean or not, is what is awaited here.
    let _ended = tokio::time::timeout(WAIT, connection)
        .await
        .expect("the idle h2c connection was closed");
    let idle = answered.elapsed();
    assert!(idle >= Duration::from_millis(400), "closed early: {idle:?}");
    assert!(idle < Duration::from_secs(5), "closed late: {idle:?}");

    // TLS with ALPN h2, then no preface: openssl s_client waits until the proxy closes.
    let started = std::time::Instant::now();
    let mut s_client = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-alpn",
            "h2",
            "-servername",
            "site.test",
        ])
        .args(["-connect", &proxy.addr.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl s_client");
    // Its input stays open (and `-quiet` ignores its end anyway): only the proxy ends it.
    let _input = s_client.stdin.take();
    let ended = tokio::time::timeout(WAIT, s_client.wait()).await;
    assert!(
        ended.is_ok(),
        "a TLS h2 connection without a preface was kept"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "closed early: {waited:?}"
    );
}

/// One h2c GET on `client`; its status.
async fn h2_get(client: &mut h2::client::SendRequest<Bytes>, to: SocketAddr) -> u16 {
    let ready = client.clone().ready().await.expect("ready");
    *client = ready;
    let request = http::Request::get(format!("http://{to}/api/h2"))
        .body(())
        .expect("request");
    h2_send(client, request, &[]).await.status().as_u16()
}

#[tokio::test]
async fn http2_idle_timeout_and_request_count_are_each_listeners_own() {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let relaxed = free_port();
    // Two h2c listeners, so one Pingora service: the strict one first.
    let proxy = Proxy::start_with_listener(
        &format!(
            "    h2c: true\n    client: {{ keepalive_timeout_ms: 400, keepalive_requests: 2 }}\n  - address: \"{relaxed}\"\n    h2c: true\n    client: {{ keepalive_timeout_ms: 60000, keepalive_requests: 5 }}"
        ),
        &sections(primary.addr, primary.addr, ""),
    )
    .await;
    wait_port(relaxed).await;
    let (mut at_ease, at_ease_connection) = h2c_connect(relaxed).await;
    assert_eq!(h2_get(&mut at_ease, relaxed).await, 200);
    let at_ease_idle_since = tokio::time::Instant::now();

    // The strict listener: GOAWAY after its 2 streams, not the other's 5.
    let (mut client, connection) = h2c_connect(proxy.addr).await;
    for _ in 0..2 {
        assert_eq!(h2_get(&mut client, proxy.addr).await, 200);
    }
    let _ended = tokio::time::timeout(WAIT, connection)
        .await
        .expect("the connection was not ended after its listener's 2 requests");
    assert!(client.ready().await.is_err(), "a 3rd stream was accepted");

    // Idle for its 400 ms, not the other's minute.
    let (mut client, connection) = h2c_connect(proxy.addr).await;
    assert_eq!(h2_get(&mut client, proxy.addr).await, 200);
    let answered = std::time::Instant::now();
    let _ended = tokio::time::timeout(WAIT, connection)
        .await
        .expect("the idle connection was not closed at its listener's timeout");
    assert!(answered.elapsed() >= Duration::from_millis(300));

    // The relaxed listener's connection, idle well past the strict timeout, still
    // serves its 2nd to 5th.
    tokio::time::sleep_until(at_ease_idle_since + Duration::from_millis(1000)).await;
    for _ in 2..=5 {
        assert_eq!(h2_get(&mut at_ease, relaxed).await, 200);
    }
    let _ended = tokio::time::timeout(WAIT, at_ease_connection)
        .await
        .expect("the relaxed connection was not ended after its 5 requests");
    assert_eq!(primary.count(), 1 + 2 + 1 + 4);
}

// ---------------------------------------------------------------- HTTP/2 mirroring

const MIRROR_POSTS: &str =
    "    mirrors:\n      - { upstream: shadow, percentage: 100, methods: [GET, POST] }";

/// POST `body` over HTTP/2 in 16 KiB DATA frames, with or without content-length; returns the status.
async fn h2_post(addr: SocketAddr, path: &str, body: &[u8], content_length: bool) -> u16 {
    let mut client = h2c_connect(addr).await.0;
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://edge.test{path}"))
        .header("x-test", "mirrored");
    if content_length {
        request = request.header("content-length", body.len());
    }
    let (response, mut stream) = client
        .send_request(request.body(()).unwrap(), body.is_empty())
        .unwrap();
    let chunks: Vec<&[u8]> = body.chunks(16 * 1024).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        stream
            .send_data(Bytes::copy_from_slice(chunk), i + 1 == chunks.len())
            .unwrap();
    }
    let response = tokio::time::timeout(WAIT, response).await.unwrap().unwrap();
    let status = response.status().as_u16();
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
    }
    status
}

/// gRPC through the proxy: an HTTP/2 client to an HTTP/2 upstream, `te: trailers` passed
/// on (gRPC servers may require it) and the response's trailers, which carry gRPC's status,
/// back to the client.
#[tokio::test]
async fn grpc_over_http2_keeps_te_and_the_status_trailers() {
    let origin = common::origin::TrailersOrigin::start().await;
    let proxy = Proxy::start_with_listener(
        "    h2c: true",
        &format!(
            "upstreams:\n{}routes:\n  - {{ name: grpc, upstream: app }}\n",
            pool("app", &[origin.addr], "    protocol: h2c\n")
        ),
    )
    .await;
    let (mut client, _connection) = h2c_connect(proxy.addr).await;
    let request = http::Request::post(format!("http://{}/pkg.Service/Method", proxy.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let response = h2_send(&mut client, request, &[b"\0\0\0\0\x02yo"]).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("response data");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    assert_eq!(data, b"\0\0\0\0\x02hi");
    let trailers = body
        .trailers()
        .await
        .expect("trailers")
        .expect("some trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    assert_eq!(
        trailers.get("grpc-message").map(|v| v.as_bytes()),
        Some(&b"ok"[..])
    );
    let received = origin.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].0.headers.get("te").map(|v| v.as_bytes()),
        Some(&b"trailers"[..])
    );
}

#[tokio::test]
async fn http2_cookie_crumbs_reach_the_primary_and_the_shadow_as_one_field() {
    let (primary, shadow, proxy) = mirroring_posts("    h2c: true").await;
    let (mut client, _connection) = h2c_connect(proxy.addr).await;
    // As browsers send them over HTTP/2: one field per cookie.
    let request = http::Request::post(format!("http://{}/api/cookies", proxy.addr))
        .header("cookie", "a=1")
        .header("x-test", "mirrored")
        .header("cookie", "b=2; c=3")
        .body(())
        .expect("request");
    let (response, _) = client.send_request(request, true).expect("send");
    assert_eq!(response.await.expect("response").status(), 200);
    for origin in [&primary, &shadow] {
        let got = origin.wait_for(1, WAIT).await;
        let cookies: Vec<&str> = got[0]
            .headers
            .get_all("cookie")
            .iter()
            .map(|v| v.to_str().expect("cookie text"))
            .collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_http2_upload_reaches_the_shadow_byte_for_byte() {
    let (primary, shadow, proxy) = mirroring_posts("    h2c: true").await;
    let big = body_of(300_000);
    let cases: [(&str, &[u8], bool); 4] = [
        ("/api/with-length", &big, true),
        ("/api/without-length", &big, false),
        ("/api/empty-with-length", b"", true),
        ("/api/empty", b"", false),
    ];
    for (path, body, content_length) in cases {
        assert_eq!(
            h2_post(proxy.addr, path, body, content_length).await,
            200,
            "{path}"
        );
    }
    let at_primary = primary.wait_for(cases.len(), WAIT).await;
    let at_shadow = shadow.wait_for(cases.len(), WAIT).await;
    for (path, body, _) in cases {
        let p = at_primary.iter().find(|r| r.uri == path).expect(path);
        let s = at_shadow
            .iter()
            .find(|r| r.uri == path)
            .unwrap_or_else(|| panic!("{path} did not reach the shadow"));
        assert_eq!(s.method, "POST", "{path}");
        assert_eq!(
            (s.body_len, &s.body_sha256),
            (body.len() as u64, &sha256_hex(body)),
            "{path}"
        );
        assert_eq!(
            (p.body_len, &p.body_sha256),
            (s.body_len, &s.body_sha256),
            "{path}"
        );
        for name in ["x-test", "x-request-id", "x-forwarded-for", "host"] {
            assert_eq!(s.header(name), p.header(name), "{path}: {name}");
        }
        assert_eq!(s.header("x-test"), Some("mirrored"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_rst_stream_mid_body_closes_the_shadow_instead_of_finishing_it() {
    let (primary, shadow, proxy) = mirroring_posts("    h2c: true").await;
    let mut client = h2c_connect(proxy.addr).await.0;
    let request = http::Request::builder()
        .method("POST")
        .uri("http://edge.test/api/partial")
        .header("content-length", 1_000_000)
        .body(())
        .unwrap();
    let (_response, mut stream) = client.send_request(request, false).unwrap();
    stream
        .send_data(Bytes::from(body_of(200_000)), false)
        .unwrap();
    wait_mirrored_bytes(&proxy).await;
    stream.send_reset(h2::Reason::CANCEL);
    wait_abandoned(&proxy, "primary_aborted", 1.0).await;
    assert_eq!(abandoned(&proxy, "primary_aborted").await, 1.0);
    wait_idle(&proxy).await;
    assert_eq!(
        shadow.count(),
        0,
        "the shadow saw a complete request from a reset upload"
    );
    assert_eq!(
        primary.count(),
        0,
        "the primary saw a complete request from a reset upload"
    );
    let line = &wait_for_json_lines(&access_log(&proxy), 1).await[0];
    assert_eq!(
        line["mirrors"][0]["outcome"], "abandoned:primary_aborted",
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_of_a_tls_request_says_https_like_its_primary() {
    let certs = Certs::new();
    let (primary, shadow, proxy) = mirroring_posts(&certs.listener(&[&certs.site], "")).await;
    let out = curl_tls(&certs, &proxy, "site.test", "/api/tls", &["--http1.1"]).await;
    assert_answered(&out, "1.1");
    let p = &primary.wait_for(1, WAIT).await[0];
    let s = &shadow.wait_for(1, WAIT).await[0];
    assert_eq!(p.header("x-forwarded-proto"), Some("https"));
    assert_eq!(s.header("x-forwarded-proto"), Some("https"));
    assert_eq!(s.header("x-request-id"), p.header("x-request-id"));
}

// ---------------------------------------------------------------- request ids

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_kept_or_made_and_reach_the_primary_the_shadow_and_the_log() {
    let (primary, shadow, proxy) = mirroring_posts("").await;
    let client = client();
    let too_long = "x".repeat(129);
    let cases: [(&str, Option<&str>); 4] = [
        ("/api/kept", Some("client-id_1.2:3")),
        ("/api/none", None),
        ("/api/spaces", Some("has space")),
        ("/api/long", Some(too_long.as_str())),
    ];
    for (path, id) in cases {
        let mut request = client.get(proxy.url(path));
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        assert_eq!(request.send().await.unwrap().status(), 200);
    }
    let at_primary = primary.wait_for(cases.len(), WAIT).await;
    let at_shadow = shadow.wait_for(cases.len(), WAIT).await;
    let lines = wait_for_json_lines(&access_log(&proxy), cases.len()).await;
    let mut made = Vec::new();
    for (path, sent) in cases {
        let id = at_primary
            .iter()
            .find(|r| r.uri == path)
            .and_then(|r| r.header("x-request-id"))
            .unwrap_or_else(|| panic!("{path}: no id at the primary"))
            .to_string();
        let shadow_id = at_shadow
            .iter()
            .find(|r| r.uri == path)
            .unwrap()
            .header("x-request-id");
        assert_eq!(shadow_id, Some(id.as_str()), "{path}");
        let logged = lines.iter().find(|l| l["path"] == path).unwrap();
        assert_eq!(logged["request_id"], id.as_str(), "{path}");
        if path == "/api/kept" {
            assert_eq!(Some(id.as_str()), sent);
        } else {
            assert_ne!(Some(id.as_str()), sent);
            made.push(id);
        }
    }
    made.sort();
    made.dedup();
    assert_eq!(made.len(), 3, "made ids are unique: {made:?}");
}

// ---------------------------------------------------------------- access log

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_carry_every_field() {
    let certs = Certs::new();
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    let mirrors = "    mirrors:\n      - { upstream: shadow, percentage: 100 }\n      - { upstream: idle, percentage: 0 }";
    let config = sections(primary.addr, shadow.addr, mirrors).replacen(
        "routes:",
        &format!("{}routes:", pool("idle", &[shadow.addr], "")),
        1,
    );
    let proxy = Proxy::start_with_listener(&certs.listener(&[&certs.site], ""), &config).await;
    let get = curl_tls(
        &certs,
        &proxy,
        "site.test",
        "/api/get?token=secret",
        &["--http2"],
    )
    .await;
    assert_answered(&get, "2");
    let post = curl_tls(
        &certs,
        &proxy,
        "site.test",
        "/api/post",
        &["--http1.1", "--data-binary", "hello"],
    )
    .await;
    assert_answered(&post, "1.1");
    let missing = curl_tls(&certs, &proxy, "site.test", "/nowhere", &["--http1.1"]).await;
    assert!(missing.stdout.ends_with("1.1 404"), "{missing:?}");

    let lines = wait_for_json_lines(&access_log(&proxy), 3).await;
    let (get, post, missing) = (&lines[0], &lines[1], &lines[2]);
    let keys: std::collections::BTreeSet<&str> = get
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let expected = [
        "time",
        "client",
        "method",
        "host",
        "path",
        "protocol",
        "tls",
        "route",
        "upstream",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "request_id",
        "mirrors",
    ];
    assert_eq!(keys, expected.into_iter().collect());
    let time = get["time"].as_str().unwrap();
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.starts_with("20"),
        "{time}"
    );
    assert!(get["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(get["method"], "GET");
    assert_eq!(get["host"], "site.test");
    assert_eq!(get["path"], "/api/get", "the query stays out of the log");
    assert_eq!(get["protocol"], "HTTP/2");
    assert_eq!(get["tls"], "TLSv1.3");
    assert_eq!(get["route"], "api");
    assert_eq!(get["upstream"], primary.addr.to_string());
    assert_eq!(get["status"], 200);
    assert_eq!(get["bytes_in"], 0);
    let body_len = "primary GET /api/get?token=secret 0\n".len();
    assert_eq!(get["bytes_out"], body_len);
    assert!(get["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(!get["request_id"].as_str().unwrap().is_empty());
    let outcomes = |line: &Value| -> Vec<(String, String)> {
        line["mirrors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["upstream"].to_string(), m["outcome"].to_string()))
            .collect()
    };
    let pair = |u: &str, o: &str| (format!("\"{u}\""), format!("\"{o}\""));
    assert_eq!(
        outcomes(get),
        [pair("shadow", "sampled"), pair("idle", "not_sampled")]
    );

    assert_eq!(post["method"], "POST");
    assert_eq!(post["protocol"], "HTTP/1.1");
    assert_eq!(post["bytes_in"], 5);
    assert_eq!(
        outcomes(post),
        [
            pair("shadow", "abandoned:method"),
            pair("idle", "abandoned:method")
        ]
    );

    assert_eq!(missing["status"], 404);
    assert_eq!(missing["route"], Value::Null);
    assert_eq!(missing["upstream"], Value::Null);
    assert_eq!(missing["mirrors"], serde_json::json!([]));
    assert_eq!(
        proxy
            .metric("shadowgate_access_log_dropped_total", &[])
            .await,
        0.0
    );
    assert!(
        proxy
            .metrics_text()
            .await
            .contains("shadowgate_access_log_dropped_total 0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_says_a_shadow_was_abandoned_when_the_client_aborts() {
    let (_primary, _shadow, proxy) = mirroring_posts("").await;
    abandon_mirrored_upload(&proxy, "/api/partial").await;
    let line = &wait_for_json_lines(&access_log(&proxy), 1).await[0];
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["bytes_in"], 200_000, "{line}");
    assert_eq!(
        line["mirrors"],
        serde_json::json!([{"upstream": "shadow", "outcome": "abandoned:primary_aborted"}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_access_log_for_logrotate() {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let proxy = Proxy::start(&sections(primary.addr, primary.addr, "")).await;
    let client = client();
    let log = access_log(&proxy);
    assert_eq!(get(&client, &proxy.url("/api/before")).await.0, 200);
    wait_for_json_lines(&log, 1).await;
    let rotated = proxy.dir().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    // Still the old file until the signal.
    assert_eq!(get(&client, &proxy.url("/api/moved")).await.0, 200);
    wait_for_json_lines(&rotated, 2).await;
    let pid = proxy.child.id().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-USR1", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    proxy.wait_for_log("access log reopened", WAIT).await;
    assert_eq!(get(&client, &proxy.url("/api/after")).await.0, 200);
    let fresh = wait_for_json_lines(&log, 1).await;
    assert_eq!(fresh[0]["path"], "/api/after");
    let old = wait_for_json_lines(&rotated, 2).await;
    assert_eq!(old.len(), 2, "{old:?}");
}

// ---------------------------------------------------------------- configuration errors

/// A whole config file whose one listener is `listener` (YAML under `- address:`).
fn config_with_listener(runtime: &Path, listener: &str) -> String {
    format!(
        "pid_file: {dir}/shadowgate.pid\nupgrade_sock: {dir}/upgrade.sock\nlisteners:\n  - address: \"{}\"\n{listener}\nupstreams:\n  app:\n    servers: [{{ address: \"127.0.0.1:9\" }}]\nroutes:\n  - {{ name: all, upstream: app }}\n",
        free_port(),
        dir = runtime.display()
    )
}

/// `-t` and a plain start on the same config: both fail with exit 2 and one line that
/// names `field` and contains `detail`.
fn assert_rejected(config: &str, field: &str, detail: &str) {
    let dir = common::proxy::private_dir();
    let path = dir.path().join("shadowgate.yaml");
    std::fs::write(&path, config).unwrap();
    for check in [true, false] {
        let mut args: Vec<&OsStr> = vec![OsStr::new("-c"), path.as_os_str()];
        if check {
            args.insert(0, OsStr::new("-t"));
        }
        let out = run_to_end(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "-t {check}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "-t {check}: one line expected: {stderr}");
        let message = lines[0]
            .split_once(".yaml: ")
            .map(|(_, m)| m)
            .unwrap_or_else(|| panic!("{stderr}"));
        assert!(
            message.starts_with(&format!("{field}: ")),
            "{field}: {message}"
        );
        assert!(message.contains(detail), "{detail:?} missing: {message}");
    }
}

#[test]
fn every_bad_tls_setting_is_one_line_naming_its_field() {
    let certs = Certs::new();
    let runtime = common::proxy::private_dir();
    let dir = runtime.path();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.join("missing.pem");
    let listener = |certificates: &[String]| {
        let list: Vec<String> = certificates
            .iter()
            .map(|c| format!("        - {c}"))
            .collect();
        format!("    tls:\n      certificates:\n{}", list.join("\n"))
    };
    let pair = |cert: &Path, key: &Path| {
        format!(
            "{{ cert: \"{}\", key: \"{}\" }}",
            cert.display(),
            key.display()
        )
    };
    let good = certs.site.yaml();
    let cases = [
        (
            listener(&[good.clone(), pair(&missing, &certs.other.key)]),
            "listeners[0].tls.certificates[1].cert",
            "cannot read",
        ),
        (
            listener(&[good.clone(), pair(&certs.other.cert, &missing)]),
            "listeners[0].tls.certificates[1].key",
            "cannot read",
        ),
        (
            // A directory: unreadable even for root.
            listener(&[pair(&certs.site.cert, dir)]),
            "listeners[0].tls.certificates[0].key",
            "cannot read",
        ),
        (
            listener(&[pair(&garbage, &certs.site.key)]),
            "listeners[0].tls.certificates[0].cert",
            "no certificate found",
        ),
        (
            listener(&[pair(&certs.site.cert, &garbage)]),
            "listeners[0].tls.certificates[0].key",
            "no private key found",
        ),
        (
            listener(&[good.clone(), pair(&certs.other.cert, &certs.site.key)]),
            "listeners[0].tls.certificates[1].key",
            "does not match the certificate",
        ),
        (
            "    tls:\n      certificates: []".to_string(),
            "listeners[0].tls.certificates",
            "no certificate",
        ),
        (
            format!("    h2c: true\n{}", listener(std::slice::from_ref(&good))),
            "listeners[0].h2c",
            "remove h2c",
        ),
        (
            format!("{}\n      alpn: h3", listener(std::slice::from_ref(&good))),
            "listeners[0].tls.alpn",
            "unknown field `alpn`",
        ),
    ];
    for (listener, field, detail) in cases {
        assert_rejected(&config_with_listener(dir, &listener), field, detail);
    }
    let bad_log = format!(
        "{}access_log:\n  path: {}/no/such/dir/access.log\n",
        config_with_listener(dir, ""),
        dir.display()
    );
    assert_rejected(&bad_log, "access_log.path", "cannot open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_warns_but_serves() {
    let certs = Certs::new();
    let expired = certs.ca.issue("expired", &["old.test"], Validity::Expired);
    let runtime = common::proxy::private_dir();
    let listener = certs.listener(&[&certs.site, &expired], "");
    let path = runtime.path().join("shadowgate.yaml");
    std::fs::write(&path, config_with_listener(runtime.path(), &listener)).unwrap();
    let out = run_to_end(&[OsStr::new("-t"), OsStr::new("-c"), path.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warning = stderr
        .lines()
        .find(|l| l.contains("listeners[0].tls.certificates[1].cert:"))
        .unwrap_or_else(|| panic!("no warning: {stderr}"));
    assert!(
        warning.contains("expired at 2021-01-01T00:00:00Z"),
        "{warning}"
    );

    let primary = Origin::start(OriginOptions::named("primary")).await;
    let proxy =
        Proxy::start_with_listener(&listener, &sections(primary.addr, primary.addr, "")).await;
    proxy
        .wait_for_log("listeners[0].tls.certificates[1].cert:", WAIT)
        .await;
    let out = curl_tls(&certs, &proxy, "site.test", "/api/", &[]).await;
    assert_answered(&out, "2");
}

// ---------------------------------------------------------------- certificate renewal

/// Kills a spawned process when the test ends, however it ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for_line(path: &Path, needle: &str) {
    eventually(WAIT, Duration::from_millis(20), || async move {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            Ok(())
        } else {
            Err(format!("no {needle:?} in {}:\n{text}", path.display()))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_after_check_and_upgrade() {
    let (certs, _primary, proxy) = tls_to_primary("").await;
    let seen = curl_tls(&certs, &proxy, "site.test", "/api/", &["-v"]).await;
    assert_eq!(presented_cn(&seen.stderr).as_deref(), Some("site.test"));

    // Renew in place: same files, a new certificate (told apart by its CN).
    let renewed = certs
        .ca
        .issue("renewed", &["renewed.test", "site.test"], Validity::Current);
    std::fs::copy(&renewed.cert, &certs.site.cert).unwrap();
    std::fs::copy(&renewed.key, &certs.site.key).unwrap();
    let config = proxy.config_path.as_os_str();
    let check = run_to_end(&[OsStr::new("-t"), OsStr::new("-c"), config]);
    assert!(check.status.success(), "{check:?}");

    // The usual zero-downtime upgrade: a new process with -u, then SIGQUIT to the old one.
    let new_log = proxy.dir().join("new.log");
    let _new = Reaped(common::proxy::spawn(&proxy.config_path, &new_log, &["-u"]));
    let upgrade_sock = proxy.dir().join("upgrade.sock");
    eventually(WAIT, Duration::from_millis(10), || {
        std::future::ready(match upgrade_sock.exists() {
            true => Ok(()),
            false => Err("no upgrade socket".to_string()),
        })
    })
    .await;
    let quit = std::process::Command::new("kill")
        .args(["-QUIT", &proxy.child.id().to_string()])
        .status()
        .unwrap();
    assert!(quit.success());
    wait_for_line(&new_log, "Bootstrap done").await;
    // The old process may accept a few more connections before it lets go; then only the new one does.
    let (certs, proxy) = (&certs, &proxy);
    eventually(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async move {
            let seen = curl_tls(certs, proxy, "site.test", "/api/", &["-v"]).await;
            assert_answered(&seen, "2");
            match presented_cn(&seen.stderr).as_deref() {
                Some("renewed.test") => Ok(()),
                _ => Err(format!("still the old certificate: {seen:?}")),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_to_stdout_is_one_json_line_per_request() {
    use tokio::io::AsyncBufReadExt;
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let runtime = common::proxy::private_dir();
    let config = config_with_listener(runtime.path(), "")
        .replace("\"127.0.0.1:9\"", &format!("\"{}\"", primary.addr))
        + "access_log:\n  path: \"-\"\n";
    let addr: SocketAddr = config
        .split("address: \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|a| a.parse().ok())
        .expect("listener address");
    let path = runtime.path().join("shadowgate.yaml");
    std::fs::write(&path, config).unwrap();
    let mut child = tokio::process::Command::new(common::proxy::binary())
        .arg("-c")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_port(addr).await;
    let client = client();
    let (status, _, _) = get(&client, &format!("http://{addr}/stdout")).await;
    assert_eq!(status, 200);
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("a line within the wait")
        .unwrap()
        .expect("a line");
    let entry: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["path"], "/stdout");
    assert_eq!(entry["route"], "all");
    assert_eq!(entry["tls"], Value::Null);
    assert_eq!(entry["protocol"], "HTTP/1.1");
}
