//! A 1 GiB streamed upload through a 100% mirror: memory stays bounded by the queue, never the body.
//! Slow in debug builds; run it with `cargo test --release --test mirror_large -- --ignored --nocapture`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use sha2::{Digest, Sha256};

const GIB: u64 = 1024 * 1024 * 1024;
const PIECE: usize = 256 * 1024;
/// Upload pace in bytes per second.
const RATE: f64 = 128.0 * 1024.0 * 1024.0;

fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "streams 1 GiB; run with --release --ignored"]
async fn a_one_gib_upload_is_mirrored_with_bounded_memory() {
    let primary = Origin::start(OriginOptions::named("primary")).await;
    let shadow = Origin::start(OriginOptions::named("shadow")).await;
    let proxy = Proxy::start(&format!(
        "upstreams:\n{}{}routes:
  - name: api
    upstream: app
    mirrors:
      - {{ upstream: shadow, percentage: 100, methods: [PUT], max_body_bytes: 2147483648, queue_bytes: 8388608, timeout_ms: 600000 }}
mirror_budget_bytes: 67108864
",
        pool("app", &[primary.addr], "    read_timeout_ms: 600000\n    write_timeout_ms: 600000\n"),
        pool("shadow", &[shadow.addr], "    read_timeout_ms: 600000\n    write_timeout_ms: 600000\n"),
    ))
    .await;
    let pid = proxy.child.id();
    let rss_before = vm_kib(pid, "VmRSS:");

    // The body is generated as it is sent: the client holds one piece at a time.
    let mut hasher = Sha256::new();
    let pieces: Vec<Bytes> = (0..4u8)
        .map(|i| Bytes::from(vec![i.wrapping_mul(37); PIECE]))
        .collect();
    for n in 0..(GIB as usize / PIECE) {
        hasher.update(&pieces[n % pieces.len()]);
    }
    let digest = origin::hex(&hasher.finalize());
    // Paced at RATE: both recording origins hash every byte on this 2-core machine,
    // and a shadow that gets less CPU than the primary would rightly be abandoned.
    let paced_from = Instant::now();
    let stream = futures_util::stream::unfold(0usize, move |n| {
        let pieces = pieces.clone();
        async move {
            if n == GIB as usize / PIECE {
                return None;
            }
            let due = paced_from + Duration::from_secs_f64((n * PIECE) as f64 / RATE);
            tokio::time::sleep_until(due.into()).await;
            Some((Ok::<_, std::io::Error>(pieces[n % 4].clone()), n + 1))
        }
    });

    // Sample the proxy's resident memory while the upload runs.
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        for _ in 0..6000 {
            peak = peak.max(vm_kib(pid, "VmRSS:"));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak
    });
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .put(proxy.url("/gib"))
        .header("content-length", GIB.to_string())
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("upload");
    let upload = started.elapsed();
    assert_eq!(resp.status(), 200);
    let at_primary = &primary.wait_for(1, WAIT).await[0];
    assert_eq!(
        (at_primary.body_len, at_primary.body_sha256.as_str()),
        (GIB, digest.as_str())
    );

    // The shadow's exchange ends one way or the other; then read how.
    proxy
        .wait_for_metric(
            "shadowgate_mirror_in_flight",
            &[("route", "api")],
            |v| v == 0.0,
            Duration::from_secs(120),
        )
        .await;
    let mirrored = started.elapsed();
    sampler.abort();
    let peak_hwm = vm_kib(pid, "VmHWM:");
    let bytes = proxy
        .metric("shadowgate_mirror_bytes_total", &[("route", "api")])
        .await;
    let abandoned = proxy
        .metric("shadowgate_mirror_abandoned_total", &[("route", "api")])
        .await;
    let text = proxy.metrics_text().await;
    for line in text
        .lines()
        .filter(|l| l.starts_with("shadowgate_mirror_abandoned_total") && !l.ends_with(" 0"))
    {
        println!("{line}");
    }
    println!(
        "1 GiB upload: primary done in {upload:?}, shadow done in {mirrored:?}; proxy RSS before {} MiB, peak (VmHWM) {} MiB; bytes written to the shadow: {bytes}; abandoned shadows: {abandoned}",
        rss_before / 1024,
        peak_hwm / 1024
    );
    assert_eq!(abandoned, 0.0, "the shadow kept up with an 8 MiB queue");
    let at_shadow = &shadow.wait_for(1, WAIT).await[0];
    assert_eq!(
        (at_shadow.body_len, at_shadow.body_sha256.as_str()),
        (GIB, digest.as_str())
    );
    // Bounded by the mirror budget plus the proxy's own buffers, nowhere near the body.
    assert!(peak_hwm < 256 * 1024, "peak RSS {} MiB", peak_hwm / 1024);
}
