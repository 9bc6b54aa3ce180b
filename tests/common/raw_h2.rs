//! A raw HTTP/2 client for hostile tests: it sends exactly the header fields it is given
//! (HPACK literals, no validation, no normalisation), so a test can send what no
//! well-behaved client library would, and reports the server's answer as frames.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

/// How the server answered stream 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum H2Answer {
    /// A response header: its status when HPACK's static table names it (200, 204, 206,
    /// 304, 400, 404, 500), else `None`.
    Status(Option<u16>),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    /// The connection closed with no answer.
    Closed,
    /// Nothing within the time allowed.
    TimedOut,
}

impl H2Answer {
    /// Refused: a 4xx the table names, or the stream or connection ended with an error.
    pub fn is_refusal(&self) -> bool {
        match self {
            H2Answer::Status(Some(status)) => (400..500).contains(status),
            H2Answer::Reset(_) | H2Answer::GoAway(_) => true,
            _ => false,
        }
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), the prefix's other bits zero.
fn hpack_int(value: usize, n: u32, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(value as u8);
        return;
    }
    out.push(max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// Header fields as HPACK literals without indexing, names and values as given.
fn header_block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00);
        hpack_int(name.len(), 7, &mut block);
        block.extend_from_slice(name);
        hpack_int(value.len(), 7, &mut block);
        block.extend_from_slice(value);
    }
    block
}

/// The status a response header block starts with, when it is an indexed static entry.
fn indexed_status(block: &[u8]) -> Option<u16> {
    match block.first()? {
        0x88 => Some(200),
        0x89 => Some(204),
        0x8a => Some(206),
        0x8b => Some(304),
        0x8c => Some(400),
        0x8d => Some(404),
        0x8e => Some(500),
        _ => None,
    }
}

/// Open a connection, send `fields` as stream 1 (with `body` as one DATA frame when
/// given), and read until the server answers that stream or the connection ends.
pub async fn raw_h2_request(
    addr: SocketAddr,
    fields: &[(&[u8], &[u8])],
    body: Option<&[u8]>,
    timeout: Duration,
) -> H2Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect to proxy");
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let end_stream = if body.is_none() { END_STREAM } else { 0 };
    out.extend(frame(
        HEADERS,
        END_HEADERS | end_stream,
        1,
        &header_block(fields),
    ));
    if let Some(body) = body {
        out.extend(frame(DATA, END_STREAM, 1, body));
    }
    // A server may refuse and close before taking every byte: its answer still counts.
    let _ = stream.write_all(&out).await;
    tokio::time::timeout(timeout, read_answer(&mut stream))
        .await
        .unwrap_or(H2Answer::TimedOut)
}

async fn read_answer(stream: &mut TcpStream) -> H2Answer {
    loop {
        let mut head = [0u8; 9];
        if stream.read_exact(&mut head).await.is_err() {
            return H2Answer::Closed;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        if stream.read_exact(&mut payload).await.is_err() {
            return H2Answer::Closed;
        }
        let code = |at: usize| {
            payload
                .get(at..at + 4)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        match kind {
            SETTINGS if flags & ACK == 0 => {
                let _ = stream.write_all(&frame(SETTINGS, ACK, 0, &[])).await;
            }
            HEADERS if id == 1 => {
                // No padding or priority flags are set by the servers under test.
                return H2Answer::Status(indexed_status(&payload));
            }
            RST_STREAM if id == 1 => return H2Answer::Reset(code(0)),
            GOAWAY => return H2Answer::GoAway(code(4)),
            _ => {}
        }
    }
}
