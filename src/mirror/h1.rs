//! A lean HTTP/1.1 client for shadow exchanges on the mirror's own idle connections.
//!
//! Pingora's client session builds a response header (header map, case map,
//! buffers) and a body reader for every exchange. A shadow's answer is only
//! counted, or captured when it is compared, so it is parsed in place with
//! httparse and its body skipped or handed over as shared slices. The request
//! header comes ready for the wire (`wire`), and the body is framed as Pingora
//! frames it, so the shadow gets the bytes the primary got.

use std::fmt;
use std::io::IoSlice;

use bytes::{Buf, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::wire::H1Request;
use crate::compare::capture::Capturer;

/// A response header larger than this is refused (Pingora's client allows 64 KiB too).
const MAX_HEADER_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// A chunk-size line or trailer section longer than this is refused.
const MAX_CHUNK_LINE_BYTES: usize = 4 * 1024;
const MAX_TRAILER_BYTES: usize = 64 * 1024;
const READ_SIZE: usize = 8 * 1024;
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
/// Body pieces written at most in one vectored write.
pub const MAX_PIECES_PER_WRITE: usize = 16;
/// A chunk's size line: up to 16 hex digits and CRLF.
const CHUNK_SIZE_LINE_BYTES: usize = 18;

#[derive(Debug)]
pub enum H1Error {
    Io(std::io::Error),
    /// The server closed the connection before the message ended.
    Closed,
    Malformed(&'static str),
}

impl fmt::Display for H1Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            H1Error::Io(e) => write!(f, "{e}"),
            H1Error::Closed => f.write_str("connection closed before the message ended"),
            H1Error::Malformed(what) => write!(f, "malformed: {what}"),
        }
    }
}

impl H1Error {
    /// The connection is gone: closed or reset by the server.
    fn is_connection_lost(&self) -> bool {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        match self {
            H1Error::Closed => true,
            H1Error::Io(e) => matches!(
                e.kind(),
                ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof
            ),
            H1Error::Malformed(_) => false,
        }
    }
}

impl From<std::io::Error> for H1Error {
    fn from(e: std::io::Error) -> Self {
        H1Error::Io(e)
    }
}

type Result<T> = std::result::Result<T, H1Error>;

/// A request header that could not be written.
#[derive(Debug)]
pub struct SendError {
    pub error: H1Error,
    /// The server had closed this kept-alive connection as it was reused.
    pub lost_reused_connection: bool,
}

/// How the request body goes on the wire, read from the header we sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// Content-Length (0 when the header has no framing: requests are never
    /// close-delimited); bytes past it are not sent, as Pingora does.
    Length {
        left: u64,
    },
    Chunked,
}

/// How the response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// The final response header, as far as a shadow needs it.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    /// Filled only when asked for (a compared response).
    pub headers: HeaderMap,
    pub body: ResponseBody,
    /// The server will take another request on this connection.
    pub keep_alive: bool,
}

/// One request/response exchange on a connection.
pub struct ShadowH1 {
    stream: TcpStream,
    framing: RequestFraming,
    /// Bytes read and not yet consumed.
    buf: BytesMut,
    /// Cleared by anything that makes the connection unfit for another request.
    reusable: bool,
    /// Taken from the idle connections rather than opened for this request.
    reused: bool,
    /// Some of the response has arrived.
    answered: bool,
}

impl ShadowH1 {
    /// Write the request header; `reused` says whether `stream` served a request before.
    pub async fn send_header(
        mut stream: TcpStream,
        request: &H1Request,
        reused: bool,
    ) -> std::result::Result<Self, SendError> {
        let sent = async {
            stream.write_all(&request.bytes).await?;
            stream.flush().await
        };
        if let Err(e) = sent.await {
            let error = H1Error::Io(e);
            return Err(SendError {
                lost_reused_connection: reused && error.is_connection_lost(),
                error,
            });
        }
        Ok(ShadowH1 {
            stream,
            framing: request.framing,
            buf: BytesMut::new(),
            reusable: request.keep_alive,
            reused,
            answered: false,
        })
    }

    /// Whether `error` means the server had closed this kept-alive connection as it was
    /// reused: it answered nothing, and the request may be sent again on a new one.
    pub fn lost_reused_connection(&self, error: &H1Error) -> bool {
        self.reused && !self.answered && error.is_connection_lost()
    }

    /// Write consecutive pieces of the body in one vectored write, each framed on its
    /// own (a chunked body gets one chunk per non-empty piece; a body with a length is
    /// cut at it), so the bytes on the wire are those of writing them one by one: but
    /// one syscall, and one wake-up of the server, instead of one per piece.
    /// More than `MAX_PIECES_PER_WRITE` pieces take one write per that many.
    pub async fn send_body(&mut self, pieces: &[&[u8]]) -> Result<()> {
        for group in pieces.chunks(MAX_PIECES_PER_WRITE) {
            self.send_body_group(group).await?;
        }
        Ok(())
    }

    async fn send_body_group(&mut self, pieces: &[&[u8]]) -> Result<()> {
        let mut size_lines = [[0u8; CHUNK_SIZE_LINE_BYTES]; MAX_PIECES_PER_WRITE];
        let mut parts: [IoSlice<'_>; 3 * MAX_PIECES_PER_WRITE] =
            [IoSlice::new(&[]); 3 * MAX_PIECES_PER_WRITE];
        let mut used = 0;
        match &mut self.framing {
            RequestFraming::Chunked => {
                let mut line_lens = [0usize; MAX_PIECES_PER_WRITE];
                for (i, piece) in pieces.iter().enumerate() {
                    line_lens[i] = chunk_size_line(piece.len(), &mut size_lines[i]);
                }
                for ((piece, line), len) in pieces.iter().zip(&size_lines).zip(line_lens) {
                    // An empty chunk would end the body.
                    if piece.is_empty() {
                        continue;
                    }
                    parts[used] = IoSlice::new(&line[..len]);
                    parts[used + 1] = IoSlice::new(piece);
                    parts[used + 2] = IoSlice::new(b"\r\n");
                    used += 3;
                }
            }
            RequestFraming::Length { left } => {
                for piece in pieces {
                    let n = piece
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    if n > 0 {
                        parts[used] = IoSlice::new(&piece[..n]);
                        used += 1;
                        *left -= n as u64;
                    }
                }
            }
        }
        write_all_vectored(&mut self.stream, &mut parts[..used]).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// End the body: the last chunk, or check the declared length was sent.
    pub async fn finish_body(&mut self) -> Result<()> {
        match self.framing {
            RequestFraming::Chunked => {
                self.stream.write_all(LAST_CHUNK).await?;
                self.stream.flush().await?;
                Ok(())
            }
            RequestFraming::Length { left: 0 } => Ok(()),
            RequestFraming::Length { .. } => {
                Err(H1Error::Malformed("body shorter than its Content-Length"))
            }
        }
    }

    /// Read the final response header; interim (1xx) responses are skipped.
    /// `want_headers`: keep the header fields (for a comparison).
    pub async fn read_head(&mut self, is_head: bool, want_headers: bool) -> Result<ResponseHead> {
        let head = self.read_final_head(is_head, want_headers).await;
        self.reusable &= head.as_ref().is_ok_and(|head| head.keep_alive);
        head
    }

    async fn read_final_head(&mut self, is_head: bool, want_headers: bool) -> Result<ResponseHead> {
        loop {
            match parse_head(&self.buf, is_head, want_headers)? {
                Some((len, head)) => {
                    self.buf.advance(len);
                    if head.status == 101 {
                        return Err(H1Error::Malformed("101 Switching Protocols"));
                    }
                    if head.status < 200 {
                        continue;
                    }
                    return Ok(head);
                }
                None if self.buf.len() >= MAX_HEADER_BYTES => {
                    return Err(H1Error::Malformed("response header too large"));
                }
                None => self.fill_or_closed().await?,
            }
        }
    }

    /// Read the body to its end: kept by `capture` when there is one, else skipped.
    pub async fn read_body(
        &mut self,
        body: ResponseBody,
        capture: Option<&mut Capturer>,
    ) -> Result<()> {
        let read = self.read_whole_body(body, capture).await;
        // A body not read to its end leaves the connection out of step.
        self.reusable &= read.is_ok();
        read
    }

    async fn read_whole_body(
        &mut self,
        body: ResponseBody,
        mut capture: Option<&mut Capturer>,
    ) -> Result<()> {
        match body {
            ResponseBody::None => Ok(()),
            ResponseBody::Length(len) => self.read_exact_body(len, &mut capture).await,
            ResponseBody::UntilClose => {
                self.reusable = false;
                loop {
                    self.take(self.buf.len(), &mut capture);
                    if self.fill().await? == 0 {
                        return Ok(());
                    }
                }
            }
            ResponseBody::Chunked => loop {
                let size = self.chunk_size().await?;
                if size == 0 {
                    return self.skip_trailers().await;
                }
                self.read_exact_body(size, &mut capture).await?;
                while self.buf.len() < 2 {
                    self.fill_or_closed().await?;
                }
                if &self.buf[..2] != b"\r\n" {
                    return Err(H1Error::Malformed("chunk not followed by CRLF"));
                }
                self.buf.advance(2);
            },
        }
    }

    /// Close the connection: the server sees the body cut short, not finished.
    pub async fn shutdown(&mut self) {
        self.reusable = false;
        let _ = self.stream.shutdown().await;
    }

    /// The connection, if it can carry another request: the server keeps it
    /// open and sent nothing past this response.
    pub fn into_reusable(self) -> Option<TcpStream> {
        (self.reusable && self.buf.is_empty()).then_some(self.stream)
    }

    async fn read_exact_body(
        &mut self,
        len: u64,
        capture: &mut Option<&mut Capturer>,
    ) -> Result<()> {
        let mut left = len;
        while left > 0 {
            if self.buf.is_empty() {
                self.fill_or_closed().await?;
            }
            let n = self
                .buf
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            self.take(n, capture);
            left -= n as u64;
        }
        Ok(())
    }

    /// Consume `n` buffered body bytes: a shared slice to the capture, or dropped.
    fn take(&mut self, n: usize, capture: &mut Option<&mut Capturer>) {
        match capture {
            Some(capturer) => capturer.body(&self.buf.split_to(n).freeze()),
            None => self.buf.advance(n),
        }
    }

    async fn chunk_size(&mut self) -> Result<u64> {
        loop {
            match httparse::parse_chunk_size(&self.buf) {
                Ok(httparse::Status::Complete((len, size))) => {
                    self.buf.advance(len);
                    return Ok(size);
                }
                Ok(httparse::Status::Partial) if self.buf.len() < MAX_CHUNK_LINE_BYTES => {
                    self.fill_or_closed().await?;
                }
                _ => return Err(H1Error::Malformed("chunk size line")),
            }
        }
    }

    /// After the last chunk: trailer fields (ignored) up to the empty line.
    async fn skip_trailers(&mut self) -> Result<()> {
        let mut skipped = 0;
        loop {
            match self.buf.windows(2).position(|w| w == b"\r\n") {
                Some(0) => {
                    self.buf.advance(2);
                    return Ok(());
                }
                Some(line) => {
                    skipped += line + 2;
                    self.buf.advance(line + 2);
                }
                None => self.fill_or_closed().await?,
            }
            if skipped > MAX_TRAILER_BYTES {
                return Err(H1Error::Malformed("trailers too large"));
            }
        }
    }

    async fn fill(&mut self) -> Result<usize> {
        self.buf.reserve(READ_SIZE);
        let n = self.stream.read_buf(&mut self.buf).await?;
        self.answered |= n > 0;
        Ok(n)
    }

    async fn fill_or_closed(&mut self) -> Result<()> {
        match self.fill().await? {
            0 => Err(H1Error::Closed),
            _ => Ok(()),
        }
    }
}

/// Write `len` as a chunk size line (hex, CRLF) into `out`; returns its length.
fn chunk_size_line(len: usize, out: &mut [u8; CHUNK_SIZE_LINE_BYTES]) -> usize {
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    let mut value = len;
    for byte in out[..digits].iter_mut().rev() {
        *byte = b"0123456789ABCDEF"[value & 0xf];
        value >>= 4;
    }
    out[digits..digits + 2].copy_from_slice(b"\r\n");
    digits + 2
}

/// Write every byte of `parts`, in as few writes as the socket takes.
async fn write_all_vectored(stream: &mut TcpStream, mut parts: &mut [IoSlice<'_>]) -> Result<()> {
    while !parts.is_empty() {
        let n = stream.write_vectored(parts).await?;
        if n == 0 {
            return Err(H1Error::Io(std::io::ErrorKind::WriteZero.into()));
        }
        IoSlice::advance_slices(&mut parts, n);
    }
    Ok(())
}

pub fn request_framing(headers: &HeaderMap) -> RequestFraming {
    let last_coding = headers.get_all(TRANSFER_ENCODING).iter().next_back();
    if last_coding.is_some_and(|v| is_chunked(v.as_bytes())) {
        return RequestFraming::Chunked;
    }
    let lengths = headers
        .get_all(CONTENT_LENGTH)
        .iter()
        .map(HeaderValue::as_bytes);
    RequestFraming::Length {
        left: content_length(lengths).ok().flatten().unwrap_or(0),
    }
}

/// Parse a complete response header at the start of `buf`: its length and what it says,
/// or None while it is incomplete. Header fields are copied out only when wanted.
fn parse_head(
    buf: &[u8],
    is_head: bool,
    want_headers: bool,
) -> Result<Option<(usize, ResponseHead)>> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(H1Error::Malformed("response header")),
    };
    let status = response.code.ok_or(H1Error::Malformed("response status"))?;
    let mut headers = HeaderMap::new();
    // Every Content-Length field must agree; checked only if it frames the body.
    let (mut has_length, mut length) = (false, Ok(None));
    // The last Transfer-Encoding field decides, as in Pingora.
    let mut last_coding: Option<&[u8]> = None;
    let (mut close, mut keep_alive_token) = (false, false);
    for field in response.headers.iter() {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(CONTENT_LENGTH.as_str().as_bytes()) {
            has_length = true;
            length = match (length, content_length(std::iter::once(field.value))) {
                (Ok(None), this) => this,
                (Ok(Some(a)), Ok(Some(b))) if a != b => {
                    Err(H1Error::Malformed("conflicting Content-Length values"))
                }
                (Ok(Some(a)), Ok(_)) => Ok(Some(a)),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
        } else if name.eq_ignore_ascii_case(TRANSFER_ENCODING.as_str().as_bytes()) {
            last_coding = Some(field.value);
        } else if name.eq_ignore_ascii_case(CONNECTION.as_str().as_bytes()) {
            close |= has_token(field.value, b"close");
            keep_alive_token |= has_token(field.value, b"keep-alive");
        }
        if want_headers {
            let name = HeaderName::from_bytes(name)
                .map_err(|_| H1Error::Malformed("response header name"))?;
            let value = HeaderValue::from_bytes(field.value)
                .map_err(|_| H1Error::Malformed("response header value"))?;
            headers.append(name, value);
        }
    }
    let mut keep_alive = !close && (response.version == Some(1) || keep_alive_token);
    let body = if is_head || status < 200 || status == 204 || status == 304 {
        ResponseBody::None
    } else if let Some(coding) = last_coding {
        // Both framings at once: read it as chunked (RFC 9112 §6.3), but the
        // connection cannot be trusted for another request.
        if has_length {
            keep_alive = false;
        }
        if is_chunked(coding) {
            ResponseBody::Chunked
        } else {
            ResponseBody::UntilClose
        }
    } else {
        match length? {
            Some(len) => ResponseBody::Length(len),
            None => ResponseBody::UntilClose,
        }
    };
    if body == ResponseBody::UntilClose {
        keep_alive = false;
    }
    Ok(Some((
        len,
        ResponseHead {
            status,
            headers,
            body,
            keep_alive,
        },
    )))
}

/// The Content-Length, if any: every value (and every comma-separated item) the same number.
fn content_length<'a>(values: impl Iterator<Item = &'a [u8]>) -> Result<Option<u64>> {
    let mut length = None;
    for value in values {
        for item in value.split(|b| *b == b',') {
            let item = item.trim_ascii();
            let parsed = std::str::from_utf8(item)
                .ok()
                .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|text| text.parse::<u64>().ok())
                .ok_or(H1Error::Malformed("Content-Length"))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(H1Error::Malformed("conflicting Content-Length values"));
            }
            length = Some(parsed);
        }
    }
    Ok(length)
}

/// Whether the last coding of a Transfer-Encoding value is `chunked`.
fn is_chunked(value: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .next_back()
        .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_http::RequestHeader;

    fn head(raw: &str, is_head: bool) -> ResponseHead {
        let (len, head) = parse_head(raw.as_bytes(), is_head, true).unwrap().unwrap();
        assert_eq!(len, raw.len());
        head
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false);
        assert_eq!(
            (h.status, h.body, h.keep_alive),
            (200, ResponseBody::Length(5), true)
        );
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!(h.body, ResponseBody::None, "a HEAD response has no body");
        let h = head("HTTP/1.1 204 No Content\r\n\r\n", false);
        assert_eq!((h.body, h.keep_alive), (ResponseBody::None, true));
        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert_eq!((h.body, h.keep_alive), (ResponseBody::Chunked, true));
        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            false,
        );
        assert_eq!((h.body, h.keep_alive), (ResponseBody::Chunked, false));
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false);
        assert_eq!((h.body, h.keep_alive), (ResponseBody::UntilClose, false));
        let h = head("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((h.body, h.keep_alive), (ResponseBody::UntilClose, false));
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nConnection: Close\r\n\r\n",
            false,
        );
        assert_eq!((h.body, h.keep_alive), (ResponseBody::Length(2), false));
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false);
        assert!(!h.keep_alive, "HTTP/1.0 closes unless it says keep-alive");
        let h = head(
            "HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n",
            false,
        );
        assert!(h.keep_alive);
    }

    #[test]
    fn bad_or_partial_headers() {
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Le", false, false)
                .unwrap()
                .is_none()
        );
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTX/1.1 200 OK\r\n\r\n",
        ] {
            assert!(parse_head(bad.as_bytes(), false, false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn headers_are_kept_only_when_asked_for() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-A: 1\r\n\r\n";
        let (_, kept) = parse_head(raw, false, true).unwrap().unwrap();
        assert_eq!(kept.headers.len(), 2);
        let (_, skipped) = parse_head(raw, false, false).unwrap().unwrap();
        assert!(skipped.headers.is_empty());
        assert_eq!(skipped.body, ResponseBody::Length(0));
    }

    #[test]
    fn request_framing_matches_pingora() {
        let mut req = RequestHeader::build("POST", b"/", None).unwrap();
        assert_eq!(
            request_framing(&req.headers),
            RequestFraming::Length { left: 0 }
        );
        req.insert_header("content-length", "7").unwrap();
        assert_eq!(
            request_framing(&req.headers),
            RequestFraming::Length { left: 7 }
        );
        req.insert_header("transfer-encoding", "chunked").unwrap();
        assert_eq!(request_framing(&req.headers), RequestFraming::Chunked);
    }

    /// One exchange against a server that answers `response` in the given pieces:
    /// the status, the body as captured, whether the connection could be reused,
    /// and the request bytes the server received.
    async fn exchange(
        method: &str,
        body: &[&[u8]],
        response: &[&[u8]],
    ) -> (Result<(u16, Vec<u8>)>, bool, Vec<u8>) {
        use std::sync::Arc;
        use tokio::io::AsyncWriteExt as _;
        use tokio::net::TcpListener;

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pieces: Vec<Vec<u8>> = response.iter().map(|p| p.to_vec()).collect();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut received = Vec::new();
            // The request ends with the header (no body) or the last chunk.
            let mut buf = [0u8; 4096];
            let complete = |r: &[u8]| match r.starts_with(b"POST") {
                true => r.ends_with(b"\r\n0\r\n\r\n"),
                false => r.ends_with(b"\r\n\r\n"),
            };
            while !complete(&received) {
                let n = socket.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                received.extend_from_slice(&buf[..n]);
            }
            for piece in pieces {
                socket.write_all(&piece).await.unwrap();
                socket.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            received
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut req = RequestHeader::build(method, b"/x", None).unwrap();
        req.insert_header("host", "shadow").unwrap();
        if !body.is_empty() {
            req.insert_header("transfer-encoding", "chunked").unwrap();
        }
        let wire = crate::mirror::wire::ShadowEdits::default()
            .h1_request(&req, !body.is_empty())
            .unwrap();
        let mut h1 = ShadowH1::send_header(stream, &wire, false).await.unwrap();
        if !body.is_empty() {
            h1.send_body(body).await.unwrap();
        }
        h1.finish_body().await.unwrap();
        let budget = Arc::new(crate::mirror::budget::ByteBudget::new(
            1 << 20,
            pingora_prometheus::prometheus::IntGauge::new("test_budget", "test").unwrap(),
        ));
        let mut capturer = Capturer::new(1 << 20, budget, std::time::Instant::now());
        let result = async {
            let head = h1.read_head(method == "HEAD", true).await?;
            h1.read_body(head.body, Some(&mut capturer)).await?;
            Ok(head.status)
        }
        .await;
        let reusable = h1.into_reusable().is_some();
        let received = server.await.unwrap();
        let result = result.map(|status| (status, capturer.finish().body().unwrap().to_vec()));
        (result, reusable, received)
    }

    #[tokio::test]
    async fn reads_each_framing_to_its_end() {
        let (r, reusable, _) = exchange(
            "GET",
            &[],
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", b"lo"],
        )
        .await;
        assert_eq!(r.unwrap(), (200, b"hello".to_vec()));
        assert!(reusable);

        let chunked: &[&[u8]] = &[
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"3;ext=1\r\nabc\r\n",
            b"2\r",
            b"\nde\r\n0\r\nX-Trailer: 1\r\n",
            b"\r\n",
        ];
        let (r, reusable, _) = exchange("GET", &[], chunked).await;
        assert_eq!(r.unwrap(), (200, b"abcde".to_vec()));
        assert!(
            reusable,
            "a whole chunked response leaves the connection usable"
        );

        let (r, reusable, _) = exchange(
            "GET",
            &[],
            &[b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close"],
        )
        .await;
        assert_eq!(r.unwrap(), (200, b"until close".to_vec()));
        assert!(!reusable);

        let (r, reusable, _) = exchange(
            "HEAD",
            &[],
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"],
        )
        .await;
        assert_eq!(r.unwrap(), (200, Vec::new()));
        assert!(
            reusable,
            "a HEAD response has no body whatever its length says"
        );
    }

    #[tokio::test]
    async fn a_cut_or_garbled_response_is_an_error_and_never_reused() {
        for response in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        ] {
            let (r, reusable, _) = exchange("GET", &[], &[response]).await;
            assert!(r.is_err(), "{:?}", String::from_utf8_lossy(response));
            assert!(!reusable);
        }
        // Bytes past the response: the server is out of step, drop the connection.
        let (r, reusable, _) = exchange(
            "GET",
            &[],
            &[b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n"],
        )
        .await;
        assert_eq!(r.unwrap().0, 204);
        assert!(!reusable);
    }

    #[tokio::test]
    async fn a_chunked_body_is_framed_as_pingora_frames_it() {
        let (r, _, received) = exchange(
            "POST",
            &[b"hello", b"", b"0123456789abcdef"],
            &[b"HTTP/1.1 204 No Content\r\n\r\n"],
        )
        .await;
        assert_eq!(r.unwrap().0, 204);
        let text = String::from_utf8(received).unwrap();
        assert!(
            text.ends_with("\r\n\r\n5\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n"),
            "{text:?}"
        );
    }

    /// A PUT with `length` bytes of body, written by `send`; what the server received.
    async fn put_with_length<F, Fut>(length: usize, send: F) -> String
    where
        F: FnOnce(ShadowH1) -> Fut,
        Fut: std::future::Future<Output = ShadowH1>,
    {
        use tokio::net::TcpListener;

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut received = Vec::new();
            socket.read_to_end(&mut received).await.unwrap();
            received
        });
        let mut req = RequestHeader::build("PUT", b"/x", None).unwrap();
        req.insert_header("host", "shadow").unwrap();
        req.insert_header("content-length", length.to_string())
            .unwrap();
        let wire = crate::mirror::wire::ShadowEdits::default()
            .h1_request(&req, true)
            .unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let h1 = ShadowH1::send_header(stream, &wire, false).await.unwrap();
        let mut h1 = send(h1).await;
        h1.finish_body().await.unwrap();
        h1.shutdown().await;
        String::from_utf8(server.await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn more_pieces_than_one_write_takes_all_go_out() {
        let text = put_with_length(40, |mut h1| async move {
            let pieces: Vec<&[u8]> = vec![b"ab"; 20];
            h1.send_body(&pieces).await.unwrap();
            h1
        })
        .await;
        assert!(
            text.ends_with(&format!("\r\n\r\n{}", "ab".repeat(20))),
            "{text:?}"
        );
    }

    #[tokio::test]
    async fn a_body_with_a_length_is_written_whole_and_cut_at_its_length() {
        let text = put_with_length(6, |mut h1| async move {
            h1.send_body(&[b"abc", b"", b"de"]).await.unwrap();
            h1.send_body(&[b"fgh"]).await.unwrap();
            h1
        })
        .await;
        assert!(text.ends_with("\r\n\r\nabcdef"), "{text:?}");
    }

    #[test]
    fn chunk_size_lines_are_upper_case_hex() {
        let mut line = [0u8; CHUNK_SIZE_LINE_BYTES];
        for (len, text) in [
            (0, "0\r\n"),
            (5, "5\r\n"),
            (16, "10\r\n"),
            (65_535, "FFFF\r\n"),
        ] {
            let n = chunk_size_line(len, &mut line);
            assert_eq!(&line[..n], text.as_bytes());
        }
        let n = chunk_size_line(usize::MAX, &mut line);
        assert_eq!(&line[..n], b"FFFFFFFFFFFFFFFF\r\n");
    }
}
