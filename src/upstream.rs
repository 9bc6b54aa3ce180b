//! Upstream pools: a pool picks a healthy server for a request by one of Pingora's selection
//! algorithms, and builds the `HttpPeer` with the pool's timeouts. Health checks are Pingora's.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// A pool's choice of server: Pingora's selection algorithm (round robin, random or
/// ketama) walked over the pool's servers, each taken or skipped by its health as the
/// pool's health check last reported it.
///
/// Pingora's `LoadBalancer::select_with` walks the same iterator, but for each
/// candidate it hashes the backend with SipHash twice (to skip repeats in a set it
/// allocates, and to look up its health), about 0.2 µs per pick, once for the primary
/// and once per shadow (docs/bench/history.md). A pool's servers are fixed at load, so
/// each is numbered then, and its health is one atomic flag.
enum Picker {
    RoundRobin(Arc<RoundRobin>),
    Random(Arc<Random>),
    Consistent(Arc<Consistent>),
}

impl Picker {
    fn pick(&self, health: &ServerHealth, key: &[u8], avoid: &[SocketAddr]) -> Option<SocketAddr> {
        match self {
            Picker::RoundRobin(s) => walk(s.iter(key), health, avoid),
            Picker::Random(s) => walk(s.iter(key), health, avoid),
            Picker::Consistent(s) => walk(s.iter(key), health, avoid),
        }
    }
}

/// The first healthy server not in `avoid`, in the algorithm's order.
fn walk(
    mut candidates: impl BackendIter,
    health: &ServerHealth,
    avoid: &[SocketAddr],
) -> Option<SocketAddr> {
    for _ in 0..MAX_SELECT_ITERATIONS {
        let backend = candidates.next()?;
        let Some(&ServerNumber(n)) = backend.ext.get::<ServerNumber>() else {
            continue;
        };
        let (addr, healthy) = &health.servers[n];
        if healthy.load(Ordering::Relaxed) && !avoid.contains(addr) {
            return Some(*addr);
        }
    }
    None
}

/// A server's place in its pool's `ServerHealth`, carried in its `Backend`.
#[derive(Clone, Copy)]
struct ServerNumber(usize);

/// The health of a pool's servers, numbered at load; written by the health check.
struct ServerHealth {
    servers: Vec<(SocketAddr, AtomicBool)>,
}

impl ServerHealth {
    fn set(&self, addr: &SocketAddr, healthy: bool) {
        for (server, flag) in &self.servers {
            if server == addr {
                flag.store(healthy, Ordering::Relaxed);
            }
        }
    }
}

/// One named pool of servers.
pub struct Pool {
    pub name: String,
    picker: Picker,
    health: Arc<ServerHealth>,
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
        let health = &*self.health;
        self.picker
            .pick(health, key, tried)
            .or_else(|| self.picker.pick(health, key, failed))
            .or_else(|| self.picker.pick(health, key, &[]))
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

/// Runs the health checks of every pool in one background service.
pub struct HealthChecks {
    checkers: Vec<Arc<LoadBalancer<RoundRobin>>>,
}

#[async_trait]
impl BackgroundService for HealthChecks {
    async fn start(&self, shutdown: ShutdownWatch) {
        let runs = self
            .checkers
            .iter()
            .map(|lb| lb.run(shutdown.clone(), None));
        futures::future::join_all(runs).await;
    }
}

/// Build every pool from the config. The returned service must be added to the server.
pub fn build_pools(
    upstreams: &std::collections::BTreeMap<String, UpstreamConfig>,
    metrics: &Arc<Metrics>,
) -> (Pools, HealthChecks) {
    let mut by_name = HashMap::new();
    let mut checkers = Vec::new();
    for (name, config) in upstreams {
        let servers = config.servers.iter().flat_map(|server| {
            let weight = server.weight as usize;
            server.resolved.iter().map(move |addr| (*addr, weight))
        });
        let (backends, health) = numbered_servers(servers);
        for (addr, _) in &health.servers {
            metrics.set_server_health(name, &addr.to_string(), true);
        }
        let health = Arc::new(health);
        if let Some(hc) = &config.health_check {
            checkers.push(health_checker(name, hc, backends.clone(), &health, metrics));
        }
        let picker = match config.selection {
            Selection::RoundRobin => Picker::RoundRobin(Arc::new(RoundRobin::build(&backends))),
            Selection::Random => Picker::Random(Arc::new(Random::build(&backends))),
            Selection::ConsistentHash => Picker::Consistent(Arc::new(Consistent::build(&backends))),
        };
        let pool = Pool {
            name: name.clone(),
            picker,
            health,
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
    (Pools { by_name }, HealthChecks { checkers })
}

/// A pool's servers (address, weight) as Pingora backends, each carrying its number in
/// the pool's health; all start healthy, as in Pingora.
fn numbered_servers(
    servers: impl IntoIterator<Item = (SocketAddr, usize)>,
) -> (BTreeSet<Backend>, ServerHealth) {
    let mut backends = BTreeSet::new();
    let mut health: Vec<(SocketAddr, AtomicBool)> = Vec::new();
    for (addr, weight) in servers {
        let number = match health.iter().position(|(a, _)| *a == addr) {
            Some(number) => number,
            None => {
                health.push((addr, AtomicBool::new(true)));
                health.len() - 1
            }
        };
        let mut backend = Backend {
            addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(addr),
            weight,
            ext: Default::default(),
        };
        backend.ext.insert(ServerNumber(number));
        backends.insert(backend);
    }
    (backends, ServerHealth { servers: health })
}

/// A `LoadBalancer` kept only to run the pool's health check (Pingora's, with its
/// thresholds); what it finds reaches the pool through the check's observer.
fn health_checker(
    name: &str,
    config: &HealthCheckConfig,
    backends: BTreeSet<Backend>,
    health: &Arc<ServerHealth>,
    metrics: &Arc<Metrics>,
) -> Arc<LoadBalancer<RoundRobin>> {
    let mut backends = Backends::new(discovery::Static::new(backends));
    backends.set_health_check(health_check(name, config, health, metrics));
    let mut lb = LoadBalancer::<RoundRobin>::from_backends(backends);
    // Static discovery never blocks: register the servers now, before the first check.
    if let Some(Err(e)) = lb.update().now_or_never() {
        warn!("upstream {name}: initial backend update failed: {e}");
    }
    lb.health_check_frequency = Some(Duration::from_millis(config.interval_ms));
    lb.parallel_health_check = true;
    Arc::new(lb)
}

fn health_check(
    pool: &str,
    config: &HealthCheckConfig,
    health: &Arc<ServerHealth>,
    metrics: &Arc<Metrics>,
) -> Box<dyn HealthCheck + Send + Sync> {
    let observer = Box::new(HealthLogger {
        pool: pool.to_string(),
        health: health.clone(),
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
    health: Arc<ServerHealth>,
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
        if let Some(addr) = target.addr.as_inet() {
            self.health.set(addr, healthy);
        }
        self.metrics.set_server_health(&self.pool, &server, healthy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn round_robin(servers: &[(u16, usize)]) -> (Picker, ServerHealth) {
        let (backends, health) = numbered_servers(servers.iter().map(|&(p, w)| (addr(p), w)));
        (
            Picker::RoundRobin(Arc::new(RoundRobin::build(&backends))),
            health,
        )
    }

    fn picks(picker: &Picker, health: &ServerHealth, n: usize, avoid: &[SocketAddr]) -> Vec<u16> {
        (0..n)
            .map(|_| picker.pick(health, b"", avoid).map_or(0, |a| a.port()))
            .collect()
    }

    #[test]
    fn round_robin_follows_the_weights() {
        let (picker, health) = round_robin(&[(1, 1), (2, 2)]);
        let got = picks(&picker, &health, 300, &[]);
        assert_eq!(got.iter().filter(|&&p| p == 1).count(), 100);
        assert_eq!(got.iter().filter(|&&p| p == 2).count(), 200);
    }

    #[test]
    fn an_unhealthy_or_avoided_server_is_skipped_and_none_when_none_is_left() {
        let (picker, health) = round_robin(&[(1, 1), (2, 1), (3, 1)]);
        health.set(&addr(2), false);
        assert!(!picks(&picker, &health, 30, &[]).contains(&2));
        assert_eq!(picks(&picker, &health, 10, &[addr(1)]), [3; 10]);
        health.set(&addr(2), true);
        assert!(picks(&picker, &health, 30, &[]).contains(&2));
        for port in [1, 2, 3] {
            health.set(&addr(port), false);
        }
        assert_eq!(picker.pick(&health, b"", &[]), None);
    }

    #[test]
    fn the_same_address_twice_is_one_server_for_health() {
        let (backends, health) = numbered_servers([(addr(1), 1), (addr(1), 3), (addr(2), 1)]);
        assert_eq!(health.servers.len(), 2);
        assert_eq!(backends.len(), 3);
        let picker = Picker::Random(Arc::new(Random::build(&backends)));
        health.set(&addr(1), false);
        assert_eq!(picks(&picker, &health, 20, &[]), [2; 20]);
    }
}
