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
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::config::Config;
use crate::metrics::{Metrics, NO_ROUTE, RouteMetrics};
use crate::mirror::{Mirror, MirrorRuntime, MirrorTee, RequestBody};
use crate::request;
use crate::routing::{RouteMatch, Router, request_host};
use crate::upstream::{Pool, Pools};

/// A configured route, ready to serve.
pub struct Route {
    pub name: String,
    pool: Arc<Pool>,
    upstream_host: Option<HeaderValue>,
    mirrors: Vec<Arc<Mirror>>,
    metrics: RouteMetrics,
}

/// The proxy: routes, pools and mirrors, built once from the config.
pub struct ShadowGate {
    router: Router<Arc<Route>>,
    no_route_metrics: RouteMetrics,
    /// Set when this process starts handing over or shutting down: responses
    /// then say `Connection: close`, so clients move to the new process cleanly.
    draining: Arc<AtomicBool>,
}

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    route: Option<Arc<Route>>,
    /// Servers already tried for this request, so a retry goes elsewhere.
    tried: Vec<SocketAddr>,
    connect_failures: u32,
    tee: MirrorTee,
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
            // Validation guarantees every referenced pool exists.
            let Some(pool) = pools.get(&route.upstream) else {
                continue;
            };
            let mirrors: Vec<Arc<Mirror>> = route
                .mirrors
                .iter()
                .filter_map(|m| {
                    let pool = pools.get(&m.upstream)?;
                    let control = m
                        .compare
                        .as_ref()
                        .and_then(|c| pools.get(c.control.as_ref()?));
                    Some(Arc::new(Mirror::new(
                        &route.name,
                        m,
                        pool,
                        control,
                        metrics,
                        mirror_runtime.clone(),
                    )))
                })
                .collect();
            log_route(route);
            let built = Route {
                name: route.name.clone(),
                pool,
                upstream_host: route
                    .upstream_host
                    .as_deref()
                    .and_then(|h| HeaderValue::from_str(h).ok()),
                mirrors,
                metrics: metrics.route(&route.name),
            };
            routes.push((RouteMatch::from_config(&route.matcher), Arc::new(built)));
        }
        ShadowGate {
            router: Router::new(routes),
            no_route_metrics: metrics.route(NO_ROUTE),
            draining,
        }
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

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            route: None,
            tried: Vec::new(),
            connect_failures: 0,
            tee: MirrorTee::default(),
        }
    }

    /// Right after the request header is read: per-connection settings.
    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Answer pipelined requests in order instead of dropping them; Pingora
        // serves them one after another, each with its own body framing, so
        // each is mirrored (or not) on its own.
        session.set_pipelining_enabled(true);
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
            // Whatever follows on this connection cannot be trusted either.
            session.set_keepalive(None);
            let body = Bytes::from(format!("bad request: {reason}\n"));
            session.respond_error_with_body(400, body).await?;
            return Ok(true);
        }
        let req = session.req_header();
        let host = request_host(req);
        let Some(route) = self
            .router
            .find(&host, req.uri.path(), &req.method)
            .cloned()
        else {
            session
                .respond_error_with_body(
                    404,
                    Bytes::from_static(b"no route matches this request\n"),
                )
                .await?;
            return Ok(true);
        };
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
        let Some(addr) = pool.select(key.as_deref().unwrap_or_default(), &ctx.tried) else {
            return Error::e_explain(
                ErrorType::HTTPStatus(502),
                format!("no healthy server in upstream {}", pool.name),
            );
        };
        ctx.tried.push(addr);
        // Each attempt replays the body through request_body_filter from the start.
        ctx.tee.new_attempt();
        Ok(Box::new(pool.peer(addr)))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.connect_failures += 1;
        let retries = ctx.route.as_ref().map_or(0, |r| r.pool.connect_retries);
        // Nothing reached the server yet, so another server may take the request.
        e.set_retry(ctx.connect_failures <= retries);
        e
    }

    /// Per attempt, the header Pingora has sanitised: add what the next hop is
    /// owed, and hand the shadows their copy before the primary-only Host rewrite.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        request::add_forwarding_headers(upstream_request, client_ip(session));
        request::relay_proxy_authorization(session.req_header(), upstream_request);
        request::normalize_upstream(upstream_request);
        if ctx.tee.wants_primary_header() {
            ctx.tee.set_primary_header(upstream_request.clone());
        }
        if let Some(host) = ctx.route.as_ref().and_then(|r| r.upstream_host.clone()) {
            upstream_request.insert_header(http::header::HOST, host)?;
        }
        Ok(())
    }

    /// Per body chunk, after the header went upstream: tee it to the shadows.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
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
    /// (status 499) rather than logged as an error.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, e: &Error) -> bool {
        client_went_away(e)
    }

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
            .map_or(&self.no_route_metrics, |r| &r.metrics);
        metrics.observe(status, ctx.started.elapsed().as_secs_f64());
    }
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
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream if client_went_away(e) => 0,
            ErrorSource::Downstream => 400,
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}
