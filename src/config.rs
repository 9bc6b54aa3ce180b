//! The configuration file: shadowgate's YAML schema, its defaults and its validation.
//! One file holds Pingora's server keys and shadowgate's sections; `load` turns it into a checked model.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use http::Method;
use pingora_core::server::configuration::ServerConf;
use serde::Deserialize;

/// Default budget for all queued shadow bytes of the process together (64 MiB).
pub const DEFAULT_MIRROR_BUDGET_BYTES: u64 = 64 * 1024 * 1024;

/// A configuration problem, with the field path that causes it.
///
/// Displayed as `field.path: what is wrong and how to fix it`, followed by the
/// YAML parser's line and column where it knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field, e.g. `routes[1].upstream`. Empty for file-level errors.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Deserialize `text` into `T`, reporting the full path of the offending field
/// (serde_yaml alone stops at the enclosing mapping for values that fail their
/// own checks) followed by the parser's line and column.
fn from_yaml_text<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text)).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // "." is the document root; a "?" segment means a syntax error, where the
        // parser's line and column say more than a half-built path.
        let path = if path == "." || path.contains('?') {
            String::new()
        } else {
            path
        };
        let message = strip_enclosing_path(&message, &path).to_string();
        ConfigError::new(path, message)
    })
}

/// serde_yaml prefixes its message with the path it knows, which is the full
/// path or a prefix of it; drop it, since the full path goes in front.
fn strip_enclosing_path<'a>(message: &'a str, path: &str) -> &'a str {
    match message.split_once(": ") {
        Some((known, rest)) if !path.is_empty() && path.starts_with(known) => rest,
        _ => message,
    }
}

impl fmt::Display for ConfigError {
    /// Always one line: line breaks inside key names or values are escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let one_line = |s: &str| s.replace('\n', "\\n").replace('\r', "\\r");
        if self.path.is_empty() {
            write!(f, "{}", one_line(&self.message))
        } else {
            write!(f, "{}: {}", one_line(&self.path), one_line(&self.message))
        }
    }
}

impl std::error::Error for ConfigError {}

/// The whole, validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Pingora's own server settings (threads, pid_file, upgrade_sock, grace periods, ...).
    pub server: ServerConf,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    pub metrics: Option<MetricsConfig>,
    /// Ceiling on the shadow bytes queued in the whole process at once.
    pub mirror_budget_bytes: u64,
    /// Worker threads for shadow sessions; 0 runs them on the proxy's threads.
    pub mirror_threads: u32,
}

/// shadowgate's own top-level sections; Pingora's keys sit beside them in the same file.
#[derive(Debug, Deserialize)]
struct Sections {
    #[serde(default)]
    listeners: Vec<ListenerConfig>,
    #[serde(default)]
    upstreams: BTreeMap<String, UpstreamConfig>,
    #[serde(default)]
    routes: Vec<RouteConfig>,
    #[serde(default)]
    metrics: Option<MetricsConfig>,
    #[serde(default = "default_mirror_budget")]
    mirror_budget_bytes: u64,
    #[serde(default = "default_mirror_threads")]
    mirror_threads: u32,
}

const SHADOWGATE_KEYS: &[&str] = &[
    "listeners",
    "upstreams",
    "routes",
    "metrics",
    "mirror_budget_bytes",
    "mirror_threads",
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
    pub path: Option<String>,
    /// HTTP checks only: the status that means healthy.
    #[serde(default)]
    pub expected_status: Option<u16>,
    /// HTTP checks only: the Host header to send.
    #[serde(default)]
    pub host: Option<String>,
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
    pub fn http_path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }
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
    pub upstream_host: Option<String>,
    #[serde(default)]
    pub mirrors: Vec<MirrorConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    #[serde(default)]
    pub host: Option<HostPattern>,
    #[serde(default)]
    pub path_prefix: Option<String>,
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
    pub host: Option<String>,
    /// Add `x-shadowgate-mirror: 1` so the shadow can tell mirrored traffic apart.
    #[serde(default = "default_true")]
    pub mark_header: bool,
    /// Shadow verdicts: compare the shadow's responses with the primary's.
    #[serde(default)]
    pub compare: Option<crate::compare::config::CompareConfig>,
}

fn default_mirror_methods() -> Vec<MethodName> {
    ["GET", "HEAD", "OPTIONS"]
        .iter()
        .map(|m| MethodName(Method::from_bytes(m.as_bytes()).unwrap_or(Method::GET)))
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
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A `host:port` socket address, kept in its canonical text form.
///
/// Pingora matches listeners across an upgrade by their exact address string,
/// so both processes must spell it the same way: we always use `SocketAddr`'s form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Address(pub SocketAddr);

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse::<SocketAddr>().map(Address).map_err(|_| {
            serde::de::Error::custom(format!(
                "cannot parse {text:?} as an IP address and port; write it like \"127.0.0.1:8080\" or \"[::1]:8080\""
            ))
        })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An HTTP method name, upper case as on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MethodName(pub Method);

impl<'de> Deserialize<'de> for MethodName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let valid = !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
        match Method::from_bytes(text.as_bytes()) {
            Ok(m) if valid => Ok(MethodName(m)),
            _ => Err(serde::de::Error::custom(format!(
                "{text:?} is not an HTTP method; use upper-case names like GET, POST, PUT"
            ))),
        }
    }
}

/// A route's host pattern: an exact name, or `*.suffix` for any subdomain of suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// Stored with its leading dot: `*.example.com` keeps `.example.com`.
    Suffix(String),
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?.to_ascii_lowercase();
        let invalid = |why: &str| {
            serde::de::Error::custom(format!(
                "invalid host pattern {text:?}: {why}; write an exact name like \"api.example.com\" or a wildcard like \"*.example.com\""
            ))
        };
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        };
        if let Some(rest) = text.strip_prefix("*.") {
            if !name_ok(rest) {
                return Err(invalid("the part after \"*.\" must be a host name"));
            }
            Ok(HostPattern::Suffix(format!(".{rest}")))
        } else if text.contains('*') {
            Err(invalid("a wildcard may only stand first, as \"*.\""))
        } else if text.contains(':') {
            Err(invalid("leave out the port"))
        } else if !name_ok(&text) {
            Err(invalid("use letters, digits, '-' and '.'"))
        } else {
            Ok(HostPattern::Exact(text))
        }
    }
}

/// A part of the request that keys hashing: for upstream selection or mirror sampling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKey {
    /// A request header, by lower-case name.
    Header(String),
    /// A cookie, by name.
    Cookie(String),
    ClientIp,
    Path,
}

impl RequestKey {
    fn parse(text: &str) -> Option<RequestKey> {
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        match text.split_once(':') {
            Some(("header", name)) if name_ok(name) => {
                Some(RequestKey::Header(name.to_ascii_lowercase()))
            }
            Some(("cookie", name)) if name_ok(name) => Some(RequestKey::Cookie(name.to_string())),
            None if text == "client_ip" => Some(RequestKey::ClientIp),
            None if text == "path" => Some(RequestKey::Path),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for RequestKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match RequestKey::parse(&text) {
            Some(RequestKey::Cookie(_)) | None => Err(serde::de::Error::custom(format!(
                "invalid hash_key {text:?}; use \"header:NAME\", \"client_ip\" or \"path\""
            ))),
            Some(key) => Ok(key),
        }
    }
}

/// How a mirror decides which requests to copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SampleBy {
    /// A deterministic counter: exactly p of every 100 eligible requests, evenly spread.
    #[default]
    Counter,
    /// A stable hash of a request key, so one key is always mirrored or never.
    Key(RequestKey),
}

impl<'de> Deserialize<'de> for SampleBy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "counter" {
            return Ok(SampleBy::Counter);
        }
        match RequestKey::parse(&text) {
            Some(RequestKey::Path) | None => Err(serde::de::Error::custom(format!(
                "invalid sample_by {text:?}; use \"counter\", \"header:NAME\", \"cookie:NAME\" or \"client_ip\""
            ))),
            Some(key) => Ok(SampleBy::Key(key)),
        }
    }
}

/// A percentage from 0 to 100 with at most two decimals, held in basis points (0..=10_000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percentage {
    pub basis_points: u32,
}

impl<'de> Deserialize<'de> for Percentage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(d)?;
        let scaled = value * 100.0;
        let rounded = scaled.round();
        if !(0.0..=100.0).contains(&value) {
            return Err(serde::de::Error::custom(format!(
                "{value} is out of range; use a number from 0 to 100"
            )));
        }
        if (scaled - rounded).abs() > 1e-6 {
            return Err(serde::de::Error::custom(format!(
                "{value} has more than two decimals; round it, e.g. to {:.2}",
                value
            )));
        }
        Ok(Percentage {
            basis_points: rounded as u32,
        })
    }
}

impl fmt::Display for Percentage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.basis_points / 100;
        let frac = self.basis_points % 100;
        if frac == 0 {
            write!(f, "{whole}%")
        } else {
            write!(f, "{whole}.{frac:02}%")
        }
    }
}

impl FromStr for Config {
    type Err = ConfigError;

    /// Parse and validate the text of a configuration file.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let document: serde_yaml::Value = from_yaml_text(text)?;
        let mapping = match &document {
            serde_yaml::Value::Mapping(m) => m.clone(),
            serde_yaml::Value::Null => serde_yaml::Mapping::new(),
            _ => {
                return Err(ConfigError::new(
                    "",
                    "the file must be a YAML mapping of keys such as listeners, upstreams and routes",
                ));
            }
        };
        check_top_level_keys(&mapping)?;
        // Parse from the text, not the Value, so errors keep their line and column.
        let server: ServerConf = if mapping.is_empty() {
            ServerConf::default()
        } else {
            from_yaml_text(text)?
        };
        // Pingora's own checks of its keys.
        let server = server
            .validate()
            .map_err(|e| ConfigError::new("", e.to_string()))?;
        let sections: Sections = if mapping.is_empty() {
            from_yaml_text("{}")?
        } else {
            from_yaml_text(text)?
        };
        let mut config = Config {
            server,
            listeners: sections.listeners,
            upstreams: sections.upstreams,
            routes: sections.routes,
            metrics: sections.metrics,
            mirror_budget_bytes: sections.mirror_budget_bytes,
            mirror_threads: sections.mirror_threads,
        };
        apply_private_runtime_dir(&mut config.server, &mapping);
        config.validate()?;
        Ok(config)
    }
}

impl Config {
    /// Read, parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                "",
                format!("cannot read configuration file {}: {e}", path.display()),
            )
        })?;
        text.parse()
    }

    fn validate(&mut self) -> Result<(), ConfigError> {
        self.validate_server()?;
        if self.listeners.is_empty() {
            return Err(ConfigError::new(
                "listeners",
                "no listener configured; add one like `listeners: [{ address: \"127.0.0.1:8080\" }]`",
            ));
        }
        let mut seen = HashSet::new();
        for (i, listener) in self.listeners.iter().enumerate() {
            if !seen.insert(listener.address) {
                return Err(ConfigError::new(
                    format!("listeners[{i}].address"),
                    format!("{} is listed twice; remove the duplicate", listener.address),
                ));
            }
        }
        if let Some(metrics) = &self.metrics
            && seen.contains(&metrics.address)
        {
            return Err(ConfigError::new(
                "metrics.address",
                format!(
                    "{} is already a proxy listener; give metrics its own port",
                    metrics.address
                ),
            ));
        }
        if self.upstreams.is_empty() {
            return Err(ConfigError::new(
                "upstreams",
                "no upstream pool configured; add at least one pool with servers",
            ));
        }
        for (name, upstream) in self.upstreams.iter_mut() {
            validate_upstream(name, upstream)?;
        }
        check_range(
            "mirror_budget_bytes",
            self.mirror_budget_bytes,
            1,
            u64::MAX / 2,
        )?;
        check_range("mirror_threads", self.mirror_threads as u64, 0, 256)?;
        self.validate_routes()
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        check_range("threads", self.server.threads as u64, 1, 1024)?;
        if self.server.daemon_wait_for_ready {
            return Err(ConfigError::new(
                "daemon_wait_for_ready",
                "not supported and not needed: with -d, shadowgate returns once its listening sockets are bound or taken over; remove the key",
            ));
        }
        check_private_dir("pid_file", &self.server.pid_file)?;
        check_private_dir("upgrade_sock", &self.server.upgrade_sock)
    }

    fn validate_routes(&self) -> Result<(), ConfigError> {
        if self.routes.is_empty() {
            return Err(ConfigError::new(
                "routes",
                "no route configured; add one like `routes: [{ name: all, upstream: app }]`",
            ));
        }
        let known = || {
            self.upstreams
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut names = std::collections::HashMap::new();
        for (i, route) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            if route.name.is_empty() {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    "route name is empty; give the route a name for logs and metrics",
                ));
            }
            if let Some(first) = names.insert(route.name.as_str(), i) {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    format!(
                        "duplicate route name {:?} (also routes[{first}].name); rename one",
                        route.name
                    ),
                ));
            }
            if !self.upstreams.contains_key(&route.upstream) {
                return Err(ConfigError::new(
                    format!("{at}.upstream"),
                    format!("unknown upstream {:?} (known: {})", route.upstream, known()),
                ));
            }
            if let Some(prefix) = &route.matcher.path_prefix
                && !prefix.starts_with('/')
            {
                return Err(ConfigError::new(
                    format!("{at}.match.path_prefix"),
                    format!("{prefix:?} must start with '/'"),
                ));
            }
            if let Some(methods) = &route.matcher.methods
                && methods.is_empty()
            {
                return Err(ConfigError::new(
                    format!("{at}.match.methods"),
                    "an empty method list matches nothing; list methods or leave the key out",
                ));
            }
            let mut mirror_upstreams = HashSet::new();
            for (j, mirror) in route.mirrors.iter().enumerate() {
                let at = format!("{at}.mirrors[{j}]");
                if !self.upstreams.contains_key(&mirror.upstream) {
                    return Err(ConfigError::new(
                        format!("{at}.upstream"),
                        format!(
                            "unknown upstream {:?} (known: {})",
                            mirror.upstream,
                            known()
                        ),
                    ));
                }
                if mirror.upstream == route.upstream {
                    return Err(ConfigError::new(
                        format!("{at}.upstream"),
                        format!(
                            "{:?} is this route's primary upstream; mirror to a different pool",
                            mirror.upstream
                        ),
                    ));
                }
                if !mirror_upstreams.insert(mirror.upstream.as_str()) {
                    return Err(ConfigError::new(
                        format!("{at}.upstream"),
                        format!(
                            "this route already mirrors to {:?}; one mirror per shadow pool",
                            mirror.upstream
                        ),
                    ));
                }
                validate_mirror(&at, mirror, self.mirror_budget_bytes)?;
                if let Some(compare) = &mirror.compare {
                    let methods: Vec<Method> = mirror.methods.iter().map(|m| m.0.clone()).collect();
                    let context = crate::compare::config::MirrorContext {
                        candidate: &mirror.upstream,
                        primary: &route.upstream,
                        mirrored_methods: &methods,
                        is_upstream: &|name| self.upstreams.contains_key(name),
                    };
                    compare
                        .validate(&format!("{at}.compare"), &context)
                        .map_err(|e| ConfigError::new(e.path, e.message))?;
                }
            }
        }
        Ok(())
    }
}

fn validate_upstream(name: &str, upstream: &mut UpstreamConfig) -> Result<(), ConfigError> {
    let at = format!("upstreams.{name}");
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(ConfigError::new(
            at,
            "pool names may use letters, digits, '-', '_' and '.'",
        ));
    }
    if upstream.servers.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.servers"),
            "the pool has no servers; list at least one `{ address: \"127.0.0.1:9000\" }`",
        ));
    }
    let mut seen = HashSet::new();
    for (i, server) in upstream.servers.iter_mut().enumerate() {
        let here = format!("{at}.servers[{i}]");
        check_range(&format!("{here}.weight"), server.weight as u64, 1, 10_000)?;
        server.resolved = resolve(&server.address)
            .map_err(|why| ConfigError::new(format!("{here}.address"), why))?;
        for addr in &server.resolved {
            if !seen.insert(*addr) {
                return Err(ConfigError::new(
                    format!("{here}.address"),
                    format!(
                        "{addr} is already in this pool; list each server once and use weight for a larger share"
                    ),
                ));
            }
        }
    }
    match (upstream.selection, &upstream.hash_key) {
        (Selection::ConsistentHash, None) => {
            return Err(ConfigError::new(
                format!("{at}.hash_key"),
                "consistent_hash needs a hash_key: \"header:NAME\", \"client_ip\" or \"path\"",
            ));
        }
        (Selection::RoundRobin | Selection::Random, Some(_)) => {
            return Err(ConfigError::new(
                format!("{at}.hash_key"),
                "hash_key is only used with `selection: consistent_hash`; remove it or change selection",
            ));
        }
        _ => {}
    }
    check_range(
        &format!("{at}.connect_timeout_ms"),
        upstream.connect_timeout_ms,
        1,
        600_000,
    )?;
    check_range(
        &format!("{at}.read_timeout_ms"),
        upstream.read_timeout_ms,
        1,
        3_600_000,
    )?;
    check_range(
        &format!("{at}.write_timeout_ms"),
        upstream.write_timeout_ms,
        1,
        3_600_000,
    )?;
    check_range(
        &format!("{at}.idle_timeout_ms"),
        upstream.idle_timeout_ms,
        1,
        3_600_000,
    )?;
    check_range(
        &format!("{at}.connect_retries"),
        upstream.connect_retries as u64,
        0,
        15,
    )?;
    if let Some(hc) = &upstream.health_check {
        validate_health_check(&format!("{at}.health_check"), hc)?;
    }
    Ok(())
}

fn validate_health_check(at: &str, hc: &HealthCheckConfig) -> Result<(), ConfigError> {
    if hc.kind == HealthCheckType::Tcp {
        for (key, set) in [
            ("path", hc.path.is_some()),
            ("expected_status", hc.expected_status.is_some()),
            ("host", hc.host.is_some()),
        ] {
            if set {
                return Err(ConfigError::new(
                    format!("{at}.{key}"),
                    "only HTTP health checks use this key; set `type: http` or remove it",
                ));
            }
        }
    }
    if let Some(path) = &hc.path
        && !path.starts_with('/')
    {
        return Err(ConfigError::new(
            format!("{at}.path"),
            format!("{path:?} must start with '/'"),
        ));
    }
    if let Some(status) = hc.expected_status {
        check_range(&format!("{at}.expected_status"), status as u64, 100, 599)?;
    }
    check_range(&format!("{at}.interval_ms"), hc.interval_ms, 10, 3_600_000)?;
    check_range(&format!("{at}.timeout_ms"), hc.timeout_ms, 1, 600_000)?;
    check_range(
        &format!("{at}.healthy_threshold"),
        hc.healthy_threshold as u64,
        1,
        100,
    )?;
    check_range(
        &format!("{at}.unhealthy_threshold"),
        hc.unhealthy_threshold as u64,
        1,
        100,
    )
}

fn validate_mirror(at: &str, mirror: &MirrorConfig, budget: u64) -> Result<(), ConfigError> {
    if mirror.methods.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.methods"),
            "an empty method list mirrors nothing; list methods or leave the key out for GET, HEAD, OPTIONS",
        ));
    }
    check_range(
        &format!("{at}.max_body_bytes"),
        mirror.max_body_bytes,
        0,
        u64::MAX / 2,
    )?;
    check_range(&format!("{at}.queue_bytes"), mirror.queue_bytes, 1, budget).map_err(|e| {
        ConfigError::new(
            e.path,
            format!("{} (at most mirror_budget_bytes = {budget})", e.message),
        )
    })?;
    check_range(&format!("{at}.timeout_ms"), mirror.timeout_ms, 1, 3_600_000)?;
    check_range(
        &format!("{at}.max_in_flight"),
        mirror.max_in_flight as u64,
        1,
        1_000_000,
    )?;
    for (name, value) in &mirror.request_headers.set {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(ConfigError::new(
                format!("{at}.request_headers.set"),
                format!("{name:?} is not a valid header name"),
            ));
        }
        if http::HeaderValue::from_str(value).is_err() {
            return Err(ConfigError::new(
                format!("{at}.request_headers.set.{name}"),
                format!("{value:?} is not a valid header value (printable ASCII only)"),
            ));
        }
    }
    for (i, name) in mirror.request_headers.remove.iter().enumerate() {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(ConfigError::new(
                format!("{at}.request_headers.remove[{i}]"),
                format!("{name:?} is not a valid header name"),
            ));
        }
    }
    if let Some(host) = &mirror.host
        && http::HeaderValue::from_str(host).is_err()
    {
        return Err(ConfigError::new(
            format!("{at}.host"),
            format!("{host:?} is not a valid Host header value"),
        ));
    }
    Ok(())
}

fn check_range(path: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::new(
            path,
            format!("{value} is out of range; use a value from {min} to {max}"),
        ));
    }
    Ok(())
}

/// Resolve `host:port` once at startup. IP literals need no lookup.
fn resolve(address: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let hint = "write it as host:port, like \"127.0.0.1:9000\" or \"app.internal:9000\"";
    if address
        .rsplit_once(':')
        .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
    {
        return Err(format!("cannot parse {address:?} as an address; {hint}"));
    }
    let addrs: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {address:?}: {e}; {hint}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{address:?} resolves to no address; {hint}"));
    }
    Ok(addrs)
}

/// Top-level keys must be shadowgate's sections or Pingora's server keys, so a typo is caught.
fn check_top_level_keys(mapping: &serde_yaml::Mapping) -> Result<(), ConfigError> {
    let pingora_keys = match serde_yaml::to_value(ServerConf::default()) {
        Ok(serde_yaml::Value::Mapping(m)) => m,
        _ => serde_yaml::Mapping::new(),
    };
    for key in mapping.keys() {
        let Some(name) = key.as_str() else {
            return Err(ConfigError::new(
                "",
                format!("top-level key {key:?} is not a string"),
            ));
        };
        if !SHADOWGATE_KEYS.contains(&name) && !pingora_keys.contains_key(name) {
            let known = SHADOWGATE_KEYS
                .iter()
                .copied()
                .chain(pingora_keys.keys().filter_map(|k| k.as_str()));
            let hint = closest(name, known)
                .map(|k| format!("did you mean {k:?}? "))
                .unwrap_or_default();
            return Err(ConfigError::new(
                name,
                format!(
                    "unknown key; {hint}shadowgate's sections are {} and Pingora's server keys include threads, pid_file, upgrade_sock, grace_period_seconds",
                    SHADOWGATE_KEYS.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// The known key nearest to a misspelt one, if it is close (edit distance ≤ 2).
fn closest<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Where the pid file and upgrade socket go when the config does not say.
///
/// Pingora's own defaults sit in /tmp, where another local user could bind the
/// upgrade socket first and be handed our listening sockets. We use a directory
/// only our user can enter instead.
pub fn default_runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("shadowgate");
    }
    // SAFETY-free: geteuid has no failure mode; read it via /proc to avoid libc.
    let uid = current_uid();
    if uid == Some(0) {
        PathBuf::from("/run/shadowgate")
    } else {
        PathBuf::from(format!("/tmp/shadowgate-{}", uid.unwrap_or(0)))
    }
}

fn apply_private_runtime_dir(server: &mut ServerConf, mapping: &serde_yaml::Mapping) {
    let dir = default_runtime_dir();
    if !mapping.contains_key("pid_file") {
        server.pid_file = dir.join("shadowgate.pid").to_string_lossy().into_owned();
    }
    if !mapping.contains_key("upgrade_sock") {
        server.upgrade_sock = dir.join("upgrade.sock").to_string_lossy().into_owned();
    }
}

/// The user id this process runs as, from /proc (Linux).
pub fn current_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // Uid: real effective saved fs
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Reject a pid file or upgrade socket whose directory others can enter.
///
/// A missing directory is fine here: `prepare_runtime_dirs` creates it with mode 0700.
fn check_private_dir(key: &str, file: &str) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let path = Path::new(file);
    if !path.is_absolute() {
        return Err(ConfigError::new(
            key,
            format!("{file:?} must be an absolute path"),
        ));
    }
    let Some(dir) = path.parent() else {
        return Err(ConfigError::new(key, format!("{file:?} has no directory")));
    };
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(());
    };
    let open_to_others = meta.mode() & 0o077 != 0;
    let foreign_owner = current_uid().is_some_and(|uid| uid != meta.uid());
    if open_to_others || foreign_owner {
        return Err(ConfigError::new(
            key,
            format!(
                "{} can be entered by other users (mode {:o}, owner uid {}); another local user could take over the upgrade socket. \
                 Put {key} in a directory owned by this user with mode 0700, e.g. {}, or remove the key to use that default",
                dir.display(),
                meta.mode() & 0o7777,
                meta.uid(),
                default_runtime_dir().display()
            ),
        ));
    }
    Ok(())
}

/// Create the directories of the pid file and upgrade socket, private to this user.
pub fn prepare_runtime_dirs(server: &ServerConf) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    for file in [&server.pid_file, &server.upgrade_sock] {
        if let Some(dir) = Path::new(file).parent()
            && !dir.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
listeners: [{ address: "127.0.0.1:8080" }]
upstreams:
  app: { servers: [{ address: "127.0.0.1:9000" }] }
routes:
  - { name: all, upstream: app }
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        text.parse()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(MINIMAL).expect("minimal config parses");
        let app = &config.upstreams["app"];
        assert_eq!(app.selection, Selection::RoundRobin);
        assert_eq!(app.servers[0].weight, 1);
        assert_eq!(config.mirror_budget_bytes, DEFAULT_MIRROR_BUDGET_BYTES);
        assert!(config.metrics.is_none());
        assert!(!config.server.upgrade_sock.starts_with("/tmp/pingora"));
    }

    #[test]
    fn percentage_keeps_two_decimals_in_basis_points() {
        let p: Percentage = serde_yaml::from_str("33.33").unwrap();
        assert_eq!(p.basis_points, 3333);
        assert_eq!(p.to_string(), "33.33%");
        let p: Percentage = serde_yaml::from_str("25").unwrap();
        assert_eq!(p.basis_points, 2500);
        assert!(serde_yaml::from_str::<Percentage>("33.333").is_err());
        assert!(serde_yaml::from_str::<Percentage>("100.01").is_err());
        assert!(serde_yaml::from_str::<Percentage>("-1").is_err());
    }

    #[test]
    fn sample_by_and_hash_key_parse() {
        let s: SampleBy = serde_yaml::from_str("header:X-User-Id").unwrap();
        assert_eq!(s, SampleBy::Key(RequestKey::Header("x-user-id".into())));
        let s: SampleBy = serde_yaml::from_str("cookie:session").unwrap();
        assert_eq!(s, SampleBy::Key(RequestKey::Cookie("session".into())));
        assert!(serde_yaml::from_str::<SampleBy>("path").is_err());
        assert!(serde_yaml::from_str::<RequestKey>("cookie:x").is_err());
        assert_eq!(
            serde_yaml::from_str::<RequestKey>("path").unwrap(),
            RequestKey::Path
        );
    }

    #[test]
    fn host_patterns() {
        let h: HostPattern = serde_yaml::from_str("\"*.Example.com\"").unwrap();
        assert_eq!(h, HostPattern::Suffix(".example.com".into()));
        assert!(serde_yaml::from_str::<HostPattern>("\"a.*.com\"").is_err());
        assert!(serde_yaml::from_str::<HostPattern>("\"a.com:80\"").is_err());
    }

    #[test]
    fn unknown_upstream_names_the_known_ones() {
        let text = MINIMAL.replace("upstream: app }", "upstream: ap }");
        let err = parse(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "routes[0].upstream: unknown upstream \"ap\" (known: app)"
        );
    }

    #[test]
    fn unknown_top_level_key_is_an_error() {
        let err = parse(&format!("{MINIMAL}\nlistener: []\n")).unwrap_err();
        assert!(
            err.to_string().starts_with("listener: unknown key"),
            "{err}"
        );
    }

    #[test]
    fn pingora_keys_are_accepted_at_top_level() {
        let config = parse(&format!("{MINIMAL}\nthreads: 3\ngrace_period_seconds: 2\n")).unwrap();
        assert_eq!(config.server.threads, 3);
        assert_eq!(config.server.grace_period_seconds, Some(2));
    }

    #[test]
    fn wrong_type_carries_path_and_line() {
        let text = MINIMAL.replace(
            "{ address: \"127.0.0.1:9000\" }",
            "{ address: \"127.0.0.1:9000\", weight: heavy }",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("upstreams.app.servers[0].weight"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn a_server_listed_twice_is_an_error() {
        let text = MINIMAL.replace(
            "servers: [{ address: \"127.0.0.1:9000\" }]",
            "servers: [{ address: \"127.0.0.1:9000\" }, { address: \"127.0.0.1:9000\" }]",
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.path, "upstreams.app.servers[1].address");
    }

    #[test]
    fn misspelt_top_level_keys_get_a_suggestion() {
        let err = parse(&format!("{MINIMAL}\nlistener: []\n")).unwrap_err();
        assert!(err.message.contains("did you mean \"listeners\"?"), "{err}");
        assert_eq!(edit_distance("routs", "routes"), 1);
        assert_eq!(closest("zzzzzz", ["routes"].into_iter()), None);
    }

    #[test]
    fn custom_value_errors_name_the_field() {
        let text = MINIMAL.replace("127.0.0.1:8080", "localhost:8080");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.path, "listeners[0].address");
        assert!(err.message.starts_with("cannot parse"), "{err}");
    }

    #[test]
    fn errors_stay_on_one_line() {
        let err = parse(&format!("{MINIMAL}\n\"list\\ners\": []\n")).unwrap_err();
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[test]
    fn tmp_is_not_private() {
        let err = parse(&format!("{MINIMAL}\nupgrade_sock: /tmp/sg.sock\n")).unwrap_err();
        assert_eq!(err.path, "upgrade_sock");
    }
}
