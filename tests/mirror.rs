//! Traffic mirroring against real loopback origins: sampling, the streaming tee, isolation of
//! the primary from every kind of shadow failure, the shadow request, and the mirror metrics.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Route `api` sends everything to pool `app` and mirrors to pool `shadow` with `mirror` settings.
fn mirrored(primary: &[SocketAddr], shadow: &[SocketAddr], mirror: &str) -> String {
    mirrored_with(primary, shadow, "", mirror)
}

fn mirrored_with(
    primary: &[SocketAddr],
    shadow: &[SocketAddr],
    shadow_pool: &str,
    mirror: &str,
) -> String {
    format!(
        "upstreams:\n{}{}routes:\n  - name: api\n    upstream: app\n    mirrors:\n      - upstream: shadow\n{}\n",
        pool("app", primary, ""),
        pool("shadow", shadow, shadow_pool),
        indent(mirror, 8)
    )
}

/// Plain recording origins `primary` and `shadow` behind route `api` mirroring with `mirror` settings.
async fn mirror_setup(mirror: &str) -> (Proxy, Origin, Origin) {
    mirror_setup_with(OriginOptions::named("shadow"), mirror).await
}

async fn mirror_setup_with(shadow: OriginOptions, mirror: &str) -> (Proxy, Origin, Origin) {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = Origin::start(shadow).await;
    let proxy = Proxy::start(&mirrored(&[primary.addr], &[shadow.addr], mirror)).await;
    (proxy, primary, shadow)
}

fn indent(text: &str, by: usize) -> String {
    text.lines()
        .map(|l| format!("{}{l}", " ".repeat(by)))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn wait_completed(proxy: &Proxy, n: f64) {
    proxy
        .wait_for_metric(
            "shadowgate_mirror_completed_total",
            &[("route", "api")],
            |v| v >= n,
            WAIT,
        )
        .await;
}

/// Wait until no shadow request of route `api` is under way.
async fn post(client: &reqwest::Client, url: &str, body: reqwest::Body) -> reqwest::Response {
    client.post(url).body(body).send().await.expect("post")
}

/// A body sent with `Transfer-Encoding: chunked`, in pieces of `piece` bytes.
fn chunked(data: Vec<u8>, piece: usize) -> reqwest::Body {
    let pieces: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(piece.max(1))
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(pieces))
}

// ---------------------------------------------------------------- sampling

/// One proxy, one route per percentage (`/pN`), each mirroring to its own pool on one shadow origin.
async fn counter_fleet(percentages: &[u32]) -> (Proxy, Origin, Origin) {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    let mut upstreams = pool("app", &[primary.addr], "");
    let mut routes = String::new();
    for p in percentages {
        upstreams += &pool(&format!("shadow{p}"), &[shadow.addr], "");
        routes += &format!(
            "  - name: p{p}\n    match: {{ path_prefix: /p{p}/ }}\n    upstream: app\n    mirrors:\n      - {{ upstream: shadow{p}, percentage: {p} }}\n"
        );
    }
    let proxy = Proxy::start(&format!("upstreams:\n{upstreams}routes:\n{routes}")).await;
    (proxy, primary, shadow)
}

async fn assert_exact_counts(proxy: &Proxy, shadow: &Origin, percentages: &[u32], per_route: u32) {
    let expected_total: u32 = percentages.iter().map(|p| p * per_route / 100).sum();
    shadow.wait_for(expected_total as usize, WAIT).await;
    for p in percentages {
        let route = format!("p{p}");
        proxy
            .wait_for_metric(
                "shadowgate_mirror_completed_total",
                &[("route", &route)],
                |v| v == (p * per_route / 100) as f64,
                WAIT,
            )
            .await;
    }
    let requests = shadow.requests();
    for p in percentages {
        let got = requests
            .iter()
            .filter(|r| r.uri.starts_with(&format!("/p{p}/")))
            .count();
        assert_eq!(
            got as u32,
            p * per_route / 100,
            "percentage {p}: mirrored {got} of {per_route}"
        );
    }
}

const PERCENTAGES: [u32; 7] = [0, 1, 10, 25, 33, 50, 100];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_mirrors_exactly_p_of_every_hundred_sequentially() {
    let (proxy, _primary, shadow) = counter_fleet(&PERCENTAGES).await;
    let client = client();
    for i in 0..200 {
        for p in PERCENTAGES {
            let (status, _, _) = get(&client, &proxy.url(&format!("/p{p}/{i}"))).await;
            assert_eq!(status, 200);
        }
    }
    assert_exact_counts(&proxy, &shadow, &PERCENTAGES, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_mirrors_exactly_p_of_every_hundred_under_concurrency() {
    let (proxy, _primary, shadow) = counter_fleet(&PERCENTAGES).await;
    let client = client();
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let client = client.clone();
        let base = proxy.url("");
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                for p in PERCENTAGES {
                    let url = format!("{base}/p{p}/{worker}-{i}");
                    let (status, _, _) = get(&client, &url).await;
                    assert_eq!(status, 200);
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    // 16 × 25 = 400 requests per route.
    assert_exact_counts(&proxy, &shadow, &PERCENTAGES, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_spreads_mirrored_requests_evenly() {
    let (proxy, _primary, shadow) = mirror_setup("percentage: 25").await;
    let client = client();
    for i in 0..100 {
        get(&client, &proxy.url(&format!("/seq/{i}"))).await;
    }
    let mirrored = shadow.wait_for(25, WAIT).await;
    let mut seqs: Vec<usize> = mirrored
        .iter()
        .map(|r| {
            r.uri
                .trim_start_matches("/seq/")
                .parse()
                .expect("sequence number")
        })
        .collect();
    seqs.sort();
    let gaps: BTreeSet<usize> = seqs.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps,
        BTreeSet::from([4]),
        "mirrored requests {seqs:?} are not every 4th"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_sampling_agrees_across_two_proxies_and_nests_across_mirrors() {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    let config = format!(
        "upstreams:\n{}{}{}routes:
  - name: api
    upstream: app
    mirrors:
      - {{ upstream: ten, percentage: 10, sample_by: \"header:x-user-id\" }}
      - {{ upstream: half, percentage: 50, sample_by: \"header:x-user-id\" }}
",
        pool("app", &[primary.addr], ""),
        pool("ten", &[shadow.addr], ""),
        pool("half", &[shadow.addr], ""),
    );
    let first = Proxy::start(&config).await;
    let second = Proxy::start(&config).await;
    let client = client();
    let users = 400;
    for proxy in [&first, &second] {
        for user in 0..users {
            // Each user twice: the decision must not change within a session.
            for _ in 0..2 {
                client
                    .get(proxy.url(&format!("/{user}")))
                    .header("x-user-id", format!("user-{user}"))
                    .send()
                    .await
                    .expect("request");
            }
        }
    }
    for proxy in [&first, &second] {
        let sampled = proxy
            .metric("shadowgate_mirror_sampled_total", &[("route", "api")])
            .await;
        proxy
            .wait_for_metric(
                "shadowgate_mirror_completed_total",
                &[("route", "api")],
                |v| v == sampled,
                WAIT,
            )
            .await;
    }
    // Every shadow request carries its user. A user in one mirror arrives 4 times
    // (2 requests × 2 proxies), a user in both arrives 8 times; anything else means
    // the proxies disagreed or a session was split.
    let mut counts = std::collections::HashMap::new();
    for seen in shadow.requests() {
        *counts
            .entry(seen.header("x-user-id").unwrap_or_default().to_string())
            .or_insert(0) += 1;
    }
    for (user, n) in &counts {
        assert!(*n == 4 || *n == 8, "{user} arrived {n} times");
    }
    for name in ["ten", "half"] {
        let labels = [("mirror", name)];
        let a = first
            .metric("shadowgate_mirror_sampled_total", &labels)
            .await;
        let b = second
            .metric("shadowgate_mirror_sampled_total", &labels)
            .await;
        assert_eq!(a, b, "the two proxies sampled different numbers for {name}");
    }
    let ten = first
        .metric("shadowgate_mirror_sampled_total", &[("mirror", "ten")])
        .await
        / 2.0;
    let half = first
        .metric("shadowgate_mirror_sampled_total", &[("mirror", "half")])
        .await
        / 2.0;
    // Binomial bounds, about 4.5 standard deviations wide.
    assert!(
        (15.0..=65.0).contains(&ten),
        "10% mirror took {ten} of {users} users"
    );
    assert!(
        (155.0..=245.0).contains(&half),
        "50% mirror took {half} of {users} users"
    );
    // Nesting: users in the 10% mirror arrive 8 times (both mirrors), none arrive 4 times via 10% only.
    let in_both = counts.values().filter(|n| **n == 8).count() as f64;
    assert_eq!(
        in_both, ten,
        "every user of the 10% mirror is also in the 50% mirror"
    );
    assert_eq!(
        counts.len() as f64,
        half,
        "the union of both mirrors is the 50% mirror"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_hash_key_fall_back_to_the_counter() {
    let (proxy, _primary, shadow) =
        mirror_setup("percentage: 50\nsample_by: \"cookie:session\"").await;
    let client = client();
    for i in 0..100 {
        get(&client, &proxy.url(&format!("/{i}"))).await;
    }
    wait_completed(&proxy, 50.0).await;
    assert_eq!(
        shadow.count(),
        50,
        "no cookie: exactly every other request by the counter"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_filter_applies_before_sampling() {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    // Default methods: GET, HEAD, OPTIONS. At 50%, counting only eligible requests,
    // 10 GETs interleaved with 10 POSTs give exactly 5 mirrored GETs.
    let proxy = Proxy::start(&mirrored(&[primary.addr], &[shadow.addr], "percentage: 50")).await;
    let client = client();
    for i in 0..10 {
        get(&client, &proxy.url(&format!("/get/{i}"))).await;
        post(
            &client,
            &proxy.url(&format!("/post/{i}")),
            reqwest::Body::from("x"),
        )
        .await;
    }
    wait_completed(&proxy, 5.0).await;
    assert_eq!(abandoned(&proxy, "method").await, 10.0);
    let methods: HashSet<String> = shadow.requests().iter().map(|r| r.method.clone()).collect();
    assert_eq!(methods, HashSet::from(["GET".to_string()]));
    assert_eq!(shadow.count(), 5);
    assert_eq!(primary.count(), 20, "the primary serves every request");
}

// ---------------------------------------------------------------- the tee

async fn assert_same_body_at_both(size: usize, chunk_piece: Option<usize>) {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    let proxy = Proxy::start(&mirrored(
        &[primary.addr],
        &[shadow.addr],
        // Queue the whole body if need be: only a real fault may end these shadows.
        "percentage: 100\nmethods: [POST]\nmax_body_bytes: 16777216\nqueue_bytes: 16777216",
    ))
    .await;
    let data = body_of(size);
    let digest = sha256_hex(&data);
    let body = match chunk_piece {
        Some(piece) => chunked(data, piece),
        None => reqwest::Body::from(data),
    };
    let resp = post(&client(), &proxy.url("/upload?x=1"), body).await;
    assert_eq!(resp.status(), 200);
    let at_primary = &primary.wait_for(1, WAIT).await[0];
    let at_shadow = &shadow.wait_for(1, WAIT).await[0];
    for (who, seen) in [("primary", at_primary), ("shadow", at_shadow)] {
        assert_eq!(
            seen.body_len, size as u64,
            "{who} body length, size {size} chunked {chunk_piece:?}"
        );
        assert_eq!(
            seen.body_sha256, digest,
            "{who} body digest, size {size} chunked {chunk_piece:?}"
        );
        assert_eq!(seen.uri, "/upload?x=1");
    }
    wait_completed(&proxy, 1.0).await;
    let bytes = proxy
        .metric("shadowgate_mirror_bytes_total", &[("route", "api")])
        .await;
    assert_eq!(bytes, size as f64);
}

const SIZES: [usize; 5] = [0, 1, 64 * 1024 - 1, 64 * 1024 + 1, 5 * 1024 * 1024];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_gets_the_exact_body_with_content_length() {
    for size in SIZES {
        assert_same_body_at_both(size, None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_gets_the_exact_body_when_chunked() {
    for size in SIZES {
        assert_same_body_at_both(size, Some(7919)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_split_across_many_reads_is_mirrored_intact() {
    // Chunk-size lines torn across TCP writes make Pingora hand the body filter
    // empty chunks between real ones; forwarded, an empty chunk would end the
    // shadow's body early.
    let (proxy, primary, shadow) = mirror_setup("percentage: 100\nmethods: [POST]").await;
    let pieces: Vec<Vec<u8>> = (0..40).map(|i| body_of(100 + i * 37)).collect();
    let whole: Vec<u8> = pieces.concat();
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .write_all(b"POST /torn HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    for piece in &pieces {
        let size_line = format!("{:x}\r\n", piece.len());
        let (a, b) = size_line.as_bytes().split_at(1);
        for part in [a, b, piece.as_slice(), b"\r\n"] {
            stream.write_all(part).await.unwrap();
            stream.flush().await.unwrap();
            // Shape the traffic so the proxy reads these as separate segments.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let answer = read_rest(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let at_shadow = &shadow.wait_for(1, WAIT).await[0];
    assert_eq!(at_shadow.body_sha256, sha256_hex(&whole));
    assert_eq!(primary.requests()[0].body_sha256, sha256_hex(&whole));
    wait_completed(&proxy, 1.0).await;
    assert_eq!(
        shadow.count(),
        1,
        "a torn body must not turn into two requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_upload_is_mirrored_without_the_expectation() {
    let (proxy, primary, shadow) =
        mirror_setup("percentage: 100\nmethods: [PUT]\nqueue_bytes: 16777216").await;
    let data = body_of(2 * 1024 * 1024);
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "PUT /big HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        data.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // Like curl: wait for the interim answer before sending the body.
    let mut interim = vec![0u8; 64];
    let n = tokio::time::timeout(WAIT, stream.read(&mut interim))
        .await
        .unwrap()
        .unwrap();
    assert!(
        interim[..n].starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&interim[..n])
    );
    stream.write_all(&data).await.unwrap();
    let answer = read_rest(&mut stream).await;
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    let at_shadow = &shadow.wait_for(1, WAIT).await[0];
    assert_eq!(at_shadow.body_sha256, sha256_hex(&data));
    assert_eq!(
        at_shadow.header("expect"),
        None,
        "the shadow must not be asked for 100-continue"
    );
    assert_eq!(primary.requests()[0].body_sha256, sha256_hex(&data));
    wait_completed(&proxy, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_primary_still_mirrors_the_body_exactly_once() {
    let refused = refusing_address();
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    let proxy = Proxy::start(&mirrored(
        &[refused, primary.addr],
        &[shadow.addr],
        "percentage: 100\nmethods: [POST]",
    ))
    .await;
    let client = client();
    let data = body_of(200 * 1024);
    for _ in 0..4 {
        // Round robin puts every other request on the refusing server first.
        let resp = post(
            &client,
            &proxy.url("/retry"),
            reqwest::Body::from(data.clone()),
        )
        .await;
        assert_eq!(resp.status(), 200);
    }
    wait_completed(&proxy, 4.0).await;
    let at_shadow = shadow.requests();
    assert_eq!(at_shadow.len(), 4, "one shadow request per client request");
    for seen in at_shadow {
        assert_eq!(seen.body_len, data.len() as u64);
        assert_eq!(seen.body_sha256, sha256_hex(&data));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_retried_mid_body_replays_nothing_to_the_shadow() {
    // The primary's reused connection resets halfway through the body; Pingora
    // retries on a new connection and replays the bytes it has through the body
    // filter. The shadow must still get each byte exactly once.
    let primary = RawOrigin::start(Misbehavior::ResetReusedMidBody(5_000)).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    let proxy = Proxy::start(&mirrored(
        &[primary.addr],
        &[shadow.addr],
        "percentage: 100\nmethods: [PUT]",
    ))
    .await;
    // Warm the pool: the next request reuses this upstream connection.
    let warm = raw_exchange(
        proxy.addr,
        b"GET /warm HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(warm.starts_with("HTTP/1.1 200"), "{warm}");

    let data = body_of(20_000);
    let mut stream = start_put(
        &proxy,
        "/replay",
        "Connection: close\r\n",
        &data[..5_000],
        data.len(),
    )
    .await;
    // The reset makes Pingora retry on a second connection; only then send the rest.
    let deadline = Instant::now() + WAIT;
    while primary.connections() < 2 {
        assert!(Instant::now() < deadline, "the primary was never retried");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stream.write_all(&data[5_000..]).await.unwrap();
    let answer = read_rest(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    assert_eq!(
        primary.answered().last(),
        Some(&data),
        "the retried primary got the whole body"
    );
    shadow_got_the_whole_body(&proxy, &shadow, &data).await;
}

/// Send a PUT's header (plus `fields`, each line ending in CRLF) declaring `length`
/// bytes of body, and `first` of them.
async fn start_put(
    proxy: &Proxy,
    path: &str,
    fields: &str,
    first: &[u8],
    length: usize,
) -> TcpStream {
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head =
        format!("PUT {path} HTTP/1.1\r\nHost: t\r\n{fields}Content-Length: {length}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    stream
}

/// The one mirrored request reached the shadow with exactly `data` as its body, and completed.
async fn shadow_got_the_whole_body(proxy: &Proxy, shadow: &Origin, data: &[u8]) {
    let at_shadow = shadow.wait_for(1, WAIT).await;
    assert_eq!(at_shadow.len(), 1, "one request mirrored");
    assert_eq!(at_shadow[0].body_len, data.len() as u64);
    assert_eq!(at_shadow[0].body_sha256, sha256_hex(data));
    wait_completed(proxy, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_body_is_in_keeps_the_connection_and_the_whole_body_still_goes() {
    // The primary answers as soon as it has the header (as an upload endpoint refusing
    // early, or NGINX's `return`, does). The proxy relays that answer while the client
    // is still sending, forwards the rest of the body to the primary and the shadow,
    // and, as NGINX does, keeps the client's connection for its next request.
    let primary = RawOrigin::start(Misbehavior::AnswersBeforeBody).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    let proxy = Proxy::start(&mirrored(
        &[primary.addr],
        &[shadow.addr],
        "percentage: 100\nmethods: [PUT]",
    ))
    .await;
    let data = body_of(300_000);
    let mut stream = start_put(&proxy, "/early", "", &data[..10_000], data.len()).await;
    let (status, body) = read_response(&mut stream)
        .await
        .expect("the answer arrives while the body is still being sent");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(
        !status.to_ascii_lowercase().contains("connection: close"),
        "{status}"
    );
    assert_eq!(body, b"ok");
    stream.write_all(&data[10_000..]).await.unwrap();
    stream
        .write_all(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let (status, body) = read_response(&mut stream)
        .await
        .expect("the connection carries the next request");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, b"ok");

    assert_eq!(
        primary.answered().first(),
        Some(&data),
        "the primary got the whole body"
    );
    shadow_got_the_whole_body(&proxy, &shadow, &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_requests_mirror_over_http2_upstreams() {
    // With an HTTP/2 upstream Pingora never calls the body filter for an empty
    // body; the shadow must finish without waiting for it.
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    let config = format!(
        "upstreams:\n{}{}routes:\n  - name: api\n    upstream: app\n    mirrors:\n      - {{ upstream: shadow, percentage: 100, methods: [GET, DELETE] }}\n",
        pool("app", &[primary.addr], "    protocol: h2c\n"),
        pool("shadow", &[shadow.addr], "    protocol: h2c\n"),
    );
    let proxy = Proxy::start(&config).await;
    let client = client();
    for path in ["/a", "/b"] {
        let (status, _, _) = get(&client, &proxy.url(path)).await;
        assert_eq!(status, 200);
    }
    let resp = client.delete(proxy.url("/c")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    wait_completed(&proxy, 3.0).await;
    let uris: Vec<String> = shadow.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(uris.len(), 3, "{uris:?}");
    assert_eq!(abandoned(&proxy, "timeout").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_shadow_of_an_http2_primary_gets_an_http11_request() {
    // The header sent to an h2c primary says HTTP/2; the HTTP/1 shadow must still get
    // an HTTP/1.1 request line, with a Host (from the :authority of an HTTP/2 client).
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = common::raw_record::RecordingOrigin::start("shadow").await;
    let config = format!(
        "upstreams:\n{}{}routes:\n  - name: api\n    upstream: app\n    mirrors:\n      - {{ upstream: shadow, percentage: 100, methods: [GET, POST] }}\n",
        pool("app", &[primary.addr], "    protocol: h2c\n"),
        pool("shadow", &[shadow.addr], ""),
    );
    let proxy = Proxy::start_with_listener("    h2c: true", &config).await;
    let (status, _, _) = get(&client(), &proxy.url("/h1-shadow?q=1")).await;
    assert_eq!(status, 200);
    let resp = post(&client(), &proxy.url("/up"), reqwest::Body::from("hello")).await;
    assert_eq!(resp.status(), 200);
    let resp = h2c_client()
        .get(proxy.url("/from-h2"))
        .send()
        .await
        .expect("h2c request");
    assert_eq!(resp.status(), 200);
    wait_completed(&proxy, 3.0).await;
    // Shadows run on their own: they may reach the shadow in any order.
    let mut got = shadow.requests();
    got.sort_by(|a, b| a.request_line.cmp(&b.request_line));
    let lines: Vec<_> = got.iter().map(|r| r.request_line.as_str()).collect();
    assert_eq!(
        lines,
        [
            "GET /from-h2 HTTP/1.1",
            "GET /h1-shadow?q=1 HTTP/1.1",
            "POST /up HTTP/1.1"
        ]
    );
    let host = proxy.addr.to_string();
    assert_eq!(got[0].values("host"), [host.as_str()]);
    assert_eq!(got[1].values("host"), [host.as_str()]);
    assert_eq!(got[2].body, b"hello");
    let answered = proxy
        .metric(
            "shadowgate_mirror_completed_total",
            &[("route", "api"), ("status_class", "2xx")],
        )
        .await;
    assert_eq!(answered, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_mirror_to_an_http2_shadow() {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    let proxy = Proxy::start(&mirrored_with(
        &[primary.addr],
        &[shadow.addr],
        "    protocol: h2c\n",
        "percentage: 100\nmethods: [POST]",
    ))
    .await;
    let data = body_of(300 * 1024);
    post(&client(), &proxy.url("/h2"), chunked(data.clone(), 10_000)).await;
    let at_shadow = &shadow.wait_for(1, WAIT).await[0];
    assert_eq!(at_shadow.body_sha256, sha256_hex(&data));
}

// ---------------------------------------------------------------- isolation

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_shadow_does_not_slow_the_primary() {
    let shadow_delay = Duration::from_secs(2);
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = Origin::start(OriginOptions::named("shadow").response_delay(shadow_delay)).await;
    let config = format!(
        "upstreams:\n{}{}routes:
  - name: api
    match: {{ path_prefix: /on }}
    upstream: app
    mirrors:
      - {{ upstream: shadow, percentage: 100, methods: [GET, POST], timeout_ms: 10000 }}
  - {{ name: off, upstream: app }}
",
        pool("app", &[primary.addr], ""),
        pool("shadow", &[shadow.addr], ""),
    );
    let proxy = Proxy::start(&config).await;
    let client = client();
    let body = body_of(100 * 1024);
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..20 {
        for (route, times) in [("/on", &mut on), ("/off", &mut off)] {
            let started = Instant::now();
            let resp = post(
                &client,
                &proxy.url(&format!("{route}/{i}")),
                reqwest::Body::from(body.clone()),
            )
            .await;
            assert_eq!(resp.status(), 200);
            let text = resp.text().await.unwrap();
            times.push(started.elapsed());
            assert!(text.starts_with("primary POST"), "{text}");
        }
    }
    let (on_median, off_median) = (median(on.clone()), median(off.clone()));
    let worst_on = on.iter().max().copied().unwrap_or_default();
    assert!(
        worst_on < shadow_delay / 4,
        "a mirrored request took {worst_on:?}: it waited on the {shadow_delay:?} shadow"
    );
    assert!(
        on_median <= off_median * 3 + Duration::from_millis(2),
        "mirror on {on_median:?} vs off {off_median:?}"
    );
    // The shadows were really sent, and still complete in the background.
    shadow.wait_for(20, WAIT).await;
    wait_completed(&proxy, 20.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_that_refuses_connections_is_counted_and_ignored() {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let down = refusing_address();
    let proxy = Proxy::start(&mirrored(&[primary.addr], &[down], "percentage: 100")).await;
    let client = client();
    for i in 0..5 {
        let (status, origin, _) = get(&client, &proxy.url(&format!("/{i}"))).await;
        assert_eq!((status, origin.as_str()), (200, "primary"));
    }
    wait_abandoned(&proxy, "connect_error", 5.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_pool_with_no_healthy_server_is_skipped() {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let down = refusing_address();
    let proxy = Proxy::start(&mirrored_with(
        &[primary.addr],
        &[down],
        "    health_check: { type: tcp, interval_ms: 100, timeout_ms: 200 }\n",
        "percentage: 100",
    ))
    .await;
    proxy
        .wait_for_metric(
            "shadowgate_upstream_server_healthy",
            &[("upstream", "shadow")],
            |v| v == 0.0,
            WAIT,
        )
        .await;
    let (status, _, _) = get(&client(), &proxy.url("/x")).await;
    assert_eq!(status, 200);
    assert_eq!(abandoned(&proxy, "no_healthy_backend").await, 1.0);
    assert_eq!(abandoned(&proxy, "connect_error").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_that_resets_mid_body_is_counted_and_ignored() {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let resetting = RawOrigin::start(Misbehavior::ResetAfter(4096)).await;
    let proxy = Proxy::start(&mirrored(
        &[primary.addr],
        &[resetting.addr],
        "percentage: 100\nmethods: [POST]\nqueue_bytes: 16777216",
    ))
    .await;
    let data = body_of(4 * 1024 * 1024);
    let resp = post(
        &client(),
        &proxy.url("/reset"),
        reqwest::Body::from(data.clone()),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(primary.requests()[0].body_sha256, sha256_hex(&data));
    wait_abandoned(&proxy, "upstream_error", 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_that_answers_garbage_is_counted_and_ignored() {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let garbage = RawOrigin::start(Misbehavior::Garbage).await;
    let proxy = Proxy::start(&mirrored(
        &[primary.addr],
        &[garbage.addr],
        "percentage: 100",
    ))
    .await;
    let (status, body_origin, body) = get(&client(), &proxy.url("/g")).await;
    assert_eq!((status, body_origin.as_str()), (200, "primary"), "{body}");
    wait_abandoned(&proxy, "upstream_error", 1.0).await;
    assert_eq!(garbage.connections(), 1);
}

/// A shadow server that reads the second request on its first connection and resets it
/// without an answer (what a server closing a kept-alive connection just as it is reused
/// looks like); it answers every other request.
async fn shadow_closing_on_reuse(mirror: &str) -> (Proxy, Origin, RawOrigin) {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = RawOrigin::start(Misbehavior::ResetReusedMidBody(0)).await;
    let proxy = Proxy::start(&mirrored(&[primary.addr], &[shadow.addr], mirror)).await;
    (proxy, primary, shadow)
}

/// Shadow requests of route `api` sent again after a lost reused connection.
async fn resent(proxy: &Proxy) -> f64 {
    proxy
        .metric("shadowgate_mirror_resent_total", &[("route", "api")])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bodiless_shadow_lost_with_its_reused_connection_is_sent_again_on_a_new_one() {
    let (proxy, _primary, shadow) = shadow_closing_on_reuse("percentage: 100").await;
    let client = client();
    for n in 1..=2 {
        let (status, origin, body) = get(&client, &proxy.url("/again")).await;
        assert_eq!((status, origin.as_str()), (200, "primary"), "{body}");
        // One at a time, so that the second shadow reuses the first one's connection.
        wait_completed(&proxy, f64::from(n)).await;
    }
    assert_eq!(shadow.answered().len(), 2, "both shadow requests answered");
    assert_eq!(
        shadow.connections(),
        2,
        "the lost one went again on a new connection"
    );
    let errors = proxy
        .metric(
            "shadowgate_mirror_abandoned_total",
            &[("route", "api"), ("reason", "upstream_error")],
        )
        .await;
    assert_eq!(errors, 0.0);
    assert_eq!(resent(&proxy).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_with_a_body_lost_with_its_reused_connection_is_not_sent_again() {
    // Its body streamed from the primary's and is gone: it cannot be sent again as it was.
    let (proxy, _primary, shadow) =
        shadow_closing_on_reuse("percentage: 100\nmethods: [PUT]").await;
    let client = client();
    for _ in 0..2 {
        let resp = client
            .put(proxy.url("/put"))
            .body("twelve bytes")
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        wait_idle(&proxy).await;
    }
    wait_abandoned(&proxy, "upstream_error", 1.0).await;
    assert_eq!(shadow.answered().len(), 1);
    assert_eq!(shadow.connections(), 1);
    assert_eq!(resent(&proxy).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_past_its_timeout_is_abandoned() {
    let (proxy, _primary, _shadow) = mirror_setup_with(
        OriginOptions::named("shadow").response_delay(Duration::from_secs(5)),
        "percentage: 100\ntimeout_ms: 300",
    )
    .await;
    let (status, _, _) = get(&client(), &proxy.url("/t")).await;
    assert_eq!(status, 200);
    wait_abandoned(&proxy, "timeout", 1.0).await;
    wait_idle(&proxy).await;
}

/// Upload 48 MiB (more than the loopback socket buffers hold) while the shadow
/// reads nothing: the shadow must be abandoned for `reason`, the upload must not
/// notice, and every queued byte must come back.
async fn upload_to_a_stalled_shadow(mirror_budget_bytes: u64, queue_bytes: u64, reason: &str) {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let stalled = RawOrigin::start(Misbehavior::Stall).await;
    let mut config = mirrored(
        &[primary.addr],
        &[stalled.addr],
        &format!(
            "percentage: 100\nmethods: [POST]\nqueue_bytes: {queue_bytes}\nmax_body_bytes: 1073741824\ntimeout_ms: 60000"
        ),
    );
    config += &format!("mirror_budget_bytes: {mirror_budget_bytes}\n");
    let proxy = Proxy::start(&config).await;
    let data = body_of(48 * 1024 * 1024);
    let resp = post(
        &client(),
        &proxy.url("/big"),
        chunked(data.clone(), 64 * 1024),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(primary.requests()[0].body_sha256, sha256_hex(&data));
    wait_abandoned(&proxy, reason, 1.0).await;
    wait_idle(&proxy).await;
    let queued = proxy.metric("shadowgate_mirror_queued_bytes", &[]).await;
    assert_eq!(queued, 0.0, "queued bytes returned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_abandons_the_shadow_not_the_upload() {
    upload_to_a_stalled_shadow(64 * 1024 * 1024, 64 * 1024, "queue_full").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_memory_budget_bounds_all_queues_together() {
    // The budget equals the queue size: the process limit is reached first.
    upload_to_a_stalled_shadow(128 * 1024, 128 * 1024, "memory_budget").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_caps_concurrent_shadows() {
    let (proxy, _primary, shadow) = mirror_setup_with(
        OriginOptions::named("shadow").response_delay(Duration::from_secs(3)),
        "percentage: 100\nmax_in_flight: 2\ntimeout_ms: 10000",
    )
    .await;
    let client = client();
    for i in 0..5 {
        let (status, _, _) = get(&client, &proxy.url(&format!("/{i}"))).await;
        assert_eq!(status, 200);
    }
    // The primaries are done long before the two admitted shadows answer.
    assert_eq!(abandoned(&proxy, "in_flight_limit").await, 3.0);
    wait_completed(&proxy, 2.0).await;
    assert_eq!(shadow.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_body_bytes_are_never_sent_whole() {
    let (proxy, primary, shadow) =
        mirror_setup("percentage: 100\nmethods: [POST]\nmax_body_bytes: 100000").await;
    let client = client();
    let data = body_of(300_000);
    // Known length: skipped up front. Chunked: abandoned once it passes the limit.
    post(
        &client,
        &proxy.url("/cl"),
        reqwest::Body::from(data.clone()),
    )
    .await;
    post(
        &client,
        &proxy.url("/chunked"),
        chunked(data.clone(), 16 * 1024),
    )
    .await;
    wait_abandoned(&proxy, "body_too_large", 2.0).await;
    wait_idle(&proxy).await;
    assert_eq!(
        shadow.count(),
        0,
        "a truncated body must never look complete to the shadow"
    );
    assert_eq!(primary.count(), 2);
    for seen in primary.requests() {
        assert_eq!(seen.body_sha256, sha256_hex(&data));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_aborts_its_upload_aborts_the_shadow_too() {
    let (proxy, _primary, shadow) = mirror_setup("percentage: 100\nmethods: [POST]").await;
    // Wait until the bytes have reached the shadow, then give up on the upload.
    abandon_mirrored_upload(&proxy, "/partial").await;
    wait_abandoned(&proxy, "primary_aborted", 1.0).await;
    wait_idle(&proxy).await;
    assert_eq!(
        shadow.count(),
        0,
        "the shadow saw a complete request from a broken upload"
    );
    // A client hanging up is counted as 499, not logged as a proxy error.
    proxy
        .wait_for_metric(
            "shadowgate_requests_total",
            &[("route", "api"), ("status", "499")],
            |v| v == 1.0,
            WAIT,
        )
        .await;
    assert!(!proxy.log().contains("Fail to proxy"), "{}", proxy.log());
}

// ---------------------------------------------------------------- the shadow request

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_request_carries_the_original_with_edits_and_the_marker() {
    let (proxy, primary, shadow) = mirror_setup(
        "percentage: 100
methods: [PATCH]
request_headers:
  set: { x-env: shadow }
  remove: [authorization, cookie]
host: app-v2.internal",
    )
    .await;
    client()
        .patch(proxy.url("/users/7?fields=name&x=%20"))
        .header("host", "api.example")
        .header("authorization", "Bearer secret")
        .header("cookie", "session=abc")
        .header("x-request-id", "r-1")
        .body("patch-body")
        .send()
        .await
        .unwrap();
    let at_shadow = &shadow.wait_for(1, WAIT).await[0];
    let at_primary = &primary.wait_for(1, WAIT).await[0];
    assert_eq!(at_shadow.method, "PATCH");
    assert_eq!(at_shadow.uri, "/users/7?fields=name&x=%20");
    assert_eq!(at_shadow.header("x-request-id"), Some("r-1"));
    assert_eq!(at_shadow.header("x-env"), Some("shadow"));
    assert_eq!(at_shadow.header("x-shadowgate-mirror"), Some("1"));
    assert_eq!(at_shadow.header("authorization"), None);
    assert_eq!(at_shadow.header("cookie"), None);
    assert_eq!(at_shadow.header("host"), Some("app-v2.internal"));
    assert_eq!(at_shadow.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(at_shadow.body_sha256, sha256_hex(b"patch-body"));
    // The primary request is untouched by the mirror's edits.
    assert_eq!(at_primary.header("authorization"), Some("Bearer secret"));
    assert_eq!(at_primary.header("cookie"), Some("session=abc"));
    assert_eq!(at_primary.header("host"), Some("api.example"));
    assert_eq!(at_primary.header("x-shadowgate-mirror"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_marker_header_can_be_turned_off() {
    let (proxy, primary, shadow) = mirror_setup("percentage: 100\nmark_header: false").await;
    get(&client(), &proxy.url("/")).await;
    let at_shadow = &shadow.wait_for(1, WAIT).await[0];
    assert_eq!(at_shadow.header("x-shadowgate-mirror"), None);
    // A client cannot mark a request itself: the marker is shadowgate's alone.
    let response = client()
        .get(proxy.url("/forged"))
        .header("X-Shadowgate-Mirror", "1")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let at_primary = &primary.wait_for(2, WAIT).await[1];
    let at_shadow = &shadow.wait_for(2, WAIT).await[1];
    assert_eq!(at_primary.uri, "/forged");
    assert_eq!(at_primary.header("x-shadowgate-mirror"), None);
    assert_eq!(at_shadow.header("x-shadowgate-mirror"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_connections_are_kept_alive_and_reused() {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = RawCountingOrigin::start().await;
    let proxy = Proxy::start(&mirrored(
        &[primary.addr],
        &[shadow.addr],
        "percentage: 100",
    ))
    .await;
    let client = client();
    for i in 0..10 {
        get(&client, &proxy.url(&format!("/{i}"))).await;
        wait_completed(&proxy, (i + 1) as f64).await;
    }
    assert_eq!(
        shadow.connections(),
        1,
        "each shadow response was read to its end and the connection reused"
    );
}

/// A keep-alive HTTP/1.1 origin that counts connections: minimal, to prove reuse.
struct RawCountingOrigin {
    addr: SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl RawCountingOrigin {
    async fn start() -> Self {
        let origin = Origin::start(OriginOptions::named("shadow")).await;
        // Front the hyper origin with a counting TCP relay.
        let listener = common::ports::listener().await;
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        let target = origin.addr;
        tokio::spawn(async move {
            let _origin = origin;
            while let Ok((mut inbound, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        RawCountingOrigin { addr, accepted }
    }

    fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------- metrics and logs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_add_up_after_a_known_sequence() {
    let (proxy, _primary, _shadow) = mirror_setup("percentage: 50\nmethods: [PUT]").await;
    let client = client();
    // 8 PUTs of 1000 bytes (4 mirrored by the 50% counter), 3 GETs (not eligible).
    for i in 0..8 {
        client
            .put(proxy.url(&format!("/{i}")))
            .body(body_of(1000))
            .send()
            .await
            .unwrap();
    }
    for i in 0..3 {
        get(&client, &proxy.url(&format!("/g{i}"))).await;
    }
    wait_completed(&proxy, 4.0).await;
    // Request metrics are recorded just after each response is sent.
    proxy
        .wait_for_metric(
            "shadowgate_requests_total",
            &[("route", "api")],
            |v| v == 11.0,
            WAIT,
        )
        .await;
    let text = proxy.metrics_text().await;
    let m = |name: &str, labels: &[(&str, &str)]| proxy::sample(&text, name, labels);
    let api = ("route", "api");
    assert_eq!(
        m(
            "shadowgate_mirror_sampled_total",
            &[api, ("mirror", "shadow")]
        ),
        4.0
    );
    assert_eq!(
        m(
            "shadowgate_mirror_completed_total",
            &[api, ("status_class", "2xx")]
        ),
        4.0
    );
    assert_eq!(
        m(
            "shadowgate_mirror_abandoned_total",
            &[api, ("reason", "method")]
        ),
        3.0
    );
    assert_eq!(
        m("shadowgate_mirror_abandoned_total", &[api]),
        3.0,
        "no other abandonment"
    );
    assert_eq!(m("shadowgate_mirror_bytes_total", &[api]), 4000.0);
    assert_eq!(m("shadowgate_mirror_duration_seconds_count", &[api]), 4.0);
    assert_eq!(
        m("shadowgate_requests_total", &[api, ("status", "200")]),
        11.0
    );
    assert_eq!(m("shadowgate_request_duration_seconds_count", &[api]), 11.0);
    assert_eq!(m("shadowgate_mirror_in_flight", &[api]), 0.0);
    assert!(
        text.contains("shadowgate_process_info{"),
        "process info is exported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_say_what_each_route_mirrors_and_how_each_shadow_ended() {
    let (proxy, _primary, _shadow) = mirror_setup("percentage: 12.5").await;
    let startup = proxy.wait_for_log("route api:", WAIT).await;
    assert!(
        startup.contains("12.50% of GET/HEAD/OPTIONS to shadow"),
        "{startup}"
    );
    for i in 0..8 {
        get(&client(), &proxy.url(&format!("/{i}"))).await;
    }
    let outcome = proxy.wait_for_log("shadow answered 200", WAIT).await;
    assert!(outcome.contains("mirror api -> shadow GET /"), "{outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_options_requests_complete_at_the_shadow() {
    let (proxy, _primary, _shadow) = mirror_setup("percentage: 100\ntimeout_ms: 2000").await;
    let client = client();
    let resp = client.head(proxy.url("/h")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client
        .request(reqwest::Method::OPTIONS, proxy.url("/o"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // A HEAD response has no body even with a Content-Length: reading must not wait for one.
    wait_completed(&proxy, 2.0).await;
    assert_eq!(abandoned(&proxy, "timeout").await, 0.0);
}
