//! Shared test support: loopback origins, the shadowgate process, and HTTP clients.
#![allow(dead_code)]

pub mod origin;
pub mod ports;
pub mod proxy;
pub mod raw_h2;
pub mod raw_record;
pub mod tls;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[allow(unused_imports)]
pub use origin::{Misbehavior, Origin, OriginOptions, RawOrigin, Recorded, Reply, sha256_hex};
#[allow(unused_imports)]
pub use ports::refusing_address;
pub use proxy::Proxy;

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// `client:` keys for a listener with its default read buffer and without one: tests of
/// the keep-alive wait run both ways (with a buffer it waits in the buffer, without one on
/// the socket's readiness).
pub const READ_BUFFERS: [&str; 2] = ["", ", read_buffer_bytes: 0"];

/// A client that speaks HTTP/2 by prior knowledge (for `h2c: true` listeners).
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A client that never pools connections across tests and never retries on its own.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// One GET through the proxy: (status, x-origin header, body).
pub async fn get(client: &reqwest::Client, url: &str) -> (u16, String, String) {
    let resp = client.get(url).send().await.expect("request");
    let status = resp.status().as_u16();
    let origin = resp
        .headers()
        .get("x-origin")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, origin, resp.text().await.unwrap_or_default())
}

/// Send raw bytes on a fresh connection and read the whole response (the
/// request should carry `Connection: close`).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    read_rest(&mut stream).await
}

/// Everything the server sends until it closes the connection (bounded by `WAIT`).
pub async fn read_rest(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Read one HTTP/1 response with a Content-Length body from a kept-alive connection:
/// (status line and header fields, body). `None` if the connection closed first.
pub async fn read_response(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: nothing past this response is consumed.
    while !buf.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, stream.read(&mut byte)).await {
            Ok(Ok(1)) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    tokio::time::timeout(WAIT, stream.read_exact(&mut body))
        .await
        .ok()?
        .ok()?;
    Some((head, body))
}

/// Wait until the peer closes `stream` (EOF or reset), discarding what it sends;
/// the time it took, or `None` if it stayed open for `limit`.
pub async fn time_to_close(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: Duration,
) -> Option<Duration> {
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(limit, async {
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
    .ok()?;
    Some(started.elapsed())
}

/// Send the start of a request header, then a byte every 100 ms (for at most 2 s) until
/// the proxy stops taking them: the time from the first byte until the proxy closed.
pub async fn slow_header_lasts(
    stream: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    start: &[u8],
) -> Duration {
    let started = std::time::Instant::now();
    stream.write_all(start).await.expect("write");
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if stream.write_all(b"X").await.is_err() || stream.flush().await.is_err() {
            break;
        }
    }
    started.elapsed()
        + time_to_close(stream, WAIT)
            .await
            .expect("the slow header was not cut off")
}

/// Wait until the proxy's listener has `n` client connections open.
pub async fn wait_for_open(proxy: &Proxy, n: f64) {
    proxy
        .wait_for_metric(
            "shadowgate_client_connections",
            &[("listener", &proxy.addr.to_string())],
            |v| v == n,
            WAIT,
        )
        .await;
}

/// An HTTP/2 connection by prior knowledge (h2c) to `addr`, ready for a request, and the
/// task driving it, which ends when the connection does.
pub async fn h2c_connect(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let connection = tokio::spawn(connection);
    (client.ready().await.expect("h2 ready"), connection)
}

/// Send `request` on an HTTP/2 connection with its body in these DATA frames (the last
/// ends the stream; none: a request without a body); the response head, within `WAIT`.
pub async fn h2_send(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    request: http::Request<()>,
    frames: &[&[u8]],
) -> http::Response<h2::RecvStream> {
    let (response, mut body) = client
        .send_request(request, frames.is_empty())
        .expect("send");
    for (i, frame) in frames.iter().enumerate() {
        body.send_data(bytes::Bytes::copy_from_slice(frame), i + 1 == frames.len())
            .expect("send data");
    }
    tokio::time::timeout(WAIT, response)
        .await
        .expect("an answer within WAIT")
        .expect("response head")
}

/// A connection to `to` from the loopback address `source` (a client address of its own,
/// for the per-address caps).
pub async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source address"))
        .expect("bind source");
    socket.connect(to).await.expect("connect")
}

/// Poll `check` every `every` until it returns `Ok`; past `timeout` the test fails with
/// the last `Err`, which says what was awaited and what was seen instead.
pub async fn eventually<T, Fut>(
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Fut,
) -> T
where
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(why) => assert!(std::time::Instant::now() < deadline, "{why}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// A client that gives up on its upload: a 1 MB POST to `path` of which 200 KB are sent,
/// held until bytes of it have reached the shadow of route `api`, then the connection dropped.
pub async fn abandon_mirrored_upload(proxy: &Proxy, path: &str) {
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let head = format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream
        .write_all(&body_of(200_000))
        .await
        .expect("write body");
    wait_mirrored_bytes(proxy).await;
    drop(stream);
}

/// Wait until some bytes of route `api` have been sent to a shadow.
pub async fn wait_mirrored_bytes(proxy: &Proxy) {
    proxy
        .wait_for_metric(
            "shadowgate_mirror_bytes_total",
            &[("route", "api")],
            |v| v > 0.0,
            WAIT,
        )
        .await;
}

/// Shadows of route `api` abandoned for `reason`.
pub async fn abandoned(proxy: &Proxy, reason: &str) -> f64 {
    proxy
        .metric(
            "shadowgate_mirror_abandoned_total",
            &[("route", "api"), ("reason", reason)],
        )
        .await
}

/// Wait until at least `n` shadows of route `api` were abandoned for `reason`.
pub async fn wait_abandoned(proxy: &Proxy, reason: &str, n: f64) {
    proxy
        .wait_for_metric(
            "shadowgate_mirror_abandoned_total",
            &[("route", "api"), ("reason", reason)],
            |v| v >= n,
            WAIT,
        )
        .await;
}

/// Wait until no shadow of route `api` is in flight.
pub async fn wait_idle(proxy: &Proxy) {
    proxy
        .wait_for_metric(
            "shadowgate_mirror_in_flight",
            &[("route", "api")],
            |v| v == 0.0,
            WAIT,
        )
        .await;
}

/// Deterministic test body of `len` bytes.
pub fn body_of(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// YAML for a pool of servers, e.g. `pool("app", &[a, b], "")`.
pub fn pool(name: &str, servers: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|s| format!("      - {{ address: \"{s}\" }}"))
        .collect();
    format!("  {name}:\n    servers:\n{}\n{extra}", list.join("\n"))
}

/// A proxy whose one route `all` sends everything to pool `app` of `servers`.
pub async fn proxy_to_pool(servers: &[SocketAddr], pool_extra: &str) -> Proxy {
    Proxy::start(&format!(
        "upstreams:\n{}routes:\n  - {{ name: all, upstream: app }}\n",
        pool("app", servers, pool_extra)
    ))
    .await
}

/// Wait until the JSON-lines file at `path` holds at least `n` lines; returns them parsed.
pub async fn wait_for_json_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let complete: Vec<&str> = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .collect();
        if complete.len() >= n {
            return complete
                .iter()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} has {} lines, expected {n}:\n{text}",
            path.display(),
            complete.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
