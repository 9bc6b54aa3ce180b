//! In-process origin servers on loopback: a recording HTTP origin (HTTP/1.1 and h2c) with
//! configurable delays and health, and raw TCP origins that misbehave on purpose.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// One request as the origin saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub headers: HeaderMap,
    pub body_len: u64,
    pub body_sha256: String,
    pub received_at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What a recording origin answers when `OriginOptions::reply` is set.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// 200 with a JSON body.
    pub fn json(value: &serde_json::Value) -> Reply {
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: value.to_string().into_bytes(),
        }
    }

    pub fn status(mut self, status: u16) -> Reply {
        self.status = status;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Builds the answer to one request: (index of the request at this origin, from 0; path and query).
pub type Replier = Arc<dyn Fn(u64, &str) -> Reply + Send + Sync>;

/// How a recording origin behaves.
#[derive(Clone)]
pub struct OriginOptions {
    /// Put in the `x-origin` response header and the body, so tests see who answered.
    pub name: String,
    pub status: u16,
    /// Wait this long after reading the request body before answering.
    pub response_delay: Duration,
    /// Wait this long before reading each body frame: a slow reader.
    pub read_delay_per_frame: Duration,
    /// When set, answer a body of this many bytes (`body_of`) instead of the summary line.
    pub response_bytes: Option<usize>,
    /// Answer with this instead of the default text body (no `x-origin` header then).
    pub reply: Option<Replier>,
}

impl OriginOptions {
    pub fn named(name: &str) -> Self {
        OriginOptions {
            name: name.to_string(),
            status: 200,
            response_delay: Duration::ZERO,
            read_delay_per_frame: Duration::ZERO,
            response_bytes: None,
            reply: None,
        }
    }

    pub fn response_bytes(mut self, len: usize) -> Self {
        self.response_bytes = Some(len);
        self
    }

    /// Answer every request with `reply(index, path_and_query)`.
    pub fn reply(mut self, reply: impl Fn(u64, &str) -> Reply + Send + Sync + 'static) -> Self {
        self.reply = Some(Arc::new(reply));
        self
    }

    pub fn response_delay(mut self, delay: Duration) -> Self {
        self.response_delay = delay;
        self
    }

    pub fn read_delay_per_frame(mut self, delay: Duration) -> Self {
        self.read_delay_per_frame = delay;
        self
    }
}

struct Shared {
    options: OriginOptions,
    log: Mutex<Vec<Recorded>>,
    arrived: Notify,
    healthy: AtomicBool,
    answered: AtomicU64,
}

/// A recording origin: answers every request and keeps what it received.
/// `GET /healthz` answers 200 or 503 (see `set_healthy`) and is not recorded.
pub struct Origin {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Origin {
    pub async fn start(options: OriginOptions) -> Origin {
        let listener = super::ports::listener().await;
        Self::serve(listener, options)
    }

    /// Start on a given address, e.g. to bring a stopped origin back on its port.
    pub async fn start_on(addr: SocketAddr, options: OriginOptions) -> Origin {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => return Self::serve(listener, options),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot bind origin on {addr}: {e}"),
            }
        }
    }

    fn serve(listener: TcpListener, options: OriginOptions) -> Origin {
        let addr = listener.local_addr().expect("origin address");
        let shared = Arc::new(Shared {
            options,
            log: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            healthy: AtomicBool::new(true),
            answered: AtomicU64::new(0),
        });
        let state = shared.clone();
        let task = accept_each(listener, move |stream| {
            let state = state.clone();
            async move {
                let service = service_fn(move |req| handle(req, state.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        });
        Origin { addr, shared, task }
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.shared.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log.lock().expect("origin log").clone()
    }

    pub fn count(&self) -> usize {
        self.shared.log.lock().expect("origin log").len()
    }

    /// Wait until at least `n` requests have arrived; panic after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.shared.arrived.notified();
            let requests = self.requests();
            if requests.len() >= n {
                return requests;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "origin {} got {} requests, expected {n} within {timeout:?}",
                    self.shared.options.name,
                    requests.len()
                );
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    /// Stop accepting; the port is closed once this returns.
    pub async fn stop(mut self) -> SocketAddr {
        self.task.abort();
        let _ = (&mut self.task).await;
        self.addr
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let options = &state.options;
    if req.uri().path() == "/healthz" {
        let status = if state.healthy.load(Ordering::SeqCst) {
            200
        } else {
            503
        };
        return Ok(Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"health\n")))
            .expect("response"));
    }
    let method = req.method().to_string();
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers = req.headers().clone();
    let mut body = req.into_body();
    let mut hasher = Sha256::new();
    let mut body_len = 0u64;
    loop {
        if !options.read_delay_per_frame.is_zero() {
            tokio::time::sleep(options.read_delay_per_frame).await;
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    body_len += data.len() as u64;
                }
            }
            Some(Err(_)) => {
                // A body that broke off is not a request we record.
                return Ok(Response::builder()
                    .status(400)
                    .body(Full::new(Bytes::new()))
                    .expect("response"));
            }
            None => break,
        }
    }
    state.log.lock().expect("origin log").push(Recorded {
        method: method.clone(),
        uri: uri.clone(),
        headers,
        body_len,
        body_sha256: hex(&hasher.finalize()),
        received_at: Instant::now(),
    });
    state.arrived.notify_waiters();
    if !options.response_delay.is_zero() {
        tokio::time::sleep(options.response_delay).await;
    }
    if let Some(reply) = &options.reply {
        let index = state.answered.fetch_add(1, Ordering::SeqCst);
        let reply = reply(index, &uri);
        let mut response = Response::builder().status(reply.status);
        for (name, value) in &reply.headers {
            response = response.header(name.as_str(), value.as_str());
        }
        return Ok(response
            .body(Full::new(Bytes::from(reply.body)))
            .expect("response"));
    }
    let body = match options.response_bytes {
        Some(len) => Bytes::from(super::body_of(len)),
        None => Bytes::from(format!("{} {method} {uri} {body_len}\n", options.name)),
    };
    let response = Response::builder()
        .status(options.status)
        .header("x-origin", options.name.as_str());
    // As a server must (RFC 9110 §9.3.2): a GET's header, no body. hyper leaves the
    // body out of an HTTP/1 answer to HEAD by itself, but sends it as DATA over HTTP/2,
    // which an HTTP/2 client must treat as a malformed response.
    let (response, body) = if method == "HEAD" {
        (response.header("content-length", body.len()), Bytes::new())
    } else {
        (response, body)
    };
    Ok(response.body(Full::new(body)).expect("response"))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a body, as the recording origin reports it.
pub fn sha256_hex(body: &[u8]) -> String {
    hex(&Sha256::digest(body))
}

/// How a raw origin misbehaves.
#[derive(Clone, Copy, Debug)]
pub enum Misbehavior {
    /// Read this many bytes of the request, then reset the connection.
    ResetAfter(usize),
    /// Read the request header, then answer bytes that are not HTTP.
    Garbage,
    /// Accept, then never read: writes to it stall once the socket buffers fill.
    Stall,
    /// A keep-alive origin (Content-Length bodies only) that, on its first
    /// connection, resets once it has this many bytes of the second request's
    /// body; every other request is answered `200 ok`. A proxy's reused
    /// connection failing mid-body.
    ResetReusedMidBody(usize),
    /// A keep-alive origin (Content-Length bodies only) that answers `200 ok` as soon
    /// as it has a request's header, then reads the body before the next request.
    AnswersBeforeBody,
    /// Not a misbehaviour: a WebSocket server as far as a proxy sees it. Answers the
    /// request `101 Switching Protocols`, then echoes every byte until the peer
    /// closes; the request head goes to `answered`.
    UpgradeEcho,
}

/// A TCP origin that breaks the protocol on purpose. Counts accepted connections.
pub struct RawOrigin {
    pub addr: SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// Bodies of requests answered by `ResetReusedMidBody`.
    answered: Arc<Mutex<Vec<Vec<u8>>>>,
    task: JoinHandle<()>,
}

impl RawOrigin {
    pub async fn start(behavior: Misbehavior) -> RawOrigin {
        let listener = super::ports::listener().await;
        let addr = listener.local_addr().expect("address");
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let counter = accepted.clone();
        let log = answered.clone();
        let task = accept_each(listener, move |mut stream| {
            let index = counter.fetch_add(1, Ordering::SeqCst);
            let log = log.clone();
            async move {
                let mut buf = vec![0u8; 16 * 1024];
                match behavior {
                    Misbehavior::ResetAfter(limit) => {
                        let mut seen = 0;
                        while seen < limit {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen += n,
                            }
                        }
                        // Linger 0 turns the close into a reset.
                        let _ = stream.set_zero_linger();
                        drop(stream);
                    }
                    Misbehavior::Garbage => {
                        let mut got = Vec::new();
                        if read_head(&mut stream, &mut got, &mut buf).await.is_none() {
                            return;
                        }
                        let _ = stream.write_all(b"this is not http at all\r\n\r\n").await;
                        let _ = stream.shutdown().await;
                    }
                    Misbehavior::ResetReusedMidBody(after) => {
                        let reset_after = (index == 0).then_some(after);
                        serve_keep_alive(stream, reset_after, false, log).await;
                    }
                    Misbehavior::AnswersBeforeBody => {
                        serve_keep_alive(stream, None, true, log).await;
                    }
                    Misbehavior::UpgradeEcho => {
                        let mut got = Vec::new();
                        let Some(head_end) = read_head(&mut stream, &mut got, &mut buf).await
                        else {
                            return;
                        };
                        log.lock()
                            .expect("answered log")
                            .push(got[..head_end].to_vec());
                        let switched = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
                        if stream.write_all(switched).await.is_err()
                            || stream.write_all(&got[head_end..]).await.is_err()
                        {
                            return;
                        }
                        let (mut from, mut to) = stream.split();
                        let _ = tokio::io::copy(&mut from, &mut to).await;
                    }
                    Misbehavior::Stall => {
                        // Hold the connection open, unread, until the peer gives up.
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        drop(stream);
                    }
                }
            }
        });
        RawOrigin {
            addr,
            accepted,
            answered,
            task,
        }
    }

    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Bodies of the requests answered so far (request heads for `UpgradeEcho`).
    pub fn answered(&self) -> Vec<Vec<u8>> {
        self.answered.lock().expect("answered log").clone()
    }
}

/// Read from `stream` into `got` until it holds a whole request head; the head's length
/// with its blank line, or `None` if the peer closes first.
async fn read_head(
    stream: &mut tokio::net::TcpStream,
    got: &mut Vec<u8>,
    scratch: &mut [u8],
) -> Option<usize> {
    loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(at + 4);
        }
        match stream.read(scratch).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&scratch[..n]),
        }
    }
}

/// Minimal HTTP/1.1 keep-alive server for Content-Length bodies; `answer_early`
/// answers each request once its header is in, before reading its body.
async fn serve_keep_alive(
    mut stream: tokio::net::TcpStream,
    reset_second_request_after: Option<usize>,
    answer_early: bool,
    log: Arc<Mutex<Vec<Vec<u8>>>>,
) {
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    for request_index in 0.. {
        let Some(head_end) = read_head(&mut stream, &mut buf, &mut chunk).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if let Some(after) = reset_second_request_after.filter(|_| request_index == 1) {
            // Take in everything the proxy has sent so far, then reset mid-body.
            while buf.len() < head_end + after {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = stream.set_zero_linger();
            return;
        }
        if answer_early && stream.write_all(ANSWER).await.is_err() {
            return;
        }
        while buf.len() < head_end + length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end..head_end + length].to_vec();
        buf.drain(..head_end + length);
        log.lock().expect("answered log").push(body);
        if !answer_early && stream.write_all(ANSWER).await.is_err() {
            return;
        }
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accept connections on `listener` until the task is aborted, each served by `serve`
/// in a task of its own.
fn accept_each<F, Fut>(listener: TcpListener, mut serve: F) -> JoinHandle<()>
where
    F: FnMut(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve(stream));
        }
    })
}

/// A request as `TrailersOrigin` received it: its header, and its trailers if any.
pub type RequestWithTrailers = (http::request::Parts, Option<http::HeaderMap>);

/// An HTTP/2 cleartext origin that answers as a gRPC server does: a header, a body, then
/// trailers (`grpc-status: 0`). Records each request's header fields, and any trailers.
pub struct TrailersOrigin {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<RequestWithTrailers>>>,
    task: JoinHandle<()>,
}

impl TrailersOrigin {
    pub async fn start() -> TrailersOrigin {
        let listener = super::ports::listener().await;
        let addr = listener.local_addr().expect("address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let task = accept_each(listener, move |stream| {
            let log = log.clone();
            async move {
                let Ok(mut connection) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((request, respond))) = connection.accept().await {
                    tokio::spawn(answer_with_trailers(request, respond, log.clone()));
                }
            }
        });
        TrailersOrigin {
            addr,
            received,
            task,
        }
    }

    /// Each request's header and trailers, in arrival order.
    pub fn received(&self) -> Vec<RequestWithTrailers> {
        self.received.lock().expect("received log").clone()
    }
}

impl Drop for TrailersOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer_with_trailers(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    log: Arc<Mutex<Vec<RequestWithTrailers>>>,
) {
    let (parts, mut body) = request.into_parts();
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
    }
    let trailers = body.trailers().await.ok().flatten();
    log.lock().expect("received log").push((parts, trailers));
    let response = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .expect("response");
    let Ok(mut send) = respond.send_response(response, false) else {
        return;
    };
    let _ = send.send_data(Bytes::from_static(b"\0\0\0\0\x02hi"), false);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    trailers.insert("grpc-message", http::HeaderValue::from_static("ok"));
    let _ = send.send_trailers(trailers);
}
