//! The shadow session: a detached task that sends one mirrored request to a shadow upstream.
//! It streams body chunks as the primary hands them over, reads and discards the response, and records the outcome.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use log::debug;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::protocols::http::v1::client::HttpSession as HttpSessionV1;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_http::RequestHeader;
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc, oneshot};

use super::budget::QueuedChunk;
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

/// One mirrored request, owned by its own task.
pub(super) struct ShadowSession {
    /// Taken by the exchange when it writes it (no copy).
    pub header: Option<Box<RequestHeader>>,
    pub peer: HttpPeer,
    /// The shadow server `peer` points at.
    pub addr: SocketAddr,
    pub inbox: mpsc::UnboundedReceiver<ShadowMsg>,
    pub abort: Arc<AbortSignal>,
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
        // A freshly spawned task runs next on this worker, ahead of primary
        // requests already waiting; step back behind them first.
        tokio::task::yield_now().await;
        let mirror = self.mirror.clone();
        let abort = self.abort.clone();
        let started = Instant::now();
        // For the outcome's log line: cheap clones (a known method, a shared path).
        let (method, uri) = self
            .header
            .as_ref()
            .map(|h| (h.method.clone(), h.uri.clone()))
            .unwrap_or_default();
        mirror.metrics.in_flight.inc();
        let outcome = tokio::select! {
            biased;
            reason = abort.triggered() => Outcome::Abandoned(reason),
            result = tokio::time::timeout(mirror.timeout, self.exchange(started)) => match result {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Abandoned(AbandonReason::Timeout),
            },
        };
        // Return the bytes of chunks that will never be sent.
        self.inbox.close();
        while self.inbox.try_recv().is_ok() {}
        mirror.metrics.in_flight.dec();
        let method = method.as_str();
        let path = uri.path();
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
        use AbandonReason::{ConnectError, PrimaryAborted, UpstreamError};
        let runtime = &self.mirror.runtime;
        let connected = if self.mirror.pool.is_h2() {
            runtime
                .connector
                .get_http_session(&self.peer)
                .await
                .map(|(session, _reused)| session)
        } else {
            runtime
                .connections
                .get(&self.peer, self.addr, self.peer.idle_timeout())
                .await
                .map(|(stream, _reused)| {
                    HttpSession::H1(HttpSessionV1::new_with_options(stream, &self.peer))
                })
        };
        let mut session = match connected {
            Ok(session) => session,
            Err(e) => {
                debug!("shadow connect to {} failed: {e}", self.peer);
                return Outcome::Abandoned(ConnectError);
            }
        };
        let Some(header) = self.header.take() else {
            return Outcome::Abandoned(UpstreamError);
        };
        // A response to HEAD has no body, whatever its framing headers say.
        let is_head = header.method == http::Method::HEAD;
        if let Err(e) = session.write_request_header(header).await {
            debug!("shadow request header to {} failed: {e}", self.peer);
            return Outcome::Abandoned(UpstreamError);
        }

        loop {
            match self.inbox.recv().await {
                Some(ShadowMsg::Chunk(chunk)) => {
                    let len = chunk.bytes().len() as u64;
                    if let Err(e) = session
                        .write_request_body(chunk.bytes().clone(), false)
                        .await
                    {
                        debug!("shadow body to {} failed: {e}", self.peer);
                        return Outcome::Abandoned(UpstreamError);
                    }
                    // The chunk's bytes leave the queue account only now, once written.
                    drop(chunk);
                    self.mirror.metrics.bytes.inc_by(len);
                }
                Some(ShadowMsg::End) => break,
                None => {
                    session.shutdown().await;
                    return Outcome::Abandoned(PrimaryAborted);
                }
            }
        }
        if let Err(e) = session.finish_request_body().await {
            debug!("shadow body end to {} failed: {e}", self.peer);
            return Outcome::Abandoned(UpstreamError);
        }

        // Read the whole response so the connection can go back to the pool.
        let (status, mut capturer) = loop {
            if let Err(e) = session.read_response_header().await {
                debug!("shadow response from {} unreadable: {e}", self.peer);
                return Outcome::Abandoned(UpstreamError);
            }
            let Some(header) = session.response_header() else {
                return Outcome::Abandoned(UpstreamError);
            };
            // 1xx (e.g. 100 Continue) is interim: the final header follows.
            if !header.status.is_informational() {
                let status = header.status.as_u16();
                let capturer = self.capture.as_ref().map(|sink| {
                    let budget = self.mirror.runtime.budget.clone();
                    let mut capturer = Capturer::new(sink.cap, budget, started);
                    capturer.header(status, &header.headers);
                    capturer
                });
                break (status, capturer);
            }
        };
        // A response to HEAD has no body, whatever its Content-Length says; the
        // HTTP/2 client would take the missing bytes for a protocol error.
        let mut has_body = !is_head;
        while has_body {
            match session.read_response_body().await {
                // Kept (up to the cap) when compared, else discarded.
                Ok(Some(chunk)) => {
                    if let Some(capturer) = &mut capturer {
                        capturer.body(&chunk);
                    }
                }
                Ok(None) => has_body = false,
                Err(e) => {
                    debug!("shadow response body from {} failed: {e}", self.peer);
                    return Outcome::Abandoned(UpstreamError);
                }
            }
        }
        if let Some(mut capturer) = capturer {
            capturer.end();
            self.captured = Some(capturer.finish());
        }
        match session {
            HttpSession::H1(mut h1) => {
                h1.respect_keepalive();
                if let Some(stream) = h1.reuse().await {
                    runtime.connections.put(self.addr, stream);
                }
            }
            session => {
                runtime
                    .connector
                    .release_http_session(session, &self.peer, self.peer.idle_timeout())
                    .await
            }
        }
        Outcome::Completed { status }
    }
}
