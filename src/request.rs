//! Reading and editing request headers, shared by the primary and the shadow path.
//! Forwarding headers (X-Forwarded-For, X-Forwarded-Proto, Via), hop-by-hop removal and request keys.

use std::borrow::Cow;
use std::io::Write;
use std::net::IpAddr;

use http::Version;
use http::header::{self, HeaderName, HeaderValue};
use pingora_http::RequestHeader;
use pingora_http::authority::{RawTargetAuthority, is_http_family_scheme, raw_target_authority};

use crate::config::RequestKey;

/// The token this proxy adds to `Via`.
pub const VIA_TOKEN: &str = "1.1 shadowgate";

/// Add the headers a reverse proxy owes its upstream: who the client is, which
/// scheme it used, and that we passed the request on.
/// `tls`: whether the client connected over TLS (`X-Forwarded-Proto: https`).
pub fn add_forwarding_headers(req: &mut RequestHeader, client_ip: Option<IpAddr>, tls: bool) {
    if let Some(ip) = client_ip {
        let forwarded_for = match extended_list(req, &X_FORWARDED_FOR) {
            Some(mut prior) => {
                prior.push_str(&ip.to_string());
                HeaderValue::try_from(prior)
            }
            None => Ok(ip_value(ip)),
        };
        if let Ok(forwarded_for) = forwarded_for {
            let _ = req.insert_header("x-forwarded-for", forwarded_for);
        }
    }
    // We are the edge: the client's scheme is ours to state.
    let scheme = HeaderValue::from_static(if tls { "https" } else { "http" });
    let _ = req.insert_header("x-forwarded-proto", scheme);
    // Static values where nothing came before: no allocation on the common path.
    let via = match extended_list(req, &header::VIA) {
        Some(mut prior) => {
            prior.push_str(VIA_TOKEN);
            HeaderValue::try_from(prior)
        }
        None => Ok(HeaderValue::from_static(VIA_TOKEN)),
    };
    if let Ok(via) = via {
        let _ = req.insert_header(header::VIA, via);
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// A list field's prior items, every line of it in order (RFC 9110 §5.3: lines of
/// one field are one comma-separated list), followed by `", "` for the item the
/// caller appends; `None` when there are none. Lines that are not visible ASCII
/// are left out, as a value that cannot be read cannot be vouched for.
fn extended_list(req: &RequestHeader, name: &HeaderName) -> Option<String> {
    let mut list = String::new();
    for line in &req.headers.get_all(name) {
        match line.to_str().map(str::trim) {
            Ok(items) if !items.is_empty() => {
                list.push_str(items);
                list.push_str(", ");
            }
            _ => {}
        }
    }
    (!list.is_empty()).then_some(list)
}

/// An address as a header value, written on the stack: the value's own bytes
/// are its one allocation (`to_string` makes a growing `String` first).
fn ip_value(ip: IpAddr) -> HeaderValue {
    // The longest address text, an IPv6 one with an embedded IPv4, is 45 bytes.
    let mut text = [0u8; 48];
    let mut cursor = std::io::Cursor::new(&mut text[..]);
    let written = write!(cursor, "{ip}");
    let len = cursor.position() as usize;
    match written {
        Ok(()) => HeaderValue::from_bytes(&text[..len]),
        Err(_) => HeaderValue::try_from(ip.to_string()),
    }
    .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Why a request must be refused with 400 before it goes anywhere, if it must.
///
/// Pingora accepts these; each is ambiguous in a way an upstream could read
/// differently from us (request smuggling, routing confusion):
/// - HTTP/1.1 without `Host`, or with more than one (RFC 9112 §3.2);
/// - a `Host` that is no host name: with `/`, `\`, whitespace or `..` (NGINX refuses
///   these too; an upstream building URLs or cache keys from it could be led astray);
/// - `Content-Length` together with `Transfer-Encoding` (RFC 9112 §6.1 allows
///   acting on Transfer-Encoding; like NGINX we refuse). Pingora drops the
///   Content-Length before we see the header, so `raw_header` (the header bytes
///   as received) is checked when Transfer-Encoding is present.
pub fn refusal(req: &RequestHeader, raw_header: Option<&[u8]>) -> Option<&'static str> {
    if req.version == Version::HTTP_11 {
        let mut hosts = req.headers.get_all(header::HOST).iter();
        match (hosts.next(), hosts.next()) {
            (None, _) => return Some("HTTP/1.1 request without Host"),
            (Some(_), Some(_)) => return Some("more than one Host header"),
            _ => {}
        }
    }
    if req
        .headers
        .get(header::HOST)
        .is_some_and(|host| !is_host_name(host.as_bytes()))
    {
        return Some("Host is not a host name");
    }
    if !is_valid_target(req) {
        return Some("request target is not in origin, absolute or asterisk form");
    }
    if req.headers.contains_key(header::TRANSFER_ENCODING)
        && raw_header.is_some_and(has_content_length_field)
    {
        return Some("both Content-Length and Transfer-Encoding");
    }
    None
}

/// A `Host` value that names a host (and port), as NGINX checks it: no path or
/// backslash, no whitespace, no empty label between dots. Empty is allowed (RFC 9112
/// §3.2: a target without an authority).
fn is_host_name(host: &[u8]) -> bool {
    !host
        .iter()
        .any(|b| matches!(b, b'/' | b'\\' | b' ' | b'\t'))
        && !host.windows(2).any(|pair| pair == b"..")
}

/// Whether the target has one of the forms RFC 9112 §3.2 allows for a
/// request we proxy: `/path`, `scheme://authority/path`, or `*` for OPTIONS.
/// (CONNECT's authority form is refused by Pingora.)
fn is_valid_target(req: &RequestHeader) -> bool {
    let raw = req.raw_path();
    match raw_target_authority(raw) {
        RawTargetAuthority::Absolute { scheme, .. } => is_http_family_scheme(scheme),
        RawTargetAuthority::AmbiguousAuthority => false,
        RawTargetAuthority::None => {
            raw.starts_with(b"/") || (raw == b"*" && req.method == http::Method::OPTIONS)
        }
    }
}

/// Whether raw HTTP/1 header bytes carry a `Content-Length` field line.
fn has_content_length_field(raw: &[u8]) -> bool {
    raw.split(|b| *b == b'\n').skip(1).any(|line| {
        line.iter().position(|b| *b == b':').is_some_and(|colon| {
            line[..colon]
                .trim_ascii()
                .eq_ignore_ascii_case(b"content-length")
        })
    })
}

/// Normalise what goes upstream where the client was allowed latitude:
/// identical duplicate `Content-Length` values (Pingora checked they agree) are
/// sent once (RFC 9110 §8.6), and an absolute-form target is sent in origin
/// form, as NGINX does; Host already names the authority (Pingora refuses a
/// request whose Host and target authority disagree).
pub fn normalize_upstream(req: &mut RequestHeader) {
    let mut lengths = req.headers.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next()
        && (lengths.next().is_some() || first.as_bytes().contains(&b','))
    {
        let one = first
            .as_bytes()
            .split(|b| *b == b',')
            .next()
            .unwrap_or_default();
        if let Ok(value) = HeaderValue::from_bytes(one.trim_ascii()) {
            let _ = req.insert_header(header::CONTENT_LENGTH, value);
        }
    }
    if let RawTargetAuthority::Absolute {
        authority,
        path_and_query,
        ..
    } = raw_target_authority(req.raw_path())
    {
        let mut origin_form = Vec::with_capacity(path_and_query.len() + 1);
        if !path_and_query.starts_with(b"/") {
            origin_form.push(b'/');
        }
        origin_form.extend_from_slice(path_and_query);
        // Pingora refused a Host that differs from the authority; an HTTP/1.0
        // request may have none, and then the authority becomes the Host.
        let host = (!req.headers.contains_key(header::HOST))
            .then(|| HeaderValue::from_bytes(authority))
            .and_then(Result::ok);
        if req.set_raw_path(&origin_form).is_ok()
            && let Some(host) = host
        {
            let _ = req.insert_header(header::HOST, host);
        }
    }
}

/// Relay the client's `Proxy-Authorization` to the primary. Pingora strips it as
/// hop-by-hop, but it is meant for a proxy that asked for it (RFC 9110 §11.7.4)
/// and shadowgate never does, so it belongs to the next hop, as with NGINX and
/// HAProxy. Not when the client's `Connection` header nominated it.
pub fn relay_proxy_authorization(client: &RequestHeader, upstream: &mut RequestHeader) {
    let name = header::PROXY_AUTHORIZATION;
    if !client.headers.contains_key(&name) || connection_nominates(client, name.as_str()) {
        return;
    }
    for value in client.headers.get_all(&name) {
        let _ = upstream.append_header(name.clone(), value.clone());
    }
}

/// An HTTP/2 client may send `Cookie` as one field per cookie (browsers do, for header
/// compression); they are one field again, joined by `"; "`, before the request goes on,
/// since an HTTP/1.1 server may read only one `Cookie` line (RFC 9113 §8.2.3).
pub fn join_cookie_crumbs(req: &mut RequestHeader) {
    let crumbs = req.headers.get_all(header::COOKIE);
    if crumbs.iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for crumb in crumbs {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    if let Ok(cookie) = HeaderValue::from_bytes(&joined) {
        let _ = req.insert_header(header::COOKIE, cookie);
    }
}

/// Whether the `Connection` header lists `name`.
fn connection_nominates(req: &RequestHeader, name: &str) -> bool {
    req.headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
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
    fn cookie_crumbs_become_one_field_and_one_cookie_is_left_alone() {
        let mut req = request(&[("cookie", "a=1"), ("x", "y"), ("cookie", "b=2; c=3")]);
        join_cookie_crumbs(&mut req);
        let cookies: Vec<&[u8]> = req
            .headers
            .get_all("cookie")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        assert_eq!(cookies, [&b"a=1; b=2; c=3"[..]]);
        let mut req = request(&[("cookie", "a=1")]);
        join_cookie_crumbs(&mut req);
        assert_eq!(req.headers.get_all("cookie").iter().count(), 1);
    }

    #[test]
    fn forwarding_headers_append_to_prior_hops() {
        let mut req = request(&[("x-forwarded-for", "10.0.0.1"), ("via", "1.1 lb")]);
        add_forwarding_headers(&mut req, Some("127.0.0.9".parse().unwrap()), false);
        assert_eq!(req.headers["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
        assert_eq!(req.headers["via"], "1.1 lb, 1.1 shadowgate");
        assert_eq!(req.headers["x-forwarded-proto"], "http");
        add_forwarding_headers(&mut req, None, true);
        assert_eq!(req.headers["x-forwarded-proto"], "https");
    }

    #[test]
    fn prior_hops_on_several_lines_are_one_list() {
        let mut req = request(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", " "),
            ("x-forwarded-for", "10.0.0.2, 10.0.0.3"),
            ("via", "1.0 a"),
            ("via", "1.1 b"),
        ]);
        add_forwarding_headers(&mut req, Some("127.0.0.9".parse().unwrap()), false);
        let all = |name| req.headers.get_all(name).iter().collect::<Vec<_>>();
        assert_eq!(
            all("x-forwarded-for"),
            ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.9"]
        );
        assert_eq!(all("via"), ["1.0 a, 1.1 b, 1.1 shadowgate"]);
    }

    #[test]
    fn client_addresses_are_written_whole() {
        for ip in [
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
            "64:ff9b::255.255.255.255",
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(addr), addr.to_string().as_str());
        }
    }

    #[test]
    fn ambiguous_requests_are_refused() {
        let mut req = request(&[]);
        assert_eq!(refusal(&req, None), Some("HTTP/1.1 request without Host"));
        req.append_header("host", "a").unwrap();
        assert_eq!(refusal(&req, None), None);
        req.append_header("host", "b").unwrap();
        assert_eq!(refusal(&req, None), Some("more than one Host header"));

        let mut req = request(&[("host", "a"), ("transfer-encoding", "chunked")]);
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\ncontent-LENGTH : 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(refusal(&req, Some(raw)).is_some());
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(refusal(&req, Some(raw)), None);
        for bad in ["a/b", "a\\b", "a..b", "..", "a b", "a/"] {
            let req = request(&[("host", bad)]);
            assert_eq!(
                refusal(&req, None),
                Some("Host is not a host name"),
                "{bad}"
            );
        }
        for good in [
            "",
            "a",
            "api.example.com.",
            "[::1]:8080",
            "a-b_c.example:80",
        ] {
            assert_eq!(refusal(&request(&[("host", good)]), None), None, "{good}");
        }
        let odd = RequestHeader::build("GET", b"%20/g", None).unwrap();
        assert!(refusal(&odd, None).is_some());
        let star = RequestHeader::build("OPTIONS", b"*", None).unwrap();
        assert!(!is_valid_target(
            &RequestHeader::build("GET", b"*", None).unwrap()
        ));
        assert!(is_valid_target(&star));
        req.set_version(Version::HTTP_10);
        req.remove_header("host");
        assert_eq!(refusal(&req, Some(raw)), None, "HTTP/1.0 needs no Host");
    }

    #[test]
    fn duplicate_lengths_and_absolute_targets_are_normalised() {
        let mut req = request(&[("content-length", "5"), ("content-length", "5")]);
        normalize_upstream(&mut req);
        assert_eq!(req.headers.get_all("content-length").iter().count(), 1);
        assert_eq!(req.headers["content-length"], "5");
        let mut req = request(&[("content-length", "7, 7")]);
        normalize_upstream(&mut req);
        assert_eq!(req.headers["content-length"], "7");

        let mut req = RequestHeader::build("GET", b"http://a.example/x?y=1", None).unwrap();
        normalize_upstream(&mut req);
        assert_eq!(req.raw_path(), b"/x?y=1");
        assert_eq!(req.headers["host"], "a.example");
        let mut req = RequestHeader::build("GET", b"http://a.example?q", None).unwrap();
        normalize_upstream(&mut req);
        assert_eq!(req.raw_path(), b"/?q");
    }

    #[test]
    fn proxy_authorization_goes_to_the_next_hop_unless_nominated() {
        let client = request(&[("proxy-authorization", "Basic eA==")]);
        let mut upstream = request(&[]);
        relay_proxy_authorization(&client, &mut upstream);
        assert_eq!(upstream.headers["proxy-authorization"], "Basic eA==");

        let client = request(&[
            ("connection", "Proxy-Authorization"),
            ("proxy-authorization", "Basic eA=="),
        ]);
        let mut upstream = request(&[]);
        relay_proxy_authorization(&client, &mut upstream);
        assert!(!upstream.headers.contains_key("proxy-authorization"));
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
