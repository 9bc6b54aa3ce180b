//! The shadow's HTTP/1 request header, written straight from the primary's.
//!
//! The header sent to the primary upstream is serialized once for each HTTP/1
//! shadow with the mirror's edits applied on the way, instead of copying the
//! header map, editing the copy and serializing that (a copy of every field,
//! allocations for each edit). The bytes are what Pingora's serializer writes:
//! the request line, each field with the case the client sent (or Pingora's
//! titled spelling), in the order the primary got them.
//!
//! Edits, in the order they are applied: `Expect` and `Proxy-Authorization` are
//! dropped, then `request_headers.remove`; a body with no framing header gets
//! `Transfer-Encoding: chunked` (as Pingora frames it for the primary); then
//! `request_headers.set`, `host` and the marker replace a field where it stood, or
//! are added at the end. Framing fields are never edited (config refuses it), so
//! the body is framed exactly as it was for the primary.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{
    CONNECTION, CONTENT_LENGTH, EXPECT, HOST, PROXY_AUTHORIZATION, TRANSFER_ENCODING,
};
use http::{HeaderName, HeaderValue, Method, Version};
use pingora_http::{IntoCaseHeaderName, RequestHeader};

use super::MARKER_HEADER;
use super::h1::{RequestFraming, has_token, request_framing};

const CRLF: &[u8] = b"\r\n";

/// The header of one HTTP/1 shadow request, ready for the wire.
#[derive(Debug, Clone)]
pub struct H1Request {
    pub bytes: Bytes,
    pub method: Method,
    /// How the body that follows is framed.
    pub framing: RequestFraming,
    /// No `Connection: close` was sent: the connection may carry another request.
    pub keep_alive: bool,
}

/// A field the mirror sets: its name, the spelling written, and its value.
#[derive(Debug, Clone)]
struct SetField {
    name: HeaderName,
    wire_name: Bytes,
    value: HeaderValue,
}

/// One mirror's edits to the header, resolved at load.
#[derive(Debug, Clone, Default)]
pub struct ShadowEdits {
    /// Dropped wherever they stand.
    remove: Vec<HeaderName>,
    /// Set once each; a later edit of the same name replaces an earlier one's value.
    set: Vec<SetField>,
}

impl ShadowEdits {
    /// `set` is written in the spelling Pingora gives a field it inserts: titled for a
    /// standard name, as given otherwise.
    pub fn new(
        remove: &[HeaderName],
        set: &[(HeaderName, HeaderValue)],
        host: Option<&HeaderValue>,
        mark: bool,
    ) -> Self {
        let mut edits = ShadowEdits {
            // The shadow gets the body regardless and must not answer `100 Continue`;
            // credentials meant for a proxy are not the shadow's business.
            remove: [EXPECT, PROXY_AUTHORIZATION]
                .into_iter()
                .chain(remove.iter().cloned())
                .collect(),
            set: Vec::new(),
        };
        let titled =
            |name: &HeaderName| Bytes::copy_from_slice(name.into_case_header_name().as_slice());
        for (name, value) in set {
            edits.set_field(name.clone(), titled(name), value.clone());
        }
        if let Some(host) = host {
            edits.set_field(HOST, titled(&HOST), host.clone());
        }
        if mark {
            let name = HeaderName::from_static(MARKER_HEADER);
            edits.set_field(
                name,
                Bytes::from_static(MARKER_HEADER.as_bytes()),
                HeaderValue::from_static("1"),
            );
        }
        edits
    }

    /// Make the same edits on a header (an HTTP/2 shadow's copy: Pingora's client
    /// writes it from a `RequestHeader`).
    pub fn apply(&self, header: &mut RequestHeader) {
        for name in &self.remove {
            header.remove_header(name);
        }
        for field in &self.set {
            let _ = header.insert_header(field.wire_name.clone(), field.value.clone());
        }
    }

    fn set_field(&mut self, name: HeaderName, wire_name: Bytes, value: HeaderValue) {
        match self.set.iter_mut().find(|f| f.name == name) {
            Some(field) => {
                field.wire_name = wire_name;
                field.value = value;
            }
            None => self.set.push(SetField {
                name,
                wire_name,
                value,
            }),
        }
    }

    /// The shadow's request header for `primary`, the header the primary upstream got;
    /// `has_body`: a body follows. None when the request line cannot be written (the
    /// same requests Pingora's serializer refuses).
    pub fn h1_request(&self, primary: &RequestHeader, has_body: bool) -> Option<H1Request> {
        // The header an HTTP/2 primary (h2c pool) got says HTTP/2; its HTTP/1 shadow
        // gets HTTP/1.1, as Pingora writes for an HTTP/1 upstream.
        let version: &[u8] = match primary.version {
            Version::HTTP_09 => b"HTTP/0.9",
            Version::HTTP_10 => b"HTTP/1.0",
            Version::HTTP_11 | Version::HTTP_2 => b"HTTP/1.1",
            _ => return None,
        };
        let target = primary.raw_path();
        if target
            .iter()
            .any(|&b| matches!(b, 0x00 | b'\n' | b'\r' | b' '))
        {
            return None;
        }
        let mut buf = BytesMut::with_capacity(512);
        buf.put_slice(primary.method.as_str().as_bytes());
        buf.put_u8(b' ');
        buf.put_slice(target);
        buf.put_u8(b' ');
        buf.put_slice(version);
        buf.put_slice(CRLF);
        // A request that came over HTTP/2 to an HTTP/2 primary may carry its host only
        // as the :authority: HTTP/1.1 needs it as Host (as Pingora does for HTTP/1).
        if !primary.headers.contains_key(HOST)
            && !self.remove.contains(&HOST)
            && !self.set.iter().any(|f| f.name == HOST)
            && let Some(authority) = primary.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            put_field(&mut buf, b"Host", &host);
        }

        // Which set fields have been written in place.
        let mut written = Written::default();
        let mut field =
            |buf: &mut BytesMut, name: &HeaderName, wire_name: &[u8], value: &HeaderValue| {
                if self.remove.contains(name) {
                    return;
                }
                let (wire_name, value) = match self.set.iter().position(|f| f.name == name) {
                    // A set field replaces the first of its name; the others are dropped.
                    Some(i) if !written.mark(i) => return,
                    Some(i) => (&self.set[i].wire_name[..], &self.set[i].value),
                    None => (wire_name, value),
                };
                put_field(buf, wire_name, value);
            };
        if primary.has_case() {
            for ((name, value), (case, _)) in primary.headers.iter().zip(primary.case_header_iter())
            {
                field(&mut buf, name, case.as_slice(), value);
            }
        } else {
            for (name, value) in primary.headers.iter() {
                field(
                    &mut buf,
                    name,
                    name.into_case_header_name().as_slice(),
                    value,
                );
            }
        }
        let mut framing = request_framing(&primary.headers);
        if has_body
            && !primary.headers.contains_key(CONTENT_LENGTH)
            && !primary.headers.contains_key(TRANSFER_ENCODING)
        {
            put_field(
                &mut buf,
                b"Transfer-Encoding",
                &HeaderValue::from_static("chunked"),
            );
            framing = RequestFraming::Chunked;
        }
        for (i, set) in self.set.iter().enumerate() {
            if !written.has(i) {
                put_field(&mut buf, &set.wire_name, &set.value);
            }
        }
        buf.put_slice(CRLF);
        // The Connection field sent: the one the mirror sets, else the primary's.
        let close = |v: &HeaderValue| has_token(v.as_bytes(), b"close");
        let keep_alive = match self.set.iter().find(|f| f.name == CONNECTION) {
            Some(set) => !close(&set.value),
            None => {
                self.remove.contains(&CONNECTION)
                    || !primary.headers.get_all(CONNECTION).iter().any(close)
            }
        };
        Some(H1Request {
            bytes: buf.freeze(),
            method: primary.method.clone(),
            framing,
            keep_alive,
        })
    }
}

impl H1Request {
    /// The path of the request target, for log lines.
    pub fn path(&self) -> &str {
        let target = self.bytes.split(|&b| b == b' ').nth(1).unwrap_or_default();
        let path = target.split(|&b| b == b'?').next().unwrap_or_default();
        std::str::from_utf8(path).unwrap_or("-")
    }
}

fn put_field(buf: &mut BytesMut, name: &[u8], value: &HeaderValue) {
    buf.put_slice(name);
    buf.put_slice(b": ");
    buf.put_slice(value.as_bytes());
    buf.put_slice(CRLF);
}

/// A set of small indexes: a bit mask, spilling to a vector past 64 (no allocation for
/// the usual handful of edits).
#[derive(Default)]
struct Written {
    low: u64,
    high: Vec<usize>,
}

impl Written {
    /// Mark `i`; false if it was marked already.
    fn mark(&mut self, i: usize) -> bool {
        if i < 64 {
            let new = self.low & (1 << i) == 0;
            self.low |= 1 << i;
            new
        } else if self.high.contains(&i) {
            false
        } else {
            self.high.push(i);
            true
        }
    }

    fn has(&self, i: usize) -> bool {
        if i < 64 {
            self.low & (1 << i) != 0
        } else {
            self.high.contains(&i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_core::protocols::http::v1::client::http_req_header_to_wire;

    /// A header as Pingora parses a client's: with the client's spelling kept.
    fn primary(fields: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/a/b?c=d", Some(fields.len())).unwrap();
        for (name, value) in fields {
            req.append_header(name.to_string(), *value).unwrap();
        }
        req
    }

    fn edits(remove: &[&str], set: &[(&str, &str)], host: Option<&str>, mark: bool) -> ShadowEdits {
        let remove: Vec<HeaderName> = remove.iter().map(|n| n.parse().unwrap()).collect();
        let set: Vec<(HeaderName, HeaderValue)> = set
            .iter()
            .map(|(n, v)| (n.parse().unwrap(), v.parse().unwrap()))
            .collect();
        let host = host.map(|h| h.parse().unwrap());
        ShadowEdits::new(&remove, &set, host.as_ref(), mark)
    }

    /// What editing a copy of the header with Pingora's own calls and serializing it
    /// gives: the bytes `h1_request` must match when no removal reorders the copy.
    fn by_copy(
        primary: &RequestHeader,
        set: &[(&str, &str)],
        host: Option<&str>,
        has_body: bool,
    ) -> Vec<u8> {
        let mut copy = primary.clone();
        if has_body
            && !copy.headers.contains_key(CONTENT_LENGTH)
            && !copy.headers.contains_key(TRANSFER_ENCODING)
        {
            copy.insert_header(TRANSFER_ENCODING, "chunked").unwrap();
        }
        for (name, value) in set {
            copy.insert_header(name.parse::<HeaderName>().unwrap(), *value)
                .unwrap();
        }
        if let Some(host) = host {
            copy.insert_header(HOST, host).unwrap();
        }
        copy.insert_header(MARKER_HEADER, "1").unwrap();
        http_req_header_to_wire(&copy).unwrap().to_vec()
    }

    fn text(request: &H1Request) -> &str {
        std::str::from_utf8(&request.bytes).unwrap()
    }

    #[test]
    fn matches_pingoras_serializer_on_an_edited_copy() {
        let req = primary(&[
            ("Host", "app"),
            ("user-agent", "curl"),
            ("X-Env", "prod"),
            ("Accept", "*/*"),
            ("x-env", "second"),
        ]);
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>, bool);
        let cases: &[Case] = &[
            (&[], None, false),
            (&[], None, true),
            (&[("x-env", "shadow")], None, false),
            (
                &[("x-new", "1"), ("accept", "text/plain")],
                Some("v2.internal"),
                true,
            ),
        ];
        for (set, host, has_body) in cases {
            let wire = edits(&[], set, *host, true)
                .h1_request(&req, *has_body)
                .unwrap();
            assert_eq!(
                text(&wire).as_bytes(),
                by_copy(&req, set, *host, *has_body),
                "{set:?} {host:?}"
            );
        }
    }

    #[test]
    fn the_primarys_order_and_spelling_are_kept() {
        let req = primary(&[
            ("HOST", "app"),
            ("Expect", "100-continue"),
            ("X-Keep", "1"),
            ("proxy-authorization", "Basic x"),
            ("Cookie", "a=1"),
            ("X-Last", "z"),
            ("Content-Length", "3"),
        ]);
        let wire = edits(&["cookie"], &[], None, true)
            .h1_request(&req, true)
            .unwrap();
        assert_eq!(
            text(&wire),
            "GET /a/b?c=d HTTP/1.1\r\nHOST: app\r\nX-Keep: 1\r\nX-Last: z\r\nContent-Length: 3\r\n\
             x-shadowgate-mirror: 1\r\n\r\n"
        );
        assert_eq!(wire.framing, RequestFraming::Length { left: 3 });
        assert!(wire.keep_alive);
        assert_eq!(wire.path(), "/a/b");
    }

    #[test]
    fn a_set_field_replaces_every_field_of_its_name_where_the_first_stood() {
        let req = primary(&[("x-env", "a"), ("Host", "app"), ("X-ENV", "b")]);
        let wire = edits(&[], &[("x-env", "shadow")], Some("v2"), false)
            .h1_request(&req, false)
            .unwrap();
        assert_eq!(
            text(&wire),
            "GET /a/b?c=d HTTP/1.1\r\nx-env: shadow\r\nHost: v2\r\n\r\n"
        );
    }

    #[test]
    fn a_removed_then_set_field_and_the_framing_are_added_at_the_end() {
        let req = primary(&[("Host", "app"), ("X-Env", "prod")]);
        let wire = edits(
            &["x-env"],
            &[("x-env", "shadow"), ("host", "first")],
            Some("v2"),
            true,
        )
        .h1_request(&req, true)
        .unwrap();
        // `host` wins over a set `host`, in the place of the first edit of that name.
        assert_eq!(
            text(&wire),
            "GET /a/b?c=d HTTP/1.1\r\nHost: v2\r\nTransfer-Encoding: chunked\r\nx-env: shadow\r\n\
             x-shadowgate-mirror: 1\r\n\r\n"
        );
        assert_eq!(wire.framing, RequestFraming::Chunked);
    }

    #[test]
    fn an_http2_copy_gets_the_same_edits() {
        let mut req = primary(&[
            ("Host", "app"),
            ("Expect", "100-continue"),
            ("Cookie", "a=1"),
            ("X-Env", "prod"),
        ]);
        edits(&["cookie"], &[("x-env", "shadow")], Some("v2"), true).apply(&mut req);
        let fields: Vec<(&str, &str)> = req
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            fields,
            [("host", "v2"), ("x-env", "shadow"), (MARKER_HEADER, "1")]
        );
    }

    #[test]
    fn connection_close_makes_the_connection_single_use() {
        let req = primary(&[("Host", "app"), ("Connection", "keep-alive, Close")]);
        let wire = edits(&[], &[], None, false)
            .h1_request(&req, false)
            .unwrap();
        assert!(!wire.keep_alive);
        let req = primary(&[("Host", "app")]);
        let wire = edits(&[], &[("connection", "close")], None, false)
            .h1_request(&req, false)
            .unwrap();
        assert!(!wire.keep_alive);
    }

    #[test]
    fn a_header_without_spelling_is_titled_as_pingora_titles_it() {
        // A request that came over HTTP/2 has no case map.
        let mut req = RequestHeader::build_no_case("GET", b"/", None).unwrap();
        req.insert_header("content-type", "text/plain").unwrap();
        req.insert_header("x-custom", "1").unwrap();
        let wire = edits(&[], &[], None, false)
            .h1_request(&req, false)
            .unwrap();
        assert_eq!(
            text(&wire).as_bytes(),
            http_req_header_to_wire(&req).unwrap().to_vec()
        );
        assert!(text(&wire).contains("Content-Type: text/plain\r\nx-custom: 1\r\n"));
    }

    #[test]
    fn an_http2_primary_header_becomes_http11_with_a_host() {
        // As Pingora holds a request that came over HTTP/2: the authority in the URI.
        let mut req = RequestHeader::build_no_case("GET", b"/p?q", None).unwrap();
        req.set_uri("https://app.example:8443/p?q".parse().unwrap());
        req.set_version(Version::HTTP_2);
        req.insert_header("accept", "*/*").unwrap();
        let wire = edits(&[], &[], None, true).h1_request(&req, false).unwrap();
        assert_eq!(
            text(&wire),
            "GET /p?q HTTP/1.1\r\nHost: app.example:8443\r\naccept: */*\r\nx-shadowgate-mirror: 1\r\n\r\n"
        );
        // A Host the mirror removes stays removed.
        let wire = edits(&["host"], &[], None, false)
            .h1_request(&req, false)
            .unwrap();
        assert_eq!(text(&wire), "GET /p?q HTTP/1.1\r\naccept: */*\r\n\r\n");
        // A Host the mirror sets is the only one.
        let wire = edits(&[], &[], Some("v2"), false)
            .h1_request(&req, false)
            .unwrap();
        assert_eq!(
            text(&wire),
            "GET /p?q HTTP/1.1\r\naccept: */*\r\nHost: v2\r\n\r\n"
        );
    }

    #[test]
    fn a_request_line_pingora_would_not_write_is_refused() {
        let mut req = primary(&[("Host", "app")]);
        req.set_version(Version::HTTP_3);
        assert!(
            edits(&[], &[], None, true)
                .h1_request(&req, false)
                .is_none()
        );
    }
}
