//! Hostile HTTP/2 input through a mirroring proxy to HTTP/1.1 upstreams: the downgrade is
//! where HTTP/2 request smuggling happens (a header value carrying CRLF, a length that the
//! DATA frames contradict, connection-specific fields), so each case is sent as raw frames,
//! exactly as written, and checked at the client, the primary and the shadow. A refused
//! case reaches neither upstream; an accepted one reaches the primary whole and the shadow
//! as the primary got it; a body that breaks off reaches neither whole.

mod common;

use std::time::Duration;

use common::raw_h2::{H2Answer, raw_h2_request};
use common::raw_record::{Framing, MirroredPair, RawRequest, TEST_ID, shadow_matches};

const ANSWER: Duration = Duration::from_secs(3);
const SETTLE: Duration = Duration::from_secs(5);

/// What the case must come to.
#[derive(Debug, Clone)]
enum Expect {
    /// Answered 200; the primary got one complete request with this framing and body
    /// (and the checks), the shadow the same request.
    Accepted(Framing, &'static [u8]),
    /// A 4xx, RST_STREAM or GOAWAY; nothing at either upstream.
    Refused,
    /// Not answered 200; neither upstream got a complete request.
    BrokenBody,
}

/// Headers every case starts from.
const BASE: [(&str, &str); 3] = [
    (":scheme", "http"),
    (":authority", "h2.test"),
    (":path", "/x"),
];

struct Case {
    name: &'static str,
    /// Header fields in order; `{id}` in a value becomes the case's name.
    fields: Vec<(&'static str, &'static str)>,
    body: Option<&'static [u8]>,
    expect: Expect,
    /// Header name and the values every complete primary request must carry for it.
    check: Option<(&'static str, &'static [&'static str])>,
}

/// A GET of `BASE` with `extra` fields after it.
fn get(name: &'static str, extra: &[(&'static str, &'static str)], expect: Expect) -> Case {
    let mut fields = vec![(":method", "GET")];
    fields.extend(BASE);
    fields.extend_from_slice(extra);
    Case {
        name,
        fields,
        body: None,
        expect,
        check: None,
    }
}

/// Fields exactly as given (pseudo-headers included).
fn raw(name: &'static str, fields: &[(&'static str, &'static str)], expect: Expect) -> Case {
    Case {
        name,
        fields: fields.to_vec(),
        body: None,
        expect,
        check: None,
    }
}

fn post(
    name: &'static str,
    extra: &[(&'static str, &'static str)],
    body: &'static [u8],
    expect: Expect,
) -> Case {
    let mut case = get(name, extra, expect);
    case.fields[0] = (":method", "POST");
    case.body = Some(body);
    case
}

fn checked(mut case: Case, name: &'static str, values: &'static [&'static str]) -> Case {
    case.check = Some((name, values));
    case
}

fn cases() -> Vec<Case> {
    use Expect::*;
    let none = || Accepted(Framing::None, b"");
    vec![
        get("baseline_get", &[], none()),
        checked(
            get(
                "cookie_crumbs_joined",
                &[("cookie", "a=1"), ("cookie", "b=2")],
                none(),
            ),
            "cookie",
            &["a=1; b=2"],
        ),
        checked(
            get("te_trailers_not_forwarded", &[("te", "trailers")], none()),
            "te",
            &[],
        ),
        raw(
            "host_without_authority",
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/x"),
                ("host", "h2.test"),
            ],
            none(),
        ),
        post(
            "post_with_length",
            &[("content-length", "5")],
            b"hello",
            Accepted(Framing::Length(5), b"hello"),
        ),
        post(
            "post_without_length",
            &[],
            b"hello",
            Accepted(Framing::Chunked, b"hello"),
        ),
        // --- smuggling through the downgrade: refused before any upstream
        get("crlf_in_value", &[("x-a", "1\r\nx-injected: 1")], Refused),
        get("lf_in_value", &[("x-a", "1\nx-injected: 1")], Refused),
        get("cr_in_value", &[("x-a", "1\rx-injected: 1")], Refused),
        get("nul_in_value", &[("x-a", "a\0b")], Refused),
        get("colon_in_name", &[("x:a", "1")], Refused),
        get("space_in_name", &[("x a", "1")], Refused),
        get("uppercase_name", &[("X-Up", "1")], Refused),
        get(
            "transfer_encoding",
            &[("transfer-encoding", "chunked")],
            Refused,
        ),
        get("connection_field", &[("connection", "close")], Refused),
        get("keep_alive_field", &[("keep-alive", "timeout=5")], Refused),
        get("upgrade_field", &[("upgrade", "websocket")], Refused),
        get(
            "proxy_connection_field",
            &[("proxy-connection", "keep-alive")],
            Refused,
        ),
        get("te_other_than_trailers", &[("te", "gzip")], Refused),
        get(
            "host_differs_from_authority",
            &[("host", "other.test")],
            Refused,
        ),
        get(
            "second_host",
            &[("host", "h2.test"), ("host", "other.test")],
            Refused,
        ),
        raw(
            "crlf_in_path",
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "h2.test"),
                (":path", "/x HTTP/1.1\r\nHost: evil"),
            ],
            Refused,
        ),
        raw(
            "space_in_method",
            &[
                (":method", "GET /admin"),
                (":scheme", "http"),
                (":authority", "h2.test"),
                (":path", "/x"),
            ],
            Refused,
        ),
        raw(
            "authority_with_userinfo",
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "user@h2.test"),
                (":path", "/x"),
            ],
            Refused,
        ),
        raw(
            "authority_with_backslash",
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "h2\\test"),
                (":path", "/x"),
            ],
            Refused,
        ),
        raw(
            "pseudo_after_regular",
            &[
                (":method", "GET"),
                ("x-a", "1"),
                (":scheme", "http"),
                (":authority", "h2.test"),
                (":path", "/x"),
            ],
            Refused,
        ),
        get("second_path", &[(":path", "/y")], Refused),
        raw(
            "empty_path",
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "h2.test"),
                (":path", ""),
            ],
            Refused,
        ),
        raw(
            "no_path",
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "h2.test"),
            ],
            Refused,
        ),
        // --- a length the DATA frames contradict: never a whole request upstream
        post(
            "length_longer_than_data",
            &[("content-length", "10")],
            b"hello",
            BrokenBody,
        ),
        post(
            "length_shorter_than_data",
            &[("content-length", "3")],
            b"hello",
            BrokenBody,
        ),
    ]
}

/// The case's fields with its test id added, as bytes.
fn fields_of(case: &Case) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = case
        .fields
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    fields.push((TEST_ID.as_bytes().to_vec(), case.name.as_bytes().to_vec()));
    fields
}

fn mine<'a>(records: &'a [RawRequest], name: &str) -> Vec<&'a RawRequest> {
    records.iter().filter(|r| r.id() == Some(name)).collect()
}

fn check(
    case: &Case,
    answer: &H2Answer,
    primary: &[&RawRequest],
    shadow: &[&RawRequest],
) -> Vec<String> {
    let mut problems = Vec::new();
    let complete = |records: &[&RawRequest]| records.iter().filter(|r| r.complete).count();
    match &case.expect {
        Expect::Accepted(framing, body) => {
            if *answer != H2Answer::Status(Some(200)) {
                problems.push(format!("client: expected 200, got {answer:?}"));
            }
            match primary {
                [one] if one.complete && one.framing == *framing && one.body == *body => {
                    if let Some((name, values)) = case.check
                        && one.values(name) != values
                    {
                        problems.push(format!(
                            "primary: expected {name} {values:?}, got {}",
                            one.describe()
                        ));
                    }
                    match shadow {
                        [twin] => {
                            if let Err(diff) = shadow_matches(one, twin) {
                                problems.push(format!("shadow differs from primary: {diff}"));
                            }
                        }
                        _ => problems
                            .push(format!("shadow: expected one copy, got {}", shadow.len())),
                    }
                }
                _ => problems.push(format!(
                    "primary: expected one complete {framing:?} request with {:?}, got {:?}",
                    String::from_utf8_lossy(body),
                    primary.iter().map(|r| r.describe()).collect::<Vec<_>>()
                )),
            }
        }
        Expect::Refused => {
            if !answer.is_refusal() {
                problems.push(format!("client: expected a refusal, got {answer:?}"));
            }
            if !primary.is_empty() || !shadow.is_empty() {
                problems.push(format!(
                    "expected nothing upstream, got {} at the primary, {} at the shadow",
                    primary.len(),
                    shadow.len()
                ));
            }
        }
        Expect::BrokenBody => {
            if *answer == H2Answer::Status(Some(200)) {
                problems.push("client: a broken body was answered 200".to_string());
            }
            if complete(primary) + complete(shadow) > 0 {
                problems.push(format!(
                    "a broken body arrived whole: {} at the primary, {} at the shadow",
                    complete(primary),
                    complete(shadow)
                ));
            }
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http2_requests_are_refused_or_forwarded_and_mirrored_faithfully() {
    let pair = MirroredPair::start_with_listener("    h2c: true").await;
    pair.settle(SETTLE).await.expect("proxy and origins ready");
    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let fields = fields_of(case);
        let fields: Vec<(&[u8], &[u8])> = fields.iter().map(|(n, v)| (&n[..], &v[..])).collect();
        let answer = raw_h2_request(pair.proxy.addr, &fields, case.body, ANSWER).await;
        let mut problems = Vec::new();
        if let Err(problem) = pair.settle(SETTLE).await {
            problems.push(problem);
        }
        let (primary, shadow) = (pair.primary.requests(), pair.shadow.requests());
        problems.extend(check(
            case,
            &answer,
            &mine(&primary, case.name),
            &mine(&shadow, case.name),
        ));
        if !problems.is_empty() {
            failures.push(format!("{}:\n    {}", case.name, problems.join("\n    ")));
        }
    }
    // Nothing the proxy made up (or split off a case) reached either side.
    for origin in [&pair.primary, &pair.shadow] {
        let strays: Vec<String> = origin
            .requests()
            .iter()
            .filter(|r| {
                !r.id().is_some_and(|id| {
                    id.starts_with("sentinel-") || cases.iter().any(|c| c.name == id)
                })
            })
            .map(RawRequest::describe)
            .collect();
        if !strays.is_empty() {
            failures.push(format!(
                "{} got request(s) of no case: {}",
                origin.name,
                strays.join(" || ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
