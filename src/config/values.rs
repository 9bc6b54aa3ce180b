//! Value types: each config string parsed once, at load, into the type the proxy uses at runtime,
//! so a value `-t` accepts cannot fail later.

use std::fmt;
use std::net::SocketAddr;

use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;

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

/// A Host header value: a name, an IPv4 address or a bracketed IPv6 address, with an optional port.
///
/// Parsed at load because Pingora's `HttpHealthCheck::new` unwraps the Host value it is
/// given (a line break there panicked at startup), and a Host rewrite that cannot be
/// sent must be refused by `-t`, not dropped at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostHeader {
    /// Invariant: a valid `HeaderValue` (visible ASCII only), equal to `value`.
    text: String,
    value: HeaderValue,
}

impl HostHeader {
    /// The default Host of an HTTP health check.
    pub fn localhost() -> HostHeader {
        HostHeader {
            text: "localhost".to_string(),
            value: HeaderValue::from_static("localhost"),
        }
    }

    /// The text, which is always a valid header value: safe to hand to APIs that unwrap one.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn header_value(&self) -> &HeaderValue {
        &self.value
    }

    fn parse(text: &str) -> Result<HostHeader, String> {
        let invalid = |why: &str| {
            format!(
                "{text:?} is not a valid Host: {why}; write a host name with an optional port, like \"app.internal\" or \"app.internal:8080\""
            )
        };
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (ip, after) = rest
                .split_once(']')
                .ok_or_else(|| invalid("an IPv6 address needs its closing ']'"))?;
            if ip.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(invalid("the part in brackets is not an IPv6 address"));
            }
            match after {
                "" => (ip, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (ip, Some(port)),
                    None => return Err(invalid("only \":port\" may follow ']'")),
                },
            }
        } else {
            match text.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            }
        };
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        };
        if !text.starts_with('[') && !name_ok(host) {
            return Err(invalid("use letters, digits, '-' and '.'"));
        }
        if let Some(port) = port
            && (port.is_empty()
                || !port.bytes().all(|b| b.is_ascii_digit())
                || port.parse::<u16>().is_err())
        {
            return Err(invalid("the port must be a number from 0 to 65535"));
        }
        let value = HeaderValue::from_str(text).map_err(|_| invalid("not a valid header value"))?;
        Ok(HostHeader {
            text: text.to_string(),
            value,
        })
    }
}

impl<'de> Deserialize<'de> for HostHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HostHeader::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A header name, parsed (and lower-cased) at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidHeaderName(pub HeaderName);

impl<'de> Deserialize<'de> for ValidHeaderName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HeaderName::from_bytes(text.as_bytes())
            .map(ValidHeaderName)
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "{text:?} is not a valid header name; use letters, digits and '-', like \"x-env\""
                ))
            })
    }
}

/// A header value, parsed at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidHeaderValue(pub HeaderValue);

impl<'de> Deserialize<'de> for ValidHeaderValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HeaderValue::from_str(&text)
            .map(ValidHeaderValue)
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "{text:?} is not a valid header value; use printable ASCII only, no line breaks"
                ))
            })
    }
}

/// Headers to set, as a YAML mapping from name to value. A name given twice (header
/// names ignore case) is an error rather than a silent overwrite.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderSet(pub Vec<(HeaderName, HeaderValue)>);

impl<'de> Deserialize<'de> for HeaderSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = HeaderSet;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping from header name to value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<HeaderSet, A::Error> {
                let mut set: Vec<(HeaderName, HeaderValue)> = Vec::new();
                while let Some(ValidHeaderName(name)) = map.next_key()? {
                    let ValidHeaderValue(value) = map.next_value()?;
                    if set.iter().any(|(seen, _)| *seen == name) {
                        return Err(serde::de::Error::custom(format!(
                            "{:?} is listed twice (header names ignore case); keep one",
                            name.as_str()
                        )));
                    }
                    set.push((name, value));
                }
                Ok(HeaderSet(set))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// The path of an HTTP health check: an origin-form request target such as `/healthz?full=1`.
///
/// Parsed at load into the `PathAndQuery` the check request is built from, so the
/// request cannot fail to build at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckPath(pub PathAndQuery);

impl HealthCheckPath {
    pub fn root() -> HealthCheckPath {
        HealthCheckPath(PathAndQuery::from_static("/"))
    }

    fn parse(text: &str) -> Result<HealthCheckPath, String> {
        check_path_text(text, "#")?;
        text.parse::<PathAndQuery>()
            .map(HealthCheckPath)
            .map_err(|e| format!("{text:?} is not a valid request path: {e}"))
    }
}

impl<'de> Deserialize<'de> for HealthCheckPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HealthCheckPath::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A route's path prefix: starts with '/', and holds only characters a request path can carry
/// unencoded, so the prefix can actually match; kept with its resolved form, which is what
/// request paths, resolved the same way, are matched against (`path::routing_path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPrefix {
    text: String,
    resolved: Vec<u8>,
}

impl PathPrefix {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Percent-escapes decoded.
    pub fn resolved(&self) -> &[u8] {
        &self.resolved
    }

    fn parse(text: String) -> Result<PathPrefix, String> {
        check_path_text(&text, "?#")?;
        let resolved = crate::path::routing_path(&text)
            .map_err(|why| format!("{text:?}: {why}"))?
            .into_owned();
        // Dot segments and doubled slashes would be resolved away in every request path:
        // a prefix with them would match other paths than it reads.
        let segments = text[1..].split('/');
        let last = text[1..].split('/').count() - 1;
        if segments
            .enumerate()
            .any(|(i, s)| matches!(s, "." | "..") || (s.is_empty() && i != last))
        {
            return Err(format!(
                "{text:?} has '//', '.' or '..'; requests are routed by their resolved path, so write the prefix resolved, like {:?}",
                String::from_utf8_lossy(&resolved)
            ));
        }
        Ok(PathPrefix { text, resolved })
    }
}

impl<'de> Deserialize<'de> for PathPrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        PathPrefix::parse(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A path must start with '/' and hold visible ASCII only, none of `forbidden`.
fn check_path_text(text: &str, forbidden: &str) -> Result<(), String> {
    if !text.starts_with('/') {
        return Err(format!("{text:?} must start with '/', like \"/healthz\""));
    }
    if let Some(c) = text
        .chars()
        .find(|c| !c.is_ascii_graphic() || forbidden.contains(*c))
    {
        return Err(format!(
            "{text:?} contains {c:?}; percent-encode it (a space is %20) or remove it"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn host_headers() {
        for ok in [
            "app.internal",
            "app.internal:8080",
            "10.0.0.1:80",
            "[::1]:8080",
            "[::1]",
            "a_b",
        ] {
            assert_eq!(HostHeader::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "bad\nhost",
            "bad host",
            "",
            "a:",
            "a:99999",
            "a:x",
            "[::1",
            "[zz]",
            "u@h",
            "h/p",
            "a:1:2",
        ] {
            assert!(HostHeader::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn header_names_values_and_sets() {
        let set: HeaderSet = serde_yaml::from_str("{ X-Env: shadow, x-b: \"1\" }").unwrap();
        assert_eq!(set.0.len(), 2);
        assert_eq!(set.0[0].0.as_str(), "x-env");
        assert!(serde_yaml::from_str::<HeaderSet>("{ X-A: 1, x-a: 2 }").is_err());
        assert!(serde_yaml::from_str::<HeaderSet>("{ \"bad name\": 1 }").is_err());
        assert!(serde_yaml::from_str::<HeaderSet>("{ x-a: \"a\\nb\" }").is_err());
        assert!(serde_yaml::from_str::<ValidHeaderName>("\"x:y\"").is_err());
    }

    #[test]
    fn health_check_paths() {
        let p = HealthCheckPath::parse("/healthz?full=1").unwrap();
        assert_eq!(p.0.as_str(), "/healthz?full=1");
        for bad in ["healthz", "", "/a b", "/a\u{1}", "/caf\u{e9}", "/a#b"] {
            assert!(HealthCheckPath::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn path_prefixes() {
        assert_eq!(
            serde_yaml::from_str::<PathPrefix>("/api/")
                .unwrap()
                .as_str(),
            "/api/"
        );
        for bad in [
            "api", "\"/a b\"", "\"/a?b\"", "/a//b", "/a/./b", "/a/../b", "/..", "/%zz",
        ] {
            assert!(
                serde_yaml::from_str::<PathPrefix>(bad).is_err(),
                "{bad:?} accepted"
            );
        }
        let escaped: PathPrefix = serde_yaml::from_str("/caf%C3%A9/").unwrap();
        assert_eq!(escaped.as_str(), "/caf%C3%A9/");
        assert_eq!(escaped.resolved(), "/café/".as_bytes());
    }
}
