//! Traffic mirroring: which requests a route's mirrors copy, and the tee that hands body chunks to shadows.
//! The primary never waits on a shadow: each hand-off is a non-blocking try, and trouble abandons only that shadow.

pub mod budget;
pub mod conns;
pub mod executor;
mod h1;
pub mod sampler;
pub mod shadow;
mod wire;

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, Method};
use log::{debug, warn};
use pingora_core::connectors::http::Connector;
use pingora_http::{RequestHeader, ResponseHeader};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::compare::capture::{Capture, Capturer};
use crate::compare::{Comparator, CompareRequest};
use crate::config::{MirrorConfig, SampleBy};
use crate::metrics::{Metrics, MirrorMetrics};
use crate::request;
use crate::upstream::Pool;
use budget::{ByteBudget, QueueAccount};
use executor::ShadowExecutor;
use sampler::Sampler;
use shadow::{AbortSignal, BodyFeed, CaptureSink, ShadowMsg, ShadowRequest, ShadowSession};
use wire::ShadowEdits;

/// Why a request was not mirrored, or why a shadow request was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbandonReason {
    Method,
    BodyTooLarge,
    QueueFull,
    MemoryBudget,
    InFlightLimit,
    NoHealthyBackend,
    ConnectError,
    Timeout,
    UpstreamError,
    PrimaryAborted,
    /// The primary request was refused or never reached an upstream, so the
    /// shadow, which gets exactly what the primary got or nothing, got nothing.
    PrimaryNotSent,
}

impl AbandonReason {
    pub const ALL: [AbandonReason; 11] = [
        AbandonReason::Method,
        AbandonReason::BodyTooLarge,
        AbandonReason::QueueFull,
        AbandonReason::MemoryBudget,
        AbandonReason::InFlightLimit,
        AbandonReason::NoHealthyBackend,
        AbandonReason::ConnectError,
        AbandonReason::Timeout,
        AbandonReason::UpstreamError,
        AbandonReason::PrimaryAborted,
        AbandonReason::PrimaryNotSent,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AbandonReason::Method => "method",
            AbandonReason::BodyTooLarge => "body_too_large",
            AbandonReason::QueueFull => "queue_full",
            AbandonReason::MemoryBudget => "memory_budget",
            AbandonReason::InFlightLimit => "in_flight_limit",
            AbandonReason::NoHealthyBackend => "no_healthy_backend",
            AbandonReason::ConnectError => "connect_error",
            AbandonReason::Timeout => "timeout",
            AbandonReason::UpstreamError => "upstream_error",
            AbandonReason::PrimaryAborted => "primary_aborted",
            AbandonReason::PrimaryNotSent => "primary_not_sent",
        }
    }
}

/// How a mirror treated one request, as known when the primary ends (for the access log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorOutcome {
    NotSampled,
    /// A shadow was started; how it ends is its own (see the mirror metrics).
    Sampled,
    Abandoned(AbandonReason),
}

impl std::fmt::Display for MirrorOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MirrorOutcome::NotSampled => f.write_str("not_sampled"),
            MirrorOutcome::Sampled => f.write_str("sampled"),
            MirrorOutcome::Abandoned(reason) => write!(f, "abandoned:{}", reason.as_str()),
        }
    }
}

/// What every mirror of the process shares: one connection pool to shadow
/// upstreams and one budget for queued bytes.
pub struct MirrorRuntime {
    /// HTTP/2 shadow pools: Pingora's connector and pool.
    connector: Arc<Connector>,
    /// HTTP/1 shadow pools: our own idle lists (cheaper per request).
    connections: conns::ShadowConnections,
    budget: Arc<ByteBudget>,
    executor: ShadowExecutor,
}

impl MirrorRuntime {
    /// `threads`: worker threads for shadow sessions; 0 runs them on the proxy's own.
    pub fn new(
        budget_bytes: u64,
        keepalive_pool_size: usize,
        threads: usize,
        metrics: &Metrics,
    ) -> Self {
        let options = pingora_core::connectors::ConnectorOptions::new(keepalive_pool_size);
        MirrorRuntime {
            connector: Arc::new(Connector::new(Some(options))),
            connections: conns::ShadowConnections::new(keepalive_pool_size),
            budget: Arc::new(ByteBudget::new(
                budget_bytes,
                metrics.mirror_queued_bytes.clone(),
            )),
            executor: ShadowExecutor::new(threads),
        }
    }
}

/// One configured mirror of one route.
pub struct Mirror {
    route: String,
    pool: Arc<Pool>,
    sampler: Sampler,
    sample_by: SampleBy,
    methods: Vec<Method>,
    max_body_bytes: u64,
    queue_bytes: u64,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
    /// The header edits (`request_headers`, `host`, the marker), resolved at load.
    edits: ShadowEdits,
    metrics: MirrorMetrics,
    runtime: Arc<MirrorRuntime>,
    /// Shadow verdicts, when the mirror has a `compare` section.
    compare: Option<Arc<Comparator>>,
    /// The control pool's twin of this mirror: same request, same limits.
    control: Option<Arc<Mirror>>,
}

/// The outcome slot of a control twin's tap: it has none of its own.
const NO_SLOT: usize = usize::MAX;

/// Header that tells a shadow upstream the request is a mirrored copy.
pub const MARKER_HEADER: &str = "x-shadowgate-mirror";

impl Mirror {
    /// `control`: the pool named by `compare.control`, if any.
    pub fn new(
        route: &str,
        config: &MirrorConfig,
        pool: Arc<Pool>,
        control: Option<Arc<Pool>>,
        metrics: &Metrics,
        runtime: Arc<MirrorRuntime>,
    ) -> Self {
        let mut mirror = Mirror::without_compare(route, config, pool, metrics, runtime.clone());
        mirror.compare = config
            .compare
            .as_ref()
            .map(|c| Comparator::new(route, &mirror.pool.name, c));
        mirror.control = control.map(|control_pool| {
            let twin = Mirror::without_compare(route, config, control_pool, metrics, runtime);
            Arc::new(twin)
        });
        mirror
    }

    /// The mirror's copying alone: also the control's twin, which is compared, not comparing.
    fn without_compare(
        route: &str,
        config: &MirrorConfig,
        pool: Arc<Pool>,
        metrics: &Metrics,
        runtime: Arc<MirrorRuntime>,
    ) -> Self {
        // Names, values and host were parsed into header types when the config was loaded.
        let remove_headers: Vec<HeaderName> = config
            .request_headers
            .remove
            .iter()
            .map(|name| name.0.clone())
            .collect();
        let edits = ShadowEdits::new(
            &remove_headers,
            &config.request_headers.set.0,
            config.host.as_ref().map(|h| h.header_value()),
            config.mark_header,
        );
        Mirror {
            route: route.to_string(),
            sampler: Sampler::new(config.percentage.basis_points),
            sample_by: config.sample_by.clone(),
            methods: config.methods.iter().map(|m| m.0.clone()).collect(),
            max_body_bytes: config.max_body_bytes,
            queue_bytes: config.queue_bytes,
            timeout: Duration::from_millis(config.timeout_ms),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight as usize)),
            edits,
            metrics: metrics.mirror(route, &pool.name),
            pool,
            runtime,
            compare: None,
            control: None,
        }
    }

    pub fn upstream_name(&self) -> &str {
        &self.pool.name
    }

    /// Decide once, before any body byte, whether this request is copied.
    /// Counts the request as ineligible (by method) but not as unsampled.
    fn wants(&self, req: &RequestHeader, client_ip: Option<IpAddr>) -> bool {
        if !self.methods.contains(&req.method) {
            self.metrics.abandoned(AbandonReason::Method);
            return false;
        }
        let key = match &self.sample_by {
            SampleBy::Counter => None,
            SampleBy::Key(key) => request::key_value(key, req, client_ip),
        };
        // A request without the key falls back to the counter.
        let sampled = match key {
            Some(key) => self.sampler.by_key(&key),
            None => self.sampler.by_counter(),
        };
        if sampled {
            self.metrics.sampled.inc();
        }
        sampled
    }

    /// The bytes a shadow server is chosen by (`consistent_hash` pools), if any.
    fn selection_key<'a>(
        &self,
        primary: &'a RequestHeader,
        client_ip: Option<IpAddr>,
    ) -> Option<Cow<'a, [u8]>> {
        self.pool
            .hash_key()
            .and_then(|k| request::key_value(k, primary, client_ip))
    }

    /// What this mirror's shadow sends, from the primary's header: an HTTP/1 header
    /// written straight from it (no copy), or an edited copy for an HTTP/2 stream;
    /// None when the header cannot be written. And the server-selection key.
    fn prepare(
        &self,
        primary: &RequestHeader,
        client_ip: Option<IpAddr>,
        body: RequestBody,
    ) -> Prepared {
        let request = if self.pool.is_h2() {
            Some(ShadowRequest::H2(Box::new(
                self.shadow_header(primary.clone()),
            )))
        } else {
            self.edits
                .h1_request(primary, body != RequestBody::Empty)
                .map(|r| ShadowRequest::H1(Box::new(r)))
        };
        Prepared {
            request,
            key: self.selection_key(primary, client_ip).map(Cow::into_owned),
        }
    }

    /// Start a shadow session for this request, or say why not. The tap that feeds
    /// it the body comes back, or none for a bodiless request. `request` is None
    /// when the shadow's header could not be written.
    fn start(
        self: &Arc<Self>,
        request: Option<ShadowRequest>,
        key: Option<&[u8]>,
        body: RequestBody,
        capture: Option<CaptureSink>,
    ) -> Result<Option<Tap>, AbandonReason> {
        if let RequestBody::Length(len) = body
            && len > self.max_body_bytes
        {
            return Err(AbandonReason::BodyTooLarge);
        }
        let request = request.ok_or(AbandonReason::UpstreamError)?;
        let permit = self
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| AbandonReason::InFlightLimit)?;
        let addr = self
            .pool
            .select(key.unwrap_or_default(), &[], &[])
            .ok_or(AbandonReason::NoHealthyBackend)?;
        let peer = Box::new(self.pool.peer(addr));

        // A bodiless request needs no body queue and gives the primary side nothing
        // to abort (an HTTP/2 upstream may not even call the body filter for an
        // empty body): its shadow runs on its own from the start, with no tap.
        let (feed, tap) = if body == RequestBody::Empty {
            (None, None)
        } else {
            let (tx, rx) = mpsc::unbounded_channel();
            let abort = Arc::new(AbortSignal::default());
            let feed = BodyFeed {
                inbox: rx,
                abort: abort.clone(),
            };
            let tap = Tap {
                mirror: self.clone(),
                tx,
                abort,
                account: Arc::new(QueueAccount::new(
                    self.queue_bytes,
                    self.runtime.budget.clone(),
                )),
                delivered: 0,
                open: true,
                slot: 0,
                abandoned: None,
            };
            (Some(feed), Some(tap))
        };
        let session = ShadowSession {
            request: Some(request),
            peer,
            addr,
            body: feed,
            mirror: self.clone(),
            capture,
            captured: None,
            _permit: permit,
        };
        self.runtime.executor.spawn(session.run());
        Ok(tap)
    }

    /// The request as an HTTP/2 shadow sees it: exactly the header sent to the
    /// primary upstream (after Pingora's sanitising and our forwarding headers),
    /// less `Expect`, `Proxy-Authorization` and `Transfer-Encoding` (HTTP/2 frames
    /// the body itself), plus this mirror's edits and the marker. An HTTP/1 shadow
    /// gets the same edits, written by `wire`.
    fn shadow_header(&self, primary: RequestHeader) -> RequestHeader {
        let mut header = primary;
        // HTTP/2 frames the body itself and forbids this header.
        header.remove_header(&http::header::TRANSFER_ENCODING);
        self.edits.apply(&mut header);
        header
    }

    fn abandoned(&self, reason: AbandonReason) {
        debug!(
            "mirror {} -> {}: not mirrored: {}",
            self.route,
            self.pool.name,
            reason.as_str()
        );
        self.metrics.abandoned(reason);
    }
}

/// What the request header says about the body to come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RequestBody {
    #[default]
    Empty,
    Length(u64),
    /// Chunked, or otherwise of unknown length.
    Streamed,
}

impl RequestBody {
    pub fn of(req: &RequestHeader, body_empty: bool) -> RequestBody {
        if body_empty {
            return RequestBody::Empty;
        }
        match req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            Some(0) => RequestBody::Empty,
            Some(n) if !req.headers.contains_key(http::header::TRANSFER_ENCODING) => {
                RequestBody::Length(n)
            }
            _ => RequestBody::Streamed,
        }
    }
}

/// The primary side of one live shadow: where its chunks go.
struct Tap {
    mirror: Arc<Mirror>,
    tx: mpsc::UnboundedSender<ShadowMsg>,
    abort: Arc<AbortSignal>,
    account: Arc<QueueAccount>,
    /// Body bytes already handed to the shadow, counted from the start of the body.
    delivered: u64,
    open: bool,
    /// This tap's entry in `MirrorTee::outcomes` (`NO_SLOT` for a control twin).
    slot: usize,
    /// Why the primary side gave this shadow up, if it did.
    abandoned: Option<AbandonReason>,
}

impl Tap {
    fn offer(&mut self, piece: Bytes) {
        let len = piece.len() as u64;
        if self.delivered + len > self.mirror.max_body_bytes {
            return self.abandon(AbandonReason::BodyTooLarge);
        }
        let chunk = match self.account.admit(piece) {
            Ok(chunk) => chunk,
            Err(reason) => return self.abandon(reason),
        };
        if self.tx.send(ShadowMsg::Chunk(chunk)).is_err() {
            // The shadow already ended and counted its own outcome.
            self.open = false;
            return;
        }
        self.delivered += len;
    }

    fn end(&mut self) {
        let _ = self.tx.send(ShadowMsg::End);
        self.open = false;
    }

    /// Stop the shadow now, even mid-write: it closes its connection, drops its
    /// queued chunks (returning their bytes) and counts `reason`. A shadow that
    /// already ended has counted its own outcome and ignores this.
    fn abandon(&mut self, reason: AbandonReason) {
        self.abort.trigger(reason);
        self.open = false;
        self.abandoned.get_or_insert(reason);
    }
}

/// What one shadow will send, prepared from the primary's header.
struct Prepared {
    /// None when the header could not be written.
    request: Option<ShadowRequest>,
    key: Option<Vec<u8>>,
}

/// A sampled shadow, prepared when the primary's header is final and started
/// once it has gone upstream.
struct ReadyShadow {
    slot: usize,
    shadow: Prepared,
    /// For a comparing mirror: what the comparison keeps of the request, and the
    /// control twin's shadow.
    compare: Option<Box<(CompareRequest, Option<Prepared>)>>,
}

/// Per-request mirror state: the sampled mirrors, the live taps and where this
/// upstream attempt is in the body.
///
/// Sampling is decided when the request arrives, but a shadow starts only once
/// the primary's request header has been written upstream: it is built from
/// that header, and a request that Pingora or we refuse is never mirrored.
#[derive(Default)]
pub struct MirrorTee {
    /// Sampled mirrors whose shadow has not started yet (their `outcomes` slots).
    pending: Vec<usize>,
    /// The sampled shadows of the current primary attempt, prepared from its header.
    ready: Vec<ReadyShadow>,
    client_ip: Option<IpAddr>,
    body: RequestBody,
    taps: Vec<Tap>,
    /// Body offset of the next chunk in the current primary attempt. A retry
    /// replays the body from the start, so this resets while `delivered` does not.
    attempt_offset: u64,
    /// Each mirror of the route and what it did with this request.
    outcomes: Vec<(Arc<Mirror>, MirrorOutcome)>,
    /// The primary's response, captured for comparisons begun for this request. Boxed:
    /// inline it made every request's state (moved by value through Pingora's futures)
    /// 800 bytes larger and 64-byte aligned, for a capture most requests never make.
    primary_capture: Option<Box<Capturer>>,
    /// Where the primary's capture goes, one per comparing mirror.
    compare_senders: Vec<oneshot::Sender<Arc<Capture>>>,
    head_request: bool,
}

impl MirrorTee {
    /// Decide each mirror of the route for this request. Nothing starts yet.
    pub fn sample(
        mirrors: &[Arc<Mirror>],
        req: &RequestHeader,
        client_ip: Option<IpAddr>,
        body: RequestBody,
    ) -> MirrorTee {
        let mut tee = MirrorTee::default();
        if mirrors.is_empty() || request::is_upgrade(req) {
            return tee;
        }
        for mirror in mirrors {
            let outcome = if mirror.wants(req, client_ip) {
                tee.pending.push(tee.outcomes.len());
                MirrorOutcome::Sampled
            } else if mirror.methods.contains(&req.method) {
                MirrorOutcome::NotSampled
            } else {
                MirrorOutcome::Abandoned(AbandonReason::Method)
            };
            tee.outcomes.push((mirror.clone(), outcome));
        }
        tee.client_ip = client_ip;
        tee.body = body;
        tee
    }

    /// Whether a sampled shadow still waits for the primary's upstream header.
    pub fn wants_primary_header(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The header this primary attempt sends upstream (called once per attempt,
    /// from `upstream_request_filter`): each sampled shadow is prepared from it now,
    /// without copying it (but for HTTP/2 shadows, which send an edited copy).
    pub fn set_primary_header(&mut self, header: &RequestHeader) {
        self.ready.clear();
        self.head_request = header.method == Method::HEAD;
        for &slot in &self.pending {
            let Some((mirror, _)) = self.outcomes.get(slot) else {
                continue;
            };
            let compare = mirror.compare.as_ref().map(|_| {
                let control = mirror
                    .control
                    .as_ref()
                    .map(|control| control.prepare(header, self.client_ip, self.body));
                Box::new((CompareRequest::of(header), control))
            });
            self.ready.push(ReadyShadow {
                slot,
                shadow: mirror.prepare(header, self.client_ip, self.body),
                compare,
            });
        }
    }

    /// The primary's header has been written upstream: start the sampled shadows.
    /// Called on the first body chunk and when the primary answers (an empty
    /// body to an HTTP/2 upstream makes no body filter call).
    pub fn primary_sent(&mut self) {
        // Nothing prepared: no header went upstream for these shadows yet.
        if self.pending.is_empty() || self.ready.is_empty() {
            return;
        }
        self.pending.clear();
        let mut capture_cap: Option<(u64, Arc<ByteBudget>)> = None;
        for ready in std::mem::take(&mut self.ready) {
            let Some(mirror) = self.outcomes.get(ready.slot).map(|(m, _)| m.clone()) else {
                continue;
            };
            let Prepared { request, key } = ready.shadow;
            let (Some(comparator), Some(compare)) = (&mirror.compare, ready.compare) else {
                self.start_one(ready.slot, &mirror, request, key.as_deref(), None);
                continue;
            };
            let (compare_request, control) = *compare;
            let Some(pending) = comparator.begin(compare_request) else {
                self.start_one(ready.slot, &mirror, request, key.as_deref(), None);
                continue;
            };
            let cap = comparator.max_body_bytes;
            let sink = |tx| CaptureSink { tx, cap };
            // A side that does not start drops its sender: the comparison counts it skipped.
            let candidate = Some(sink(pending.candidate));
            self.start_one(ready.slot, &mirror, request, key.as_deref(), candidate);
            if let (Some(twin), Some(tx), Some(control)) =
                (&mirror.control, pending.control, control)
            {
                let Prepared { request, key } = control;
                self.start_one(NO_SLOT, twin, request, key.as_deref(), Some(sink(tx)));
            }
            self.compare_senders.push(pending.primary);
            mirror.runtime.executor.spawn(pending.job.run());
            let widest = capture_cap.as_ref().map_or(cap, |(c, _)| cap.max(*c));
            capture_cap = Some((widest, mirror.runtime.budget.clone()));
        }
        if let Some((cap, budget)) = &capture_cap {
            self.primary_capture = Some(Box::new(Capturer::new(
                *cap,
                budget.clone(),
                Instant::now(),
            )));
        }
    }

    fn start_one(
        &mut self,
        slot: usize,
        mirror: &Arc<Mirror>,
        request: Option<ShadowRequest>,
        key: Option<&[u8]>,
        sink: Option<CaptureSink>,
    ) {
        match mirror.start(request, key, self.body, sink) {
            Ok(Some(mut tap)) => {
                tap.slot = slot;
                self.taps.push(tap);
            }
            // A bodiless shadow needs nothing more from the primary side.
            Ok(None) => {}
            Err(reason) => {
                mirror.abandoned(reason);
                if let Some((_, outcome)) = self.outcomes.get_mut(slot) {
                    *outcome = MirrorOutcome::Abandoned(reason);
                }
            }
        }
    }

    /// The primary's response header, for the comparisons of this request.
    pub fn primary_response(&mut self, response: &ResponseHeader) {
        let Some(capture) = &mut self.primary_capture else {
            return;
        };
        if response.status.is_informational() {
            return;
        }
        capture.header(response.status.as_u16(), &response.headers);
        let no_body = self.head_request
            || matches!(response.status.as_u16(), 204 | 304)
            || response
                .headers
                .get(http::header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() == b"0");
        if no_body {
            capture.end();
        }
    }

    /// The primary's exchange ended without error, so its response was whole:
    /// covers a body that ended with the header (e.g. an empty HTTP/2 response),
    /// which makes no body filter call.
    pub fn primary_complete(&mut self) {
        if let Some(capture) = &mut self.primary_capture
            && capture.has_header()
        {
            capture.end();
        }
    }

    /// A chunk of the primary's response body (shared, not copied).
    pub fn primary_body(&mut self, chunk: Option<&Bytes>, end_of_stream: bool) {
        let Some(capture) = &mut self.primary_capture else {
            return;
        };
        if let Some(chunk) = chunk {
            capture.body(chunk);
        }
        if end_of_stream {
            capture.end();
        }
    }

    pub fn is_active(&self) -> bool {
        !self.pending.is_empty() || self.taps.iter().any(|t| t.open)
    }

    /// A new primary attempt starts; its body filter calls begin at offset 0 again.
    pub fn new_attempt(&mut self) {
        self.attempt_offset = 0;
    }

    /// Hand one body chunk of the primary to every live shadow, without waiting.
    ///
    /// Each shadow gets each byte once: bytes it already has (a retry replays the
    /// body) are sliced off. Empty chunks are never forwarded: on a chunked
    /// HTTP/1 body an empty chunk is the terminator.
    pub fn tee(&mut self, chunk: Option<&Bytes>, end_of_stream: bool) {
        // The body filter runs only after the header went upstream.
        self.primary_sent();
        let start = self.attempt_offset;
        let len = chunk.map_or(0, |c| c.len() as u64);
        self.attempt_offset += len;
        for tap in self.taps.iter_mut().filter(|t| t.open) {
            if let Some(chunk) = chunk {
                match unsent_part(chunk, start, tap.delivered) {
                    Ok(Some(piece)) => tap.offer(piece),
                    Ok(None) => {}
                    Err(BodyGap) => {
                        // Cannot happen while every chunk passes here, but a gap
                        // would corrupt the shadow's body: never risk it.
                        warn!("mirror tee lost track of the body offset; abandoning shadow");
                        tap.abandon(AbandonReason::UpstreamError);
                        continue;
                    }
                }
            }
            if end_of_stream && tap.open && tap.delivered == self.attempt_offset {
                tap.end();
            }
        }
    }

    /// The primary is done. A shadow still waiting for body never gets the rest,
    /// so it drops its connection instead of finishing the body; a shadow that
    /// never started (the primary was refused or never sent) is counted as such.
    pub fn finish(&mut self) {
        for slot in self.pending.drain(..) {
            if let Some((mirror, outcome)) = self.outcomes.get_mut(slot) {
                mirror.abandoned(AbandonReason::PrimaryNotSent);
                *outcome = MirrorOutcome::Abandoned(AbandonReason::PrimaryNotSent);
            }
        }
        for tap in self.taps.iter_mut().filter(|t| t.open) {
            tap.abandon(AbandonReason::PrimaryAborted);
        }
        for tap in &self.taps {
            if let (Some(reason), Some(entry)) = (tap.abandoned, self.outcomes.get_mut(tap.slot)) {
                entry.1 = MirrorOutcome::Abandoned(reason);
            }
        }
        self.taps.clear();
        // The response has been sent: hand it to the comparisons. One that never
        // ended (an error, a client gone) is dropped, and they count the skip.
        if let Some(capture) = self.primary_capture.take()
            && capture.has_header()
            && capture.ended()
        {
            let capture = Arc::new(capture.finish());
            for sender in self.compare_senders.drain(..) {
                let _ = sender.send(capture.clone());
            }
        }
        self.compare_senders.clear();
    }

    /// Each mirror of the route (by upstream name) and what it did with this request,
    /// as settled by `finish`.
    pub fn outcomes(&self) -> impl Iterator<Item = (&str, MirrorOutcome)> {
        self.outcomes
            .iter()
            .map(|(mirror, outcome)| (mirror.upstream_name(), *outcome))
    }
}

/// A chunk starts past the bytes a shadow has: the bytes between were never seen.
#[derive(Debug, PartialEq, Eq)]
struct BodyGap;

/// The part of `chunk` (at body offset `start`) that a shadow holding the first
/// `delivered` body bytes still lacks. A slice shares the buffer: no copy.
fn unsent_part(chunk: &Bytes, start: u64, delivered: u64) -> Result<Option<Bytes>, BodyGap> {
    let end = start + chunk.len() as u64;
    if chunk.is_empty() || end <= delivered {
        return Ok(None);
    }
    if delivered < start {
        return Err(BodyGap);
    }
    Ok(Some(chunk.slice((delivered - start) as usize..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_bytes_pass_whole() {
        let chunk = Bytes::from_static(b"abcdef");
        assert_eq!(unsent_part(&chunk, 10, 10), Ok(Some(chunk.clone())));
    }

    #[test]
    fn a_replayed_retry_buffer_sends_only_the_new_tail() {
        // The shadow has 4 bytes; a retry replays the first 6 as one chunk.
        let replay = Bytes::from_static(b"abcdef");
        let tail = unsent_part(&replay, 0, 4).unwrap().unwrap();
        assert_eq!(&tail[..], b"ef");
        // The slice shares the replayed buffer rather than copying it.
        assert_eq!(tail.as_ptr(), replay[4..].as_ptr());
    }

    #[test]
    fn bytes_the_shadow_has_are_skipped() {
        let replay = Bytes::from_static(b"abcdef");
        assert_eq!(unsent_part(&replay, 0, 6), Ok(None));
        assert_eq!(unsent_part(&replay, 0, 100), Ok(None));
    }

    #[test]
    fn empty_chunks_are_never_forwarded() {
        assert_eq!(unsent_part(&Bytes::new(), 0, 0), Ok(None));
    }

    #[test]
    fn a_gap_is_refused() {
        assert_eq!(unsent_part(&Bytes::from_static(b"xy"), 8, 4), Err(BodyGap));
    }

    #[test]
    fn body_kind_comes_from_the_header() {
        let mut req = RequestHeader::build("POST", b"/", None).unwrap();
        assert_eq!(RequestBody::of(&req, true), RequestBody::Empty);
        req.insert_header("content-length", "12").unwrap();
        assert_eq!(RequestBody::of(&req, false), RequestBody::Length(12));
        req.insert_header("transfer-encoding", "chunked").unwrap();
        assert_eq!(RequestBody::of(&req, false), RequestBody::Streamed);
    }
}
