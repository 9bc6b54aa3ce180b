//! Every Prometheus metric shadowgate exports, defined in one place.
//! Hot paths take pre-labelled handles (`RouteMetrics`, `MirrorMetrics`) so a request does no label lookups it can avoid.

use std::sync::{Arc, OnceLock};

use pingora_prometheus::prometheus::{
    self, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, core::Collector,
};

use crate::mirror::AbandonReason;

/// Latency buckets in seconds, from half a millisecond to half a minute.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Label value for requests that matched no route.
pub const NO_ROUTE: &str = "no_route";

/// `metric`, registered in `registry`. Definitions are constants, so building cannot fail;
/// registration only fails on a duplicate name, which the callers' `OnceLock`s rule out.
pub(crate) fn registered<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("metric definition is valid");
    let _ = registry.register(Box::new(metric.clone()));
    metric
}

/// The process's metric families, registered once in the default Prometheus registry.
pub struct Metrics {
    requests_total: IntCounterVec,
    request_duration: HistogramVec,
    mirror_sampled: IntCounterVec,
    mirror_completed: IntCounterVec,
    mirror_abandoned: IntCounterVec,
    mirror_bytes: IntCounterVec,
    mirror_resent: IntCounterVec,
    mirror_duration: HistogramVec,
    mirror_in_flight: IntGaugeVec,
    /// Shadow bytes queued in the whole process, against `mirror_budget_bytes`.
    pub mirror_queued_bytes: IntGauge,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: IntCounter,
    server_healthy: IntGaugeVec,
    process_info: IntGaugeVec,
    client_connections: IntGaugeVec,
    client_refused: IntCounterVec,
    client_header_timeouts: IntCounterVec,
    client_underscore_requests: IntCounterVec,
    tls_handshake_failures: IntCounterVec,
    upstream_retries: IntCounterVec,
}

impl Metrics {
    /// The process-wide metrics, created and registered on first use.
    pub fn global() -> Arc<Metrics> {
        static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
        METRICS
            .get_or_init(|| {
                Arc::new(Metrics::register(
                    pingora_prometheus::prometheus::default_registry(),
                ))
            })
            .clone()
    }

    fn register(registry: &Registry) -> Metrics {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            registered(registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            registered(registry, HistogramVec::new(opts, labels))
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            registered(registry, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let queued = registered(
            registry,
            IntGauge::new(
                "shadowgate_mirror_queued_bytes",
                "Shadow body bytes queued in the process now, bounded by mirror_budget_bytes",
            ),
        );
        let access_log_dropped = registered(
            registry,
            IntCounter::new(
                "shadowgate_access_log_dropped_total",
                "Access log lines dropped because the queue to the writer was full",
            ),
        );

        Metrics {
            requests_total: counter(
                "shadowgate_requests_total",
                "Requests answered, by route and response status",
                &["route", "status"],
            ),
            request_duration: histogram(
                "shadowgate_request_duration_seconds",
                "Time from request start to the end of the response, by route",
                &["route"],
            ),
            mirror_sampled: counter(
                "shadowgate_mirror_sampled_total",
                "Requests chosen for mirroring",
                &["route", "mirror"],
            ),
            mirror_completed: counter(
                "shadowgate_mirror_completed_total",
                "Shadow requests whose response was read to the end, by status class",
                &["route", "mirror", "status_class"],
            ),
            mirror_abandoned: counter(
                "shadowgate_mirror_abandoned_total",
                "Requests not mirrored or shadow requests given up, by reason",
                &["route", "mirror", "reason"],
            ),
            mirror_bytes: counter(
                "shadowgate_mirror_bytes_total",
                "Request body bytes written to shadow upstreams",
                &["route", "mirror"],
            ),
            mirror_resent: counter(
                "shadowgate_mirror_resent_total",
                "Shadow requests sent again on a new connection after the server closed the reused one before answering",
                &["route", "mirror"],
            ),
            mirror_duration: histogram(
                "shadowgate_mirror_duration_seconds",
                "Duration of completed shadow exchanges",
                &["route", "mirror"],
            ),
            mirror_in_flight: gauge(
                "shadowgate_mirror_in_flight",
                "Shadow requests under way",
                &["route", "mirror"],
            ),
            mirror_queued_bytes: queued,
            access_log_dropped,
            server_healthy: gauge(
                "shadowgate_upstream_server_healthy",
                "1 when the health check considers the server healthy",
                &["upstream", "server"],
            ),
            process_info: gauge(
                "shadowgate_process_info",
                "Always 1; labels identify the running process",
                &["version", "pid"],
            ),
            client_connections: gauge(
                "shadowgate_client_connections",
                "Client connections open now, by listener",
                &["listener"],
            ),
            client_refused: counter(
                "shadowgate_client_connections_refused_total",
                "Client connections refused because a limit was reached: answered 503 and closed, or over TLS closed before the handshake",
                &["listener", "limit"],
            ),
            client_header_timeouts: counter(
                "shadowgate_client_header_timeouts_total",
                "Connections closed because the request header did not arrive within header_timeout_ms",
                &["listener"],
            ),
            client_underscore_requests: counter(
                "shadowgate_client_underscore_requests_total",
                "Requests with header fields whose names have an underscore: those fields dropped, or the request answered 400 (rejected), by listeners[].client.headers_with_underscores",
                &["listener", "action"],
            ),
            tls_handshake_failures: counter(
                "shadowgate_tls_handshake_failures_total",
                "TLS handshakes that failed (failed) or did not finish within the listener's header_timeout_ms (timeout)",
                &["listener", "reason"],
            ),
            upstream_retries: counter(
                "shadowgate_upstream_retries_total",
                "Idempotent requests retried on another server after a failure before any response byte",
                &["upstream"],
            ),
        }
    }

    /// Mark this process in the metrics, so a scrape tells which process answered.
    pub fn record_process_info(&self) {
        self.process_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), &std::process::id().to_string()])
            .set(1);
    }

    pub fn set_server_health(&self, upstream: &str, server: &str, healthy: bool) {
        self.server_healthy
            .with_label_values(&[upstream, server])
            .set(healthy as i64);
    }

    /// Handles for one listener's client connections; `tls` for a listener that
    /// terminates TLS (only those count handshakes).
    pub fn listener(&self, listener: &str, tls: bool) -> ListenerMetrics {
        let handshakes = |reason| {
            self.tls_handshake_failures
                .with_label_values(&[listener, reason])
        };
        ListenerMetrics {
            tls_handshake_failures: tls.then(|| TlsHandshakeFailures {
                failed: handshakes("failed"),
                timeout: handshakes("timeout"),
            }),
            open: self.client_connections.with_label_values(&[listener]),
            refused_total: self
                .client_refused
                .with_label_values(&[listener, "max_connections"]),
            refused_per_ip: self
                .client_refused
                .with_label_values(&[listener, "max_connections_per_ip"]),
            header_timeouts: self.client_header_timeouts.with_label_values(&[listener]),
        }
    }

    /// One listener's counts of requests with underscored header names.
    pub fn underscore_requests(&self, listener: &str) -> UnderscoreCounters {
        let action = |action| {
            self.client_underscore_requests
                .with_label_values(&[listener, action])
        };
        UnderscoreCounters {
            dropped: action("dropped"),
            rejected: action("rejected"),
        }
    }

    /// The retry counter of one upstream pool.
    pub fn upstream_retries(&self, upstream: &str) -> IntCounter {
        self.upstream_retries.with_label_values(&[upstream])
    }

    /// Handles for one route.
    pub fn route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            route: route.to_string(),
            requests_total: self.requests_total.clone(),
            by_status: (STATUS_MIN..=STATUS_MAX).map(|_| OnceLock::new()).collect(),
            duration: self.request_duration.with_label_values(&[route]),
        }
    }

    /// Handles for one mirror of one route.
    pub fn mirror(&self, route: &str, mirror: &str) -> MirrorMetrics {
        let labels = [route, mirror];
        MirrorMetrics {
            sampled: self.mirror_sampled.with_label_values(&labels),
            completed: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| {
                self.mirror_completed
                    .with_label_values(&[route, mirror, class])
            }),
            abandoned: AbandonReason::ALL.map(|r| {
                self.mirror_abandoned
                    .with_label_values(&[route, mirror, r.as_str()])
            }),
            bytes: self.mirror_bytes.with_label_values(&labels),
            resent: self.mirror_resent.with_label_values(&labels),
            duration: self.mirror_duration.with_label_values(&labels),
            in_flight: self.mirror_in_flight.with_label_values(&labels),
        }
    }
}

const STATUS_MIN: u16 = 100;
const STATUS_MAX: u16 = 599;

/// Pre-labelled metrics of one route.
pub struct RouteMetrics {
    route: String,
    requests_total: IntCounterVec,
    /// The `requests_total` child of each status, resolved on its first use so
    /// later requests skip the label hash and the family's lock.
    by_status: Box<[OnceLock<IntCounter>]>,
    duration: Histogram,
}

impl RouteMetrics {
    pub fn observe(&self, status: u16, seconds: f64) {
        let counter = |status: u16| {
            let mut buf = itoa::Buffer::new();
            self.requests_total
                .with_label_values(&[self.route.as_str(), buf.format(status)])
        };
        match self.by_status.get(status.wrapping_sub(STATUS_MIN) as usize) {
            Some(slot) => slot.get_or_init(|| counter(status)).inc(),
            None => counter(status).inc(),
        }
        self.duration.observe(seconds);
    }
}

/// Pre-labelled metrics of one listener.
pub struct ListenerMetrics {
    pub open: IntGauge,
    pub refused_total: IntCounter,
    pub refused_per_ip: IntCounter,
    pub header_timeouts: IntCounter,
    pub tls_handshake_failures: Option<TlsHandshakeFailures>,
}

/// Requests whose underscored header names were dropped, or that were rejected for them.
#[derive(Clone)]
pub struct UnderscoreCounters {
    pub dropped: IntCounter,
    pub rejected: IntCounter,
}

/// A TLS listener's failed handshakes, by reason.
pub struct TlsHandshakeFailures {
    pub failed: IntCounter,
    pub timeout: IntCounter,
}

/// Pre-labelled metrics of one mirror.
pub struct MirrorMetrics {
    pub sampled: IntCounter,
    completed: [IntCounter; 5],
    abandoned: [IntCounter; AbandonReason::ALL.len()],
    pub bytes: IntCounter,
    pub resent: IntCounter,
    duration: Histogram,
    pub in_flight: IntGauge,
}

impl MirrorMetrics {
    pub fn abandoned(&self, reason: AbandonReason) {
        self.abandoned[reason as usize].inc();
    }

    pub fn completed(&self, status: u16, seconds: f64) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.completed[class].inc();
        self.duration.observe(seconds);
    }
}
