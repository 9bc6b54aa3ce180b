//! Upstream pools: a pingora-load-balancing `LoadBalancer` per pool, with its health check.
//! A pool picks a healthy server for a request and builds the `HttpPeer` with the pool's timeouts.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use log::{info, warn};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use pingora_load_balancing::health_check::{
    HealthCheck, HealthObserve, HttpHealthCheck, TcpHealthCheck,
};
use pingora_load_balancing::selection::{
    BackendIter, BackendSelection, Consistent, Random, RoundRobin,
};
use pingora_load_balancing::{Backend, Backends, LoadBalancer, discovery};
use pingora_prometheus::prometheus::IntCounter;

use crate::config::{
    HealthCheckConfig, HealthCheckPath, HealthCheckType, HostHeader, RequestKey, Selection,
    UpstreamConfig, UpstreamProtocol,
};
use crate::metrics::Metrics;

/// How far a selection may walk the ring or list looking for a healthy, untried server.
const MAX_SELECT_ITERATIONS: usize = 256;

/// The selection algorithm of a pool, each a `LoadBalancer` of its own type.
enum Balancer {
    RoundRobin(Arc<LoadBalancer<RoundRobin>>),
    Random(Arc<LoadBalancer<Random>>),
    Consistent(Arc<LoadBalancer<Consistent>>),
}

impl Balancer {
    fn select(&self, key: &[u8], tried: &[SocketAddr]) -> Option<Backend> {
        let accept = |b: &Backend, healthy: bool| {
            healthy && b.addr.as_inet().is_none_or(|addr| !tried.contains(addr))
        };
        match self {
            Balancer::RoundRobin(lb) => lb.select_with(key, MAX_SELECT_ITERATIONS, accept),
            Balancer::Random(lb) => lb.select_with(key, MAX_SELECT_ITERATIONS, accept),
            Balancer::Consistent(lb) => lb.select_with(key, MAX_SELECT_ITERATIONS, accept),
        }
    }
}

/// One named pool of servers.
pub struct Pool {
    pub name: String,
    balancer: Balancer,
    hash_key: Option<RequestKey>,
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    read_timeout: Duration,
    write_timeout: Duration,
    idle_timeout: Duration,
    /// How many more servers to try after a failed connect.
    pub connect_retries: u32,
    /// Retry an idempotent request on another server after a failure before any response byte.
    pub retry_idempotent: bool,
    /// Number of server addresses, so a retry is only made when another one exists.
    servers: usize,
    /// Counts those retries.
    pub retries: IntCounter,
}

impl Pool {
    /// The request key `consistent_hash` pools select by; `None` for other algorithms.
    pub fn hash_key(&self) -> Option<&RequestKey> {
        self.hash_key.as_ref()
    }

    /// How long a connect to one of the pool's servers may take.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Whether the pool speaks HTTP/2 (h2c) to its servers.
    pub fn is_h2(&self) -> bool {
        self.protocol == UpstreamProtocol::H2c
    }

    /// A healthy server, preferring ones not yet tried for this request, then
    /// ones that did not fail it.
    ///
    /// When every healthy server has been tried, any healthy server will do: a
    /// retry on the same server beats failing a request another server could not take.
    pub fn select(
        &self,
        key: &[u8],
        tried: &[SocketAddr],
        failed: &[SocketAddr],
    ) -> Option<SocketAddr> {
        self.balancer
            .select(key, tried)
            .or_else(|| self.balancer.select(key, failed))
            .or_else(|| self.balancer.select(key, &[]))
            .and_then(|b| b.addr.as_inet().copied())
    }

    /// Whether the pool has a server that is not in `servers`.
    pub fn has_server_besides(&self, servers: &[SocketAddr]) -> bool {
        let distinct = servers
            .iter()
            .enumerate()
            .filter(|(i, addr)| !servers[..*i].contains(addr))
            .count();
        distinct < self.servers
    }

    /// The peer to connect to, carrying this pool's timeouts and protocol.
    pub fn peer(&self, addr: SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, false, String::new());
        let options = &mut peer.options;
        options.connection_timeout = Some(self.connect_timeout);
        options.read_timeout = Some(self.read_timeout);
        options.write_timeout = Some(self.write_timeout);
        options.idle_timeout = Some(self.idle_timeout);
        if self.protocol == UpstreamProtocol::H2c {
            options.set_http_version(2, 2);
        }
        peer
    }
}

/// All pools by name, plus the background service that runs their health checks.
pub struct Pools {
    by_name: HashMap<String, Arc<Pool>>,
}

impl Pools {
    pub fn get(&self, name: &str) -> Option<Arc<Pool>> {
        self.by_name.get(name).cloned()
    }

    /// The pool a validated config refers to by name.
    ///
    /// Validation refuses a route or mirror naming an unknown pool, and `build_pools`
    /// builds every configured pool, so a miss is a bug in shadowgate: it stops the
    /// start rather than silently dropping the route or mirror.
    pub fn referenced(&self, name: &str) -> Arc<Pool> {
        match self.by_name.get(name) {
            Some(pool) => pool.clone(),
            None => panic!("validated config refers to pool {name:?}, which was not built"),
        }
    }
}

/// Runs service discovery and health checks of every pool in one background service.
pub struct HealthChecks {
    runners: Vec<Box<dyn Runner>>,
}

/// Type-erased `LoadBalancer::run`, so pools of different algorithms share one service.
#[async_trait]
trait Runner: Send + Sync {
    async fn run(&self, shutdown: ShutdownWatch);
}

#[async_trait]
impl<S> Runner for Arc<LoadBalancer<S>>
where
    S: BackendSelection + Send + Sync + 'static,
    S::Iter: BackendIter,
{
    async fn run(&self, shutdown: ShutdownWatch) {
        LoadBalancer::run(self, shutdown, None).await
    }
}

#[async_trait]
impl BackgroundService for HealthChecks {
    async fn start(&self, shutdown: ShutdownWatch) {
        let runs = self.runners.iter().map(|r| r.run(shutdown.clone()));
        futures::future::join_all(runs).await;
    }
}

/// Build every pool from the config. The returned service must be added to the server.
pub fn build_pools(
    upstreams: &std::collections::BTreeMap<String, UpstreamConfig>,
    metrics: &Arc<Metrics>,
) -> (Pools, HealthChecks) {
    let mut by_name = HashMap::new();
    let mut runners: Vec<Box<dyn Runner>> = Vec::new();
    for (name, config) in upstreams {
        let backends = backends_of(config);
        let balancer = match config.selection {
            Selection::RoundRobin => {
                let lb = Arc::new(load_balancer::<RoundRobin>(name, config, backends, metrics));
                runners.push(Box::new(lb.clone()));
                Balancer::RoundRobin(lb)
            }
            Selection::Random => {
                let lb = Arc::new(load_balancer::<Random>(name, config, backends, metrics));
                runners.push(Box::new(lb.clone()));
                Balancer::Random(lb)
            }
            Selection::ConsistentHash => {
                let lb = Arc::new(load_balancer::<Consistent>(name, config, backends, metrics));
                runners.push(Box::new(lb.clone()));
                Balancer::Consistent(lb)
            }
        };
        let pool = Pool {
            name: name.clone(),
            balancer,
            hash_key: config.hash_key.clone(),
            protocol: config.protocol,
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            read_timeout: Duration::from_millis(config.read_timeout_ms),
            write_timeout: Duration::from_millis(config.write_timeout_ms),
            idle_timeout: Duration::from_millis(config.idle_timeout_ms),
            connect_retries: config.connect_retries,
            retry_idempotent: config.retry_idempotent,
            servers: config.servers.iter().map(|s| s.resolved.len()).sum(),
            retries: metrics.upstream_retries(name),
        };
        by_name.insert(name.clone(), Arc::new(pool));
    }
    (Pools { by_name }, HealthChecks { runners })
}

fn backends_of(config: &UpstreamConfig) -> BTreeSet<Backend> {
    let mut set = BTreeSet::new();
    for server in &config.servers {
        for addr in &server.resolved {
            set.insert(Backend {
                addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(*addr),
                weight: server.weight as usize,
                ext: Default::default(),
            });
        }
    }
    set
}

fn load_balancer<S>(
    name: &str,
    config: &UpstreamConfig,
    backends: BTreeSet<Backend>,
    metrics: &Arc<Metrics>,
) -> LoadBalancer<S>
where
    S: BackendSelection + 'static,
    S::Iter: BackendIter,
{
    for backend in &backends {
        metrics.set_server_health(name, &backend.addr.to_string(), true);
    }
    let mut backends = Backends::new(discovery::Static::new(backends));
    if let Some(hc) = &config.health_check {
        backends.set_health_check(health_check(name, hc, metrics));
    }
    let mut lb = LoadBalancer::<S>::from_backends(backends);
    // Static discovery never blocks: fill the selector now so the pool serves before
    // its background service first runs.
    if let Some(Err(e)) = lb.update().now_or_never() {
        warn!("upstream {name}: initial backend update failed: {e}");
    }
    lb.health_check_frequency = config
        .health_check
        .as_ref()
        .map(|hc| Duration::from_millis(hc.interval_ms));
    lb.parallel_health_check = true;
    lb
}

fn health_check(
    pool: &str,
    config: &HealthCheckConfig,
    metrics: &Arc<Metrics>,
) -> Box<dyn HealthCheck + Send + Sync> {
    let observer = Box::new(HealthLogger {
        pool: pool.to_string(),
        metrics: metrics.clone(),
    });
    let timeout = Duration::from_millis(config.timeout_ms);
    match config.kind {
        HealthCheckType::Tcp => {
            let mut hc = TcpHealthCheck::new();
            hc.consecutive_success = config.healthy_threshold as usize;
            hc.consecutive_failure = config.unhealthy_threshold as usize;
            hc.peer_template.options.connection_timeout = Some(timeout);
            hc.health_changed_callback = Some(observer);
            hc
        }
        HealthCheckType::Http => {
            let host = config.http_host();
            // `new` unwraps the host as a header value; `HostHeader` is one by construction.
            let mut hc = HttpHealthCheck::new(host.as_str(), false);
            hc.consecutive_success = config.healthy_threshold as usize;
            hc.consecutive_failure = config.unhealthy_threshold as usize;
            hc.peer_template.options.connection_timeout = Some(timeout);
            hc.peer_template.options.read_timeout = Some(timeout);
            hc.req = health_check_request(config.http_path(), &host);
            let expected = config.http_expected_status();
            hc.validator = Some(Box::new(move |resp| {
                if resp.status.as_u16() == expected {
                    Ok(())
                } else {
                    pingora_error::Error::e_explain(
                        pingora_error::ErrorType::HTTPStatus(resp.status.as_u16()),
                        format!("health check expected status {expected}"),
                    )
                }
            }));
            hc.health_changed_callback = Some(observer);
            Box::new(hc)
        }
    }
}

/// The GET an HTTP health check sends, built from parsed parts so it cannot fail.
fn health_check_request(path: HealthCheckPath, host: &HostHeader) -> RequestHeader {
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.uri = http::Uri::from(path.0);
    parts
        .headers
        .insert(http::header::HOST, host.header_value().clone());
    parts.headers.insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static("shadowgate-health-check"),
    );
    RequestHeader::from(parts)
}

/// Logs health flips and keeps the per-server health gauge current.
struct HealthLogger {
    pool: String,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl HealthObserve for HealthLogger {
    async fn observe(&self, target: &Backend, healthy: bool) {
        let server = target.addr.to_string();
        if healthy {
            info!("upstream {}: server {server} is healthy again", self.pool);
        } else {
            warn!(
                "upstream {}: server {server} is unhealthy, taking it out of rotation",
                self.pool
            );
        }
        self.metrics.set_server_health(&self.pool, &server, healthy);
    }
}
