//! The Pingora `ProxyHttp` implementation: a thin layer that calls routing, pools, the mirror and metrics.
//! Each filter does one thing: route, pick a peer, add forwarding headers, tee the body, map errors, record.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use log::{info, warn};
use pingora_core::modules::http::HttpModules;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::access_log::{self, AccessLog};
use crate::config::Config;
use crate::limits::LimitsByListener;
use crate::metrics::{Metrics, NO_ROUTE, RouteMetrics};
use crate::mirror::{Mirror, MirrorRuntime, MirrorTee, RequestBody};
use crate::path::routing_path;
use crate::request;
use crate::request_id;
use crate::routing::{RouteMatch, Router, request_host};
use crate::upstream::{Pool, Pools};

/// A configured route, ready to serve.
pub struct Route {
    pub name: String,
    pool: Arc<Pool>,
    upstream_host: Option<HeaderValue>,
    /// `max_body_bytes` here in place of the listener's: `Some(0)` is no limit.
    max_body_bytes: Option<u64>,
    mirrors: Vec<Arc<Mirror>>,
    metrics: RouteMetrics,
}

/// The proxy: routes, pools and mirrors, built once from the config. Clones
/// share all of it (one per listening service: cleartext HTTP/2 is per service).
#[derive(Clone)]
pub struct ShadowGate {
    router: Arc<Router<Arc<Route>>>,
    no_route_metrics: Arc<RouteMetrics>,
    /// Set when this process starts handing over or shutting down: responses
    /// then say `Connection: close`, so clients move to the new process cleanly.
    draining: Arc<AtomicBool>,
    access_log: Option<Arc<AccessLog>>,
    /// Each listener's client limits, for HTTP/2 streams.
    listener_limits: Arc<LimitsByListener>,
}

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    route: Option<Arc<Route>>,
    /// Servers already tried for this request, so a retry goes elsewhere.
    tried: Vec<SocketAddr>,
    /// Servers that refused the connection or broke it off before answering this request:
    /// when every server was tried, a retry prefers the others.
    failed: Vec<SocketAddr>,
    connect_failures: u32,
    /// Set once the one retry after a server broke off has been used.
    retried_idempotent: bool,
    tee: MirrorTee,
    /// The request's `X-Request-Id`, kept or made in `request_filter`.
    request_id: Option<HeaderValue>,
    /// The body limit: the listener's `max_body_bytes` from `early_request_filter`,
    /// then, once routed, what is left to count of a body of unknown length; and how
    /// much of the body this attempt has passed on.
    body_limit: Option<u64>,
    body_bytes: u64,
}

impl ShadowGate {
    /// Build the proxy from a validated config. `pools` holds every upstream named there.
    pub fn new(
        config: &Config,
        pools: &Pools,
        metrics: &Metrics,
        mirror_runtime: Arc<MirrorRuntime>,
        draining: Arc<AtomicBool>,
    ) -> Self {
        let mut routes = Vec::new();
        for route in &config.routes {
            let pool = pools.referenced(&route.upstream);
            let mirrors: Vec<Arc<Mirror>> = route
                .mirrors
                .iter()
                .map(|m| {
                    let control = m
                        .compare
                        .as_ref()
                        .and_then(|c| c.control.as_ref())
                        .map(|name| pools.referenced(name));
                    Arc::new(Mirror::new(
                        &route.name,
                        m,
                        pools.referenced(&m.upstream),
                        control,
                        metrics,
                        mirror_runtime.clone(),
                    ))
                })
                .collect();
            log_route(route);
            let built = Route {
                name: route.name.clone(),
                pool,
                upstream_host: route
                    .upstream_host
                    .as_ref()
                    .map(|h| h.header_value().clone()),
                max_body_bytes: route.max_body_bytes,
                mirrors,
                metrics: metrics.route(&route.name),
            };
            routes.push((RouteMatch::from_config(&route.matcher), Arc::new(built)));
        }
        ShadowGate {
            router: Arc::new(Router::new(routes)),
            no_route_metrics: Arc::new(metrics.route(NO_ROUTE)),
            draining,
            access_log: None,
            listener_limits: Arc::new(LimitsByListener::new(&config.listeners, metrics)),
        }
    }

    /// Write one line per request to `log`.
    pub fn with_access_log(mut self, log: Arc<AccessLog>) -> Self {
        self.access_log = Some(log);
        self
    }
}

impl ShadowGate {
    /// Once a shutdown or upgrade has begun, answer with `Connection: close` so
    /// keep-alive clients reconnect (to the new process) instead of reusing a
    /// connection this process is about to close.
    fn close_if_draining(&self, session: &mut Session) {
        if self.draining.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        }
    }
}

fn log_route(route: &crate::config::RouteConfig) {
    if route.mirrors.is_empty() {
        info!("route {}: -> {}, no mirror", route.name, route.upstream);
        return;
    }
    let described: Vec<String> = route
        .mirrors
        .iter()
        .map(|m| {
            let methods: Vec<&str> = m.methods.iter().map(|x| x.0.as_str()).collect();
            let by = match &m.sample_by {
                crate::config::SampleBy::Counter => "counter".to_string(),
                crate::config::SampleBy::Key(k) => format!("{k:?}"),
            };
            format!(
                "{} of {} to {} (sampled by {by}, max body {} B, queue {} B, timeout {} ms, max in flight {})",
                m.percentage,
                methods.join("/"),
                m.upstream,
                m.max_body_bytes,
                m.queue_bytes,
                m.timeout_ms,
                m.max_in_flight
            )
        })
        .collect();
    info!(
        "route {}: -> {}, mirrors {}",
        route.name,
        route.upstream,
        described.join("; ")
    );
    for m in &route.mirrors {
        let unsafe_methods: Vec<&str> = m
            .methods
            .iter()
            .filter(|x| !x.0.is_idempotent())
            .map(|x| x.0.as_str())
            .collect();
        if !unsafe_methods.is_empty() {
            warn!(
                "route {}: mirror to {} copies non-idempotent methods {}; the shadow must not cause side effects",
                route.name,
                m.upstream,
                unsafe_methods.join(", ")
            );
        }
    }
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

#[async_trait]
impl ProxyHttp for ShadowGate {
    type CTX = RequestCtx;

    /// At start: no downstream modules. Pingora's default adds a response
    /// compression module that is disabled yet still built and called per request.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    /// A fresh per-request state.
    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            route: None,
            tried: Vec::new(),
            failed: Vec::new(),
            connect_failures: 0,
            retried_idempotent: false,
            tee: MirrorTee::default(),
            request_id: None,
            body_limit: None,
            body_bytes: 0,
        }
    }

    /// Right after the header was read: stop the listener's header clock, enforce its size
    /// limits (and give an HTTP/2 stream the listener's timeouts).
    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Answer pipelined requests in order instead of dropping them; Pingora
        // serves them one after another, each with its own body framing, so
        // each is mirrored (or not) on its own.
        session.set_pipelining_enabled(true);
        ctx.body_limit = crate::listener::header_received(session, &self.listener_limits)?;
        Ok(())
    }

    /// Refuse ambiguous requests, match the route, decide which mirrors sample it.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        self.close_if_draining(session);
        let raw_header = session
            .as_downstream()
            .as_http1()
            .map(|h1| h1.get_headers_raw_bytes());
        if let Some(reason) = request::refusal(session.req_header(), raw_header.as_deref()) {
            return refuse(session, reason).await;
        }
        // Before anything reads it: cookies split per field over HTTP/2 go on as one.
        if session.req_header().version == http::Version::HTTP_2 {
            request::join_cookie_crumbs(session.req_header_mut());
        }
        // Routed by its resolved path; the path goes upstream as sent.
        let req = session.req_header();
        let found = routing_path(req.uri.path()).map(|path| {
            self.router
                .find(&request_host(req), &path, &req.method)
                .cloned()
        });
        // In the request header itself, so the primary and every shadow get it.
        ctx.request_id = Some(request_id::ensure(session.req_header_mut()));
        let route = match found {
            Ok(route) => route,
            Err(reason) => return refuse(session, reason).await,
        };
        let Some(route) = route else {
            session
                .respond_error_with_body(
                    404,
                    Bytes::from_static(b"no route matches this request\n"),
                )
                .await?;
            return Ok(true);
        };
        // The route's body limit in place of the listener's, if it has one.
        let body_limit = route
            .max_body_bytes
            .map_or(ctx.body_limit, |max| (max > 0).then_some(max));
        ctx.body_limit = crate::listener::check_body_length(session, body_limit)?;
        if !route.mirrors.is_empty() {
            let body_empty = session.as_mut().is_body_empty();
            let body = RequestBody::of(session.req_header(), body_empty);
            ctx.tee = MirrorTee::sample(
                &route.mirrors,
                session.req_header(),
                client_ip(session),
                body,
            );
        }
        ctx.route = Some(route);
        Ok(false)
    }

    /// Per attempt: pick a server of the route's pool, never one already tried.
    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(route) = &ctx.route else {
            return Error::e_explain(ErrorType::InternalError, "upstream_peer without a route");
        };
        let pool = &route.pool;
        let key = pool
            .hash_key()
            .and_then(|k| request::key_value(k, session.req_header(), client_ip(session)));
        let Some(addr) = pool.select(key.as_deref().unwrap_or_default(), &ctx.tried, &ctx.failed)
        else {
            return Error::e_explain(
                ErrorType::HTTPStatus(502),
                format!("no healthy server in upstream {}", pool.name),
            );
        };
        ctx.tried.push(addr);
        // Each attempt replays the body through request_body_filter from the start.
        ctx.tee.new_attempt();
        ctx.body_bytes = 0;
        Ok(Box::new(pool.peer(addr)))
    }

    /// A connect failed: retry on another server up to the pool's `connect_retries`.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.connect_failures += 1;
        ctx.failed.extend(peer._address.as_inet().copied());
        let retries = ctx.route.as_ref().map_or(0, |r| r.pool.connect_retries);
        // Nothing reached the server yet, so another server may take the request.
        e.set_retry(ctx.connect_failures <= retries);
        e
    }

    /// A failure once the request reached a server. Pingora's rule stays (a failed reused
    /// connection is retried); in addition, an idempotent request whose body is fully replayable
    /// is retried once on another server when this one broke off before any response byte.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // A stale pooled connection says nothing about the server; a fresh one failing does.
        let broke_off = server_broke_off(&e) && !client_reused;
        if broke_off {
            ctx.failed.extend(peer._address.as_inet().copied());
        }
        let replayable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none();
        if !replayable {
            e.set_retry(false);
            return e;
        }
        e.retry.decide_reuse(client_reused);
        if let Some(pool) = ctx.route.as_ref().map(|r| &r.pool)
            && !e.retry()
            && pool.retry_idempotent
            && !ctx.retried_idempotent
            && broke_off
            && pool.has_server_besides(&ctx.failed)
        {
            ctx.retried_idempotent = true;
            pool.retries.inc();
            e.set_retry(true);
        }
        e
    }

    /// Per attempt, the header Pingora has sanitised: add what the next hop is
    /// owed, and write the shadows their header before the primary-only Host rewrite.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let tls = tls_version(session).is_some();
        request::add_forwarding_headers(upstream_request, client_ip(session), tls);
        request::relay_proxy_authorization(session.req_header(), upstream_request);
        request::normalize_upstream(upstream_request);
        if ctx.tee.wants_primary_header() {
            ctx.tee.set_primary_header(upstream_request);
        }
        if let Some(host) = ctx.route.as_ref().and_then(|r| r.upstream_host.clone()) {
            upstream_request.insert_header(http::header::HOST, host)?;
        }
        Ok(())
    }

    /// Per body chunk, after the header went upstream: hold a body of unknown length to its
    /// limit (the route's or the listener's), then tee it to the shadows.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(max) = ctx.body_limit {
            ctx.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
            if ctx.body_bytes > max {
                // This piece goes nowhere: the upstream and the shadows see the body
                // break off, the client gets 413 and the connection closes.
                session.set_keepalive(None);
                return crate::listener::body_too_large(max);
            }
        }
        if ctx.tee.is_active() {
            ctx.tee.tee(body.as_ref(), end_of_stream);
        }
        Ok(())
    }

    /// The primary answered, so its request went upstream: start any shadow the
    /// body filter has not (an empty body to an HTTP/2 upstream never calls it).
    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.tee.primary_sent();
        // Compared shadows need the primary's answer: its header first.
        ctx.tee.primary_response(upstream_response);
        Ok(())
    }

    /// Before the response goes to the client.
    async fn response_filter(
        &self,
        session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A request already under way when the drain began must say so too.
        self.close_if_draining(session);
        Ok(())
    }

    /// Per response body chunk from the primary: captured (shared, not copied) for comparisons.
    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        ctx.tee.primary_body(body.as_ref(), end_of_stream);
        Ok(None)
    }

    /// The request failed: answer the status its error maps to (or nothing if the client left).
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        _ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = error_status(e);
        if code > 0 {
            let _ = session.respond_error(code).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// A client that hangs up mid-request is routine at the edge: it is counted
    /// (status 499) rather than logged as an error; so is a header or body over the
    /// listener's limits, and a client that pauses past its timeouts (408, or a
    /// WebSocket left idle): anyone could otherwise flood the error log.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, e: &Error) -> bool {
        client_went_away(e)
            || client_timed_out(e)
            || matches!(e.etype(), ErrorType::HTTPStatus(413 | 431))
    }

    /// Always last: close out the shadows, hand the capture to comparisons, record metrics and the access log.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // A response that ended without error was whole: comparisons may use it.
        if e.is_none() {
            ctx.tee.primary_complete();
        }
        // A shadow still waiting for body will not get the rest: close it, not finish it.
        ctx.tee.finish();
        let status = session
            .response_written()
            .map(|r: &ResponseHeader| r.status.as_u16())
            .or_else(|| e.map(error_status).filter(|c| *c > 0))
            // Nothing was sent: the client went away first.
            .unwrap_or(499);
        let metrics = ctx
            .route
            .as_ref()
            .map_or(&*self.no_route_metrics, |r| &r.metrics);
        metrics.observe(status, ctx.started.elapsed().as_secs_f64());
        if let Some(log) = &self.access_log {
            log.log(access_log_entry(session, ctx, status));
        }
    }
}

/// Answer 400 and close: whatever follows on the connection cannot be trusted either.
async fn refuse(session: &mut Session, reason: &str) -> Result<bool> {
    session.set_keepalive(None);
    let body = Bytes::from(format!("bad request: {reason}\n"));
    session.respond_error_with_body(400, body).await?;
    Ok(true)
}

/// The negotiated TLS version, or None on a cleartext connection.
fn tls_version(session: &Session) -> Option<&'static str> {
    let ssl = session.digest()?.ssl_digest.as_ref()?;
    Some(crate::tls::version_label(&ssl.version))
}

/// The access log line of a request that has ended.
fn access_log_entry(session: &Session, ctx: &RequestCtx, status: u16) -> access_log::Entry {
    let req = session.req_header();
    access_log::Entry {
        time: std::time::SystemTime::now(),
        client: session.client_addr().map(|a| a.to_string()),
        method: req.method.as_str().to_string(),
        host: request_host(req).into_owned(),
        path: req.uri.path().to_string(),
        protocol: match req.version {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_09 => "HTTP/0.9",
            http::Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        },
        tls: tls_version(session),
        route: ctx.route.as_ref().map(|r| r.name.clone()),
        upstream: ctx.tried.last().map(|a| a.to_string()),
        status,
        bytes_in: session.body_bytes_read() as u64,
        bytes_out: session.body_bytes_sent() as u64,
        duration_ms: ctx.started.elapsed().as_secs_f64() * 1000.0,
        request_id: ctx
            .request_id
            .as_ref()
            .and_then(|id| id.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        mirrors: ctx
            .tee
            .outcomes()
            .map(|(upstream, outcome)| access_log::MirrorEntry {
                upstream: upstream.to_string(),
                outcome: outcome.to_string(),
            })
            .collect(),
    }
}

/// The server reset or closed the connection, rather than timing out or answering badly.
fn server_broke_off(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed
    )
}

fn client_timed_out(e: &Error) -> bool {
    e.esource() == &ErrorSource::Downstream
        && matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        )
}

fn client_went_away(e: &Error) -> bool {
    e.esource() == &ErrorSource::Downstream
        && matches!(
            e.etype(),
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
        )
}

/// The status to answer for a failed request: 504 for an upstream timeout, 502
/// for other upstream failures, 400 for a bad request, 0 when the client is gone.
fn error_status(e: &Error) -> u16 {
    match e.etype() {
        ErrorType::HTTPStatus(code) => *code,
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if e.esource() == &ErrorSource::Upstream =>
        {
            504
        }
        // The client paused longer than body_timeout_ms: NGINX's answer too.
        ErrorType::ReadTimedout if e.esource() == &ErrorSource::Downstream => 408,
        // The client stopped reading the response: nothing more can reach it.
        ErrorType::WriteTimedout if e.esource() == &ErrorSource::Downstream => 0,
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream if client_went_away(e) => 0,
            ErrorSource::Downstream => 400,
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}
