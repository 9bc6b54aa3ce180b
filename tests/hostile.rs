//! Hostile HTTP/1.1 input through a mirroring proxy, one case per connection: request-smuggling
//! classics, broken framing, malformed header lines and request lines. Each case says what the
//! client gets, what the primary upstream gets (framing and body bytes) and whether the shadow
//! gets exactly the primary's request (modulo the mirror's edits) or nothing at all.
//! All cases run; every failing one is reported together at the end.

mod common;

use std::time::Duration;

use common::raw_record::{
    ClientOutcome, Framing, MirroredPair, RawRequest, TEST_ID, raw_request, shadow_matches,
};

/// How long one case may take to be answered (or closed).
const ANSWER: Duration = Duration::from_secs(3);
/// How long the sentinel and the mirror metrics may take to settle after a case.
const SETTLE: Duration = Duration::from_secs(5);

/// What the client must see.
#[derive(Debug, Clone, Copy)]
enum Client {
    /// One 2xx response.
    Ok,
    /// A 4xx response.
    Refused,
    /// A 4xx response, or the connection closed without a response.
    RefusedOrClosed,
    /// 2xx or 4xx; the origin expectations apply only when accepted, else nothing may arrive.
    Either,
    /// This many 2xx responses, in the order of the pipelined requests.
    Answers(usize),
}

/// What the primary upstream must record for the case.
#[derive(Debug, Clone)]
enum Primary {
    /// No request, not even a partial one.
    Nothing,
    /// Possibly a request head with a partial body, never a complete request.
    NoComplete,
    /// Exactly one complete request, with this framing and these body bytes.
    Got(Framing, &'static [u8]),
    /// This many complete requests (pipelining).
    Each(usize),
}

/// What the shadow upstream must record for the case.
#[derive(Debug, Clone, Copy)]
enum Shadow {
    /// For each complete primary request exactly one shadow request, equal modulo the edits.
    Same,
    /// Either `Same`, or nothing at all.
    SameOrNothing,
    /// No request, not even a partial one.
    Nothing,
    /// Never a complete request.
    NoComplete,
}

/// An extra check on each complete primary request.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// Header `name` carries exactly these values, in order.
    Values(&'static str, &'static [&'static str]),
    /// Header `name` is absent.
    Lacks(&'static str),
    /// Every chunk-size line is bare hex digits: no extension, no whitespace.
    CleanChunks,
    /// The request line is exactly this.
    RequestLine(&'static str),
}

struct Case {
    name: &'static str,
    raw: Vec<u8>,
    client: Client,
    primary: Primary,
    shadow: Shadow,
    checks: Vec<Check>,
}

/// A case whose raw text has `{id}` where the test id goes.
fn case(
    name: &'static str,
    raw: &str,
    client: Client,
    primary: Primary,
    shadow: Shadow,
    checks: &[Check],
) -> Case {
    Case {
        name,
        raw: raw.replace("{id}", name).into_bytes(),
        client,
        primary,
        shadow,
        checks: checks.to_vec(),
    }
}

/// Refused at the header: 4xx, nothing at either origin.
fn refused(name: &'static str, raw: &str) -> Case {
    case(
        name,
        raw,
        Client::Refused,
        Primary::Nothing,
        Shadow::Nothing,
        &[],
    )
}

/// Accepted: 2xx, the primary gets `framing` and `body`, the shadow the same request.
fn accepted(
    name: &'static str,
    raw: &str,
    framing: Framing,
    body: &'static [u8],
    checks: &[Check],
) -> Case {
    case(
        name,
        raw,
        Client::Ok,
        Primary::Got(framing, body),
        Shadow::Same,
        checks,
    )
}

/// A body that breaks off or is malformed mid-way: refused or closed, never complete anywhere.
fn broken_body(name: &'static str, raw: &str) -> Case {
    case(
        name,
        raw,
        Client::RefusedOrClosed,
        Primary::NoComplete,
        Shadow::NoComplete,
        &[],
    )
}

const ID: &str = "x-test-id: {id}\r\n";

fn cases() -> Vec<Case> {
    use Check::*;
    use Framing::{Chunked, Length};
    let none = Framing::None;
    let post = |headers: &str, body: &str| {
        format!("POST /up HTTP/1.1\r\nHost: h\r\n{ID}{headers}\r\n{body}")
    };
    let get = |headers: &str| format!("GET /g HTTP/1.1\r\nHost: h\r\n{ID}{headers}\r\n");
    let long_value = "v".repeat(8 * 1024);
    let huge_value = "v".repeat(200 * 1024);
    let over_limit = "v".repeat(1024 * 1024 + 16);
    let many_headers: String = (0..300).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    vec![
        // --- baselines: the harness itself must pass these.
        accepted("plain_get", &get(""), none.clone(), b"", &[]),
        accepted(
            "post_content_length",
            &post("Content-Length: 5\r\n", "hello"),
            Length(5),
            b"hello",
            &[Values("content-length", &["5"])],
        ),
        accepted(
            "post_chunked",
            &post(
                "Transfer-Encoding: chunked\r\n",
                "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            ),
            Chunked,
            b"hello world",
            &[Values("transfer-encoding", &["chunked"]), CleanChunks],
        ),
        accepted(
            "duplicate_ordinary_header_keeps_order",
            &get("X-Dup: 1\r\nX-Dup: 2\r\nx-dup: 3\r\n"),
            none.clone(),
            b"",
            &[Values("x-dup", &["1", "2", "3"])],
        ),
        accepted(
            "head_request",
            &format!("HEAD /g HTTP/1.1\r\nHost: h\r\n{ID}\r\n"),
            none.clone(),
            b"",
            &[],
        ),
        accepted(
            "get_with_content_length_body",
            &get("Content-Length: 5\r\n").replace("\r\n\r\n", "\r\n\r\nhello"),
            Length(5),
            b"hello",
            &[],
        ),
        accepted(
            "prior_x_forwarded_for_extended",
            &get("X-Forwarded-For: 10.0.0.1\r\n"),
            none.clone(),
            b"",
            &[Values("x-forwarded-for", &["10.0.0.1, 127.0.0.1"])],
        ),
        accepted(
            "client_mirror_marker_dropped",
            &get("X-Shadowgate-Mirror: 1\r\n"),
            none.clone(),
            b"",
            &[Lacks("x-shadowgate-mirror")],
        ),
        accepted(
            "underscored_field_names_dropped",
            &get("X_Forwarded_For: 6.6.6.6\r\nX_Custom: 1\r\n"),
            none.clone(),
            b"",
            &[
                Lacks("x_forwarded_for"),
                Lacks("x_custom"),
                Values("x-forwarded-for", &["127.0.0.1"]),
            ],
        ),
        accepted(
            "prior_forwarding_lists_on_several_lines_joined",
            &get(
                "X-Forwarded-For: 10.0.0.1\r\nVia: 1.0 a\r\nX-Forwarded-For: 10.0.0.2\r\nVia: 1.1 b\r\n",
            ),
            none.clone(),
            b"",
            &[
                Values("x-forwarded-for", &["10.0.0.1, 10.0.0.2, 127.0.0.1"]),
                Values("via", &["1.0 a, 1.1 b, 1.1 shadowgate"]),
            ],
        ),
        // --- Host (RFC 9112 §3.2)
        refused(
            "http11_without_host",
            &format!("GET /g HTTP/1.1\r\n{ID}\r\n"),
        ),
        refused(
            "two_host_lines",
            &format!("GET /g HTTP/1.1\r\nHost: a\r\nHost: b\r\n{ID}\r\n"),
        ),
        refused(
            "two_identical_host_lines",
            &format!("GET /g HTTP/1.1\r\nHost: a\r\nHost: a\r\n{ID}\r\n"),
        ),
        refused(
            "host_with_a_path",
            &format!("GET /g HTTP/1.1\r\nHost: a.example/admin\r\n{ID}\r\n"),
        ),
        refused(
            "host_with_a_backslash",
            &format!("GET /g HTTP/1.1\r\nHost: a.example\\b\r\n{ID}\r\n"),
        ),
        refused(
            "host_with_an_empty_label",
            &format!("GET /g HTTP/1.1\r\nHost: a..example\r\n{ID}\r\n"),
        ),
        accepted(
            "http10_without_host",
            &format!("GET /g HTTP/1.0\r\n{ID}\r\n"),
            none.clone(),
            b"",
            &[],
        ),
        accepted(
            "http10_keep_alive",
            &format!("GET /g HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n{ID}\r\n"),
            none.clone(),
            b"",
            &[Lacks("keep-alive")],
        ),
        // --- Content-Length and Transfer-Encoding together: refused (CL.TE, TE.CL, TE.TE)
        refused(
            "cl_te_classic",
            &post(
                "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\nG",
            ),
        ),
        refused(
            "te_cl_classic",
            &post(
                "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
                "8\r\nSMUGGLED\r\n0\r\n\r\n",
            ),
        ),
        refused(
            "te_xchunked_with_cl",
            &post(
                "Content-Length: 5\r\nTransfer-Encoding: xchunked\r\n",
                "hello",
            ),
        ),
        refused(
            "te_leading_space_value_with_cl",
            &post(
                "Content-Length: 5\r\nTransfer-Encoding:  chunked\r\n",
                "0\r\n\r\n",
            ),
        ),
        refused(
            "te_chunked_identity_with_cl",
            &post(
                "Content-Length: 5\r\nTransfer-Encoding: chunked, identity\r\n",
                "hello",
            ),
        ),
        refused(
            "te_chunked_identity_alone",
            &post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"),
        ),
        refused(
            "te_tab_before_colon_with_cl",
            &post(
                "Content-Length: 5\r\nTransfer-Encoding\t: chunked\r\n",
                "0\r\n\r\n",
            ),
        ),
        refused(
            "te_space_before_colon_with_cl",
            &post(
                "Content-Length: 5\r\nTransfer-Encoding : chunked\r\n",
                "0\r\n\r\n",
            ),
        ),
        refused(
            "te_uppercase_value_with_cl",
            &post(
                "Content-Length: 5\r\nTransfer-Encoding: CHUNKED\r\n",
                "0\r\n\r\n",
            ),
        ),
        refused(
            "te_uppercase_name_with_cl",
            &post(
                "Content-Length: 5\r\nTRANSFER-ENCODING: chunked\r\n",
                "0\r\n\r\n",
            ),
        ),
        refused(
            "te_identity_then_chunked_with_cl",
            &post(
                "Content-Length: 5\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
        ),
        refused(
            "te_xchunked_alone",
            &post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"),
        ),
        accepted(
            "te_identity_then_chunked_reframed",
            &post(
                "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            Chunked,
            b"hello",
            &[Values("transfer-encoding", &["chunked"]), CleanChunks],
        ),
        case(
            "te_chunked_twice",
            &post(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            Client::Either,
            Primary::Got(Chunked, b"hello"),
            Shadow::Same,
            &[Values("transfer-encoding", &["chunked"])],
        ),
        accepted(
            "te_uppercase_value",
            &post("Transfer-Encoding: CHUNKED\r\n", "5\r\nhello\r\n0\r\n\r\n"),
            Chunked,
            b"hello",
            &[CleanChunks],
        ),
        // --- Content-Length forms (RFC 9110 §8.6)
        accepted(
            "cl_duplicate_identical_forwarded_once",
            &post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"),
            Length(5),
            b"hello",
            &[Values("content-length", &["5"])],
        ),
        refused(
            "cl_differing",
            &post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"),
        ),
        refused("cl_plus_sign", &post("Content-Length: +5\r\n", "hello")),
        refused("cl_negative", &post("Content-Length: -1\r\n", "")),
        refused("cl_two_numbers", &post("Content-Length:  5 5\r\n", "hello")),
        refused("cl_hex", &post("Content-Length: 0x5\r\n", "hello")),
        refused(
            "cl_overflow",
            &post("Content-Length: 99999999999999999999999\r\n", "hello"),
        ),
        refused(
            "cl_space_before_colon",
            &post("Content-Length : 5\r\n", "hello"),
        ),
        accepted(
            "cl_leading_zeros",
            &post("Content-Length: 005\r\n", "hello"),
            Length(5),
            b"hello",
            &[],
        ),
        // --- Connection nominations
        refused("connection_nominates_host", &get("Connection: Host\r\n")),
        refused(
            "connection_nominates_x_forwarded_for",
            &get("Connection: X-Forwarded-For\r\nX-Forwarded-For: 10.9.9.9\r\n"),
        ),
        accepted(
            "connection_nominates_content_length",
            &post(
                "Connection: Content-Length\r\nContent-Length: 5\r\n",
                "hello",
            ),
            Chunked,
            b"hello",
            &[Lacks("content-length"), CleanChunks],
        ),
        refused(
            "connection_nominates_host_with_body",
            &post("Connection: Host\r\nContent-Length: 5\r\n", "hello"),
        ),
        accepted(
            "connection_nominates_transfer_encoding",
            &post(
                "Connection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n",
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            Chunked,
            b"hello",
            &[CleanChunks],
        ),
        accepted(
            "connection_nominates_x_foo",
            &get("Connection: x-foo\r\nx-foo: 1\r\n"),
            none.clone(),
            b"",
            &[Lacks("x-foo"), Lacks("connection")],
        ),
        // --- chunk forms Pingora accepts and re-frames cleanly
        accepted(
            "chunk_size_trailing_space",
            &post("Transfer-Encoding: chunked\r\n", "5 \r\nhello\r\n0\r\n\r\n"),
            Chunked,
            b"hello",
            &[CleanChunks],
        ),
        accepted(
            "chunk_extension",
            &post(
                "Transfer-Encoding: chunked\r\n",
                "5;a=b\r\nhello\r\n0;c=d\r\n\r\n",
            ),
            Chunked,
            b"hello",
            &[CleanChunks],
        ),
        accepted(
            "chunk_extension_unterminated_quote",
            &post(
                "Transfer-Encoding: chunked\r\n",
                "5;a=\"b\r\nhello\r\n0\r\n\r\n",
            ),
            Chunked,
            b"hello",
            &[CleanChunks],
        ),
        accepted(
            "trailer_non_field_line",
            &post(
                "Transfer-Encoding: chunked\r\n",
                "5\r\nhello\r\n0\r\nthis is not a field\r\n\r\n",
            ),
            Chunked,
            b"hello",
            &[CleanChunks],
        ),
        // --- broken chunked bodies: never complete anywhere
        broken_body(
            "chunk_size_not_hex",
            &post("Transfer-Encoding: chunked\r\n", "zz\r\nhello\r\n0\r\n\r\n"),
        ),
        broken_body(
            "chunk_size_overflow",
            &post(
                "Transfer-Encoding: chunked\r\n",
                "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            ),
        ),
        broken_body(
            "chunk_data_without_crlf",
            &post("Transfer-Encoding: chunked\r\n", "5\r\nhelloXX0\r\n\r\n"),
        ),
        broken_body(
            "chunk_size_negative",
            &post("Transfer-Encoding: chunked\r\n", "-5\r\nhello\r\n0\r\n\r\n"),
        ),
        // --- malformed header lines: refused before any upstream sees them
        refused("bare_cr_in_header_value", &get("X-A: a\rb\r\n")),
        // A bare LF ends a line (RFC 9112 §2.2 allows it); the header goes
        // upstream re-serialised with CRLF, so no upstream can read it otherwise.
        accepted(
            "bare_lf_header_line",
            &format!("GET /g HTTP/1.1\r\nHost: h\r\n{ID}X-A: a\nX-B: b\r\n\r\n"),
            none.clone(),
            b"",
            &[Values("x-a", &["a"]), Values("x-b", &["b"])],
        ),
        refused("nul_in_header_value", &get("X-A: a\0b\r\n")),
        refused("obs_fold", &get("X-A: a\r\n folded\r\n")),
        refused("obs_fold_tab", &get("X-A: a\r\n\tfolded\r\n")),
        refused("header_name_with_space", &get("X A: b\r\n")),
        refused("header_name_empty", &get(": b\r\n")),
        refused("header_name_non_token", &get("X<A>: b\r\n")),
        refused("header_name_quote", &get("X\"A: b\r\n")),
        refused("header_name_trailing_space", &get("X-A : b\r\n")),
        refused("header_line_without_colon", &get("JustText\r\n")),
        refused(
            "first_header_line_folded",
            &format!("GET /g HTTP/1.1\r\n Host: h\r\n{ID}\r\n"),
        ),
        // --- request lines
        // Illegal bytes in the target are percent-encoded by Pingora: every
        // upstream gets the same, unambiguous, encoded target.
        accepted(
            "target_with_space",
            &format!("GET /a b HTTP/1.1\r\nHost: h\r\n{ID}\r\n"),
            none.clone(),
            b"",
            &[RequestLine("GET /a%20b HTTP/1.1")],
        ),
        // Pingora reads a raw NUL as `%00`; a path with a NUL in it is refused, as
        // NGINX does (no upstream should have to decide what it means).
        refused(
            "nul_in_target",
            &format!("GET /a\0b HTTP/1.1\r\nHost: h\r\n{ID}\r\n"),
        ),
        // Pingora reads the second space as part of the target (`%20/g`), which
        // is then no origin-form target at all: refused.
        refused(
            "double_space_in_request_line",
            &format!("GET  /g HTTP/1.1\r\nHost: h\r\n{ID}\r\n"),
        ),
        case(
            "http09_request_line",
            "GET /g\r\n\r\n",
            Client::RefusedOrClosed,
            Primary::Nothing,
            Shadow::Nothing,
            &[],
        ),
        case(
            "unknown_http_version",
            &format!("GET /g HTTP/9.9\r\nHost: h\r\n{ID}\r\n"),
            Client::RefusedOrClosed,
            Primary::Nothing,
            Shadow::Nothing,
            &[],
        ),
        accepted(
            "absolute_form_target",
            &format!("GET http://h/x?y=1 HTTP/1.1\r\nHost: h\r\n{ID}\r\n"),
            none.clone(),
            b"",
            &[RequestLine("GET /x?y=1 HTTP/1.1"), Values("host", &["h"])],
        ),
        accepted(
            "options_asterisk",
            &format!("OPTIONS * HTTP/1.1\r\nHost: h\r\n{ID}\r\n"),
            none.clone(),
            b"",
            &[RequestLine("OPTIONS * HTTP/1.1")],
        ),
        case(
            "connect_method",
            &format!("CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n{ID}\r\n"),
            Client::Refused,
            Primary::Nothing,
            Shadow::Nothing,
            &[],
        ),
        // --- sizes
        accepted(
            "long_header_line_8k",
            &get(&format!("X-Long: {long_value}\r\n")),
            none.clone(),
            b"",
            &[],
        ),
        case(
            "header_line_200k",
            &get(&format!("X-Long: {huge_value}\r\n")),
            Client::Either,
            Primary::Got(none.clone(), b""),
            Shadow::Same,
            &[],
        ),
        case(
            "header_section_over_1mib",
            &get(&format!("X-Long: {over_limit}\r\n")),
            Client::RefusedOrClosed,
            Primary::Nothing,
            Shadow::Nothing,
            &[],
        ),
        case(
            "too_many_header_lines",
            &get(&many_headers),
            Client::RefusedOrClosed,
            Primary::Nothing,
            Shadow::Nothing,
            &[],
        ),
        // --- protocol switches and hop-by-hop credentials
        case(
            "upgrade_h2c_not_upgraded",
            &get(
                "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
            ),
            Client::Ok,
            Primary::Got(none.clone(), b""),
            Shadow::SameOrNothing,
            &[Lacks("upgrade"), Lacks("http2-settings")],
        ),
        accepted(
            "expect_100_continue",
            &format!(
                "PUT /up HTTP/1.1\r\nHost: h\r\n{ID}Expect: 100-continue\r\nContent-Length: 5\r\n\r\nhello"
            ),
            Length(5),
            b"hello",
            &[Values("expect", &["100-continue"])],
        ),
        accepted(
            "proxy_authorization_to_primary_only",
            &get("Proxy-Authorization: Basic eHh4Onl5eQ==\r\n"),
            none.clone(),
            b"",
            &[Values("proxy-authorization", &["Basic eHh4Onl5eQ=="])],
        ),
        // --- pipelining: both answered in order, each mirrored once
        case(
            "pipelined_two_gets",
            "GET /p1 HTTP/1.1\r\nHost: h\r\nx-test-id: {id}#1\r\n\r\nGET /p2 HTTP/1.1\r\nHost: h\r\nx-test-id: {id}#2\r\n\r\n",
            Client::Answers(2),
            Primary::Each(2),
            Shadow::Same,
            &[],
        ),
    ]
}

/// Whether a record belongs to case `name` (pipelined requests carry `name#n`).
fn belongs(record: &RawRequest, name: &str) -> bool {
    record
        .id()
        .is_some_and(|id| id == name || id.strip_prefix(name).is_some_and(|r| r.starts_with('#')))
}

fn check_client(case: &Case, outcome: &ClientOutcome) -> Result<bool, String> {
    let first = outcome.responses.first().map(|r| r.0);
    let class = first.map(|s| s / 100);
    let accepted = class == Some(2);
    let ok = match case.client {
        Client::Ok => accepted && outcome.responses.len() == 1,
        Client::Refused => class == Some(4),
        Client::RefusedOrClosed => class == Some(4) || (first.is_none() && outcome.closed),
        Client::Either => accepted || class == Some(4),
        Client::Answers(n) => {
            outcome.responses.len() == n
                && outcome
                    .responses
                    .iter()
                    .enumerate()
                    .all(|(i, (status, body))| {
                        *status / 100 == 2
                            && String::from_utf8_lossy(body).contains(&format!("#{}", i + 1))
                    })
        }
    };
    if ok {
        Ok(accepted)
    } else {
        Err(format!(
            "client: expected {:?}, got {}",
            case.client,
            outcome.describe()
        ))
    }
}

fn check_primary(case: &Case, records: &[RawRequest], refused: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let complete: Vec<&RawRequest> = records.iter().filter(|r| r.complete).collect();
    let expected = if refused {
        Primary::Nothing
    } else {
        case.primary.clone()
    };
    match expected {
        Primary::Nothing if !records.is_empty() => problems.push(format!(
            "primary: expected nothing, got {}",
            describe_all(records)
        )),
        Primary::NoComplete if !complete.is_empty() => problems.push(format!(
            "primary: expected no complete request, got {}",
            describe_all(records)
        )),
        Primary::Got(framing, body) => {
            if records.len() != 1 || complete.len() != 1 {
                problems.push(format!(
                    "primary: expected one complete request, got {}",
                    describe_all(records)
                ));
            } else if complete[0].framing != framing || complete[0].body != body {
                problems.push(format!(
                    "primary: expected {framing:?} {:?}, got {}",
                    String::from_utf8_lossy(body),
                    complete[0].describe()
                ));
            }
        }
        Primary::Each(n) if complete.len() != n || records.len() != n => problems.push(format!(
            "primary: expected {n} complete requests, got {}",
            describe_all(records)
        )),
        _ => {}
    }
    for record in &complete {
        for check in &case.checks {
            let failed = match *check {
                Check::Values(name, values) => {
                    (record.values(name) != values).then(|| format!("{name} values {values:?}"))
                }
                Check::Lacks(name) => {
                    (!record.values(name).is_empty()).then(|| format!("no {name}"))
                }
                Check::CleanChunks => (!record
                    .chunk_lines
                    .iter()
                    .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_hexdigit())))
                .then(|| "bare hex chunk-size lines".to_string()),
                Check::RequestLine(line) => {
                    (record.request_line != line).then(|| format!("request line {line:?}"))
                }
            };
            if let Some(wanted) = failed {
                problems.push(format!(
                    "primary: expected {wanted}, got {}",
                    record.describe()
                ));
            }
        }
    }
    problems
}

fn check_shadow(
    case: &Case,
    primary: &[RawRequest],
    shadow: &[RawRequest],
    refused: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    let expected = if refused {
        Shadow::Nothing
    } else {
        case.shadow
    };
    let same = || -> Vec<String> {
        let mut problems = Vec::new();
        let complete: Vec<&RawRequest> = primary.iter().filter(|r| r.complete).collect();
        if shadow.len() != complete.len() {
            problems.push(format!(
                "shadow: expected {} request(s) like the primary's, got {}",
                complete.len(),
                describe_all(shadow)
            ));
        }
        for p in complete {
            let twins: Vec<&RawRequest> = shadow.iter().filter(|s| s.id() == p.id()).collect();
            match twins.as_slice() {
                [twin] => {
                    if let Err(diff) = shadow_matches(p, twin) {
                        problems.push(format!("shadow differs from primary: {diff}"));
                    }
                }
                _ => problems.push(format!(
                    "shadow: expected one copy of {:?}, got {}",
                    p.id(),
                    twins.len()
                )),
            }
        }
        problems
    };
    match expected {
        Shadow::Same => problems.extend(same()),
        Shadow::SameOrNothing if !shadow.is_empty() => problems.extend(same()),
        Shadow::Nothing if !shadow.is_empty() => problems.push(format!(
            "shadow: expected nothing, got {}",
            describe_all(shadow)
        )),
        Shadow::NoComplete if shadow.iter().any(|r| r.complete) => problems.push(format!(
            "shadow: a broken body arrived complete: {}",
            describe_all(shadow)
        )),
        _ => {}
    }
    problems
}

fn describe_all(records: &[RawRequest]) -> String {
    if records.is_empty() {
        return "nothing".to_string();
    }
    let all: Vec<String> = records.iter().map(RawRequest::describe).collect();
    format!("{} request(s): {}", records.len(), all.join(" || "))
}

/// Ids of records that belong to no case and are no sentinel: a request the proxy made up
/// (or split off a hostile one) and forwarded.
fn strays(records: &[RawRequest], cases: &[Case]) -> Vec<String> {
    records
        .iter()
        .filter(|r| !r.id().is_some_and(|id| id.starts_with("sentinel-")))
        .filter(|r| !cases.iter().any(|c| belongs(r, c.name)))
        .map(RawRequest::describe)
        .collect()
}

/// The recording origin itself, with no proxy in between: it must keep what the table relies on
/// (duplicates, order, raw chunk-size lines, trailers) and never call a broken body complete.
#[tokio::test]
async fn the_recording_origin_keeps_requests_byte_exact() {
    let origin = common::raw_record::RecordingOrigin::start("direct").await;
    let sent = "POST /a HTTP/1.1\r\nHost: h\r\nX-D: 1\r\nx-d: 2\r\nx-test-id: one\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n1\r\n!\r\n0\r\nT: v\r\n\r\n\
                GET /b HTTP/1.1\r\nHost: h\r\nx-test-id: two\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok";
    let outcome = raw_request(origin.addr, sent.as_bytes(), &[false, false], ANSWER).await;
    assert_eq!(outcome.responses.len(), 2, "{}", outcome.describe());
    assert!(String::from_utf8_lossy(&outcome.responses[1].1).contains("two"));
    let one = &origin.with_id("one")[0];
    assert_eq!(one.request_line, "POST /a HTTP/1.1");
    assert_eq!(one.values("x-d"), ["1", "2"]);
    assert_eq!(one.headers[1], ("X-D".to_string(), "1".to_string()));
    assert_eq!(
        (one.framing.clone(), one.body.as_slice()),
        (Framing::Chunked, &b"hello!"[..])
    );
    assert_eq!(one.chunk_lines, ["5;e=1", "1", "0"]);
    assert_eq!(one.trailers, ["T: v"]);
    assert!(one.complete);
    let two = &origin.with_id("two")[0];
    assert_eq!(
        (two.framing.clone(), two.body.as_slice()),
        (Framing::Length(2), &b"ok"[..])
    );
    assert_eq!(two.values("content-length"), ["2", "2"]);
    assert_eq!((two.connection, two.position), (one.connection, 1));

    // A body cut short is recorded, but as incomplete.
    let cut = "POST /c HTTP/1.1\r\nHost: h\r\nx-test-id: three\r\nContent-Length: 10\r\n\r\nabc";
    let mut stream = tokio::net::TcpStream::connect(origin.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, cut.as_bytes())
        .await
        .unwrap();
    drop(stream);
    let deadline = std::time::Instant::now() + ANSWER;
    while origin.with_id("three").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "cut request not recorded"
        );
        tokio::task::yield_now().await;
    }
    let three = &origin.with_id("three")[0];
    assert!(
        !three.complete && three.body.is_empty(),
        "{}",
        three.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_or_forwarded_and_mirrored_faithfully() {
    let pair = MirroredPair::start().await;
    pair.settle(SETTLE).await.expect("proxy and origins ready");
    let cases = cases();
    assert!(cases.len() >= 45, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        assert!(
            case.name == "http09_request_line" || {
                let text = String::from_utf8_lossy(&case.raw);
                text.contains(TEST_ID)
            },
            "case {} carries no test id",
            case.name
        );
        let (primary_seen, shadow_seen) =
            (pair.primary.requests().len(), pair.shadow.requests().len());
        let head: Vec<bool> = match case.client {
            Client::Answers(n) => vec![false; n],
            _ => vec![case.raw.starts_with(b"HEAD ")],
        };
        let outcome = raw_request(pair.proxy.addr, &case.raw, &head, ANSWER).await;
        let mut problems = Vec::new();
        let accepted = match check_client(case, &outcome) {
            Ok(accepted) => accepted,
            Err(problem) => {
                problems.push(problem);
                outcome.responses.first().is_some_and(|r| r.0 / 100 == 2)
            }
        };
        if let Err(problem) = pair.settle(SETTLE).await {
            problems.push(problem);
        }
        let primary: Vec<RawRequest> = pair.primary.requests()[primary_seen..]
            .iter()
            .filter(|r| belongs(r, case.name))
            .cloned()
            .collect();
        let shadow: Vec<RawRequest> = pair.shadow.requests()[shadow_seen..]
            .iter()
            .filter(|r| belongs(r, case.name))
            .cloned()
            .collect();
        let refused = matches!(case.client, Client::Either) && !accepted;
        problems.extend(check_primary(case, &primary, refused));
        problems.extend(check_shadow(case, &primary, &shadow, refused));
        for origin in [&pair.primary, &pair.shadow] {
            let seen = if origin.name == "primary" {
                primary_seen
            } else {
                shadow_seen
            };
            let stray = strays(&origin.requests()[seen..], &cases);
            if !stray.is_empty() {
                problems.push(format!(
                    "{} got request(s) of no case: {}",
                    origin.name,
                    stray.join(" || ")
                ));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{}:\n    {}", case.name, problems.join("\n    ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
