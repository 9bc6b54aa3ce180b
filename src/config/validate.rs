//! Validation across fields and sections: ranges, references between pools and routes,
//! duplicates, and resolving server addresses.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};

use super::Config;
use super::error::ConfigError;
use super::runtime_dir::check_private_dir;
use super::schema::*;
use super::values::{RequestKey, SampleBy};
use crate::limits::UnderscoreHeaders;

impl Config {
    pub(super) fn validate(&mut self) -> Result<(), ConfigError> {
        self.validate_server()?;
        if self.listeners.is_empty() {
            return Err(ConfigError::new(
                "listeners",
                "no listener configured; add one like `listeners: [{ address: \"127.0.0.1:8080\" }]`",
            ));
        }
        let mut seen = HashSet::new();
        for (i, listener) in self.listeners.iter_mut().enumerate() {
            listener.load_tls(&format!("listeners[{i}]"))?;
            if !seen.insert(listener.address) {
                return Err(ConfigError::new(
                    format!("listeners[{i}].address"),
                    format!("{} is listed twice; remove the duplicate", listener.address),
                ));
            }
            listener.client.validate().map_err(|e| {
                ConfigError::new(format!("listeners[{i}].client.{}", e.field), e.message)
            })?;
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
        if let Some(access_log) = &self.access_log {
            access_log.check("access_log")?;
        }
        self.validate_routes()?;
        self.validate_underscored_keys()
    }

    /// A key on a header whose name has an underscore finds nothing where a listener
    /// drops such fields (or refuses their requests): said at load, not found in traffic.
    fn validate_underscored_keys(&self) -> Result<(), ConfigError> {
        let Some(i) = self
            .listeners
            .iter()
            .position(|l| l.client.headers_with_underscores != UnderscoreHeaders::Allow)
        else {
            return Ok(());
        };
        let hash_keys = self
            .upstreams
            .iter()
            .map(|(name, u)| (format!("upstreams.{name}.hash_key"), u.hash_key.as_ref()));
        let sample_keys = self.routes.iter().enumerate().flat_map(|(r, route)| {
            route.mirrors.iter().enumerate().map(move |(m, mirror)| {
                let key = match &mirror.sample_by {
                    SampleBy::Key(key) => Some(key),
                    SampleBy::Counter => None,
                };
                (format!("routes[{r}].mirrors[{m}].sample_by"), key)
            })
        });
        for (at, key) in hash_keys.chain(sample_keys) {
            if let Some(RequestKey::Header(name)) = key
                && name.contains('_')
            {
                return Err(ConfigError::new(
                    at,
                    format!(
                        "header {name:?} has an underscore, and listeners[{i}] does not pass such fields on; \
                         set listeners[{i}].client.headers_with_underscores: allow, or key on another header"
                    ),
                ));
            }
        }
        Ok(())
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
                    let methods: Vec<http::Method> =
                        mirror.methods.iter().map(|m| m.0.clone()).collect();
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
    // The shadow's body is framed exactly as the primary's: its framing fields are
    // never edited (a removed Content-Length would let the body be read as a request).
    let edits = &mirror.request_headers;
    let removed = edits
        .remove
        .iter()
        .enumerate()
        .map(|(i, name)| (format!("remove[{i}]"), &name.0));
    let set = edits
        .set
        .0
        .iter()
        .map(|(name, _)| (format!("set.{name}"), name));
    for (key, name) in removed.chain(set) {
        if *name == http::header::CONTENT_LENGTH || *name == http::header::TRANSFER_ENCODING {
            return Err(ConfigError::new(
                format!("{at}.request_headers.{key}"),
                format!(
                    "{:?} frames the body and cannot be edited; the shadow's body is framed as the primary's, remove this entry",
                    name.as_str()
                ),
            ));
        }
    }
    check_range(
        &format!("{at}.max_in_flight"),
        mirror.max_in_flight as u64,
        1,
        1_000_000,
    )?;
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

#[cfg(test)]
mod tests {
    use crate::config::tests::{MINIMAL, parse};

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
    fn a_server_listed_twice_is_an_error() {
        let text = MINIMAL.replace(
            "servers: [{ address: \"127.0.0.1:9000\" }]",
            "servers: [{ address: \"127.0.0.1:9000\" }, { address: \"127.0.0.1:9000\" }]",
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.path, "upstreams.app.servers[1].address");
    }

    #[test]
    fn a_key_on_an_underscored_header_needs_listeners_that_pass_it() {
        let hashed = MINIMAL.replace(
            "app: { servers",
            "app: { selection: consistent_hash, hash_key: \"header:X_User\", servers",
        );
        let err = parse(&hashed).unwrap_err();
        assert_eq!(err.path, "upstreams.app.hash_key");
        assert!(
            err.message.contains("headers_with_underscores: allow"),
            "{err}"
        );
        let sampled = MINIMAL
            .replace(
                "upstreams:\n",
                "upstreams:\n  shadow: { servers: [{ address: \"127.0.0.1:9001\" }] }\n",
            )
            .replace(
                "upstream: app }",
                "upstream: app, mirrors: [{ upstream: shadow, percentage: 10, sample_by: \"header:x_user\" }] }",
            );
        let err = parse(&sampled).unwrap_err();
        assert_eq!(err.path, "routes[0].mirrors[0].sample_by", "{err}");
        let allowed = |text: &str| {
            text.replace(
                "address: \"127.0.0.1:8080\" }",
                "address: \"127.0.0.1:8080\", client: { headers_with_underscores: allow } }",
            )
        };
        assert!(parse(&allowed(&hashed)).is_ok());
        assert!(parse(&allowed(&sampled)).is_ok());
    }
}
