//! Slow and idle clients, connection caps and oversize headers (`listeners[].client`), and the
//! retry of idempotent requests when a server breaks off before answering.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    Misbehavior, Origin, OriginOptions, Proxy, READ_BUFFERS, RawOrigin, WAIT, client, connect_from,
    h2c_connect, pool, read_response, read_rest, slow_header_lasts, time_to_close, wait_for_open,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A proxy in front of one recording origin, with these client limits.
async fn proxy_with_client(client: &str) -> (Proxy, Origin) {
    proxy_with_listener(&format!("    client: {client}")).await
}

/// A proxy in front of one recording origin, with these listener settings.
async fn proxy_with_listener(listener_extra: &str) -> (Proxy, Origin) {
    let origin = Origin::start(OriginOptions::named("app")).await;
    let proxy = Proxy::start_with_listener(listener_extra, &one_route("app", origin.addr)).await;
    (proxy, origin)
}

/// Config text: one pool of one server, and a route sending everything to it.
fn one_route(pool_name: &str, server: SocketAddr) -> String {
    format!(
        "upstreams:\n{}routes:\n  - {{ name: all, upstream: {pool_name} }}\n",
        pool(pool_name, &[server], "")
    )
}

const GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: test\r\n\r\n";

async fn open_connections(proxy: &Proxy) -> f64 {
    proxy
        .metric(
            "shadowgate_client_connections",
            &[("listener", &proxy.addr.to_string())],
        )
        .await
}

/// One GET on a kept-alive connection; the response head.
async fn get_on(stream: &mut TcpStream) -> String {
    stream.write_all(GET).await.expect("write request");
    let (head, _) = read_response(stream).await.expect("response");
    head
}

#[tokio::test]
async fn slow_header_is_closed_at_the_header_deadline() {
    let (proxy, origin) = proxy_with_client("{ header_timeout_ms: 1000 }").await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut reader, mut writer) = stream.split();
    // Slowloris: a byte every 100 ms, each well within any per-read timeout.
    let dribble = async {
        writer.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").await.ok()?;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            writer.write_all(b"a").await.ok()?;
        }
        #[allow(unreachable_code)]
        Some(())
    };
    let closed = async {
        let started = std::time::Instant::now();
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(WAIT, async {
            while matches!(
                tokio::io::AsyncReadExt::read(&mut reader, &mut buf).await,
                Ok(n) if n > 0
            ) {}
        })
        .await;
        started.elapsed()
    };
    let took = tokio::select! {
        took = closed => took,
        _ = dribble => panic!("the proxy stopped taking bytes without closing"),
    };
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(3000),
        "closed after {took:?}, header_timeout_ms is 1000"
    );
    assert_eq!(origin.count(), 0);
    proxy
        .wait_for_metric(
            "shadowgate_client_header_timeouts_total",
            &[("listener", &proxy.addr.to_string())],
            |v| v == 1.0,
            WAIT,
        )
        .await;
}

#[tokio::test]
async fn idle_time_between_requests_is_not_header_time() {
    for read_buffer in READ_BUFFERS {
        let (proxy, origin) = proxy_with_client(&format!(
            "{{ header_timeout_ms: 300, keepalive_timeout_ms: 5000{read_buffer} }}"
        ))
        .await;
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        assert!(get_on(&mut stream).await.starts_with("HTTP/1.1 200"));
        // Idle for longer than the header deadline, shorter than keep-alive, and long
        // enough for the connection to give back its buffers (after 1 s).
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(get_on(&mut stream).await.starts_with("HTTP/1.1 200"));
        // Two requests in one write: the second, read with the first, is not left waiting.
        stream.write_all(&GET.repeat(2)).await.expect("write");
        for i in 0..2 {
            let (head, _) = read_response(&mut stream)
                .await
                .unwrap_or_else(|| panic!("pipelined request {i}: no response ({read_buffer})"));
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        }
        // A slow header on the kept-alive connection is timed from its first byte.
        let took = slow_header_lasts(&mut stream, b"GET / HTTP/1.1\r\n").await;
        assert!(
            took < Duration::from_millis(2500),
            "closed after {took:?} ({read_buffer})"
        );
        assert_eq!(origin.count(), 4, "{read_buffer}");
    }
}

#[tokio::test]
async fn each_request_gets_its_own_full_deadlines() {
    // A connection keeps one header clock and one idle clock and moves them later for each
    // request: every request must get a whole deadline from its own start.
    let (proxy, _origin) =
        proxy_with_client("{ header_timeout_ms: 700, keepalive_timeout_ms: 700 }").await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    // 2.5 s of requests, far past both first deadlines; each header comes in two halves
    // 200 ms apart so that its header clock runs, and each waits 300 ms after the last.
    let mut last_response = std::time::Instant::now();
    for i in 0..5 {
        stream
            .write_all(b"GET /x HTTP/1.1\r\n")
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(200)).await;
        stream
            .write_all(b"Host: test\r\n\r\n")
            .await
            .expect("write");
        let (head, _) = read_response(&mut stream)
            .await
            .unwrap_or_else(|| panic!("request {i}: no response"));
        assert!(head.starts_with("HTTP/1.1 200"), "request {i}: {head}");
        last_response = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Idle after the last: closed one keep-alive timeout after its response.
    time_to_close(&mut stream, WAIT)
        .await
        .expect("the idle connection stayed open");
    let idle = last_response.elapsed();
    assert!(
        idle >= Duration::from_millis(600) && idle < Duration::from_millis(3000),
        "closed {idle:?} after the last response; keepalive_timeout_ms is 700"
    );
}

#[tokio::test]
async fn idle_keepalive_connection_is_closed_after_keepalive_timeout() {
    // 1500 ms: the wait goes on without the buffers after 1 s, and still ends in time.
    for (keepalive, read_buffer) in [
        (500, READ_BUFFERS[0]),
        (500, READ_BUFFERS[1]),
        (1500, READ_BUFFERS[0]),
    ] {
        let (proxy, _origin) = proxy_with_client(&format!(
            "{{ keepalive_timeout_ms: {keepalive}{read_buffer} }}"
        ))
        .await;
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        assert!(get_on(&mut stream).await.starts_with("HTTP/1.1 200"));
        let took = time_to_close(&mut stream, WAIT)
            .await
            .expect("the idle connection stayed open");
        let keepalive = Duration::from_millis(keepalive);
        assert!(
            took >= keepalive - Duration::from_millis(100)
                && took < keepalive + Duration::from_millis(2500),
            "closed after {took:?}, keepalive_timeout_ms is {keepalive:?} ({read_buffer})"
        );
    }
}

#[tokio::test]
async fn keepalive_timeout_zero_closes_after_each_response() {
    let (proxy, _origin) = proxy_with_client("{ keepalive_timeout_ms: 0 }").await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let head = get_on(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(time_to_close(&mut stream, WAIT).await.is_some());
}

#[tokio::test]
async fn slow_body_is_answered_408_at_body_timeout() {
    let (proxy, _origin) = proxy_with_client("{ body_timeout_ms: 500 }").await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\nfirst bytes")
        .await
        .expect("write");
    // ... and nothing more.
    let started = std::time::Instant::now();
    let answer = read_rest(&mut stream).await;
    let took = started.elapsed();
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "got {answer:?} after {took:?}; proxy log:\n{}",
        proxy.log()
    );
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(3000),
        "answered after {took:?}"
    );
}

#[tokio::test]
async fn a_body_left_unfinished_after_an_early_answer_is_closed_at_body_timeout() {
    // The upstream answers at the header; the client then sends nothing more of its
    // body. The kept connection waits for the rest only as long as the body timeout.
    let early = RawOrigin::start(Misbehavior::AnswersBeforeBody).await;
    let proxy = Proxy::start_with_listener(
        "    client: { body_timeout_ms: 500 }",
        &one_route("early", early.addr),
    )
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(
            b"PUT /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\nfirst bytes",
        )
        .await
        .expect("write");
    let (status, _) = read_response(&mut stream)
        .await
        .expect("the early answer is relayed");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let took = time_to_close(&mut stream, WAIT)
        .await
        .expect("the connection is closed, not held");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(3000),
        "closed after {took:?}"
    );
}

#[tokio::test]
async fn client_that_does_not_read_is_dropped_at_send_timeout() {
    const LARGE: usize = 64 * 1024 * 1024;
    let origin = Origin::start(OriginOptions::named("big").response_bytes(LARGE)).await;
    let proxy =
        Proxy::start_with_client("{ send_timeout_ms: 500 }", &one_route("app", origin.addr)).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream.write_all(GET).await.expect("write");
    origin.wait_for(1, WAIT).await;
    // Never read: once the socket buffers are full the proxy's writes stall.
    wait_for_open(&proxy, 1.0).await;
    wait_for_open(&proxy, 0.0).await;
    let mut received = 0usize;
    let mut buf = vec![0u8; 1024 * 1024];
    let _ = tokio::time::timeout(WAIT, async {
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
            if n == 0 {
                break;
            }
            received += n;
        }
    })
    .await;
    assert!(
        received < LARGE,
        "the whole {LARGE}-byte response arrived; the client was not dropped"
    );
}

/// The same over HTTP/2: a stream whose body stops arriving is answered 408 at
/// `body_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_slow_body_is_answered_408_at_body_timeout() {
    let (proxy, _origin) =
        proxy_with_listener("    h2c: true\n    client: { body_timeout_ms: 500 }").await;
    let proxy_addr = proxy.addr;
    let (mut client, _connection) = h2c_connect(proxy_addr).await;
    let request = http::Request::post(format!("http://{proxy_addr}/upload"))
        .header("content-length", "100")
        .body(())
        .expect("request");
    let (response, mut body) = client.send_request(request, false).expect("send");
    body.send_data(bytes::Bytes::from_static(b"first bytes"), false)
        .expect("send data");
    // ... and nothing more.
    let started = std::time::Instant::now();
    let response = tokio::time::timeout(WAIT, response)
        .await
        .expect("no answer within WAIT")
        .expect("response head");
    let took = started.elapsed();
    assert_eq!(response.status(), 408, "after {took:?}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(3000),
        "answered after {took:?}"
    );
}

/// The same over HTTP/2: a stream whose client stops granting flow-control window is
/// reset at `send_timeout_ms`, and its connection, idle then, closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_stream_that_is_not_read_is_reset_at_send_timeout() {
    const LARGE: usize = 64 * 1024 * 1024;
    let origin = Origin::start(OriginOptions::named("big").response_bytes(LARGE)).await;
    let proxy = Proxy::start_with_listener(
        "    h2c: true\n    client: { send_timeout_ms: 500, keepalive_timeout_ms: 500 }",
        &one_route("app", origin.addr),
    )
    .await;
    let proxy_addr = proxy.addr;
    let (mut client, _connection) = h2c_connect(proxy_addr).await;
    let request = http::Request::get(format!("http://{proxy_addr}/x"))
        .body(())
        .expect("request");
    let (response, _) = client.send_request(request, true).expect("send");
    let mut body = response.await.expect("response head").into_body();
    // Take what arrives but never release flow-control capacity: after the first
    // window the proxy's writes stall.
    let mut received = 0usize;
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match body.data().await {
                Some(Ok(chunk)) => received += chunk.len(),
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await;
    let reset = ended.expect("the stalled stream was not ended within WAIT");
    assert!(
        reset.is_some(),
        "the stream ended cleanly with {received} bytes"
    );
    assert!(received < LARGE, "the whole response arrived");
    wait_for_open(&proxy, 0.0).await;
}

#[tokio::test]
async fn connections_over_max_connections_get_503_and_slots_are_freed() {
    let (proxy, _origin) =
        proxy_with_client("{ max_connections: 3, max_connections_per_ip: 3 }").await;
    // The harness's readiness probe may still hold a slot on a busy machine: let a
    // full exchange go through and wait until no connection is open.
    let mut warm_up = TcpStream::connect(proxy.addr).await.expect("connect");
    assert!(get_on(&mut warm_up).await.starts_with("HTTP/1.1 200"));
    drop(warm_up);
    wait_for_open(&proxy, 0.0).await;
    // Kept-alive connections after one request each. (The listener uses TCP_DEFER_ACCEPT:
    // a connection that has sent nothing is not handed to the proxy at all.)
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        assert!(get_on(&mut stream).await.starts_with("HTTP/1.1 200"));
        held.push(stream);
    }
    wait_for_open(&proxy, 3.0).await;

    let mut extra = TcpStream::connect(proxy.addr).await.expect("connect");
    extra.write_all(GET).await.expect("write");
    let answer = read_rest(&mut extra).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "got {answer:?}");
    assert!(answer.contains("too many connections to this listener"));
    assert_eq!(
        proxy
            .metric(
                "shadowgate_client_connections_refused_total",
                &[("limit", "max_connections")]
            )
            .await,
        1.0
    );

    // The connections within the limit are still served.
    for stream in &mut held {
        assert!(get_on(stream).await.starts_with("HTTP/1.1 200"));
    }
    // A closed connection gives its slot back.
    drop(held.pop());
    wait_for_open(&proxy, 2.0).await;
    let mut again = TcpStream::connect(proxy.addr).await.expect("connect");
    assert!(get_on(&mut again).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn connections_over_max_connections_per_ip_get_503_others_are_served() {
    let (proxy, _origin) = proxy_with_client("{ max_connections_per_ip: 2 }").await;
    // Client addresses of their own: the harness's readiness probe (from 127.0.0.1)
    // may still hold a slot of 127.0.0.1 on a busy machine.
    let mut a1 = connect_from("127.0.0.3", proxy.addr).await;
    let mut a2 = connect_from("127.0.0.3", proxy.addr).await;
    let head = get_on(&mut a1).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "a1: {head}\n{}",
        proxy.log()
    );
    let head = get_on(&mut a2).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "a2: {head}\n{}",
        proxy.log()
    );
    wait_for_open(&proxy, 2.0).await;

    let mut a3 = connect_from("127.0.0.3", proxy.addr).await;
    a3.write_all(GET).await.expect("write");
    let answer = read_rest(&mut a3).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "got {answer:?}");
    assert!(answer.contains("too many connections from your address"));

    // Another address is not affected, nor are the first two.
    let mut b = connect_from("127.0.0.4", proxy.addr).await;
    assert!(get_on(&mut b).await.starts_with("HTTP/1.1 200"));
    assert!(get_on(&mut a1).await.starts_with("HTTP/1.1 200"));
    assert!(get_on(&mut a2).await.starts_with("HTTP/1.1 200"));

    drop(a1);
    wait_for_open(&proxy, 2.0).await;
    let mut a4 = connect_from("127.0.0.3", proxy.addr).await;
    assert!(get_on(&mut a4).await.starts_with("HTTP/1.1 200"));
}

/// HTTP/2 rapid reset (CVE-2023-44487): streams opened and cancelled at once, as fast as
/// the client can. The connection is ended with GOAWAY (ENHANCE_YOUR_CALM) and the
/// cancelled requests do not reach the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_is_ended_with_goaway() {
    const STREAMS: usize = 2000;
    let (proxy, origin) = proxy_with_listener("    h2c: true").await;
    let (mut client, connection) = h2c_connect(proxy.addr).await;
    for i in 0..STREAMS {
        client = match client.ready().await {
            Ok(client) => client,
            Err(_) => break, // the proxy has ended the connection
        };
        let request = http::Request::get(format!("http://{}/r{i}", proxy.addr))
            .body(())
            .expect("request");
        match client.send_request(request, true) {
            Ok((_response, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => break,
        }
    }
    let ended = tokio::time::timeout(WAIT, connection)
        .await
        .expect("the connection was not ended")
        .expect("connection task");
    // The client reads the GOAWAY, or, still writing, finds the connection closed after it.
    let error = ended.expect_err("the connection ended without an error");
    assert!(
        error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || error.is_io(),
        "{error:?}"
    );
    let reached = origin.count();
    assert!(
        reached < STREAMS / 10,
        "{reached} cancelled requests reached the upstream"
    );
}

/// The same limits for an HTTP/2 request (whose own limit, Pingora's 64 KiB header list,
/// is far above them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_http2_headers_get_431() {
    let (proxy, origin) = proxy_with_listener(
        "    h2c: true\n    client: { max_header_bytes: 2048, max_headers: 10 }",
    )
    .await;
    let (mut client, _connection) = h2c_connect(proxy.addr).await;
    let mut status_of = async |path: &str, headers: &[(String, String)]| {
        let mut request = http::Request::get(format!("http://{}{path}", proxy.addr));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let (response, _) = client
            .send_request(request.body(()).expect("request"), true)
            .expect("send");
        response.await.expect("response").status()
    };
    let big = [("x-big".to_string(), "b".repeat(3000))];
    assert_eq!(status_of("/big", &big).await, 431);
    let many: Vec<_> = (0..12)
        .map(|i| (format!("x-h{i}"), "v".to_string()))
        .collect();
    assert_eq!(status_of("/many", &many).await, 431);
    let fits: Vec<_> = (0..7)
        .map(|i| (format!("x-h{i}"), "v".repeat(100)))
        .collect();
    assert_eq!(status_of("/fits", &fits).await, 200);
    assert_eq!(origin.count(), 1);
}

#[tokio::test]
async fn connection_closes_after_keepalive_requests() {
    let (proxy, origin) = proxy_with_client("{ keepalive_requests: 3 }").await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    for i in 1..=3 {
        let head = get_on(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "request {i}: {head}");
        let closes = head.to_ascii_lowercase().contains("connection: close");
        assert_eq!(closes, i == 3, "request {i}: {head}");
    }
    assert!(time_to_close(&mut stream, WAIT).await.is_some());
    assert_eq!(origin.count(), 3);
}

/// An HTTP/2 connection gets GOAWAY after `keepalive_requests` streams (as NGINX's
/// `keepalive_requests` does), once those are answered; the client opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connection_ends_after_keepalive_requests() {
    let (proxy, origin) =
        proxy_with_listener("    h2c: true\n    client: { keepalive_requests: 3 }").await;
    let (mut client, connection) = h2c_connect(proxy.addr).await;
    for i in 1..=3 {
        client = client.ready().await.expect("ready");
        let request = http::Request::get(format!("http://{}/r{i}", proxy.addr))
            .body(())
            .expect("request");
        let (response, _) = client.send_request(request, true).expect("send");
        assert_eq!(
            response.await.expect("response").status(),
            200,
            "request {i}"
        );
    }
    // `client` is still held: only the proxy can end the connection.
    let ended = tokio::time::timeout(WAIT, connection)
        .await
        .expect("the connection was not ended after its last request")
        .expect("connection task");
    // GOAWAY with NO_ERROR; the socket's close may race the client's last frames.
    if let Err(error) = ended {
        assert!(
            error.reason() == Some(h2::Reason::NO_ERROR) || error.is_io(),
            "{error:?}"
        );
    }
    assert!(client.ready().await.is_err(), "a 4th stream was accepted");
    assert_eq!(origin.count(), 3);
}

#[tokio::test]
async fn oversize_headers_get_431() {
    let (proxy, origin) = proxy_with_client("{ max_header_bytes: 2048, max_headers: 10 }").await;
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: test\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(3000)
    );
    let answer = common::raw_exchange(proxy.addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "got {answer:?}");

    let many: String = (0..12).map(|i| format!("X-H{i}: v\r\n")).collect();
    let answer = common::raw_exchange(
        proxy.addr,
        format!("GET /many HTTP/1.1\r\nHost: test\r\n{many}Connection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "got {answer:?}");

    // Within both limits: served.
    let fits: String = (0..7)
        .map(|i| format!("X-H{i}: {}\r\n", "v".repeat(100)))
        .collect();
    let answer = common::raw_exchange(
        proxy.addr,
        format!("GET /fits HTTP/1.1\r\nHost: test\r\n{fits}Connection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "got {answer:?}");
    assert_eq!(origin.count(), 1);
}

/// A pool of a good origin and one that resets every connection before answering.
async fn proxy_to_good_and_resetting(pool_extra: &str) -> (Proxy, Origin, RawOrigin) {
    let good = Origin::start(OriginOptions::named("good")).await;
    let bad = RawOrigin::start(Misbehavior::ResetAfter(1)).await;
    let proxy = Proxy::start(&format!(
        "upstreams:\n{}routes:\n  - {{ name: all, upstream: app }}\n",
        pool("app", &[good.addr, bad.addr], pool_extra)
    ))
    .await;
    (proxy, good, bad)
}

#[tokio::test]
async fn idempotent_request_is_retried_on_another_server_after_a_reset() {
    let (proxy, good, bad) = proxy_to_good_and_resetting("").await;
    let client = client();
    for i in 0..6 {
        let (status, origin, _) = common::get(&client, &proxy.url(&format!("/r{i}"))).await;
        assert_eq!((status, origin.as_str()), (200, "good"), "request {i}");
    }
    assert!(
        bad.connections() >= 1,
        "the resetting server was never tried"
    );
    assert_eq!(good.count(), 6);
    let retries = proxy
        .metric("shadowgate_upstream_retries_total", &[("upstream", "app")])
        .await;
    assert_eq!(retries, bad.connections() as f64);
}

#[tokio::test]
async fn post_is_not_retried_after_a_reset() {
    let (proxy, good, bad) = proxy_to_good_and_resetting("").await;
    let client = client();
    // The pool does retry: GETs all succeed, some of them on their second server.
    for i in 0..4 {
        assert_eq!(
            common::get(&client, &proxy.url(&format!("/g{i}"))).await.0,
            200
        );
    }
    let retried = bad.connections();
    assert!(retried >= 1);
    let mut statuses = Vec::new();
    for i in 0..4 {
        let resp = client
            .post(proxy.url(&format!("/p{i}")))
            .body(vec![b'x'; 1000])
            .send()
            .await
            .expect("response");
        statuses.push(resp.status().as_u16());
    }
    let failed = statuses.iter().filter(|s| **s == 502).count();
    assert!(
        failed >= 1,
        "no POST reached the resetting server: {statuses:?}"
    );
    assert_eq!(failed, bad.connections() - retried, "{statuses:?}");
    assert_eq!(good.count(), 4 + 4 - failed, "{statuses:?}");
    // Only the GETs were retried.
    assert_eq!(
        proxy
            .metric("shadowgate_upstream_retries_total", &[("upstream", "app")])
            .await,
        retried as f64
    );
}

#[tokio::test]
async fn retry_can_be_switched_off_per_pool() {
    let (proxy, _good, bad) = proxy_to_good_and_resetting("    retry_idempotent: false\n").await;
    let client = client();
    let mut statuses = Vec::new();
    for i in 0..4 {
        statuses.push(common::get(&client, &proxy.url(&format!("/n{i}"))).await.0);
    }
    assert!(statuses.contains(&502), "{statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count(),
        bad.connections()
    );
}

#[tokio::test]
async fn open_connection_gauge_counts_down_to_zero() {
    let (proxy, _origin) = proxy_with_client("{}").await;
    // The harness's readiness probe may still be open on a busy machine.
    wait_for_open(&proxy, 0.0).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    assert!(get_on(&mut stream).await.starts_with("HTTP/1.1 200"));
    assert_eq!(open_connections(&proxy).await, 1.0);
    drop(stream);
    wait_for_open(&proxy, 0.0).await;
}

#[tokio::test]
async fn http1_on_an_h2c_listener_gets_the_same_limits() {
    let (proxy, origin) =
        proxy_with_listener("    h2c: true\n    client: { header_timeout_ms: 1000 }").await;
    let listener = proxy.addr.to_string();
    let timeouts = || async {
        proxy
            .metric(
                "shadowgate_client_header_timeouts_total",
                &[("listener", &listener)],
            )
            .await
    };
    let before = timeouts().await;

    // A request shorter than the HTTP/2 preface is answered at once, not held
    // until 24 bytes arrive.
    let mut short = TcpStream::connect(proxy.addr).await.expect("connect");
    short
        .write_all(b"GET /s HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let answered = tokio::time::timeout(Duration::from_millis(900), read_response(&mut short))
        .await
        .expect("a short HTTP/1.0 request waited for more bytes");
    let (head, _) = answered.expect("response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // A client that stops inside the HTTP/2 preface, and one that never finishes
    // its HTTP/1 header, are closed at the header deadline, as on any listener.
    // (A client that sends nothing at all is held by the kernel: TCP_DEFER_ACCEPT.)
    let mut stalled = TcpStream::connect(proxy.addr).await.expect("connect");
    stalled.write_all(b"PRI * HTTP/2").await.expect("write");
    let mut slow = TcpStream::connect(proxy.addr).await.expect("connect");
    slow.write_all(b"GET /slow HTTP/1.1\r\nX-Slow: a")
        .await
        .expect("write");
    for (what, stream) in [("stalled preface", &mut stalled), ("slow", &mut slow)] {
        let took = time_to_close(stream, WAIT)
            .await
            .unwrap_or_else(|| panic!("the {what} connection was never closed"));
        assert!(
            took < Duration::from_millis(3000),
            "{what} connection closed after {took:?}, header_timeout_ms is 1000"
        );
    }
    proxy
        .wait_for_metric(
            "shadowgate_client_header_timeouts_total",
            &[("listener", &listener)],
            |v| v >= before + 2.0,
            WAIT,
        )
        .await;
    assert_eq!(
        origin.count(),
        1,
        "only the complete request reached the origin"
    );
}

/// A request whose field names have underscores, one of them the twin of a field the
/// proxy sets: CGI-style servers read both as `HTTP_X_FORWARDED_FOR`.
const UNDERSCORED: &[u8] = b"GET /u HTTP/1.1\r\nHost: test\r\nX_Forwarded_For: 6.6.6.6\r\nX_Custom: 1\r\nX-Kept: k\r\nConnection: close\r\n\r\n";

async fn underscore_count(proxy: &Proxy, action: &str) -> f64 {
    proxy
        .metric(
            "shadowgate_client_underscore_requests_total",
            &[("listener", &proxy.addr.to_string()), ("action", action)],
        )
        .await
}

/// By default (as NGINX does) the fields go no further; the rest of the request does.
#[tokio::test]
async fn underscored_header_fields_are_dropped_by_default() {
    let (proxy, origin) = proxy_with_client("{}").await;
    let answer = common::raw_exchange(proxy.addr, UNDERSCORED).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "got {answer:?}");
    let seen = &origin.wait_for(1, WAIT).await[0];
    assert_eq!(seen.header("x_forwarded_for"), None, "{seen:?}");
    assert_eq!(seen.header("x_custom"), None, "{seen:?}");
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-kept"), Some("k"));
    assert_eq!(underscore_count(&proxy, "dropped").await, 1.0);
    // A request without such fields is not counted.
    let answer = common::raw_exchange(
        proxy.addr,
        b"GET /v HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "got {answer:?}");
    assert_eq!(underscore_count(&proxy, "dropped").await, 1.0);
}

#[tokio::test]
async fn underscored_header_fields_are_refused_or_passed_as_set() {
    let (proxy, origin) = proxy_with_client("{ headers_with_underscores: reject }").await;
    let answer = common::raw_exchange(proxy.addr, UNDERSCORED).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "got {answer:?}");
    assert_eq!(underscore_count(&proxy, "rejected").await, 1.0);
    assert_eq!(origin.count(), 0);

    let (proxy, origin) = proxy_with_client("{ headers_with_underscores: allow }").await;
    let answer = common::raw_exchange(proxy.addr, UNDERSCORED).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "got {answer:?}");
    let seen = &origin.wait_for(1, WAIT).await[0];
    assert_eq!(seen.header("x_forwarded_for"), Some("6.6.6.6"));
    assert_eq!(seen.header("x_custom"), Some("1"));
    assert_eq!(underscore_count(&proxy, "dropped").await, 0.0);
}

/// HTTP/2 streams follow their listener's rule too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_underscored_header_fields_are_dropped() {
    let (proxy, origin) = proxy_with_listener("    h2c: true").await;
    let (mut client, _connection) = h2c_connect(proxy.addr).await;
    let request = http::Request::get(format!("http://{}/u", proxy.addr))
        .header("x_forwarded_for", "6.6.6.6")
        .header("x-kept", "k")
        .body(())
        .expect("request");
    let (response, _) = client.send_request(request, true).expect("send");
    assert_eq!(response.await.expect("response").status(), 200);
    let seen = &origin.wait_for(1, WAIT).await[0];
    assert_eq!(seen.header("x_forwarded_for"), None, "{seen:?}");
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-kept"), Some("k"));
    assert_eq!(underscore_count(&proxy, "dropped").await, 1.0);
}

/// A proxy with these listener settings, pools `app` (one server) and `shadow` (one
/// server), and these routes.
async fn proxy_with_shadow(
    listener_extra: &str,
    app: SocketAddr,
    shadow: SocketAddr,
    routes: &str,
) -> Proxy {
    let sections = format!(
        "upstreams:\n{}{}{routes}",
        pool("app", &[app], ""),
        pool("shadow", &[shadow], "")
    );
    Proxy::start_with_listener(listener_extra, &sections).await
}

/// One raw request on a new connection: the response head, and the connection.
async fn answer_to(proxy: &Proxy, request: &[u8]) -> (String, TcpStream) {
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let (head, _) = read_response(&mut stream).await.expect("response");
    (head, stream)
}

async fn assert_200(proxy: &Proxy, request: &[u8]) {
    let (head, _) = answer_to(proxy, request).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// The proxy answers `request` 413 and closes the connection.
async fn assert_413_and_closed(proxy: &Proxy, request: &[u8]) {
    let (head, mut stream) = answer_to(proxy, request).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(
        time_to_close(&mut stream, WAIT).await.is_some(),
        "the connection stayed open after 413"
    );
}

/// A request with a body of `len` bytes and its `Content-Length`.
fn post_with_length(path: &str, len: usize) -> Vec<u8> {
    let mut request =
        format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\n\r\n").into_bytes();
    request.extend(std::iter::repeat_n(b'a', len));
    request
}

/// A chunked request whose body is `pieces` chunks of `len` bytes each, terminated.
fn chunked_post(path: &str, pieces: usize, len: usize) -> Vec<u8> {
    let mut request =
        format!("POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    for _ in 0..pieces {
        request.extend_from_slice(format!("{len:x}\r\n").as_bytes());
        request.extend(std::iter::repeat_n(b'a', len));
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    request
}

#[tokio::test]
async fn a_body_over_max_body_bytes_gets_413_and_reaches_no_upstream_whole() {
    const ROUTES: &str = r"routes:
  - { name: uploads, match: { path_prefix: /uploads }, upstream: app, max_body_bytes: 0 }
  - { name: small, match: { path_prefix: /small }, upstream: app, max_body_bytes: 100 }
  - name: api
    upstream: app
    mirrors: [{ upstream: shadow, percentage: 100, methods: [POST] }]
";
    let primary = Origin::start(OriginOptions::named("app")).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    let proxy = proxy_with_shadow(
        "    h2c: true\n    client: { max_body_bytes: 1000 }",
        primary.addr,
        shadow.addr,
        ROUTES,
    )
    .await;

    // A route's own limit holds in place of the listener's, higher or lower.
    assert_200(&proxy, &post_with_length("/uploads/a", 5000)).await;
    assert_413_and_closed(
        &proxy,
        b"POST /small HTTP/1.1\r\nHost: t\r\nContent-Length: 101\r\n\r\n",
    )
    .await;
    assert_413_and_closed(&proxy, &chunked_post("/small", 2, 60)).await;

    // Within the listener's limit, with a length and chunked: passed on, and mirrored.
    assert_200(&proxy, &post_with_length("/length", 1000)).await;
    assert_200(&proxy, &chunked_post("/chunked", 2, 500)).await;

    // A declared length over it: answered before the body, which is never read.
    assert_413_and_closed(
        &proxy,
        b"POST /declared HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n",
    )
    .await;
    // Chunked, crossing it at the second chunk: the header and first chunk went
    // upstream and to the shadow, the rest goes nowhere.
    assert_413_and_closed(&proxy, &chunked_post("/streamed", 3, 600)).await;

    // HTTP/2 without a length: the stream is answered 413.
    let (mut client, _connection) = h2c_connect(proxy.addr).await;
    let request = http::Request::post(format!("http://{}/h2", proxy.addr))
        .body(())
        .expect("request");
    let piece = [b'a'; 600];
    let response = common::h2_send(&mut client, request, &[&piece, &piece]).await;
    assert_eq!(response.status(), 413);

    // Only the two requests within the limit reached either side whole; the shadow
    // of the streamed one was closed when its primary broke off.
    common::wait_abandoned(&proxy, "primary_aborted", 1.0).await;
    common::wait_idle(&proxy).await;
    let uris = |origin: &Origin| -> Vec<String> {
        origin.requests().iter().map(|r| r.uri.clone()).collect()
    };
    assert_eq!(uris(&primary), ["/uploads/a", "/length", "/chunked"]);
    // Shadows run on their own: in either order.
    let mut at_shadow = uris(&shadow);
    at_shadow.sort();
    assert_eq!(at_shadow, ["/chunked", "/length"]);
}

#[tokio::test]
async fn an_upgraded_connection_is_a_tunnel_not_a_body() {
    let echo = RawOrigin::start(Misbehavior::UpgradeEcho).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    let proxy = proxy_with_shadow(
        "    client: { max_body_bytes: 1000 }",
        echo.addr,
        shadow.addr,
        "routes:\n  - name: api\n    upstream: app\n    mirrors: [{ upstream: shadow, percentage: 100, methods: [GET] }]\n",
    )
    .await;
    // Many times over: whether the upstream's 101 or the request's own empty body is
    // handled first is a race, and the tunnel must survive either order (Pingora's
    // cloudflare/pingora#946, patched here).
    const CONNECTIONS: u8 = 20;
    for connection in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        stream
            .write_all(
                b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            )
            .await
            .expect("write upgrade");
        let (head, _) = read_response(&mut stream).await.expect("response");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // Both ways, three times the listener's body limit: a tunnel, not a request body.
        for round in 0..3u8 {
            let sent = vec![b'a' + round; 1000];
            stream.write_all(&sent).await.expect("write");
            let mut echoed = vec![0u8; sent.len()];
            tokio::time::timeout(
                WAIT,
                tokio::io::AsyncReadExt::read_exact(&mut stream, &mut echoed),
            )
            .await
            .expect("echo within WAIT")
            .unwrap_or_else(|e| panic!("echo, connection {connection}, round {round}: {e}"));
            assert_eq!(echoed, sent, "connection {connection}, round {round}");
        }
    }
    let upgrade = String::from_utf8_lossy(&echo.answered()[0]).to_ascii_lowercase();
    assert!(upgrade.contains("upgrade: websocket"), "{upgrade}");
    assert!(upgrade.contains("connection: upgrade"), "{upgrade}");
    // An upgrade is not mirrored: a shadow could not take over the client's tunnel.
    common::wait_idle(&proxy).await;
    assert_eq!(shadow.count(), 0);
}
