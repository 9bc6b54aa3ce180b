//! Value types: each config string parsed once, at load, into the type the proxy uses at runtime,
//! so a value `-t` accepts cannot fail later.

use std::fmt;
use std::net::SocketAddr;

use http::Method;
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
}
