//! Property test of mirroring fidelity: a few hundred generated HTTP/1.1 requests (seeded, so
//! every run sends the same ones) mixing ordinary and duplicate headers, `Connection`
//! nominations, `Transfer-Encoding`/`Content-Length` combinations and bodies. For every request
//! the proxy accepts, the shadow must get exactly what the primary got (modulo the mirror's
//! edits) and the primary must get the body the client meant; for every request it refuses,
//! neither origin may get anything.
//!
//! `SHADOW_FIDELITY_SEED=<n>` replays another sequence.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::raw_record::{
    ClientOutcome, MirroredPair, RawRequest, TEST_ID, raw_request, shadow_matches,
};

const REQUESTS: usize = 240;
const DEFAULT_SEED: u64 = 0x5eed_f1de_1171;
const ANSWER: Duration = Duration::from_secs(3);
const SETTLE: Duration = Duration::from_secs(10);

/// xorshift64*: small, deterministic, good enough to pick test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn token(&mut self, max: usize) -> String {
        const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~";
        let len = 1 + self.below(max);
        (0..len).map(|_| *self.pick(CHARS) as char).collect()
    }

    /// A header value: tokens, sometimes with inner spaces, commas or `=`.
    fn value(&mut self) -> String {
        let mut value = self.token(10);
        for _ in 0..self.below(3) {
            value.push(*self.pick(&[' ', ',', '=', ';']));
            value.push_str(&self.token(6));
        }
        value
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// How the generated body is framed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum BodyForm {
    None,
    Length,
    Chunked,
    /// `Content-Length` (of the chunked encoding) and `Transfer-Encoding: chunked`.
    LengthAndChunked,
    /// `Transfer-Encoding: identity` then `Transfer-Encoding: chunked`.
    IdentityThenChunked,
    /// `Transfer-Encoding: chunked` twice.
    ChunkedTwice,
    /// Two identical `Content-Length` lines.
    LengthTwice,
    /// One `Transfer-Encoding: identity, chunked` line.
    IdentityChunkedList,
}

const BODY_FORMS: &[BodyForm] = &[
    BodyForm::Length,
    BodyForm::Chunked,
    BodyForm::LengthAndChunked,
    BodyForm::IdentityThenChunked,
    BodyForm::ChunkedTwice,
    BodyForm::LengthTwice,
    BodyForm::IdentityChunkedList,
];

/// `chunked` is case-insensitive (RFC 9112 §7).
const CHUNKED_SPELLINGS: [&str; 3] = ["chunked", "Chunked", "CHUNKED"];

/// Tokens a generated `Connection` header may nominate.
const NOMINATIONS: &[&str] = &[
    "content-length",
    "Transfer-Encoding",
    "host",
    "X-Forwarded-For",
    "keep-alive",
    "te",
    "upgrade",
    "x-a",
    "close",
    "X-Dup",
];

const ORDINARY: &[&str] = &[
    "Accept",
    "accept",
    "User-Agent",
    "Cache-Control",
    "X-A",
    "x-a",
    "X-Dup",
    "Cookie",
    "Accept-Language",
];

struct Generated {
    id: String,
    raw: Vec<u8>,
    method: &'static str,
    /// The body the client means, de-chunked.
    body: Vec<u8>,
    /// Features of this request, to tabulate failures by.
    tags: Vec<String>,
    /// Asks for a protocol switch: such a request may legitimately go unmirrored.
    upgrade: bool,
    /// Why the proxy must refuse this request (RFC 9112 §3.2, §6.1; protected nominations).
    must_refuse: Vec<&'static str>,
}

fn chunked(body: &[u8], rng: &mut Rng) -> String {
    let mut out = String::new();
    let mut rest = body;
    while !rest.is_empty() {
        let take = (1 + rng.below(rest.len())).min(rest.len());
        out.push_str(&format!("{take:x}\r\n"));
        out.push_str(std::str::from_utf8(&rest[..take]).expect("ascii body"));
        out.push_str("\r\n");
        rest = &rest[take..];
    }
    out.push_str("0\r\n\r\n");
    out
}

fn generate(index: usize, rng: &mut Rng) -> Generated {
    let id = format!("f{index}");
    let method = *rng.pick(&["GET", "POST", "PUT", "HEAD"]);
    let mut tags = vec![method.to_string()];
    let mut must_refuse = Vec::new();
    let mut headers: Vec<(String, String)> = Vec::new();
    // HTTP/1.0 only with framings it has (no chunked).
    let mut version = if rng.chance(6) {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    match rng.below(100) {
        0..=2 => tags.push("no-host".to_string()),
        3..=4 => {
            headers.push(("Host".to_string(), "h".to_string()));
            headers.push(("Host".to_string(), "other".to_string()));
            tags.push("two-hosts".to_string());
            must_refuse.push("two Host lines");
        }
        _ => headers.push(("Host".to_string(), "h".to_string())),
    }
    for _ in 0..rng.below(5) {
        let name = rng.pick(ORDINARY).to_string();
        headers.push((name, rng.value()));
    }
    if rng.chance(20) {
        headers.push((format!("X-R-{}", rng.token(6)), rng.value()));
    }
    if rng.chance(30) {
        let (name, _) = rng.pick(&[("X-Dup", ""), ("x-dup", ""), ("Accept", "")]);
        headers.push((name.to_string(), rng.value()));
        headers.push((name.to_string(), rng.value()));
        tags.push("dup-header".to_string());
    }
    let mut upgrade = false;
    if rng.chance(35) {
        let mut nominated: Vec<&str> = Vec::new();
        for _ in 0..1 + rng.below(4) {
            let token = *rng.pick(NOMINATIONS);
            if !nominated.contains(&token) {
                nominated.push(token);
            }
        }
        for token in &nominated {
            tags.push(format!("conn:{}", token.to_ascii_lowercase()));
            if matches!(*token, "host" | "X-Forwarded-For") {
                must_refuse.push("Connection nominates a protected header");
            }
            match token.to_ascii_lowercase().as_str() {
                "keep-alive" if rng.chance(50) => {
                    headers.push(("Keep-Alive".to_string(), "timeout=5".to_string()))
                }
                "te" if rng.chance(50) => headers.push(("TE".to_string(), "trailers".to_string())),
                "upgrade" if rng.chance(50) => {
                    headers.push(("Upgrade".to_string(), "foo/1".to_string()));
                    upgrade = true;
                }
                "x-a" => headers.push(("X-A".to_string(), rng.value())),
                _ => {}
            }
        }
        if nominated.len() > 1 && rng.chance(30) {
            let (first, second) = nominated.split_at(1);
            headers.push(("Connection".to_string(), first.join(", ")));
            headers.push(("Connection".to_string(), second.join(",")));
        } else {
            headers.push(("Connection".to_string(), nominated.join(", ")));
        }
    }
    let with_body = match method {
        "POST" | "PUT" => rng.chance(85),
        _ => rng.chance(15),
    };
    let form = if with_body {
        *rng.pick(BODY_FORMS)
    } else {
        BodyForm::None
    };
    let body: Vec<u8> = if form == BodyForm::None {
        Vec::new()
    } else {
        let len = if form == BodyForm::Length && rng.chance(10) {
            0
        } else {
            1 + rng.below(40)
        };
        (0..len)
            .map(|_| *rng.pick(b"abcdefghijklmnopqrstuvwxyz0123456789 "))
            .collect()
    };
    if !matches!(
        form,
        BodyForm::None | BodyForm::Length | BodyForm::LengthTwice
    ) {
        version = "HTTP/1.1";
    }
    if version == "HTTP/1.1" && tags.iter().any(|t| t == "no-host") {
        must_refuse.push("HTTP/1.1 without Host");
    }
    if version == "HTTP/1.0" {
        tags.push("http/1.0".to_string());
    }
    if form == BodyForm::LengthAndChunked {
        must_refuse.push("Content-Length with Transfer-Encoding");
    }
    let encoded = chunked(&body, rng);
    let text = String::from_utf8(body.clone()).expect("ascii body");
    let wire = match form {
        BodyForm::None => String::new(),
        BodyForm::Length | BodyForm::LengthTwice => text,
        _ => encoded.clone(),
    };
    let te = |v: &str| ("Transfer-Encoding".to_string(), v.to_string());
    let cl = |n: usize| ("Content-Length".to_string(), n.to_string());
    match form {
        BodyForm::None => {}
        BodyForm::Length => headers.push(cl(body.len())),
        BodyForm::LengthTwice => {
            headers.push(cl(body.len()));
            headers.push(cl(body.len()));
        }
        BodyForm::Chunked => {
            let coding = *rng.pick(&CHUNKED_SPELLINGS);
            headers.push(te(coding))
        }
        BodyForm::LengthAndChunked => {
            headers.push(cl(encoded.len()));
            headers.push(te("chunked"));
        }
        BodyForm::IdentityThenChunked => {
            headers.push(te("identity"));
            headers.push(te("chunked"));
        }
        BodyForm::ChunkedTwice => {
            headers.push(te("chunked"));
            headers.push(te("chunked"));
        }
        BodyForm::IdentityChunkedList => headers.push(te("identity, chunked")),
    }
    if form != BodyForm::None {
        tags.push(format!("body:{form:?}"));
        if rng.chance(10) {
            headers.push(("Expect".to_string(), "100-continue".to_string()));
            tags.push("expect".to_string());
        }
    }
    if rng.chance(10) {
        headers.push((
            "Proxy-Authorization".to_string(),
            format!("Basic {}", rng.token(12)),
        ));
        tags.push("proxy-authorization".to_string());
    }
    rng.shuffle(&mut headers);
    // The id goes first so even a request mangled later in its header stays attributable.
    headers.insert(0, (TEST_ID.to_string(), id.clone()));
    let mut raw = format!("{method} /f/{index}?q={} {version}\r\n", rng.token(8));
    for (name, value) in &headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    raw.push_str("\r\n");
    raw.push_str(&wire);
    Generated {
        id,
        raw: raw.into_bytes(),
        method,
        body,
        tags,
        upgrade,
        must_refuse,
    }
}

/// What went wrong with one request.
struct Failure {
    id: String,
    tags: Vec<String>,
    raw: String,
    problems: Vec<String>,
}

fn check(
    request: &Generated,
    outcome: &ClientOutcome,
    primary: &[RawRequest],
    shadow: &[RawRequest],
) -> Vec<String> {
    let mut problems = Vec::new();
    let status = outcome.responses.first().map(|r| r.0);
    match status {
        None => {
            problems.push(format!("no response: {}", outcome.describe()));
            if primary.iter().chain(shadow).any(|r| r.complete) {
                problems.push("unanswered, yet an origin got a complete request".to_string());
            }
        }
        Some(status) if status / 100 == 4 => {
            if !primary.is_empty() {
                problems.push(format!(
                    "refused {status}, yet the primary got {}",
                    primary[0].describe()
                ));
            }
            if !shadow.is_empty() {
                problems.push(format!(
                    "refused {status}, yet the shadow got {}",
                    shadow[0].describe()
                ));
            }
        }
        Some(status) => {
            if !request.must_refuse.is_empty() {
                problems.push(format!(
                    "answered {status}, must refuse: {}",
                    request.must_refuse.join(", ")
                ));
            }
            if status / 100 != 2 {
                problems.push(format!("answered {status}: {}", outcome.describe()));
            }
            match primary {
                [p] if p.complete => {
                    if p.body != request.body {
                        problems.push(format!(
                            "primary body {:?}, client sent {:?}",
                            String::from_utf8_lossy(&p.body),
                            String::from_utf8_lossy(&request.body)
                        ));
                    }
                    match shadow {
                        [s] => {
                            if let Err(diff) = shadow_matches(p, s) {
                                problems.push(format!("shadow differs: {diff}"));
                            }
                        }
                        [] if request.upgrade => {}
                        _ => problems.push(format!(
                            "accepted, expected one shadow copy, got {}",
                            shadow.len()
                        )),
                    }
                }
                _ => problems.push(format!(
                    "accepted, expected one complete primary request, got {}",
                    primary.len()
                )),
            }
        }
    }
    problems
}

/// A problem message without its request-specific details.
fn problem_kind(problem: &str) -> String {
    let problem = problem.strip_prefix("shadow differs: ").unwrap_or(problem);
    // Framing headers' values are the point; other headers' values are random.
    if [
        "header transfer-encoding",
        "header content-length",
        "header host",
    ]
    .iter()
    .any(|p| problem.starts_with(p))
    {
        return problem.to_string();
    }
    let cut = problem.find(['"', '[', '(']).unwrap_or(problem.len());
    format!("{}...", problem[..cut].chars().take(90).collect::<String>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shadow_gets_exactly_what_the_primary_got() {
    let seed = std::env::var("SHADOW_FIDELITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let mut rng = Rng(seed.max(1));
    let pair = MirroredPair::start().await;
    pair.settle(SETTLE).await.expect("proxy and origins ready");

    let requests: Vec<Generated> = (0..REQUESTS).map(|i| generate(i, &mut rng)).collect();
    let mut outcomes = Vec::new();
    for request in &requests {
        let head = [request.method == "HEAD"];
        outcomes.push(raw_request(pair.proxy.addr, &request.raw, &head, ANSWER).await);
    }
    pair.settle(SETTLE).await.expect("mirror settles");

    let primary_log = pair.primary.requests();
    let shadow_log = pair.shadow.requests();
    let of = |log: &[RawRequest], id: &str| -> Vec<RawRequest> {
        log.iter().filter(|r| r.id() == Some(id)).cloned().collect()
    };
    let mut failures = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for (request, outcome) in requests.iter().zip(&outcomes) {
        match outcome.responses.first().map(|r| r.0 / 100) {
            Some(4) => refused += 1,
            Some(_) => accepted += 1,
            None => {}
        }
        let problems = check(
            request,
            outcome,
            &of(&primary_log, &request.id),
            &of(&shadow_log, &request.id),
        );
        if !problems.is_empty() {
            failures.push(Failure {
                id: request.id.clone(),
                tags: request.tags.clone(),
                raw: String::from_utf8_lossy(&request.raw).into_owned(),
                problems,
            });
        }
    }
    let strays: Vec<String> = primary_log
        .iter()
        .chain(&shadow_log)
        .filter(|r| {
            !r.id().is_some_and(|id| {
                id.starts_with("sentinel-") || requests.iter().any(|q| q.id == id)
            })
        })
        .map(RawRequest::describe)
        .collect();

    println!(
        "seed {seed}: {} requests, {accepted} accepted, {refused} refused, {} failed, {} stray origin requests",
        requests.len(),
        failures.len(),
        strays.len()
    );
    let mut by_tag: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for request in &requests {
        let failed = failures.iter().any(|f| f.id == request.id);
        for tag in &request.tags {
            let entry = by_tag.entry(tag.as_str()).or_default();
            entry.0 += 1;
            entry.1 += usize::from(failed);
        }
    }
    let mut report = String::from("failed/total by feature:\n");
    for (tag, (total, failed)) in &by_tag {
        report.push_str(&format!("  {tag:28} {failed:4} / {total}\n"));
    }
    // One example per kind of problem, so a single dominant bug does not hide the others.
    let mut kinds: BTreeMap<String, (usize, &Failure)> = BTreeMap::new();
    for failure in &failures {
        for problem in &failure.problems {
            for part in problem.split("; ") {
                kinds.entry(problem_kind(part)).or_insert((0, failure)).0 += 1;
            }
        }
    }
    report.push_str("\nproblems by kind (count, first example):\n");
    for (kind, (count, failure)) in &kinds {
        report.push_str(&format!(
            "\n{count:4} x {kind}\n  e.g. {} [{}]\n  sent: {:?}\n  {}\n",
            failure.id,
            failure.tags.join(" "),
            failure.raw,
            failure.problems.join("\n  ")
        ));
    }
    for stray in strays.iter().take(5) {
        report.push_str(&format!("\nstray origin request: {stray}\n"));
    }
    assert!(
        failures.is_empty() && strays.is_empty(),
        "{} of {} generated requests failed (seed {seed}), {} stray origin requests\n{report}",
        failures.len(),
        requests.len(),
        strays.len()
    );
}
