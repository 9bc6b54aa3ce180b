//! Request ids: the client's `X-Request-Id` when it is sane, else one made here.
//! A made id is a per-process random prefix and a counter: unique, and one atomic add per request.

use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;
use pingora_http::RequestHeader;

/// The header that carries the id to the primary, to every shadow and back to logs.
pub const HEADER: &str = "x-request-id";

/// Longest client id kept; longer ones are replaced (a log field, not a payload).
pub const MAX_LEN: usize = 128;

/// Keep the client's id if it sent exactly one valid one, else set a new one.
/// Returns the id now in the header.
pub fn ensure(req: &mut RequestHeader) -> HeaderValue {
    let mut sent = req.headers.get_all(HEADER).iter();
    if let (Some(id), None) = (sent.next(), sent.next())
        && is_valid(id.as_bytes())
    {
        return id.clone();
    }
    let id = generate();
    // A name and value we built ourselves: insertion cannot fail.
    let _ = req.insert_header(HEADER, id.clone());
    id
}

/// 1 to `MAX_LEN` visible ASCII characters (no spaces or controls).
pub fn is_valid(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len()) && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// A new id: 16 hex digits random per process, `-`, then a counter in hex.
/// Built on the stack: the header value is the only allocation.
pub fn generate() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(process_random);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut text = [0u8; 33];
    write_hex(&mut text[..16], prefix);
    text[16] = b'-';
    let digits = (16 - n.leading_zeros() as usize / 4).max(1);
    write_hex(&mut text[17..17 + digits], n);
    // Hex digits and '-' only: always a valid header value.
    HeaderValue::from_bytes(&text[..17 + digits])
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// The low `out.len()` hex digits of `value`, most significant first.
fn write_hex(out: &mut [u8], mut value: u64) {
    for byte in out.iter_mut().rev() {
        *byte = b"0123456789abcdef"[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// 64 random bits for this process: std's per-process random hash keys, mixed
/// with the pid and the time, so two processes (e.g. across an upgrade) differ.
fn process_random() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(now);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(ids: &[&str]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for id in ids {
            req.append_header(HEADER, *id).unwrap();
        }
        req
    }

    #[test]
    fn a_valid_client_id_is_kept() {
        let mut req = request(&["abc-123_XYZ"]);
        assert_eq!(ensure(&mut req), "abc-123_XYZ");
        assert_eq!(req.headers[HEADER], "abc-123_XYZ");
    }

    #[test]
    fn missing_invalid_or_repeated_ids_are_replaced() {
        let long = "a".repeat(MAX_LEN + 1);
        for ids in [
            &[][..],
            &["has space"],
            &[""],
            &[long.as_str()],
            &["a", "b"],
        ] {
            let mut req = request(ids);
            let id = ensure(&mut req);
            assert!(is_valid(id.as_bytes()));
            assert_eq!(req.headers.get_all(HEADER).iter().count(), 1);
            assert_eq!(req.headers[HEADER], id);
            assert!(ids.iter().all(|sent| id != *sent));
        }
    }

    #[test]
    fn generated_ids_are_unique_and_share_the_process_prefix() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        let prefix = |v: &HeaderValue| v.to_str().unwrap().split('-').next().unwrap().to_string();
        assert_eq!(prefix(&a), prefix(&b));
        assert_eq!(prefix(&a).len(), 16);
    }

    #[test]
    fn counters_are_written_in_full_hex() {
        let mut out = [0u8; 16];
        write_hex(&mut out, u64::MAX);
        assert_eq!(&out, b"ffffffffffffffff");
        let mut out = [0u8; 3];
        write_hex(&mut out, 0xabc);
        assert_eq!(&out, b"abc");
    }
}
