//! One comparison of two captured responses: status, headers (names and normalized values,
//! minus the ignore list) and body (JSON field by field, gzip decoded within a cap, else length and hash).

use std::collections::HashSet;
use std::io::Read;

use bytes::Bytes;
use http::HeaderName;
use serde_json::Value;

use super::capture::{Capture, Partial};
use super::json::{self, DiffKind, FieldDiff, FieldPattern, JsonLimits};

/// Why a body was compared by length and hash only, or not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyNote {
    /// A side was longer than `max_body_bytes`.
    OverCap,
    /// The mirror budget could not hold a side's body.
    Budget,
    /// Gzip that did not decode within the cap.
    GzipLimit,
    /// One side gzip, the other not (the `content-encoding` header difference says so).
    EncodingMismatch,
    /// JSON content type, but a side did not parse.
    JsonInvalid,
    /// The JSON walk hit a depth, node or difference cap.
    JsonLimits,
}

impl BodyNote {
    pub const ALL: [BodyNote; 6] = [
        BodyNote::OverCap,
        BodyNote::Budget,
        BodyNote::GzipLimit,
        BodyNote::EncodingMismatch,
        BodyNote::JsonInvalid,
        BodyNote::JsonLimits,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BodyNote::OverCap => "over_cap",
            BodyNote::Budget => "budget",
            BodyNote::GzipLimit => "gzip_limit",
            BodyNote::EncodingMismatch => "encoding_mismatch",
            BodyNote::JsonInvalid => "json_invalid",
            BodyNote::JsonLimits => "json_limits",
        }
    }
}

/// How one mirror compares.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ignore_headers: HashSet<HeaderName>,
    pub ignore_fields: Vec<FieldPattern>,
    /// Decoded gzip bodies larger than this are compared by their raw hash.
    pub max_decoded_bytes: u64,
    pub limits: JsonLimits,
}

/// The differences between the primary and one other side.
#[derive(Debug, Default)]
pub struct Differences {
    /// `status`, `header:NAME`, `body` or a JSON path; one entry per path.
    pub fields: Vec<FieldDiff>,
    pub body_note: Option<BodyNote>,
}

/// Compare `other` against `primary`.
pub fn compare(primary: &Capture, other: &Capture, settings: &Settings) -> Differences {
    let mut out = Differences::default();
    if primary.status != other.status {
        out.fields.push(FieldDiff {
            path: "status".into(),
            kind: DiffKind::Value,
            primary: Some(primary.status.to_string()),
            other: Some(other.status.to_string()),
        });
    }
    compare_headers(primary, other, settings, &mut out.fields);
    out.body_note = compare_bodies(primary, other, settings, &mut out.fields);
    out
}

/// A header's values as one comparable string: trimmed, inner whitespace collapsed, joined by ", ".
fn normalized(capture: &Capture, name: &HeaderName) -> String {
    let mut out = String::new();
    for value in capture.headers.get_all(name) {
        if !out.is_empty() {
            out.push_str(", ");
        }
        let text = String::from_utf8_lossy(value.as_bytes());
        let mut first = true;
        for word in text.split_whitespace() {
            if !first {
                out.push(' ');
            }
            out.push_str(word);
            first = false;
        }
    }
    out
}

fn compare_headers(primary: &Capture, other: &Capture, s: &Settings, out: &mut Vec<FieldDiff>) {
    let mut names: Vec<&HeaderName> = primary
        .headers
        .keys()
        .chain(other.headers.keys())
        .filter(|n| !s.ignore_headers.contains(*n))
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    for name in names {
        let (a, b) = (
            primary.headers.contains_key(name),
            other.headers.contains_key(name),
        );
        let (va, vb) = (normalized(primary, name), normalized(other, name));
        let kind = match (a, b) {
            (true, false) => DiffKind::Missing,
            (false, true) => DiffKind::Extra,
            _ if va != vb => DiffKind::Value,
            _ => continue,
        };
        out.push(FieldDiff {
            path: format!("header:{}", name.as_str()),
            kind,
            primary: a.then(|| json::truncate(va, 160)),
            other: b.then(|| json::truncate(vb, 160)),
        });
    }
}

fn is_gzip(c: &Capture) -> bool {
    c.header("content-encoding")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"))
}

fn is_json(c: &Capture) -> bool {
    c.header("content-type").is_some_and(|v| {
        let mime = v.split(';').next().unwrap_or("").trim();
        mime.eq_ignore_ascii_case("application/json")
            || mime.to_ascii_lowercase().ends_with("+json")
    })
}

/// Decode gzip, refusing output past `max` bytes.
fn gunzip(body: &[u8], max: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut decoder = flate2::read::GzDecoder::new(body).take(max + 1);
    decoder.read_to_end(&mut out).ok()?;
    (out.len() as u64 <= max).then_some(out)
}

fn compare_bodies(
    primary: &Capture,
    other: &Capture,
    s: &Settings,
    out: &mut Vec<FieldDiff>,
) -> Option<BodyNote> {
    let by_hash = |out: &mut Vec<FieldDiff>, note: Option<BodyNote>| {
        if primary.len != other.len || primary.hash != other.hash {
            out.push(FieldDiff {
                path: "body".into(),
                kind: if primary.len != other.len {
                    DiffKind::Length
                } else {
                    DiffKind::Value
                },
                primary: Some(format!("{} bytes, xxh3 {:016x}", primary.len, primary.hash)),
                other: Some(format!("{} bytes, xxh3 {:016x}", other.len, other.hash)),
            });
        }
        note
    };
    let partial = primary.partial.or(other.partial);
    let (Some(mut a), Some(mut b)) = (primary.body(), other.body()) else {
        let note = match partial {
            Some(Partial::Budget) => BodyNote::Budget,
            _ => BodyNote::OverCap,
        };
        return by_hash(out, Some(note));
    };
    match (is_gzip(primary), is_gzip(other)) {
        (true, true) => {
            match (
                gunzip(&a, s.max_decoded_bytes),
                gunzip(&b, s.max_decoded_bytes),
            ) {
                (Some(x), Some(y)) => {
                    a = Bytes::from(x);
                    b = Bytes::from(y);
                }
                _ => return by_hash(out, Some(BodyNote::GzipLimit)),
            }
        }
        (false, false) => {}
        // The content-encoding header difference is already reported.
        _ => return Some(BodyNote::EncodingMismatch),
    }
    // The common case, identical bytes, needs no parsing at all.
    if a == b {
        return None;
    }
    if is_json(primary) && is_json(other) {
        let parsed = (
            serde_json::from_slice::<Value>(&a),
            serde_json::from_slice::<Value>(&b),
        );
        let (Ok(x), Ok(y)) = parsed else {
            return bytes_differ(&a, &b, out).then_some(BodyNote::JsonInvalid);
        };
        let diff = json::diff(&x, &y, &s.ignore_fields, s.limits);
        out.extend(diff.diffs);
        return diff.incomplete.then_some(BodyNote::JsonLimits);
    }
    bytes_differ(&a, &b, out);
    None
}

/// Compare two whole bodies as bytes; record `body` when they differ.
fn bytes_differ(a: &[u8], b: &[u8], out: &mut Vec<FieldDiff>) -> bool {
    if a == b {
        return false;
    }
    let show = |x: &[u8]| json::truncate(String::from_utf8_lossy(x).into_owned(), 160);
    out.push(FieldDiff {
        path: "body".into(),
        kind: if a.len() != b.len() {
            DiffKind::Length
        } else {
            DiffKind::Value
        },
        primary: Some(show(a)),
        other: Some(show(b)),
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::capture::Capturer;
    use crate::mirror::budget::ByteBudget;
    use http::HeaderMap;
    use pingora_prometheus::prometheus::IntGauge;
    use std::sync::Arc;
    use std::time::Instant;

    fn capture(status: u16, headers: &[(&str, &str)], body: &[u8], cap: u64) -> Capture {
        let budget = Arc::new(ByteBudget::new(1 << 20, IntGauge::new("t", "t").unwrap()));
        let mut c = Capturer::new(cap, budget, Instant::now());
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        c.header(status, &map);
        c.body(&Bytes::copy_from_slice(body));
        c.finish()
    }

    fn settings() -> Settings {
        Settings {
            ignore_headers: ["date"]
                .iter()
                .map(|h| HeaderName::from_static(h))
                .collect(),
            ignore_fields: vec![FieldPattern::parse("$..ts").unwrap()],
            max_decoded_bytes: 1 << 20,
            limits: JsonLimits::default(),
        }
    }

    fn paths(d: &Differences) -> Vec<&str> {
        d.fields.iter().map(|f| f.path.as_str()).collect()
    }

    const JSON: (&str, &str) = ("content-type", "application/json; charset=utf-8");

    #[test]
    fn status_headers_and_json_fields() {
        let a = capture(
            200,
            &[JSON, ("date", "x"), ("etag", "\"1\"")],
            br#"{"a":1,"ts":1}"#,
            100,
        );
        let b = capture(
            201,
            &[JSON, ("date", "y"), ("etag", " \"2\" ")],
            br#"{"a":2,"ts":2}"#,
            100,
        );
        let d = compare(&a, &b, &settings());
        assert_eq!(paths(&d), vec!["status", "header:etag", "$.a"]);
        assert_eq!(d.body_note, None);
    }

    #[test]
    fn header_values_are_normalized() {
        let a = capture(200, &[("vary", "a,  b")], b"", 100);
        let b = capture(200, &[("vary", " a, b ")], b"", 100);
        assert!(compare(&a, &b, &settings()).fields.is_empty());
    }

    #[test]
    fn over_the_cap_only_length_and_hash() {
        let a = capture(200, &[], b"0123456789", 4);
        let b = capture(200, &[], b"0123456789", 4);
        let d = compare(&a, &b, &settings());
        assert!(d.fields.is_empty());
        assert_eq!(d.body_note, Some(BodyNote::OverCap));
        let c = capture(200, &[], b"0123456780", 4);
        assert_eq!(paths(&compare(&a, &c, &settings())), vec!["body"]);
    }

    #[test]
    fn gzip_is_decoded_when_both_sides_use_it() {
        use flate2::{Compression, write::GzEncoder};
        use std::io::Write;
        let gz = |text: &[u8], level| {
            let mut e = GzEncoder::new(Vec::new(), Compression::new(level));
            e.write_all(text).unwrap();
            e.finish().unwrap()
        };
        let h = [JSON, ("content-encoding", "gzip")];
        // Different compression levels, same JSON: equal.
        let a = capture(
            200,
            &h,
            &gz(br#"{"a":[1,2,3],"b":"xxxxxxxxxxxxxxxxxxxxxxxx"}"#, 1),
            1000,
        );
        let b = capture(
            200,
            &h,
            &gz(br#"{"a":[1,2,3],"b":"xxxxxxxxxxxxxxxxxxxxxxxx"}"#, 9),
            1000,
        );
        assert!(compare(&a, &b, &settings()).fields.is_empty());
        let c = capture(
            200,
            &h,
            &gz(br#"{"a":[1,2,4],"b":"xxxxxxxxxxxxxxxxxxxxxxxx"}"#, 9),
            1000,
        );
        assert_eq!(paths(&compare(&a, &c, &settings())), vec!["$.a[*]"]);
        let mut tight = settings();
        tight.max_decoded_bytes = 10;
        assert_eq!(compare(&a, &b, &tight).body_note, Some(BodyNote::GzipLimit));
        let plain = capture(200, &[JSON], br#"{"a":[1,2,3]}"#, 1000);
        let d = compare(&a, &plain, &settings());
        assert_eq!(d.body_note, Some(BodyNote::EncodingMismatch));
        assert_eq!(paths(&d), vec!["header:content-encoding"]);
    }

    #[test]
    fn invalid_json_falls_back_to_bytes() {
        let a = capture(200, &[JSON], b"{not json", 100);
        let b = capture(200, &[JSON], b"{not json!", 100);
        let d = compare(&a, &b, &settings());
        assert_eq!(paths(&d), vec!["body"]);
        assert_eq!(d.body_note, Some(BodyNote::JsonInvalid));
    }
}
