//! Byte-exact HTTP/1.1 recording: an origin that parses requests itself, so tests see the
//! request line, header lines (order, case, duplicates) and body framing exactly as the proxy
//! sent them, and a raw client that reads responses without normalising anything.
//!
//! hyper would fold or reject exactly the things hostile tests need to see (duplicate
//! `Content-Length`, chunk-size lines, trailers), hence a hand-written parser.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Header every test request carries so records can be matched to what was sent.
pub const TEST_ID: &str = "x-test-id";

/// Header the proxy adds to every shadow request.
pub const MIRROR_MARKER: &str = "x-shadowgate-mirror";

/// How a request's body was delimited on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// Neither `Content-Length` nor `Transfer-Encoding`.
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// One request as received, byte for byte where it matters.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// Index of the connection it arrived on, per origin, from 0.
    pub connection: usize,
    /// Position on that connection, from 0.
    pub position: usize,
    /// The request line without its CRLF.
    pub request_line: String,
    /// Header lines as received: name as spelled, value without surrounding whitespace.
    pub headers: Vec<(String, String)>,
    pub framing: Framing,
    /// The chunk-size lines of a chunked body as received (last one is the `0` line).
    pub chunk_lines: Vec<String>,
    /// Lines of the trailer section of a chunked body.
    pub trailers: Vec<String>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// False when the connection ended (or the framing broke) before the request did.
    pub complete: bool,
}

impl RawRequest {
    /// Every value of header `name` (case-insensitive), in order.
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.values(name).into_iter().next()
    }

    /// The test id the request carried, if any.
    pub fn id(&self) -> Option<&str> {
        self.header(TEST_ID)
    }

    /// Headers grouped by lowercased name, values in arrival order.
    pub fn header_multiset(&self) -> BTreeMap<String, Vec<String>> {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, value) in &self.headers {
            map.entry(name.to_ascii_lowercase())
                .or_default()
                .push(value.clone());
        }
        map
    }

    /// One-line summary for failure messages.
    pub fn describe(&self) -> String {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(n, v)| format!("{n}: {}", clip(v)))
            .collect();
        format!(
            "{:?} [{}] {:?} chunk lines {:?} trailers {:?} body {:?}{}",
            self.request_line,
            headers.join(" | "),
            self.framing,
            self.chunk_lines,
            self.trailers,
            String::from_utf8_lossy(&self.body),
            if self.complete { "" } else { " INCOMPLETE" }
        )
    }
}

/// At most 80 characters of `text`, for failure messages.
fn clip(text: &str) -> String {
    match text.char_indices().nth(80) {
        Some((at, _)) => format!("{}...({} bytes)", &text[..at], text.len()),
        None => text.to_string(),
    }
}

/// Check that `shadow` is `primary` modulo the edits a mirror makes by default: the marker
/// header added, `Expect` and `Proxy-Authorization` removed. Same request line, same
/// header multiset (lowercased names, values in order), same framing kind, same body bytes.
pub fn shadow_matches(primary: &RawRequest, shadow: &RawRequest) -> Result<(), String> {
    let mut problems = Vec::new();
    if !shadow.complete {
        problems.push("shadow request is incomplete".to_string());
    }
    if primary.request_line != shadow.request_line {
        problems.push(format!(
            "request line: primary {:?}, shadow {:?}",
            primary.request_line, shadow.request_line
        ));
    }
    let mut expected = primary.header_multiset();
    expected.remove("expect");
    expected.remove("proxy-authorization");
    expected
        .entry(MIRROR_MARKER.to_string())
        .or_default()
        .push("1".to_string());
    let actual = shadow.header_multiset();
    for (name, values) in &expected {
        match actual.get(name) {
            Some(got) if got == values => {}
            Some(got) => problems.push(format!(
                "header {name}: primary {:?}, shadow {:?}",
                clipped(values),
                clipped(got)
            )),
            None => problems.push(format!(
                "header {name}: primary {:?}, shadow has none",
                clipped(values)
            )),
        }
    }
    for (name, values) in &actual {
        if !expected.contains_key(name) {
            problems.push(format!(
                "header {name}: only at shadow {:?}",
                clipped(values)
            ));
        }
    }
    // The header lines themselves: the primary's, in its order and spelling, less the
    // two dropped fields, then the marker.
    let dropped = |name: &str| {
        name.eq_ignore_ascii_case("expect") || name.eq_ignore_ascii_case("proxy-authorization")
    };
    let marker = (MIRROR_MARKER.to_string(), "1".to_string());
    let expected_lines: Vec<&(String, String)> = primary
        .headers
        .iter()
        .filter(|(name, _)| !dropped(name))
        .chain(std::iter::once(&marker))
        .collect();
    let actual_lines: Vec<&(String, String)> = shadow.headers.iter().collect();
    if problems.is_empty() && expected_lines != actual_lines {
        problems.push(format!(
            "header order or spelling: primary {:?}, shadow {:?}",
            expected_lines, actual_lines
        ));
    }
    if primary.framing != shadow.framing {
        problems.push(format!(
            "framing: primary {:?}, shadow {:?}",
            primary.framing, shadow.framing
        ));
    }
    if primary.body != shadow.body {
        problems.push(format!(
            "body: primary {:?}, shadow {:?}",
            String::from_utf8_lossy(&primary.body),
            String::from_utf8_lossy(&shadow.body)
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn clipped(values: &[String]) -> Vec<String> {
    values.iter().map(|v| clip(v)).collect()
}

struct Log {
    requests: Mutex<Vec<RawRequest>>,
    arrived: Notify,
}

/// A keep-alive origin that records every request it parses, complete or not, and answers
/// each complete one `200` with body `<name> <test id>\n`.
pub struct RecordingOrigin {
    pub addr: SocketAddr,
    pub name: String,
    log: Arc<Log>,
    task: JoinHandle<()>,
}

impl RecordingOrigin {
    pub async fn start(name: &str) -> RecordingOrigin {
        let listener = super::ports::listener().await;
        let addr = listener.local_addr().expect("origin address");
        let log = Arc::new(Log {
            requests: Mutex::new(Vec::new()),
            arrived: Notify::new(),
        });
        let connections = Arc::new(AtomicUsize::new(0));
        let shared = log.clone();
        let origin_name = name.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let index = connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, index, origin_name.clone(), shared.clone()));
            }
        });
        RecordingOrigin {
            addr,
            name: name.to_string(),
            log,
            task,
        }
    }

    /// Every request so far, in the order they were recorded.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.log.requests.lock().expect("origin log").clone()
    }

    /// The requests that carried test id `id`.
    pub fn with_id(&self, id: &str) -> Vec<RawRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.id() == Some(id))
            .collect()
    }

    /// Wait until a complete request with test id `id` has arrived; false after `timeout`.
    pub async fn wait_for_id(&self, id: &str, timeout: Duration) -> bool {
        self.wait_until(
            |log| log.iter().any(|r| r.id() == Some(id) && r.complete),
            timeout,
        )
        .await
    }

    /// Wait until the log satisfies `done`; false after `timeout`.
    pub async fn wait_until(
        &self,
        done: impl Fn(&[RawRequest]) -> bool,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.log.arrived.notified();
            if done(&self.requests()) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }
}

impl Drop for RecordingOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn record(log: &Log, request: RawRequest) {
    log.requests.lock().expect("origin log").push(request);
    log.arrived.notify_waiters();
}

/// Buffered reads from one connection.
struct Reader {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Reader {
    /// Read more bytes; false at end of stream or on error.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The bytes up to and without the next CRLF, consumed with it.
    async fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..i].to_vec();
                self.buf.drain(..i + 2);
                return Some(line);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Exactly `n` bytes.
    async fn exact(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn serve(stream: TcpStream, connection: usize, name: String, log: Arc<Log>) {
    let mut reader = Reader {
        stream,
        buf: Vec::new(),
    };
    for position in 0.. {
        let mut request = RawRequest {
            connection,
            position,
            request_line: String::new(),
            headers: Vec::new(),
            framing: Framing::None,
            chunk_lines: Vec::new(),
            trailers: Vec::new(),
            body: Vec::new(),
            complete: false,
        };
        let Some(line) = reader.line().await else {
            if !reader.buf.is_empty() {
                request.request_line = text(&reader.buf);
                record(&log, request);
            }
            return;
        };
        request.request_line = text(&line);
        // Header lines until the empty line.
        loop {
            let Some(line) = reader.line().await else {
                record(&log, request);
                return;
            };
            if line.is_empty() {
                break;
            }
            let line = text(&line);
            let (name, value) = line.split_once(':').unwrap_or((line.as_str(), ""));
            request.headers.push((
                name.to_string(),
                value.trim_matches([' ', '\t']).to_string(),
            ));
        }
        let is_head = request.request_line.starts_with("HEAD ");
        if !read_body(&mut reader, &mut request).await {
            record(&log, request);
            return;
        }
        request.complete = true;
        let id = request.id().unwrap_or("-").to_string();
        record(&log, request);
        let body = format!("{name} {id}\n");
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-origin: {name}\r\n\r\n",
            body.len()
        );
        let mut response = head.into_bytes();
        if !is_head {
            response.extend_from_slice(body.as_bytes());
        }
        if reader.stream.write_all(&response).await.is_err() {
            return;
        }
    }
}

/// Read the body the headers announce into `request`; false if it broke off or the
/// framing is invalid (the connection is then closed).
async fn read_body(reader: &mut Reader, request: &mut RawRequest) -> bool {
    let codings: Vec<String> = request
        .values("transfer-encoding")
        .iter()
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    if !codings.is_empty() {
        request.framing = Framing::Chunked;
        if codings.last().map(String::as_str) != Some("chunked") {
            return false;
        }
        return read_chunked(reader, request).await;
    }
    let lengths: Vec<&str> = request.values("content-length");
    if let Some(first) = lengths.first() {
        let Ok(length) = first.parse::<u64>() else {
            return false;
        };
        if lengths.iter().any(|l| l != first) {
            return false;
        }
        request.framing = Framing::Length(length);
        let Some(body) = reader.exact(length as usize).await else {
            return false;
        };
        request.body = body;
    }
    true
}

async fn read_chunked(reader: &mut Reader, request: &mut RawRequest) -> bool {
    loop {
        let Some(line) = reader.line().await else {
            return false;
        };
        let line = text(&line);
        request.chunk_lines.push(line.clone());
        let digits = line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(digits, 16) else {
            return false;
        };
        if size == 0 {
            loop {
                let Some(trailer) = reader.line().await else {
                    return false;
                };
                if trailer.is_empty() {
                    return true;
                }
                request.trailers.push(text(&trailer));
            }
        }
        let Some(data) = reader.exact(size).await else {
            return false;
        };
        request.body.extend_from_slice(&data);
        if reader.exact(2).await.as_deref() != Some(b"\r\n") {
            return false;
        }
    }
}

/// What a raw client saw after sending its bytes.
#[derive(Debug, Clone)]
pub struct ClientOutcome {
    /// Final (non-1xx) responses in order: status and body.
    pub responses: Vec<(u16, Vec<u8>)>,
    /// Interim (1xx) statuses seen.
    pub interim: Vec<u16>,
    /// The server closed (or reset) the connection before all awaited responses arrived.
    pub closed: bool,
    /// Neither the responses nor a close arrived in time.
    pub timed_out: bool,
    /// Unparsable response bytes, if any.
    pub garbage: Option<String>,
}

impl ClientOutcome {
    pub fn describe(&self) -> String {
        let responses: Vec<String> = self
            .responses
            .iter()
            .map(|(s, b)| format!("{s} {:?}", String::from_utf8_lossy(b)))
            .collect();
        format!(
            "responses [{}]{}{}{}{}",
            responses.join(", "),
            if self.interim.is_empty() {
                String::new()
            } else {
                format!(" interim {:?}", self.interim)
            },
            if self.closed { " closed" } else { "" },
            if self.timed_out { " TIMED OUT" } else { "" },
            self.garbage
                .as_ref()
                .map(|g| format!(" garbage {g:?}"))
                .unwrap_or_default()
        )
    }
}

/// Send `request` on a fresh connection and read up to `expected` final responses (responses
/// to HEAD requests, per `head`, carry no body). Stops at close, garbage or `timeout`.
pub async fn raw_request(
    addr: SocketAddr,
    request: &[u8],
    head: &[bool],
    timeout: Duration,
) -> ClientOutcome {
    let mut outcome = ClientOutcome {
        responses: Vec::new(),
        interim: Vec::new(),
        closed: false,
        timed_out: false,
        garbage: None,
    };
    let stream = TcpStream::connect(addr).await.expect("connect to proxy");
    let mut reader = Reader {
        stream,
        buf: Vec::new(),
    };
    // A server may refuse and close before taking every byte: that is a close, not a test error.
    if reader.stream.write_all(request).await.is_err() {
        outcome.closed = true;
    }
    let read = async {
        for &is_head in head {
            match read_response(&mut reader, is_head, &mut outcome.interim).await {
                Ok(Some(response)) => outcome.responses.push(response),
                Ok(None) => {
                    outcome.closed = true;
                    return;
                }
                Err(garbage) => {
                    outcome.garbage = Some(garbage);
                    return;
                }
            }
        }
    };
    if tokio::time::timeout(timeout, read).await.is_err() {
        outcome.timed_out = true;
    }
    outcome
}

/// One final response; `Ok(None)` if the connection ended first.
async fn read_response(
    reader: &mut Reader,
    head: bool,
    interim: &mut Vec<u16>,
) -> Result<Option<(u16, Vec<u8>)>, String> {
    loop {
        let Some(status_line) = reader.line().await else {
            return Ok(None);
        };
        let status_line = text(&status_line);
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| status_line.clone())?;
        let mut headers = Vec::new();
        loop {
            let Some(line) = reader.line().await else {
                return Ok(None);
            };
            if line.is_empty() {
                break;
            }
            let line = text(&line).to_ascii_lowercase();
            if let Some((n, v)) = line.split_once(':') {
                headers.push((n.trim().to_string(), v.trim().to_string()));
            }
        }
        if (100..200).contains(&status) {
            interim.push(status);
            continue;
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        if head || status == 204 || status == 304 {
            return Ok(Some((status, Vec::new())));
        }
        if get("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
            let mut request = RawRequest {
                connection: 0,
                position: 0,
                request_line: String::new(),
                headers: Vec::new(),
                framing: Framing::Chunked,
                chunk_lines: Vec::new(),
                trailers: Vec::new(),
                body: Vec::new(),
                complete: false,
            };
            if !read_chunked(reader, &mut request).await {
                return Ok(None);
            }
            return Ok(Some((status, request.body)));
        }
        if let Some(length) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            return match reader.exact(length).await {
                Some(body) => Ok(Some((status, body))),
                None => Ok(None),
            };
        }
        // Close-delimited.
        while reader.fill().await {}
        return Ok(Some((status, std::mem::take(&mut reader.buf))));
    }
}

/// A proxy whose route `api` sends everything to a recording `primary` and mirrors 100% of
/// every usual method to a recording `shadow`.
pub struct MirroredPair {
    pub proxy: crate::common::Proxy,
    pub primary: RecordingOrigin,
    pub shadow: RecordingOrigin,
    sentinels: AtomicUsize,
}

impl MirroredPair {
    pub async fn start() -> MirroredPair {
        Self::start_with_listener("").await
    }

    /// The same with these listener settings (`    h2c: true` for HTTP/2 clients).
    pub async fn start_with_listener(listener_extra: &str) -> MirroredPair {
        let primary = RecordingOrigin::start("primary").await;
        let shadow = RecordingOrigin::start("shadow").await;
        let proxy = crate::common::Proxy::start_with_listener(listener_extra, &format!(
            "upstreams:\n{}{}routes:\n  - name: api\n    upstream: app\n    mirrors:\n      - upstream: shadow\n        percentage: 100\n        methods: [GET, HEAD, OPTIONS, POST, PUT, DELETE, PATCH]\n",
            crate::common::pool("app", &[primary.addr], ""),
            crate::common::pool("shadow", &[shadow.addr], ""),
        ))
        .await;
        MirroredPair {
            proxy,
            primary,
            shadow,
            sentinels: AtomicUsize::new(0),
        }
    }

    /// Make sure everything sent before has reached both origins or never will: send a
    /// known-good sentinel request on a new connection, wait until both origins recorded it,
    /// then until every sampled shadow request has completed or been abandoned.
    pub async fn settle(&self, timeout: Duration) -> Result<(), String> {
        let n = self.sentinels.fetch_add(1, Ordering::SeqCst);
        let id = format!("sentinel-{n}");
        let request =
            format!("GET /sentinel HTTP/1.1\r\nHost: sentinel\r\n{TEST_ID}: {id}\r\n\r\n");
        let outcome = raw_request(self.proxy.addr, request.as_bytes(), &[false], timeout).await;
        if outcome.responses.first().map(|r| r.0) != Some(200) {
            return Err(format!(
                "sentinel {id} not answered 200: {}",
                outcome.describe()
            ));
        }
        for origin in [&self.primary, &self.shadow] {
            if !origin.wait_for_id(&id, timeout).await {
                return Err(format!("sentinel {id} never reached the {}", origin.name));
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let (open, in_flight, text) = self.open_shadows().await;
            if open == 0.0 && in_flight == 0.0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "mirror metrics did not settle: {open} sampled shadows neither completed nor abandoned, {in_flight} in flight\n{}",
                    text.lines()
                        .filter(|l| l.starts_with("shadowgate_mirror"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sampled shadows not yet completed or abandoned, shadows in flight, and the metrics page.
    async fn open_shadows(&self) -> (f64, f64, String) {
        use crate::common::proxy::sample;
        let text = self.proxy.metrics_text().await;
        let route = [("route", "api")];
        let sampled = sample(&text, "shadowgate_mirror_sampled_total", &route);
        let completed = sample(&text, "shadowgate_mirror_completed_total", &route);
        let abandoned = sample(&text, "shadowgate_mirror_abandoned_total", &route)
            - sample(
                &text,
                "shadowgate_mirror_abandoned_total",
                &[("route", "api"), ("reason", "method")],
            );
        let in_flight = sample(&text, "shadowgate_mirror_in_flight", &route);
        (sampled - completed - abandoned, in_flight, text)
    }
}
