//! The shadow session: a detached task that sends one mirrored request to a shadow upstream.
//! It streams body chunks as the primary hands them over, reads and discards the response, and records the outcome.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use log::debug;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_http::RequestHeader;
use pingora_timeout::fast_timeout::fast_timeout;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc, oneshot};

use super::budget::QueuedChunk;
use super::conns;
use super::h1::{MAX_PIECES_PER_WRITE, ShadowH1};
use super::wire::H1Request;
use super::{AbandonReason, Mirror};
use crate::compare::capture::{Capture, Capturer};

/// What the primary side sends a shadow session.
#[derive(Debug)]
pub enum ShadowMsg {
    Chunk(QueuedChunk),
    /// The body is complete.
    End,
}

/// Lets the primary stop a shadow at once, even while the shadow is blocked
/// writing to a slow upstream, so its queued bytes are returned without delay.
#[derive(Default)]
pub(super) struct AbortSignal {
    /// 0 while running, else 1 + the reason's index.
    reason: AtomicUsize,
    notify: Notify,
}

impl AbortSignal {
    pub fn trigger(&self, reason: AbandonReason) {
        let code = reason as usize + 1;
        if self
            .reason
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // notify_one keeps a permit if the shadow is not waiting yet.
            self.notify.notify_one();
        }
    }

    async fn triggered(&self) -> AbandonReason {
        loop {
            let code = self.reason.load(Ordering::Acquire);
            if code > 0 {
                return AbandonReason::ALL[code - 1];
            }
            self.notify.notified().await;
        }
    }
}

/// How one shadow exchange ended.
enum Outcome {
    Completed { status: u16 },
    Abandoned(AbandonReason),
}

/// Where a compared shadow delivers its response, and how much of the body to keep.
pub struct CaptureSink {
    pub tx: oneshot::Sender<Capture>,
    pub cap: u64,
}

/// The primary side's line to a shadow with a body: the chunks, and a way to stop it.
pub(super) struct BodyFeed {
    pub inbox: mpsc::UnboundedReceiver<ShadowMsg>,
    pub abort: Arc<AbortSignal>,
}

/// What a shadow sends: an HTTP/1 header ready for the wire, or the header an HTTP/2
/// stream is opened with.
pub(super) enum ShadowRequest {
    /// Boxed: it is held across the exchange, and the task future stays small.
    H1(Box<H1Request>),
    H2(Box<RequestHeader>),
}

impl ShadowRequest {
    fn method(&self) -> &http::Method {
        match self {
            ShadowRequest::H1(request) => &request.method,
            ShadowRequest::H2(header) => &header.method,
        }
    }

    /// For log lines.
    fn method_and_path(&self) -> (http::Method, String) {
        match self {
            ShadowRequest::H1(request) => (request.method.clone(), request.path().to_string()),
            ShadowRequest::H2(header) => (header.method.clone(), header.uri.path().to_string()),
        }
    }
}

/// One mirrored request, owned by its own task.
pub(super) struct ShadowSession {
    /// Taken by the exchange when it writes it (no copy).
    pub request: Option<ShadowRequest>,
    /// Boxed, as the session lives in its task's future: a smaller future is cheaper to spawn.
    pub peer: Box<HttpPeer>,
    /// The shadow server `peer` points at.
    pub addr: SocketAddr,
    /// Where the body comes from; none for a bodiless request.
    pub body: Option<BodyFeed>,
    pub mirror: Arc<Mirror>,
    /// Where the response goes when it is compared; otherwise it is read and discarded.
    pub capture: Option<CaptureSink>,
    pub captured: Option<Capture>,
    /// Held for the life of the session: it is this request's place under `max_in_flight`.
    pub _permit: OwnedSemaphorePermit,
}

impl ShadowSession {
    /// Run the exchange within the mirror's timeout and record how it ended.
    ///
    /// A timeout or an abort drops the exchange, and with it the connection: a
    /// half-sent body is closed, never finished.
    pub async fn run(mut self) {
        // On a multi-thread runtime a freshly spawned task runs next on this
        // worker (its LIFO slot), ahead of primary requests already waiting: step
        // back behind them first. A current-thread runtime (one proxy thread, or
        // `work_stealing: false`) queues it behind them already.
        if Handle::current().runtime_flavor() != RuntimeFlavor::CurrentThread {
            tokio::task::yield_now().await;
        }
        let mirror = self.mirror.clone();
        let abort = self.body.as_ref().map(|feed| feed.abort.clone());
        let started = Instant::now();
        // For the outcome's log line, only when it is written.
        let (method, path) = match &self.request {
            Some(request) if log::log_enabled!(log::Level::Debug) => request.method_and_path(),
            _ => Default::default(),
        };
        mirror.metrics.in_flight.inc();
        // Pingora's shared 10 ms timers, not tokio's: a shadow's deadline is usually the
        // earliest timer in the process, and registering one earlier than the driver's
        // next wake-up makes tokio wake its own thread through an eventfd write, once
        // per shadow (measured: 0.7 extra syscalls per mirrored request).
        let exchange = async {
            match fast_timeout(mirror.timeout, self.exchange(started)).await {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Abandoned(AbandonReason::Timeout),
            }
        };
        let outcome = match &abort {
            Some(abort) => tokio::select! {
                biased;
                reason = abort.triggered() => Outcome::Abandoned(reason),
                outcome = exchange => outcome,
            },
            // A bodiless shadow: the primary side has nothing to stop it for.
            None => exchange.await,
        };
        // Return the bytes of chunks that will never be sent.
        if let Some(feed) = &mut self.body {
            feed.inbox.close();
            while feed.inbox.try_recv().is_ok() {}
        }
        mirror.metrics.in_flight.dec();
        let method = method.as_str();
        // A compared response goes to its comparison; otherwise the sender is dropped
        // and the comparison counts this side as failed.
        if let (Some(sink), Some(captured), Outcome::Completed { .. }) =
            (self.capture.take(), self.captured.take(), &outcome)
        {
            let _ = sink.tx.send(captured);
        }
        match outcome {
            Outcome::Completed { status } => {
                let seconds = started.elapsed().as_secs_f64();
                mirror.metrics.completed(status, seconds);
                debug!(
                    "mirror {} -> {} {} {}: shadow answered {} in {:.1} ms",
                    mirror.route,
                    mirror.pool.name,
                    method,
                    path,
                    status,
                    seconds * 1000.0
                );
            }
            Outcome::Abandoned(reason) => {
                mirror.metrics.abandoned(reason);
                debug!(
                    "mirror {} -> {} {} {}: shadow abandoned: {}",
                    mirror.route,
                    mirror.pool.name,
                    method,
                    path,
                    reason.as_str()
                );
            }
        }
    }

    async fn exchange(&mut self, started: Instant) -> Outcome {
        use AbandonReason::{PrimaryAborted, UpstreamError};
        let Some(request) = self.request.take() else {
            return Outcome::Abandoned(UpstreamError);
        };
        // A response to HEAD has no body, whatever its framing headers say.
        let is_head = request.method() == http::Method::HEAD;
        // A server may close a kept-alive connection just as it is reused. The request
        // then goes once more, on a new connection, when it can be sent again exactly as
        // it was: no body, an idempotent method (as Pingora and NGINX retry upstreams).
        let may_resend = self.body.is_none() && request.method().is_idempotent();
        let (mut conn, resend) = match request {
            ShadowRequest::H2(header) => match self.open_h2(header).await {
                Ok(conn) => (conn, None),
                Err(reason) => return Outcome::Abandoned(reason),
            },
            ShadowRequest::H1(request) => match self.open_h1(&request, true).await {
                Ok(conn) => (conn, may_resend.then_some(request)),
                Err(OpenError::LostReusedConnection) if may_resend => {
                    return Box::pin(self.resend(&request, is_head, started)).await;
                }
                Err(e) => return Outcome::Abandoned(e.reason()),
            },
        };
        // Chunks the primary queued while this task waited go out together.
        let mut batch: Vec<QueuedChunk> = Vec::new();
        while let Some(feed) = &mut self.body {
            let mut ended = false;
            match feed.inbox.recv().await {
                Some(ShadowMsg::Chunk(chunk)) => batch.push(chunk),
                Some(ShadowMsg::End) => break,
                None => {
                    conn.shutdown().await;
                    return Outcome::Abandoned(PrimaryAborted);
                }
            }
            while batch.len() < MAX_PIECES_PER_WRITE {
                match feed.inbox.try_recv() {
                    Ok(ShadowMsg::Chunk(chunk)) => batch.push(chunk),
                    Ok(ShadowMsg::End) => {
                        ended = true;
                        break;
                    }
                    // Nothing more yet; a closed inbox is seen by the next `recv`.
                    Err(_) => break,
                }
            }
            // Boxed: the write's framing arrays would otherwise grow every shadow's task.
            if let Err(e) = Box::pin(conn.send_body(&batch)).await {
                debug!("shadow body to {} failed: {e}", self.peer);
                return Outcome::Abandoned(UpstreamError);
            }
            let len: usize = batch.iter().map(|chunk| chunk.bytes().len()).sum();
            // The chunks' bytes leave the queue account only now, once written.
            batch.clear();
            self.mirror.metrics.bytes.inc_by(len as u64);
            if ended {
                break;
            }
        }
        if let Err(e) = conn.finish_body().await {
            debug!("shadow body end to {} failed: {e}", self.peer);
            return Outcome::Abandoned(UpstreamError);
        }
        let result = self
            .read_response(conn, is_head, self.capturer(started))
            .await;
        match (result, resend) {
            (Err(e), Some(request)) if e.lost_reused_connection => {
                Box::pin(self.resend(&request, is_head, started)).await
            }
            (result, _) => self.outcome(result),
        }
    }

    /// Send a bodiless request again on a new connection, after its server closed the
    /// kept-alive one it went on before answering anything (the rare path: boxed).
    async fn resend(&mut self, request: &H1Request, is_head: bool, started: Instant) -> Outcome {
        debug!(
            "shadow connection to {} was closed by the server as it was reused: sending again on a new one",
            self.peer
        );
        self.mirror.metrics.resent.inc();
        let mut conn = match self.open_h1(request, false).await {
            Ok(conn) => conn,
            Err(e) => return Outcome::Abandoned(e.reason()),
        };
        if let Err(e) = conn.finish_body().await {
            debug!("shadow body end to {} failed: {e}", self.peer);
            return Outcome::Abandoned(AbandonReason::UpstreamError);
        }
        let result = self
            .read_response(conn, is_head, self.capturer(started))
            .await;
        self.outcome(result)
    }

    /// The capture of a compared shadow's response (boxed: it is large and travels
    /// through the read futures).
    fn capturer(&self, started: Instant) -> Option<Box<Capturer>> {
        self.capture.as_ref().map(|sink| {
            Box::new(Capturer::new(
                sink.cap,
                self.mirror.runtime.budget.clone(),
                started,
            ))
        })
    }

    /// How an exchange ended, from its response (and keep the capture of a compared one).
    fn outcome(&mut self, result: Result<(u16, Option<Box<Capturer>>), ReadError>) -> Outcome {
        match result {
            Ok((status, capturer)) => {
                if let Some(mut capturer) = capturer {
                    capturer.end();
                    self.captured = Some(capturer.finish());
                }
                Outcome::Completed { status }
            }
            Err(e) => {
                debug!("shadow response from {} failed: {}", self.peer, e.message);
                Outcome::Abandoned(AbandonReason::UpstreamError)
            }
        }
    }

    /// Open an HTTP/2 stream to the shadow server (Pingora's session pool) and send the
    /// request header.
    async fn open_h2(&self, header: Box<RequestHeader>) -> Result<Conn, AbandonReason> {
        // Boxed, like every connect below: these futures are large and would
        // otherwise make every shadow task (and its spawn copy) as large.
        let connecting = Box::pin(self.mirror.runtime.connector.get_http_session(&*self.peer));
        let mut session = match connecting.await {
            Ok((session, _reused)) => session,
            Err(e) => {
                debug!("shadow connect to {} failed: {e}", self.peer);
                return Err(AbandonReason::ConnectError);
            }
        };
        if let Err(e) = session.write_request_header(header).await {
            debug!("shadow request header to {} failed: {e}", self.peer);
            return Err(AbandonReason::UpstreamError);
        }
        Ok(Conn::H2(Box::new(session)))
    }

    /// Send the request header over one of the mirror's own idle HTTP/1 connections to
    /// the shadow server (when `may_reuse`) or a new one.
    async fn open_h1(&self, request: &H1Request, may_reuse: bool) -> Result<Conn, OpenError> {
        let connections = &self.mirror.runtime.connections;
        let connect_timeout = self.mirror.pool.connect_timeout();
        let opened = if may_reuse {
            let idle_timeout = self.peer.idle_timeout();
            connections
                .get(self.addr, connect_timeout, idle_timeout)
                .await
        } else {
            conns::connect(self.addr, connect_timeout)
                .await
                .map(|s| (s, false))
        };
        let (stream, reused) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                debug!("shadow connect to {} failed: {e}", self.peer);
                return Err(OpenError::Failed(AbandonReason::ConnectError));
            }
        };
        match ShadowH1::send_header(stream, request, reused).await {
            Ok(h1) => Ok(Conn::H1(h1)),
            Err(e) => {
                debug!("shadow request header to {} failed: {}", self.peer, e.error);
                Err(if e.lost_reused_connection {
                    OpenError::LostReusedConnection
                } else {
                    OpenError::Failed(AbandonReason::UpstreamError)
                })
            }
        }
    }

    /// The final response: its status, and the capture when compared. The
    /// connection goes back to its pool if it can carry another request.
    async fn read_response(
        &self,
        conn: Conn,
        is_head: bool,
        mut capturer: Option<Box<Capturer>>,
    ) -> Result<(u16, Option<Box<Capturer>>), ReadError> {
        let runtime = &self.mirror.runtime;
        match conn {
            Conn::H1(mut h1) => {
                let head = match h1.read_head(is_head, capturer.is_some()).await {
                    Ok(head) => head,
                    Err(e) => {
                        return Err(ReadError {
                            lost_reused_connection: h1.lost_reused_connection(&e),
                            message: e.to_string(),
                        });
                    }
                };
                if let Some(capturer) = &mut capturer {
                    capturer.header(head.status, &head.headers);
                }
                h1.read_body(head.body, capturer.as_deref_mut())
                    .await
                    .map_err(ReadError::other)?;
                if let Some(stream) = h1.into_reusable() {
                    runtime.connections.put(self.addr, stream);
                }
                Ok((head.status, capturer))
            }
            // Boxed: Pingora's HTTP/2 client futures are large.
            Conn::H2(session) => Box::pin(self.read_h2_response(*session, is_head, capturer))
                .await
                .map_err(ReadError::other),
        }
    }

    async fn read_h2_response(
        &self,
        mut session: HttpSession,
        is_head: bool,
        mut capturer: Option<Box<Capturer>>,
    ) -> Result<(u16, Option<Box<Capturer>>), String> {
        let status = loop {
            session
                .read_response_header()
                .await
                .map_err(|e| e.to_string())?;
            let header = session
                .response_header()
                .ok_or_else(|| "no response header".to_string())?;
            // 1xx (e.g. 100 Continue) is interim: the final header follows.
            if !header.status.is_informational() {
                if let Some(capturer) = &mut capturer {
                    capturer.header(header.status.as_u16(), &header.headers);
                }
                break header.status.as_u16();
            }
        };
        // A response to HEAD has no body, whatever its Content-Length says; the
        // HTTP/2 client would take the missing bytes for a protocol error.
        let mut has_body = !is_head;
        while has_body {
            match session.read_response_body().await {
                Ok(Some(chunk)) => {
                    if let Some(capturer) = &mut capturer {
                        capturer.body(&chunk);
                    }
                }
                Ok(None) => has_body = false,
                Err(e) => return Err(e.to_string()),
            }
        }
        self.mirror
            .runtime
            .connector
            .release_http_session(session, &*self.peer, self.peer.idle_timeout())
            .await;
        Ok((status, capturer))
    }
}

/// Why a request header could not go out on an HTTP/1 connection.
enum OpenError {
    /// The server had closed the kept-alive connection as it was reused.
    LostReusedConnection,
    Failed(AbandonReason),
}

impl OpenError {
    fn reason(&self) -> AbandonReason {
        match self {
            OpenError::LostReusedConnection => AbandonReason::UpstreamError,
            OpenError::Failed(reason) => *reason,
        }
    }
}

/// Why a response could not be read.
struct ReadError {
    message: String,
    /// The server had closed the kept-alive connection as it was reused, answering nothing.
    lost_reused_connection: bool,
}

impl ReadError {
    fn other(error: impl std::fmt::Display) -> Self {
        ReadError {
            message: error.to_string(),
            lost_reused_connection: false,
        }
    }
}

/// A shadow's connection once its request header is sent.
enum Conn {
    /// HTTP/1: the lean client of `h1`.
    H1(ShadowH1),
    /// HTTP/2: Pingora's client (boxed: the session future stays small).
    H2(Box<HttpSession>),
}

impl Conn {
    /// Send consecutive body chunks, `MAX_PIECES_PER_WRITE` per write to an HTTP/1 shadow.
    async fn send_body(&mut self, chunks: &[QueuedChunk]) -> Result<(), String> {
        match self {
            Conn::H1(h1) => {
                for group in chunks.chunks(MAX_PIECES_PER_WRITE) {
                    let mut pieces: [&[u8]; MAX_PIECES_PER_WRITE] = [&[]; MAX_PIECES_PER_WRITE];
                    for (piece, chunk) in pieces.iter_mut().zip(group) {
                        *piece = chunk.bytes();
                    }
                    h1.send_body(&pieces[..group.len()])
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Conn::H2(session) => {
                for chunk in chunks {
                    session
                        .write_request_body(chunk.bytes().clone(), false)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            }
        }
    }

    async fn finish_body(&mut self) -> Result<(), String> {
        match self {
            Conn::H1(h1) => h1.finish_body().await.map_err(|e| e.to_string()),
            Conn::H2(session) => session
                .finish_request_body()
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        }
    }

    /// Close the connection so that the server sees the body cut short, not finished.
    async fn shutdown(&mut self) {
        match self {
            Conn::H1(h1) => h1.shutdown().await,
            Conn::H2(session) => session.shutdown().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<F: FnOnce(ShadowSession) -> Fut, Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Every shadow task is this future: it is copied when spawned, so the large
    /// and rare parts (connecting, HTTP/2, the capture, the peer) are boxed.
    /// It was 11.6 KiB before they were.
    #[test]
    fn the_shadow_task_stays_small() {
        let size = future_size(ShadowSession::run);
        assert!(
            size <= 2048,
            "the shadow task's future grew to {size} bytes"
        );
    }
}
