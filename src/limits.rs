//! Client-side limits of a listener (`listeners[].client`): timeouts, keep-alive, connection caps
//! and header size. Defaults are safe for a proxy facing the internet; `listener.rs` enforces them.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::metrics::{Metrics, UnderscoreCounters};

/// Pingora's own ceiling on header lines; a request with more gets its 400.
pub const PINGORA_MAX_HEADERS: u64 = 256;
/// Pingora's own ceiling on the request header size (1 MiB); above it, 400.
pub const PINGORA_MAX_HEADER_BYTES: u64 = 1_048_575;

/// Limits on what one client connection may hold and how slowly it may go.
///
/// Every field has a default, so `client:` may be left out or list only what differs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientLimits {
    /// Time for the whole request header from its first byte: a total, not a per-read timeout.
    /// (New connections reach the proxy with their first byte: the listeners use TCP_DEFER_ACCEPT.)
    pub header_timeout_ms: u64,
    /// Longest wait between two reads of the request body.
    pub body_timeout_ms: u64,
    /// Longest wait for one write to the client to make progress.
    pub send_timeout_ms: u64,
    /// Idle time allowed between two requests; 0 turns keep-alive off.
    pub keepalive_timeout_ms: u64,
    /// Requests served on one connection before it is closed.
    pub keepalive_requests: u32,
    /// Open connections on this listener; a connection over it gets 503 and is closed.
    pub max_connections: u32,
    /// Open connections from one client IP address on this listener; over it, 503 and close.
    pub max_connections_per_ip: u32,
    /// Size of the request line plus header fields; over it, 431.
    pub max_header_bytes: u64,
    /// Number of header fields; over it, 431.
    pub max_headers: u64,
    /// Read buffer of each connection. Pingora's default of 64 KiB is most of an idle
    /// connection's memory; large bodies are read in larger pieces regardless.
    pub read_buffer_bytes: u64,
    /// Request header fields whose names have an underscore.
    pub headers_with_underscores: UnderscoreHeaders,
    /// Size of a request body; over it, 413. 0: no limit.
    pub max_body_bytes: u64,
}

/// What a listener does with request header fields whose names have an underscore.
///
/// Servers that pass fields to applications as CGI-style variables read `X_Forwarded_For`
/// and `X-Forwarded-For` as the same `HTTP_X_FORWARDED_FOR`, so a client could pass such a
/// field off as one this proxy sets or vouches for. NGINX ignores them by default
/// (`underscores_in_headers off`); Envoy advises dropping or rejecting them at the edge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnderscoreHeaders {
    /// The fields go no further: not upstream, not to a shadow, not to routing.
    #[default]
    Drop,
    /// The request is answered 400.
    Reject,
    /// The fields are passed on like any other.
    Allow,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            send_timeout_ms: 30_000,
            keepalive_timeout_ms: 60_000,
            keepalive_requests: 1_000,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            read_buffer_bytes: 4 * 1024,
            headers_with_underscores: UnderscoreHeaders::Drop,
            // Bodies stream through, never held here: the upstream sets its own limit.
            max_body_bytes: 0,
        }
    }
}

/// A limit out of range: the field (relative to `client`) and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitError {
    pub field: &'static str,
    pub message: String,
}

impl ClientLimits {
    /// Check every value against its sane range.
    pub fn validate(&self) -> Result<(), LimitError> {
        let hour = 3_600_000;
        let checks: [(&'static str, u64, u64, u64); 10] = [
            ("header_timeout_ms", self.header_timeout_ms, 1, hour),
            ("body_timeout_ms", self.body_timeout_ms, 1, hour),
            ("send_timeout_ms", self.send_timeout_ms, 1, hour),
            ("keepalive_timeout_ms", self.keepalive_timeout_ms, 0, hour),
            (
                "keepalive_requests",
                self.keepalive_requests as u64,
                1,
                1_000_000,
            ),
            (
                "max_connections",
                self.max_connections as u64,
                1,
                10_000_000,
            ),
            (
                "max_connections_per_ip",
                self.max_connections_per_ip as u64,
                1,
                10_000_000,
            ),
            (
                "max_header_bytes",
                self.max_header_bytes,
                1024,
                PINGORA_MAX_HEADER_BYTES,
            ),
            ("max_headers", self.max_headers, 1, PINGORA_MAX_HEADERS),
            ("read_buffer_bytes", self.read_buffer_bytes, 0, 1 << 20),
        ];
        for (field, value, min, max) in checks {
            if value < min || value > max {
                return Err(LimitError {
                    field,
                    message: format!("{value} is out of range; use a value from {min} to {max}"),
                });
            }
        }
        if self.max_connections_per_ip > self.max_connections {
            return Err(LimitError {
                field: "max_connections_per_ip",
                message: format!(
                    "{} is above max_connections ({}); lower it or raise max_connections",
                    self.max_connections_per_ip, self.max_connections
                ),
            });
        }
        Ok(())
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }

    pub fn send_timeout(&self) -> Duration {
        Duration::from_millis(self.send_timeout_ms)
    }

    /// `None` when keep-alive is off.
    pub fn keepalive_timeout(&self) -> Option<Duration> {
        (self.keepalive_timeout_ms > 0).then(|| Duration::from_millis(self.keepalive_timeout_ms))
    }

    /// How long an HTTP/2 connection may go with no stream open (and, new, without its
    /// preface): the keep-alive timeout, or with keep-alive off (which HTTP/2 cannot
    /// honour) the header deadline.
    pub fn h2_idle_timeout(&self) -> Duration {
        self.keepalive_timeout()
            .unwrap_or_else(|| self.header_timeout())
    }
}

/// Does a connection accepted on `local` belong to the listener bound to `address`?
pub fn listens_on(address: SocketAddr, local: SocketAddr) -> bool {
    address == local
        || (address.ip().is_unspecified()
            && address.port() == local.port()
            && address.is_ipv4() == local.is_ipv4())
}

/// What a request's header must meet on one listener, checked once it is read
/// (`listener::header_received`), with the counters for what it did.
#[derive(Clone)]
pub struct HeaderRules {
    pub max_bytes: u64,
    pub max_fields: u64,
    pub underscores: UnderscoreHeaders,
    pub underscore_counts: UnderscoreCounters,
    /// `max_body_bytes`, unless the request's route has its own: checked against
    /// `Content-Length` once the request is routed, counted as a body of unknown
    /// length streams. `None`: no limit.
    pub max_body_bytes: Option<u64>,
}

impl HeaderRules {
    /// The rules of the listener bound to `address`.
    pub fn new(limits: &ClientLimits, address: SocketAddr, metrics: &Metrics) -> Self {
        HeaderRules {
            max_bytes: limits.max_header_bytes,
            max_fields: limits.max_headers,
            underscores: limits.headers_with_underscores,
            underscore_counts: metrics.underscore_requests(&address.to_string()),
            max_body_bytes: (limits.max_body_bytes > 0).then_some(limits.max_body_bytes),
        }
    }
}

/// One listener's client limits and header rules.
pub struct ListenerLimits {
    address: SocketAddr,
    pub client: ClientLimits,
    pub header: HeaderRules,
}

/// Each listener's client limits by its address, for HTTP/2 streams: Pingora runs every
/// stream in a task of its own, outside `ClientGate`'s loop, so a stream finds its
/// listener by the connection's local address.
pub struct LimitsByListener(Vec<ListenerLimits>);

impl LimitsByListener {
    pub fn new(listeners: &[crate::config::ListenerConfig], metrics: &Metrics) -> Self {
        LimitsByListener(
            listeners
                .iter()
                .map(|l| ListenerLimits {
                    address: l.address.0,
                    client: l.client.clone(),
                    header: HeaderRules::new(&l.client, l.address.0, metrics),
                })
                .collect(),
        )
    }

    /// The limits of the listener that accepted a connection on `local`.
    pub fn of(&self, local: Option<SocketAddr>) -> Option<&ListenerLimits> {
        if let [only] = self.0.as_slice() {
            return Some(only);
        }
        let local = local?;
        self.0.iter().find(|l| listens_on(l.address, local))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(ClientLimits::default().validate(), Ok(()));
    }

    #[test]
    fn out_of_range_names_the_field() {
        let limits = ClientLimits {
            max_headers: 300,
            ..ClientLimits::default()
        };
        let err = limits.validate().unwrap_err();
        assert_eq!(err.field, "max_headers");
        assert!(err.message.contains("from 1 to 256"), "{}", err.message);
    }

    #[test]
    fn per_ip_cannot_exceed_total() {
        let limits = ClientLimits {
            max_connections: 10,
            max_connections_per_ip: 20,
            ..ClientLimits::default()
        };
        assert_eq!(
            limits.validate().unwrap_err().field,
            "max_connections_per_ip"
        );
    }

    #[test]
    fn partial_section_keeps_other_defaults() {
        let limits: ClientLimits = serde_yaml::from_str("max_headers: 50").unwrap();
        assert_eq!(limits.max_headers, 50);
        assert_eq!(limits.header_timeout_ms, 10_000);
        assert_eq!(limits.headers_with_underscores, UnderscoreHeaders::Drop);
        let limits: ClientLimits =
            serde_yaml::from_str("headers_with_underscores: reject").unwrap();
        assert_eq!(limits.headers_with_underscores, UnderscoreHeaders::Reject);
        assert!(serde_yaml::from_str::<ClientLimits>("headers_with_underscores: keep").is_err());
        assert_eq!(limits.max_body_bytes, 0);
    }

    #[test]
    fn a_stream_finds_its_listener_by_local_address() {
        let listener = |address: &str, send_timeout_ms| crate::config::ListenerConfig {
            address: crate::config::Address(address.parse().unwrap()),
            tls: None,
            h2c: true,
            client: ClientLimits {
                send_timeout_ms,
                ..ClientLimits::default()
            },
        };
        let send_timeout =
            |limits: Option<&ListenerLimits>| limits.map(|l| l.client.send_timeout_ms);
        let metrics = Metrics::global();
        let one = LimitsByListener::new(&[listener("127.0.0.1:80", 5)], &metrics);
        assert_eq!(send_timeout(one.of(None)), Some(5));
        let two = LimitsByListener::new(
            &[listener("127.0.0.1:80", 5), listener("0.0.0.0:81", 7)],
            &metrics,
        );
        let at = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        assert_eq!(send_timeout(two.of(at("127.0.0.1:80"))), Some(5));
        assert_eq!(send_timeout(two.of(at("10.1.2.3:81"))), Some(7));
        assert_eq!(send_timeout(two.of(at("[::1]:81"))), None);
        assert_eq!(send_timeout(two.of(None)), None);
    }

    #[test]
    fn zero_keepalive_turns_it_off() {
        let limits = ClientLimits {
            keepalive_timeout_ms: 0,
            ..ClientLimits::default()
        };
        assert_eq!(limits.keepalive_timeout(), None);
        // HTTP/2 cannot turn keep-alive off: its idle connections get the header deadline.
        assert_eq!(limits.h2_idle_timeout(), limits.header_timeout());
        assert_eq!(
            ClientLimits::default().h2_idle_timeout(),
            Duration::from_secs(60)
        );
    }
}
