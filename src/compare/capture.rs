//! One side's response, captured as it streams past: status, headers, the body up to a cap
//! as shared `Bytes` (no copy), and a streaming hash and length of the whole body.
//! Kept bytes are charged to the process's mirror budget; when it is short, the capture keeps only the hash.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use xxhash_rust::xxh3::Xxh3;

use crate::mirror::budget::{BudgetHold, ByteBudget};

/// A finished capture.
#[derive(Debug)]
pub struct Capture {
    pub status: u16,
    pub headers: HeaderMap,
    /// The first bytes of the body, as the chunks arrived.
    pub kept: Vec<Bytes>,
    /// Length of the whole body.
    pub len: u64,
    /// xxh3 of the whole body.
    pub hash: u64,
    /// Why the kept bytes are not the whole body, if they are not.
    pub partial: Option<Partial>,
    /// From the request going upstream to the end of the response.
    pub elapsed: Duration,
    /// The budget share of `kept`, returned when the capture is dropped.
    _hold: BudgetHold,
}

/// Why a capture holds less than the whole body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partial {
    /// Longer than `max_body_bytes`.
    OverCap,
    /// The mirror budget could not hold the body.
    Budget,
}

impl Capture {
    /// The whole body in one buffer, when it was kept whole. One chunk is shared, not copied.
    pub fn body(&self) -> Option<Bytes> {
        if self.partial.is_some() {
            return None;
        }
        match self.kept.as_slice() {
            [] => Some(Bytes::new()),
            [one] => Some(one.clone()),
            many => {
                let mut joined = Vec::with_capacity(self.len as usize);
                for chunk in many {
                    joined.extend_from_slice(chunk);
                }
                Some(Bytes::from(joined))
            }
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A capture under way.
pub struct Capturer {
    cap: u64,
    started: Instant,
    status: u16,
    headers: HeaderMap,
    kept: Vec<Bytes>,
    kept_len: u64,
    len: u64,
    hasher: Xxh3,
    partial: Option<Partial>,
    hold: BudgetHold,
    /// When the body ended: the side's response time stops here.
    ended: Option<Instant>,
}

impl Capturer {
    /// `started`: when the request went upstream, for the latency comparison.
    pub fn new(cap: u64, budget: Arc<ByteBudget>, started: Instant) -> Self {
        Capturer {
            cap,
            started,
            status: 0,
            headers: HeaderMap::new(),
            kept: Vec::new(),
            kept_len: 0,
            len: 0,
            hasher: Xxh3::new(),
            partial: None,
            hold: BudgetHold::new(budget),
            ended: None,
        }
    }

    pub fn header(&mut self, status: u16, headers: &HeaderMap) {
        self.status = status;
        self.headers = headers.clone();
    }

    pub fn has_header(&self) -> bool {
        self.status != 0
    }

    /// Take in one body chunk: a shared slice up to the cap, the hash of all of it.
    pub fn body(&mut self, chunk: &Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.len += chunk.len() as u64;
        self.hasher.update(chunk);
        if self.partial.is_some() {
            return;
        }
        let room = self.cap.saturating_sub(self.kept_len);
        let piece = if (chunk.len() as u64) <= room {
            chunk.clone()
        } else {
            self.partial = Some(Partial::OverCap);
            chunk.slice(..room as usize)
        };
        if piece.is_empty() {
            return;
        }
        if !self.hold.grow(piece.len() as u64) {
            // Hash-only from here: the kept bytes are useless without the rest.
            self.partial = Some(Partial::Budget);
            self.kept.clear();
            self.kept_len = 0;
            self.hold.release();
            return;
        }
        self.kept_len += piece.len() as u64;
        self.kept.push(piece);
    }

    /// The body is complete.
    pub fn end(&mut self) {
        self.ended.get_or_insert_with(Instant::now);
    }

    pub fn ended(&self) -> bool {
        self.ended.is_some()
    }

    pub fn finish(self) -> Capture {
        Capture {
            status: self.status,
            headers: self.headers,
            kept: self.kept,
            len: self.len,
            hash: self.hasher.digest(),
            partial: self.partial,
            elapsed: self
                .ended
                .unwrap_or_else(Instant::now)
                .saturating_duration_since(self.started),
            _hold: self.hold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_prometheus::prometheus::IntGauge;

    fn budget(limit: u64) -> Arc<ByteBudget> {
        Arc::new(ByteBudget::new(limit, IntGauge::new("t", "t").unwrap()))
    }

    #[test]
    fn keeps_up_to_the_cap_and_hashes_everything() {
        let budget = budget(1000);
        let mut c = Capturer::new(5, budget.clone(), Instant::now());
        c.header(200, &HeaderMap::new());
        let first = Bytes::from_static(b"abc");
        c.body(&first);
        c.body(&Bytes::from_static(b"defgh"));
        let capture = c.finish();
        assert_eq!(capture.len, 8);
        assert_eq!(capture.partial, Some(Partial::OverCap));
        assert_eq!(capture.kept.concat(), b"abcde");
        // The first chunk is shared, not copied.
        assert_eq!(capture.kept[0].as_ptr(), first.as_ptr());
        assert_eq!(capture.hash, xxhash_rust::xxh3::xxh3_64(b"abcdefgh"));
        assert_eq!(budget.used(), 5);
        drop(capture);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_short_budget_degrades_to_hash_only() {
        let budget = budget(4);
        let mut c = Capturer::new(100, budget.clone(), Instant::now());
        c.body(&Bytes::from_static(b"abc"));
        c.body(&Bytes::from_static(b"def"));
        let capture = c.finish();
        assert_eq!(capture.partial, Some(Partial::Budget));
        assert!(capture.kept.is_empty());
        assert!(capture.body().is_none());
        assert_eq!(budget.used(), 0);
        assert_eq!(capture.hash, xxhash_rust::xxh3::xxh3_64(b"abcdef"));
    }

    #[test]
    fn a_whole_body_joins_its_chunks() {
        let mut c = Capturer::new(100, budget(100), Instant::now());
        c.body(&Bytes::from_static(b"ab"));
        c.body(&Bytes::new());
        c.body(&Bytes::from_static(b"cd"));
        assert_eq!(&c.finish().body().unwrap()[..], b"abcd");
    }
}
