//! Request paths as routing reads them. A leaf: the config checks route prefixes with it,
//! the router matches with it.

use std::borrow::Cow;

/// A request path as routing reads it, as NGINX reads one before it matches locations:
/// percent-escapes decoded, repeated slashes merged, `.` and `..` segments resolved. Only
/// the choice of route uses it; upstreams get the path as sent. So `/api/../admin` is
/// routed as the `/admin` an upstream resolves it to, not by its `/api` prefix, and
/// `/%61dmin` as `/admin`.
///
/// Err, with the reason, when a path cannot be read one way only: a malformed or NUL
/// escape, or a `..` above the root (NGINX answers these 400 too). A target that is not
/// a path (`*`) is returned as it is.
pub fn routing_path(path: &str) -> Result<Cow<'_, [u8]>, &'static str> {
    let raw = path.as_bytes();
    let plain = !raw.contains(&b'%') && !raw.windows(2).any(|pair| pair == b"//" || pair == b"/.");
    if plain || !raw.starts_with(b"/") {
        return Ok(Cow::Borrowed(raw));
    }
    let mut decoded = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while let Some((&byte, tail)) = rest.split_first() {
        if byte != b'%' {
            decoded.push(byte);
            rest = tail;
            continue;
        }
        let escaped = tail
            .get(..2)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .ok_or("path has a malformed percent-escape")?;
        if escaped == 0 {
            return Err("path has an escaped NUL");
        }
        decoded.push(escaped);
        rest = &tail[2..];
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut ends_in_slash = false;
    for segment in decoded[1..].split(|b| *b == b'/') {
        ends_in_slash = true;
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop().ok_or("path goes above the root with '..'")?;
            }
            name => {
                segments.push(name);
                ends_in_slash = false;
            }
        }
    }
    let mut resolved = Vec::with_capacity(decoded.len());
    for segment in &segments {
        resolved.push(b'/');
        resolved.extend_from_slice(segment);
    }
    if ends_in_slash || resolved.is_empty() {
        resolved.push(b'/');
    }
    Ok(Cow::Owned(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_routed_as_resolved() {
        let resolved = |path| routing_path(path).map(|p| String::from_utf8_lossy(&p).into_owned());
        for (path, expected) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/.well-known/x", "/.well-known/x"),
            ("//a///b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/", "/a/"),
            ("/a/..", "/"),
            ("/%61dmin", "/admin"),
            ("/a%2Fb", "/a/b"),
            ("/x/%2e%2E/admin", "/admin"),
            ("/caf%C3%A9", "/caf\u{e9}"),
            ("*", "*"),
        ] {
            assert_eq!(resolved(path).as_deref(), Ok(expected), "{path}");
        }
        assert!(matches!(routing_path("/a/b"), Ok(Cow::Borrowed(_))));
        for bad in ["/..", "/a/../..", "/%2e%2e/x", "/%zz", "/%4", "/a%00b"] {
            assert!(routing_path(bad).is_err(), "{bad} accepted");
        }
    }
}
