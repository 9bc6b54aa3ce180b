//! The serde schema: one struct per YAML section, with its defaults.
//! Values inside are parsed into their runtime types (see `values`); cross-field rules live in `validate`.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use http::Method;
use serde::Deserialize;

use super::values::*;
use crate::access_log::AccessLogConfig;
use crate::tls::TlsConfig;

/// Default budget for all queued shadow bytes of the process together (64 MiB).
pub const DEFAULT_MIRROR_BUDGET_BYTES: u64 = 64 * 1024 * 1024;

/// shadowgate's own top-level sections; Pingora's keys sit beside them in the same file.
#[derive(Debug, Deserialize)]
pub(super) struct Sections {
    #[serde(default)]
    pub(super) listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub(super) upstreams: BTreeMap<String, UpstreamConfig>,
    #[serde(default)]
    pub(super) routes: Vec<RouteConfig>,
    #[serde(default)]
    pub(super) metrics: Option<MetricsConfig>,
    #[serde(default = "default_mirror_budget")]
    pub(super) mirror_budget_bytes: u64,
    #[serde(default = "default_mirror_threads")]
    pub(super) mirror_threads: u32,
    #[serde(default)]
    pub(super) access_log: Option<AccessLogConfig>,
}

pub(super) const SHADOWGATE_KEYS: &[&str] = &[
    "listeners",
    "upstreams",
    "routes",
    "metrics",
    "mirror_budget_bytes",
    "mirror_threads",
    "access_log",
];

fn default_mirror_budget() -> u64 {
    DEFAULT_MIRROR_BUDGET_BYTES
}

fn default_mirror_threads() -> u32 {
    0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: Address,
    /// Terminate TLS here (HTTP/2 offered by ALPN unless `tls.h2: false`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Also accept cleartext HTTP/2 by prior knowledge on this (non-TLS) port.
    #[serde(default)]
    pub h2c: bool,
    /// Timeouts and caps for the clients of this listener (`limits.rs`).
    #[serde(default)]
    pub client: crate::limits::ClientLimits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub address: Address,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub servers: Vec<ServerConfig>,
    #[serde(default)]
    pub selection: Selection,
    /// Which part of the request feeds `consistent_hash`.
    #[serde(default)]
    pub hash_key: Option<RequestKey>,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_io_timeout")]
    pub read_timeout_ms: u64,
    #[serde(default = "default_io_timeout")]
    pub write_timeout_ms: u64,
    /// How long an idle keep-alive connection to a server stays in the pool.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_ms: u64,
    /// How many more servers to try when connecting to one fails.
    #[serde(default = "default_connect_retries")]
    pub connect_retries: u32,
    /// Retry an idempotent request once on another server when this one fails
    /// before sending any response byte (see README, "Retries").
    #[serde(default = "default_retry_idempotent")]
    pub retry_idempotent: bool,
}

fn default_connect_timeout() -> u64 {
    2_000
}
fn default_io_timeout() -> u64 {
    60_000
}
fn default_idle_timeout() -> u64 {
    60_000
}
fn default_connect_retries() -> u32 {
    2
}
fn default_retry_idempotent() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Filled in by validation: `address` resolved to socket addresses.
    #[serde(skip)]
    pub resolved: Vec<SocketAddr>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    #[default]
    RoundRobin,
    Random,
    ConsistentHash,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 over cleartext, prior knowledge.
    H2c,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckType {
    Tcp,
    Http,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(rename = "type")]
    pub kind: HealthCheckType,
    /// HTTP checks only: the path to GET.
    #[serde(default)]
    pub path: Option<HealthCheckPath>,
    /// HTTP checks only: the status that means healthy.
    #[serde(default)]
    pub expected_status: Option<u16>,
    /// HTTP checks only: the Host header to send.
    #[serde(default)]
    pub host: Option<HostHeader>,
    #[serde(default = "default_hc_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_hc_timeout")]
    pub timeout_ms: u64,
    /// Consecutive successes that bring an unhealthy server back.
    #[serde(default = "default_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that take a healthy server out.
    #[serde(default = "default_threshold")]
    pub unhealthy_threshold: u32,
}

fn default_hc_interval() -> u64 {
    1_000
}
fn default_hc_timeout() -> u64 {
    1_000
}
fn default_threshold() -> u32 {
    1
}

impl HealthCheckConfig {
    /// The path to GET: the configured one, or `/` when the key is absent.
    pub fn http_path(&self) -> HealthCheckPath {
        self.path.clone().unwrap_or_else(HealthCheckPath::root)
    }
    /// The Host to send: the configured one, or `localhost` when the key is absent.
    pub fn http_host(&self) -> HostHeader {
        self.host.clone().unwrap_or_else(HostHeader::localhost)
    }
    /// The healthy status: the configured one, or 200 when the key is absent.
    pub fn http_expected_status(&self) -> u16 {
        self.expected_status.unwrap_or(200)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    pub upstream: String,
    /// Rewrite the Host header sent to the primary; unchanged by default.
    #[serde(default)]
    pub upstream_host: Option<HostHeader>,
    /// The request body limit on this route, in place of the listener's
    /// `client.max_body_bytes` (0: no limit); the listener's by default.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    #[serde(default)]
    pub mirrors: Vec<MirrorConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    #[serde(default)]
    pub host: Option<HostPattern>,
    #[serde(default)]
    pub path_prefix: Option<PathPrefix>,
    #[serde(default)]
    pub methods: Option<Vec<MethodName>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    pub upstream: String,
    pub percentage: Percentage,
    #[serde(default)]
    pub sample_by: SampleBy,
    #[serde(default = "default_mirror_methods")]
    pub methods: Vec<MethodName>,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: u64,
    #[serde(default = "default_mirror_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    #[serde(default)]
    pub request_headers: HeaderEdits,
    /// Host header for the shadow request; unchanged by default.
    #[serde(default)]
    pub host: Option<HostHeader>,
    /// Add `x-shadowgate-mirror: 1` so the shadow can tell mirrored traffic apart.
    #[serde(default = "default_true")]
    pub mark_header: bool,
    /// Shadow verdicts: compare the shadow's responses with the primary's.
    #[serde(default)]
    pub compare: Option<crate::compare::config::CompareConfig>,
}

fn default_mirror_methods() -> Vec<MethodName> {
    [Method::GET, Method::HEAD, Method::OPTIONS]
        .into_iter()
        .map(MethodName)
        .collect()
}
fn default_max_body() -> u64 {
    10 * 1024 * 1024
}
fn default_queue_bytes() -> u64 {
    1024 * 1024
}
fn default_mirror_timeout() -> u64 {
    5_000
}
fn default_max_in_flight() -> u32 {
    256
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    #[serde(default)]
    pub set: HeaderSet,
    #[serde(default)]
    pub remove: Vec<ValidHeaderName>,
}
