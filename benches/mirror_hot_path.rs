//! Micro-benchmarks of the mirror's hot paths: the sampling decision, made once per
//! request, and the per-chunk tee that hands body bytes to a live shadow.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pingora_http::RequestHeader;
use shadowgate::config::{Config, RequestKey};
use shadowgate::metrics::Metrics;
use shadowgate::mirror::sampler::Sampler;
use shadowgate::mirror::{Mirror, MirrorRuntime, MirrorTee, RequestBody};
use shadowgate::request;
use shadowgate::upstream::build_pools;
use tokio::io::AsyncReadExt;

fn sampling(c: &mut Criterion) {
    let mut group = c.benchmark_group("sampling");
    let counter = Sampler::new(2_500);
    group.bench_function("counter 25%", |b| {
        b.iter(|| black_box(counter.by_counter()))
    });
    let keyed = Sampler::new(2_500);
    group.bench_function("hash of a 36-byte key 25%", |b| {
        b.iter(|| black_box(keyed.by_key(black_box(b"5f0c6a4e-2f7d-4a53-9a5b-7c1d2e3f4a5b"))))
    });
    let mut req = RequestHeader::build("GET", b"/api/users/42", None).expect("request");
    req.insert_header("cookie", "theme=dark; session=5f0c6a4e2f7d; lang=en")
        .expect("header");
    let cookie = RequestKey::Cookie("session".into());
    group.bench_function("cookie key lookup + hash", |b| {
        b.iter(|| {
            let key = request::key_value(&cookie, black_box(&req), None);
            black_box(key.map(|k| keyed.by_key(&k)))
        })
    });
    group.finish();
}

/// A loopback sink that reads and discards everything: a shadow that keeps up.
async fn sink() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sink");
    let addr = listener.local_addr().expect("sink address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn tee(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let shadow = runtime.block_on(sink());
    let yaml = format!(
        r#"
listeners: [{{ address: "127.0.0.1:1" }}]
upgrade_sock: /nonexistent-private/upgrade.sock
pid_file: /nonexistent-private/pid
upstreams:
  app: {{ servers: [{{ address: "127.0.0.1:1" }}] }}
  shadow: {{ servers: [{{ address: "{shadow}" }}] }}
routes:
  - name: bench
    upstream: app
    mirrors:
      - {{ upstream: shadow, percentage: 100, methods: [POST], max_body_bytes: 1099511627776, queue_bytes: 67108864, timeout_ms: 3600000 }}
"#
    );
    let config: Config = yaml.parse().expect("bench config");
    let metrics = Metrics::global();
    let (pools, _health) = build_pools(&config.upstreams, &metrics);
    let mirror_runtime = Arc::new(MirrorRuntime::new(
        config.mirror_budget_bytes,
        16,
        0,
        &metrics,
    ));
    let mirror = Arc::new(Mirror::new(
        "bench",
        &config.routes[0].mirrors[0],
        pools.get("shadow").expect("shadow pool"),
        None,
        &metrics,
        mirror_runtime,
    ));
    let mut req = RequestHeader::build("POST", b"/upload", None).expect("request");
    req.insert_header("transfer-encoding", "chunked")
        .expect("header");

    let mut group = c.benchmark_group("tee");
    for size in [1024usize, 16 * 1024, 64 * 1024] {
        let chunk = Bytes::from(vec![7u8; size]);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("{size} B chunk to one live shadow"), |b| {
            let _guard = runtime.enter();
            let mut tee = MirrorTee::sample(
                std::slice::from_ref(&mirror),
                &req,
                None,
                RequestBody::Streamed,
            );
            tee.set_primary_header(&req);
            tee.primary_sent();
            // Time the tee calls only; between batches let the shadow drain
            // (unmeasured), so the queue never fills and every call does real work.
            b.iter_custom(|iters| {
                let mut measured = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let batch = left.min(32);
                    let started = Instant::now();
                    for _ in 0..batch {
                        tee.tee(Some(black_box(&chunk)), false);
                    }
                    measured += started.elapsed();
                    left -= batch;
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while metrics.mirror_queued_bytes.get() > 0 {
                        assert!(Instant::now() < deadline, "the shadow stopped draining");
                        std::thread::yield_now();
                    }
                }
                measured
            });
            assert!(
                tee.is_active(),
                "the shadow was abandoned: the measurement is void"
            );
            tee.finish();
        });
    }
    let chunk = Bytes::from(vec![7u8; 16 * 1024]);
    group.throughput(Throughput::Bytes(chunk.len() as u64));
    group.bench_function("16384 B chunk, no live shadow", |b| {
        let mut tee = MirrorTee::default();
        b.iter(|| tee.tee(Some(black_box(&chunk)), false));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = sampling, tee
}
criterion_main!(benches);
