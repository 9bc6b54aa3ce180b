//! The client side of the listeners: a `ServerApp` around Pingora's HTTP proxy that enforces
//! `listeners[].client` — connection caps, a total header deadline, idle, body and send timeouts,
//! header and body size, and the fields a client's header may not carry further (names with an
//! underscore, the mirror's marker).
//!
//! Pingora's own HTTP/1 loop applies its keep-alive timeout to each `read()` of the header, so a
//! client sending a byte now and then holds a connection for ever. This app runs that loop
//! itself: it waits for the next request with the keep-alive timeout, then races the request
//! against a deadline that `early_request_filter` disarms once the header is in. On an h2c
//! port the first bytes decide, within the same deadline: the HTTP/2 preface goes to Pingora,
//! anything else to this loop.
//!
//! A TLS connection is counted against the caps before its handshake (`TlsAdmission`), so
//! handshakes that stall or fail cannot hold more connections than the caps allow.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use http::HeaderName;
use log::debug;
use pingora_core::apps::{
    HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp,
};
use pingora_core::listeners::PreTlsProcess;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::http::v2::server::H2Options;
use pingora_core::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{ALPN, GetSocketDigest, Shutdown, SocketDigest, Stream};
use pingora_core::server::ShutdownWatch;
use pingora_core::upstreams::peer::{Tracer, Tracing};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::RequestHeader;
use pingora_proxy::{HttpProxy, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, Sleep, sleep};

use crate::config::ListenerConfig;
use crate::limits::{ClientLimits, HeaderRules, LimitsByListener, UnderscoreHeaders, listens_on};
use crate::metrics::{ListenerMetrics, Metrics};
use crate::mirror::MARKER_HEADER;
use crate::proxy::ShadowGate;

/// How long a refused connection may take to send its request before it gets its 503,
/// and then to close its side after reading it.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

tokio::task_local! {
    /// The request being read on this connection's task; read by `header_received`.
    static CURRENT_REQUEST: Arc<RequestState>;
}

/// What the proxy's first filter needs to know about the request it runs in.
struct RequestState {
    header_received: AtomicBool,
    header: HeaderRules,
    /// False when the listener has keep-alive off.
    keepalive: bool,
}

/// Called from `early_request_filter`, which Pingora runs right after the header was read:
/// stops the header clock, applies the listener's keep-alive switch (Pingora has just set
/// keep-alive from the request's own `Connection` header), answers 431 to a header over
/// the listener's limits, applies its rule for field names with an underscore and drops a
/// client's own mirror marker. Returns the listener's `max_body_bytes` (a route may
/// override it: `check_body_length` applies the one that holds).
pub fn header_received(session: &mut Session, listeners: &LimitsByListener) -> Result<Option<u64>> {
    let checked = CURRENT_REQUEST.try_with(|state| {
        state.header_received.store(true, Ordering::Relaxed);
        if !state.keepalive {
            session.set_keepalive(None);
        }
        check_header(session, &state.header)
    });
    // Outside `ClientGate`'s loop: an HTTP/2 stream.
    checked.unwrap_or_else(|_| http2_stream_received(session, listeners))
}

/// The same for an HTTP/2 stream, which Pingora runs in a task of its own, outside
/// `ClientGate`'s loop: its listener, found by the connection's local address, gives it the
/// send and body timeouts and the header rules an HTTP/1 request has.
fn http2_stream_received(
    session: &mut Session,
    listeners: &LimitsByListener,
) -> Result<Option<u64>> {
    let local = session
        .digest()
        .and_then(|d| d.socket_digest.as_ref())
        .and_then(|d| d.local_addr())
        .and_then(|a| a.as_inet())
        .copied();
    let Some(listener) = listeners.of(local) else {
        return Ok(None);
    };
    let downstream = session.as_downstream_mut();
    downstream.set_write_timeout(Some(listener.client.send_timeout()));
    downstream.set_read_timeout(Some(listener.client.body_timeout()));
    check_header(session, &listener.header)
}

fn check_header(session: &mut Session, rules: &HeaderRules) -> Result<Option<u64>> {
    let found = check_header_size(session.req_header(), rules)?;
    if found.mirror_marker {
        // Only shadowgate marks a mirrored request: a client's marker could pass a
        // real request off as a shadow copy to a primary that skips work for those.
        session.req_header_mut().remove_header(MARKER_HEADER);
        debug!("dropped a client's {MARKER_HEADER} field");
    }
    if found.underscored {
        apply_underscore_rule(session, rules)?;
    }
    Ok(rules.max_body_bytes)
}

/// A body limit (`max_body_bytes`, if any) against the declared `Content-Length`: 413 and
/// close when over it (the body is not read: nothing of it goes anywhere). Without a
/// length (chunked, or HTTP/2 without one) the body is counted as it streams: the limit
/// is returned for that.
pub fn check_body_length(session: &mut Session, limit: Option<u64>) -> Result<Option<u64>> {
    let Some(max) = limit else {
        return Ok(None);
    };
    // Pingora has checked the field (one value, or equal ones) on HTTP/1; `h2` checks
    // an HTTP/2 stream's DATA against it.
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(length) if length > max => {
            session.set_keepalive(None);
            body_too_large(max)
        }
        Some(_) => Ok(None),
        // What follows an upgrade (a WebSocket) is a tunnel, not a request body.
        None if crate::request::is_upgrade(session.req_header()) => Ok(None),
        None => Ok(Some(max)),
    }
}

/// The 413 for a request body over its `max_body_bytes` (the route's or the listener's).
pub fn body_too_large<T>(max: u64) -> Result<T> {
    Error::e_explain(
        ErrorType::HTTPStatus(413),
        format!("request body over max_body_bytes ({max})"),
    )
}

/// Fields a client sent that the edge does not pass on as they are, found in the
/// pass that measures the header.
#[derive(Debug, Default, PartialEq, Eq)]
struct Found {
    /// A field name has an underscore (`headers_with_underscores`).
    underscored: bool,
    /// The mirror's marker field, which only shadowgate may set.
    mirror_marker: bool,
}

/// 431 for a header over the listener's limits; else what it holds that the edge acts on.
fn check_header_size(req: &RequestHeader, rules: &HeaderRules) -> Result<Found> {
    let count = req.headers.len() as u64;
    if count > rules.max_fields {
        return Error::e_explain(
            ErrorType::HTTPStatus(431),
            format!(
                "request has {count} header fields; the listener allows {}",
                rules.max_fields
            ),
        );
    }
    let (bytes, found) = measure_header(req);
    if bytes > rules.max_bytes {
        return Error::e_explain(
            ErrorType::HTTPStatus(431),
            format!(
                "request header is {bytes} bytes; the listener allows {}",
                rules.max_bytes
            ),
        );
    }
    Ok(found)
}

/// `headers_with_underscores`: drop such fields before anything reads them (routing,
/// keys, the primary's and the shadows' headers), or refuse the request.
fn apply_underscore_rule(session: &mut Session, rules: &HeaderRules) -> Result<()> {
    match rules.underscores {
        UnderscoreHeaders::Allow => Ok(()),
        UnderscoreHeaders::Reject => {
            rules.underscore_counts.rejected.inc();
            // Whatever follows on this connection is not worth reading either.
            session.set_keepalive(None);
            Error::e_explain(
                ErrorType::HTTPStatus(400),
                "a header field name has an underscore (listener's headers_with_underscores: reject)",
            )
        }
        UnderscoreHeaders::Drop => {
            rules.underscore_counts.dropped.inc();
            let dropped = drop_underscored_fields(session.req_header_mut());
            debug!("dropped header fields with underscores: {dropped:?}");
            Ok(())
        }
    }
}

/// Remove every field whose name has an underscore; returns their names.
fn drop_underscored_fields(req: &mut RequestHeader) -> Vec<HeaderName> {
    let names: Vec<HeaderName> = req
        .headers
        .keys()
        .filter(|name| has_underscore(name))
        .cloned()
        .collect();
    for name in &names {
        req.remove_header(name);
    }
    names
}

fn has_underscore(name: &HeaderName) -> bool {
    name.as_str().as_bytes().contains(&b'_')
}

/// Size of the header as sent (request line and fields with their separators), and
/// the fields the edge acts on: one pass over the fields for both.
fn measure_header(req: &RequestHeader) -> (u64, Found) {
    let request_line = req.method.as_str().len() + 1 + req.raw_path().len() + 1 + 8 + 2;
    let mut fields = 0;
    let mut found = Found::default();
    for (name, value) in &req.headers {
        fields += name.as_str().len() + 2 + value.len() + 2;
        found.underscored |= has_underscore(name);
        found.mirror_marker |= name.as_str() == MARKER_HEADER;
    }
    ((request_line + fields + 2) as u64, found)
}

/// The proxy, fronted by each listener's client limits.
pub struct ClientGate {
    proxy: Arc<HttpProxy<ShadowGate>>,
    listeners: Arc<[Arc<ListenerState>]>,
}

/// One listener's limits and its open connections.
struct ListenerState {
    address: SocketAddr,
    limits: ClientLimits,
    header: HeaderRules,
    open: AtomicU32,
    open_per_ip: Mutex<HashMap<IpAddr, u32>>,
    metrics: ListenerMetrics,
    /// Its HTTP/2 connections' idle timeout and request count (see `ListenerHttp2`).
    http2_options: HttpServerOptions,
}

/// The proxy as one listener's HTTP/2 connections see it. Pingora's HTTP/2 accept
/// loop reads the idle timeout and the request count from the app's server options,
/// which are one per service; through this each listener has its own, and the
/// requests still go to the one proxy (its upstream pools, its filters).
struct ListenerHttp2 {
    proxy: Arc<HttpProxy<ShadowGate>>,
    listener: Arc<ListenerState>,
}

/// The service's server options with the listener's HTTP/2 limits.
fn http2_options(service: Option<&HttpServerOptions>, limits: &ClientLimits) -> HttpServerOptions {
    let mut options = service.cloned().unwrap_or_default();
    // Pingora keeps an idle HTTP/2 connection for ever unless told otherwise.
    options.h2_idle_timeout = Some(limits.h2_idle_timeout());
    // GOAWAY after `keepalive_requests` streams, as NGINX does.
    options.keepalive_request_limit = Some(limits.keepalive_requests);
    options
}

#[async_trait]
impl HttpServerApp for ListenerHttp2 {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        self.proxy.process_new_http(session, shutdown).await
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.proxy.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.listener.http2_options)
    }
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Total,
    PerIp,
}

/// A connection's place in its listener's counts, given back when dropped.
struct Slot {
    listener: Arc<ListenerState>,
    ip: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let listener = &self.listener;
        listener.open.fetch_sub(1, Ordering::Relaxed);
        listener.metrics.open.dec();
        if let Some(ip) = self.ip {
            let mut per_ip = lock(&listener.open_per_ip);
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

/// The address a per-IP cap counts: an IPv4 address as it is (also when it arrives
/// IPv4-mapped on a dual-stack socket), an IPv6 address by its /64 prefix, since one
/// IPv6 client usually holds a whole /64 and could otherwise open the cap's worth of
/// connections from every address in it.
fn per_client(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The counts stay consistent even if a holder panicked: each update is one step.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ListenerState {
    fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> std::result::Result<Slot, Refusal> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.limits.max_connections {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Total);
        }
        let ip = ip.map(per_client);
        if let Some(ip) = ip {
            let mut per_ip = lock(&self.open_per_ip);
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= self.limits.max_connections_per_ip {
                drop(per_ip);
                self.open.fetch_sub(1, Ordering::Relaxed);
                return Err(Refusal::PerIp);
            }
            *n += 1;
        }
        self.metrics.open.inc();
        Ok(Slot {
            listener: self.clone(),
            ip,
        })
    }

    fn count_refusal(&self, why: Refusal, ip: Option<IpAddr>) {
        match why {
            Refusal::Total => self.metrics.refused_total.inc(),
            Refusal::PerIp => self.metrics.refused_per_ip.inc(),
        }
        debug!(
            "refusing a connection from {ip:?} on {}: {why:?} limit",
            self.address
        );
    }

    fn serves(&self, local: SocketAddr) -> bool {
        listens_on(self.address, local)
    }
}

impl ClientGate {
    pub fn new(
        proxy: Arc<HttpProxy<ShadowGate>>,
        listeners: &[ListenerConfig],
        metrics: &Metrics,
    ) -> Self {
        let listeners = listeners
            .iter()
            .map(|l| {
                Arc::new(ListenerState {
                    address: l.address.0,
                    limits: l.client.clone(),
                    header: HeaderRules::new(&l.client, l.address.0, metrics),
                    open: AtomicU32::new(0),
                    open_per_ip: Mutex::new(HashMap::new()),
                    metrics: metrics.listener(&l.address.to_string(), l.tls.is_some()),
                    http2_options: http2_options(proxy.server_options(), &l.client),
                })
            })
            .collect();
        ClientGate { proxy, listeners }
    }

    /// The pre-TLS step that admits this gate's TLS connections (see `TlsAdmission`).
    pub fn tls_admission(&self) -> Arc<TlsAdmission> {
        Arc::new(TlsAdmission {
            listeners: self.listeners.clone(),
        })
    }

    /// An HTTP/2 connection, served by Pingora with the listener's limits.
    async fn serve_http2(
        &self,
        listener: &Arc<ListenerState>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let app = Arc::new(ListenerHttp2 {
            proxy: self.proxy.clone(),
            listener: listener.clone(),
        });
        app.process_new(stream, shutdown).await
    }

    /// The HTTP/1 keep-alive loop of one connection, with the listener's limits.
    async fn serve_http1(
        &self,
        listener: &ListenerState,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) {
        let limits = &listener.limits;
        let keepalive = limits.keepalive_timeout();
        // Pingora applies its keep-alive timeout to each read of the first header (and then
        // re-derives it from the request's `Connection` header); the header deadline below is
        // the real bound, so Pingora's must never be the shorter.
        let pingora_keepalive = keepalive.map(|k| k.max(limits.header_timeout()).as_secs().max(1));
        // Between requests the connection waits for the next one's first bytes holding
        // no request state (`Peek::wait_for_data`): on a plain socket in its read buffer
        // (on the socket itself without one), over TLS on the socket under the session. A
        // TLS stream of another kind could not be waited on: there the header deadline
        // also covers the idle wait.
        let can_wait = stream.get_ssl_digest().is_none() || is_rustls(&stream);
        let reused_deadline = if can_wait {
            limits.header_timeout()
        } else {
            limits.header_timeout() + keepalive.unwrap_or_default()
        };
        let mut next: Option<(Stream, Option<HttpPersistentSettings>)> = Some((stream, None));
        let mut first = true;
        // One per connection, re-armed for each request.
        let state = Arc::new(RequestState {
            header_received: AtomicBool::new(false),
            header: listener.header.clone(),
            keepalive: keepalive.is_some(),
        });
        // The connection's two clocks, each re-armed only when a request needs it (see `rearmed`).
        let mut idle_timer = pin!(sleep(Duration::ZERO));
        let mut header_timer = pin!(sleep(Duration::ZERO));
        // One wait for shutdown per connection, kept between requests: making one per
        // idle wait cost a clone of the watch and a waiter registration each time.
        let mut shutdown_begins = pin!(shutting_down(shutdown));
        while let Some((mut stream, settings)) = next.take() {
            // A pipelined request is already read (Pingora holds its bytes), so
            // waiting for the socket would stall it until the keep-alive timeout.
            let pipelined = settings.as_ref().is_some_and(|s| s.has_pipelined_prefix());
            if !first && can_wait && !pipelined {
                let Some(arrived) = next_request_arrives(
                    stream,
                    keepalive,
                    idle_timer.as_mut(),
                    shutdown_begins.as_mut(),
                )
                .await
                else {
                    return;
                };
                stream = arrived;
            }
            let deadline = if first {
                limits.header_timeout()
            } else {
                reused_deadline
            };
            let mut session = ServerSession::new_http1(stream);
            match settings {
                Some(settings) => settings.apply_to_session(&mut session),
                None => {
                    session.set_keepalive(pingora_keepalive);
                    // The first request plus this many more.
                    session.set_keepalive_reuses_remaining(Some(limits.keepalive_requests - 1));
                }
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            // Like NGINX: a response that starts before the request body is in (an
            // upstream answering early) still lets the connection carry the next
            // request once the rest of the body is read, within the body timeout.
            session.set_close_on_response_before_downstream_finish(false);
            session.set_total_drain_timeout(Some(limits.body_timeout()));
            session.set_read_timeout(Some(limits.body_timeout()));
            session.set_write_timeout(Some(limits.send_timeout()));
            state.header_received.store(false, Ordering::Relaxed);
            let request = CURRENT_REQUEST.scope(
                state.clone(),
                self.proxy.process_new_http(session, shutdown),
            );
            let reusable = tokio::select! {
                // The request first: a header read whole by its first poll needs no clock.
                biased;
                reusable = request => reusable,
                _ = header_deadline(&state, header_timer.as_mut(), deadline) => {
                    debug!("request header not received within {deadline:?}: closing");
                    listener.metrics.header_timeouts.inc();
                    return;
                }
            };
            next = reusable.map(|r| r.consume());
            first = false;
        }
    }
}

/// What a client with prior knowledge of HTTP/2 sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a cleartext client opens with the HTTP/2 preface. Peeks only as far as it
/// takes to tell: an HTTP/1 request differs within its first 3 bytes, so a request
/// shorter than the preface is not kept waiting. The bytes stay for the parser.
async fn opens_with_h2_preface(stream: &mut Stream) -> std::io::Result<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    for len in [1, 3, H2_PREFACE.len()] {
        if !stream.try_peek(&mut buf[..len]).await? || buf[..len] != H2_PREFACE[..len] {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Wait for the first bytes of the next request on a kept-alive connection, without
/// reading them: `None` when the client stays idle past the keep-alive timeout, closes,
/// or the server is shutting down. Waiting here rather than in Pingora's request reader
/// keeps an idle connection small (no request state, no header buffer) and lets the
/// header deadline start at the request's first byte.
async fn next_request_arrives(
    mut stream: Stream,
    keepalive: Option<Duration>,
    mut timer: Pin<&mut Sleep>,
    mut shutdown_begins: Pin<&mut impl Future<Output = ()>>,
) -> Option<Stream> {
    let keepalive = keepalive?;
    // Data that arrives stays for the request reader: in the read buffer, or on the socket.
    // A busy connection keeps its buffers; one quiet for a while gives them back until
    // its client speaks again (as NGINX frees an idle connection's buffers).
    let first = keepalive.min(RELEASE_BUFFERS_AFTER);
    let waited = idle_wait(
        stream.wait_for_data(),
        first,
        timer.as_mut(),
        shutdown_begins.as_mut(),
    )
    .await;
    match waited {
        Idle::Arrived => return Some(stream),
        Idle::TimedOut if first < keepalive => stream.release_buffers(),
        Idle::TimedOut | Idle::Ended => return None,
    }
    let waited = idle_wait(
        stream.wait_for_data(),
        keepalive - first,
        timer,
        shutdown_begins,
    )
    .await;
    matches!(waited, Idle::Arrived).then_some(stream)
}

/// How long a kept-alive connection waits for its next request with its buffers.
const RELEASE_BUFFERS_AFTER: Duration = Duration::from_secs(1);

/// How an idle wait ended.
enum Idle {
    Arrived,
    TimedOut,
    /// The client closed, the connection failed, or the server is shutting down.
    Ended,
}

/// Wait for `arrives` (data came) for at most `limit`, and until shutdown.
async fn idle_wait(
    arrives: impl Future<Output = std::io::Result<bool>>,
    limit: Duration,
    timer: Pin<&mut Sleep>,
    shutdown_begins: Pin<&mut impl Future<Output = ()>>,
) -> Idle {
    tokio::select! {
        // A request already waiting needs no clock.
        biased;
        arrived = arrives => match arrived {
            Ok(true) => Idle::Arrived,
            _ => Idle::Ended,
        },
        _ = rearmed(timer, limit) => Idle::TimedOut,
        _ = shutdown_begins => Idle::Ended,
    }
}

/// A server-side TLS stream as Pingora's rustls listeners make it.
type RustlsStream = pingora_core::protocols::tls::TlsStream<L4Stream>;

fn is_rustls(stream: &Stream) -> bool {
    stream.as_any().is::<RustlsStream>()
}

async fn shutting_down(shutdown: &ShutdownWatch) {
    let mut watch = shutdown.clone();
    while !*watch.borrow_and_update() {
        if watch.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves when the header has not arrived within `limit`; never once it has.
async fn header_deadline(state: &RequestState, timer: Pin<&mut Sleep>, limit: Duration) {
    // Polled right after the request's first poll: a header read whole by then needs no clock.
    if !state.header_received.load(Ordering::Relaxed) {
        rearmed(timer, limit).await;
    }
    if state.header_received.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
}

/// Re-arm one of a connection's timers for `limit` from now and wait for it.
///
/// Each connection keeps its timers for its whole life rather than making one per request:
/// moving a registered tokio timer's deadline later only stores a number (tokio re-files the
/// timer when the old deadline comes), where a new timer per request costs an insert and a
/// removal in tokio's timer wheel and, being the earliest timer, often an eventfd write by
/// which tokio wakes its own thread (counted with `perf trace`: docs/bench/history.md).
async fn rearmed(mut timer: Pin<&mut Sleep>, limit: Duration) {
    timer.as_mut().reset(Instant::now() + limit);
    timer.await
}

/// Answer 503 to a connection over a limit. The request (if it comes quickly) is read first
/// and the client's close awaited briefly, so the answer is not lost to a reset.
async fn refuse(mut stream: Stream, why: Refusal) {
    let body: &[u8] = match why {
        Refusal::Total => b"too many connections to this listener\n",
        Refusal::PerIp => b"too many connections from your address\n",
    };
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut buf = [0u8; 2048];
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        let mut tail = [0u8; 4];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    for &b in &buf[..n] {
                        tail = [tail[1], tail[2], tail[3], b];
                    }
                    if &tail == b"\r\n\r\n" {
                        return;
                    }
                }
            }
        }
    })
    .await;
    if stream.write_all(response.as_bytes()).await.is_err()
        || stream.write_all(body).await.is_err()
        || stream.flush().await.is_err()
    {
        return;
    }
    Shutdown::shutdown(&mut *stream).await;
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[async_trait]
impl ServerApp for ClientGate {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(listener) = listener_of(&self.listeners, stream.get_socket_digest()) else {
            // Not one of ours (cannot happen): Pingora's own handling.
            return self.proxy.process_new(stream, shutdown).await;
        };
        // A TLS connection was admitted before its handshake: its slot goes with the stream.
        let _slot = if stream.get_ssl_digest().is_some() {
            None
        } else {
            let ip = peer_ip(stream.get_socket_digest());
            match listener.admit(ip) {
                Ok(slot) => Some(slot),
                Err(why) => {
                    listener.count_refusal(why, ip);
                    refuse(stream, why).await;
                    return None;
                }
            }
        };
        // HTTP/2 is served by Pingora with the listener's idle timeout and request
        // count (`ListenerHttp2`), each stream gets its limits in
        // `http2_stream_received`, and the connection caps apply here. HTTP/1, over
        // TLS or cleartext, with or without h2c on the port, gets the loop below.
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.serve_http2(listener, stream, shutdown).await;
        }
        let h2c = self.proxy.server_options().is_some_and(|o| o.h2c);
        if h2c && stream.get_ssl_digest().is_none() {
            let limit = listener.limits.header_timeout();
            match tokio::time::timeout(limit, opens_with_h2_preface(&mut stream)).await {
                // Pingora peeks again and finds the preface in the rewound bytes.
                Ok(Ok(true)) => return self.serve_http2(listener, stream, shutdown).await,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    debug!("connection closed before its first request: {e}");
                    return None;
                }
                Err(_) => {
                    debug!("no request within {limit:?} on an h2c listener: closing");
                    listener.metrics.header_timeouts.inc();
                    return None;
                }
            }
        }
        self.serve_http1(listener, stream, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }

    /// Failed TLS handshakes are the internet's background noise (scanners, clients
    /// giving up): counted, and logged at debug rather than Pingora's error level.
    fn handshake_failed(&self, endpoint: &str, peer: Option<&PeerAddr>, error: &Error) {
        if error.etype() == &REFUSED_BEFORE_HANDSHAKE {
            return; // counted as a refusal by `TlsAdmission`
        }
        // The endpoint is the listener's address as configured.
        let listener = endpoint
            .parse::<SocketAddr>()
            .ok()
            .and_then(|address| self.listeners.iter().find(|l| l.address == address));
        if let Some(failures) = listener.and_then(|l| l.metrics.tls_handshake_failures.as_ref()) {
            if error.etype() == &ErrorType::TLSHandshakeTimedout {
                failures.timeout.inc();
            } else {
                failures.failed.inc();
            }
        }
        debug!("TLS handshake on {endpoint} with {peer:?} failed: {error}");
    }
}

/// The listener a connection came in on, by its local address.
fn listener_of(
    listeners: &[Arc<ListenerState>],
    digest: Option<Arc<SocketDigest>>,
) -> Option<&Arc<ListenerState>> {
    if let [only] = listeners {
        return Some(only);
    }
    let local = *digest?.local_addr()?.as_inet()?;
    listeners.iter().find(|l| l.serves(local))
}

fn peer_ip(digest: Option<Arc<SocketDigest>>) -> Option<IpAddr> {
    digest.and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
}

/// The error a TLS connection over a cap is dropped with, before its handshake.
const REFUSED_BEFORE_HANDSHAKE: ErrorType = ErrorType::Custom("RefusedBeforeHandshake");

/// Counts a TLS connection against its listener's caps before the handshake (Pingora runs
/// this pre-TLS step inside the handshake's deadline). Admitted, the connection's slot is
/// carried by the socket itself and given back when the socket is dropped, whether the
/// handshake fails or the connection ends later. Over a cap, the connection is dropped
/// before any TLS work: a client cannot be sent a 503 before its handshake.
pub struct TlsAdmission {
    listeners: Arc<[Arc<ListenerState>]>,
}

#[async_trait]
impl PreTlsProcess for TlsAdmission {
    async fn process(&self, stream: &mut L4Stream) -> Result<()> {
        let Some(listener) = listener_of(&self.listeners, stream.get_socket_digest()) else {
            return Ok(());
        };
        let ip = peer_ip(stream.get_socket_digest());
        match listener.admit(ip) {
            Ok(slot) => {
                // The stream's tracer is the one thing Pingora keeps with the socket and
                // drops with it.
                stream.tracer = Some(Tracer(Box::new(SlotHolder { _slot: Some(slot) })));
                Ok(())
            }
            Err(why) => {
                listener.count_refusal(why, ip);
                Error::e_explain(REFUSED_BEFORE_HANDSHAKE, format!("{why:?} limit"))
            }
        }
    }
}

/// Holds a TLS connection's slot for as long as Pingora keeps its socket.
struct SlotHolder {
    _slot: Option<Slot>,
}

impl std::fmt::Debug for SlotHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotHolder")
    }
}

impl Tracing for SlotHolder {
    fn on_connected(&self) {}
    fn on_disconnected(&self) {}
    fn boxed_clone(&self) -> Box<dyn Tracing> {
        // A copy must not give the slot back a second time.
        Box::new(SlotHolder { _slot: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: usize, value_len: usize) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/path", None).unwrap();
        for i in 0..headers {
            req.append_header(format!("x-h{i}"), "v".repeat(value_len))
                .unwrap();
        }
        req
    }

    fn listener(address: &str, max_connections: u32, per_ip: u32) -> Arc<ListenerState> {
        Arc::new(ListenerState {
            address: address.parse().unwrap(),
            limits: ClientLimits {
                max_connections,
                max_connections_per_ip: per_ip,
                ..ClientLimits::default()
            },
            header: rules(32 * 1024, 100),
            open: AtomicU32::new(0),
            open_per_ip: Mutex::new(HashMap::new()),
            metrics: Metrics::global().listener(&format!("unit-{address}"), false),
            http2_options: HttpServerOptions::default(),
        })
    }

    #[test]
    fn http2_options_are_the_services_with_the_listeners_limits() {
        let mut service = HttpServerOptions::default();
        service.h2c = true;
        let limits = ClientLimits {
            keepalive_timeout_ms: 1500,
            keepalive_requests: 7,
            ..ClientLimits::default()
        };
        let options = http2_options(Some(&service), &limits);
        assert!(options.h2c);
        assert_eq!(options.h2_idle_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(options.keepalive_request_limit, Some(7));
    }

    #[test]
    fn slots_count_total_and_per_ip_and_are_given_back() {
        let l = listener("127.0.0.1:1", 3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = l.admit(Some(a)).unwrap();
        let _a2 = l.admit(Some(a)).unwrap();
        assert!(matches!(l.admit(Some(a)), Err(Refusal::PerIp)));
        let _b1 = l.admit(Some(b)).unwrap();
        assert!(matches!(l.admit(Some(b)), Err(Refusal::Total)));
        drop(a1);
        assert_eq!(l.open.load(Ordering::Relaxed), 2);
        let _a3 = l.admit(Some(a)).unwrap();
        assert_eq!(lock(&l.open_per_ip).get(&a), Some(&2));
    }

    #[test]
    fn ipv6_clients_are_capped_per_64_and_mapped_ipv4_as_ipv4() {
        let l = listener("[::]:1", 10, 2);
        let host = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let a = l.admit(host("2001:db8:1:2::1")).unwrap();
        let _b = l.admit(host("2001:db8:1:2:ffff::9")).unwrap();
        assert!(
            matches!(l.admit(host("2001:db8:1:2::77")), Err(Refusal::PerIp)),
            "a third address of the same /64 is over the cap of 2"
        );
        let _other = l.admit(host("2001:db8:1:3::1")).unwrap();
        let _v4 = l.admit(host("192.0.2.7")).unwrap();
        let _mapped = l.admit(host("::ffff:192.0.2.7")).unwrap();
        assert!(matches!(l.admit(host("192.0.2.7")), Err(Refusal::PerIp)));
        drop(a);
        let _again = l.admit(host("2001:db8:1:2::77")).unwrap();
    }

    #[test]
    fn a_wildcard_listener_serves_its_port_on_any_address() {
        let wildcard = listener("0.0.0.0:8080", 1, 1);
        assert!(wildcard.serves("10.1.2.3:8080".parse().unwrap()));
        assert!(!wildcard.serves("10.1.2.3:8081".parse().unwrap()));
        assert!(!wildcard.serves("[::1]:8080".parse().unwrap()));
        let exact = listener("127.0.0.1:8080", 1, 1);
        assert!(exact.serves("127.0.0.1:8080".parse().unwrap()));
        assert!(!exact.serves("127.0.0.2:8080".parse().unwrap()));
    }

    #[test]
    fn header_size_counts_line_and_fields() {
        let mut req = request(1, 3);
        // "GET /path HTTP/1.1\r\n" + "x-h0: vvv\r\n" + "\r\n"
        assert_eq!(measure_header(&req), (20 + 11 + 2, Found::default()));
        req.append_header("X_h", "v").unwrap();
        req.append_header("X-Shadowgate-Mirror", "1").unwrap();
        let found = Found {
            underscored: true,
            mirror_marker: true,
        };
        assert_eq!(measure_header(&req), (20 + 11 + 8 + 24 + 2, found));
    }

    fn rules(max_bytes: u64, max_fields: u64) -> HeaderRules {
        let limits = ClientLimits {
            max_header_bytes: max_bytes,
            max_headers: max_fields,
            ..ClientLimits::default()
        };
        HeaderRules::new(&limits, "127.0.0.1:1".parse().unwrap(), &Metrics::global())
    }

    #[test]
    fn too_many_fields_or_bytes_is_431() {
        let over_count = check_header_size(&request(5, 1), &rules(10_000, 4)).unwrap_err();
        assert_eq!(over_count.etype(), &ErrorType::HTTPStatus(431));
        let over_bytes = check_header_size(&request(2, 600), &rules(1_000, 100)).unwrap_err();
        assert_eq!(over_bytes.etype(), &ErrorType::HTTPStatus(431));
        let fits = check_header_size(&request(4, 10), &rules(1_000, 4)).unwrap();
        assert_eq!(fits, Found::default());
    }

    #[test]
    fn underscored_fields_are_dropped_whatever_their_case_or_count() {
        let mut req = request(2, 1);
        req.append_header("X_Forwarded_For", "6.6.6.6").unwrap();
        req.append_header("x_forwarded_for", "7.7.7.7").unwrap();
        req.append_header("Under_", "u").unwrap();
        assert!(
            check_header_size(&req, &rules(10_000, 100))
                .unwrap()
                .underscored
        );
        let dropped = drop_underscored_fields(&mut req);
        assert_eq!(dropped, ["x_forwarded_for", "under_"]);
        let mut wire = Vec::new();
        req.header_to_h1_wire(&mut wire);
        assert_eq!(wire, b"x-h0: v\r\nx-h1: v\r\n");
        assert!(
            !check_header_size(&req, &rules(10_000, 100))
                .unwrap()
                .underscored
        );
    }
}
