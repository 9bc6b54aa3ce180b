//! Micro-benchmarks of a shadow verdict's main cost: parsing two JSON bodies and walking
//! them in step (flatten + diff), for a 4 KiB and a 64 KiB body that differ in one field.
//! Runs off the request path, but bounds how many comparisons a core can do per second.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::HeaderMap;
use pingora_prometheus::prometheus::IntGauge;
use shadowgate::compare::capture::{Capture, Capturer};
use shadowgate::compare::diff::{self, Settings};
use shadowgate::compare::json::{FieldPattern, JsonLimits};
use shadowgate::mirror::budget::ByteBudget;

/// A JSON document of about `bytes` bytes: a list of items, like an API page.
fn document(bytes: usize, changed_item: Option<usize>) -> Vec<u8> {
    let mut items = Vec::new();
    let mut i = 0;
    let mut size = 0;
    while size < bytes {
        let price = if Some(i) == changed_item { 1000 } else { 999 };
        let item = format!(
            r#"{{"id":{i},"sku":"SKU-{i:06}","name":"Item number {i}","price":{{"amount":{price},"currency":"EUR"}},"tags":["a","b"],"stock":{}}}"#,
            i % 17
        );
        size += item.len() + 1;
        items.push(item);
        i += 1;
    }
    format!(
        r#"{{"page":1,"generated_at":"2026-11-27T19:00:00Z","items":[{}]}}"#,
        items.join(",")
    )
    .into_bytes()
}

fn capture(body: &[u8]) -> Capture {
    let budget = Arc::new(ByteBudget::new(
        1 << 30,
        IntGauge::new("bench_budget", "bench").expect("gauge"),
    ));
    let mut capturer = Capturer::new(1 << 20, budget, Instant::now());
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/json".parse().expect("value"));
    capturer.header(200, &headers);
    capturer.body(&Bytes::copy_from_slice(body));
    capturer.end();
    capturer.finish()
}

fn flatten_and_diff(c: &mut Criterion) {
    let settings = Settings {
        ignore_headers: Default::default(),
        ignore_fields: vec![FieldPattern::parse("$..generated_at").expect("pattern")],
        max_decoded_bytes: 1 << 20,
        limits: JsonLimits::default(),
    };
    let mut group = c.benchmark_group("compare");
    for size in [4 * 1024usize, 64 * 1024] {
        let primary = capture(&document(size, None));
        let candidate = capture(&document(size, Some(3)));
        let found = diff::compare(&primary, &candidate, &settings);
        assert_eq!(found.fields.len(), 1, "one field differs");
        group.throughput(Throughput::Bytes(primary.len));
        group.bench_function(
            format!("{} KiB JSON, parse both + diff", size / 1024),
            |b| {
                b.iter(|| {
                    black_box(diff::compare(
                        black_box(&primary),
                        black_box(&candidate),
                        &settings,
                    ))
                })
            },
        );
        let twin = capture(&document(size, None));
        group.bench_function(format!("{} KiB JSON, identical bodies", size / 1024), |b| {
            b.iter(|| {
                black_box(diff::compare(
                    black_box(&primary),
                    black_box(&twin),
                    &settings,
                ))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, flatten_and_diff);
criterion_main!(benches);
