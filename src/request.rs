//! Reading and editing request headers, shared by the primary and the shadow path.
//! Forwarding headers (X-Forwarded-For, X-Forwarded-Proto, Via), hop-by-hop removal and request keys.

use std::borrow::Cow;
use std::net::IpAddr;

use http::header::{self, HeaderName};
use pingora_http::RequestHeader;

use crate::config::RequestKey;

/// The token this proxy adds to `Via`.
pub const VIA_TOKEN: &str = "1.1 shadowgate";

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1), plus
/// `Expect`, which a copied request must not carry: the shadow would answer
/// `100 Continue` to a client that is not listening to it.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::EXPECT,
];
const HOP_BY_HOP_EXTRA: &[&str] = &["keep-alive", "proxy-connection"];

/// Add the headers a reverse proxy owes its upstream: who the client is, which
/// scheme it used, and that we passed the request on.
pub fn add_forwarding_headers(req: &mut RequestHeader, client_ip: Option<IpAddr>) {
    if let Some(ip) = client_ip {
        let forwarded_for = match req.headers.get("x-forwarded-for").map(|v| v.to_str()) {
            Some(Ok(prior)) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
            _ => ip.to_string(),
        };
        let _ = req.insert_header("x-forwarded-for", forwarded_for);
    }
    // We are the edge and listen on plain HTTP: the client's scheme is ours to state.
    let _ = req.insert_header("x-forwarded-proto", "http");
    let via = match req.headers.get(header::VIA).map(|v| v.to_str()) {
        Some(Ok(prior)) if !prior.trim().is_empty() => format!("{prior}, {VIA_TOKEN}"),
        _ => VIA_TOKEN.to_string(),
    };
    let _ = req.insert_header(header::VIA, via);
}

/// Remove connection-specific headers, including those the `Connection` header names.
pub fn remove_hop_by_hop(req: &mut RequestHeader) {
    let named: Vec<String> = req
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for name in named {
        req.remove_header(&name);
    }
    for name in HOP_BY_HOP {
        req.remove_header(name);
    }
    for name in HOP_BY_HOP_EXTRA {
        req.remove_header(*name);
    }
}

/// The bytes of the request part that `key` names, if the request has it.
pub fn key_value<'a>(
    key: &RequestKey,
    req: &'a RequestHeader,
    client_ip: Option<IpAddr>,
) -> Option<Cow<'a, [u8]>> {
    match key {
        RequestKey::Header(name) => req
            .headers
            .get(name.as_str())
            .map(|v| Cow::Borrowed(v.as_bytes())),
        RequestKey::Cookie(name) => cookie(req, name).map(Cow::Borrowed),
        RequestKey::ClientIp => client_ip.map(|ip| Cow::Owned(ip.to_string().into_bytes())),
        RequestKey::Path => Some(Cow::Borrowed(req.uri.path().as_bytes())),
    }
}

/// The value of cookie `name`, from any `Cookie` header of the request.
fn cookie<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a [u8]> {
    req.headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            (&pair[..eq] == name.as_bytes()).then(|| &pair[eq + 1..])
        })
}

/// Whether the request asks to switch protocols (e.g. WebSocket).
pub fn is_upgrade(req: &RequestHeader) -> bool {
    req.headers.contains_key(header::UPGRADE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/a/b?q=1", None).unwrap();
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).unwrap();
        }
        req
    }

    #[test]
    fn forwarding_headers_append_to_prior_hops() {
        let mut req = request(&[("x-forwarded-for", "10.0.0.1"), ("via", "1.1 lb")]);
        add_forwarding_headers(&mut req, Some("127.0.0.9".parse().unwrap()));
        assert_eq!(req.headers["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
        assert_eq!(req.headers["via"], "1.1 lb, 1.1 shadowgate");
        assert_eq!(req.headers["x-forwarded-proto"], "http");
    }

    #[test]
    fn hop_by_hop_headers_and_connection_tokens_go() {
        let mut req = request(&[
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("expect", "100-continue"),
            ("keep-alive", "timeout=5"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut req);
        for gone in ["connection", "x-private", "expect", "keep-alive"] {
            assert!(!req.headers.contains_key(gone), "{gone} should be removed");
        }
        assert_eq!(req.headers["x-kept"], "yes");
    }

    #[test]
    fn cookie_key_finds_the_named_cookie() {
        let req = request(&[("cookie", "a=1; session=abc; b=2")]);
        let key = RequestKey::Cookie("session".into());
        assert_eq!(key_value(&key, &req, None).as_deref(), Some(&b"abc"[..]));
        let missing = RequestKey::Cookie("nope".into());
        assert!(key_value(&missing, &req, None).is_none());
    }

    #[test]
    fn path_key_leaves_out_the_query() {
        let req = request(&[]);
        assert_eq!(
            key_value(&RequestKey::Path, &req, None).as_deref(),
            Some(&b"/a/b"[..])
        );
    }
}
