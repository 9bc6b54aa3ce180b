//! The `compare:` section of a mirror: what a shadow verdict compares, and how strictly.
//! A leaf module: `config` embeds it and turns its [`FieldError`] into a `ConfigError`.

use std::path::PathBuf;

use http::Method;
use serde::Deserialize;

use super::json::FieldPattern;

/// Per side, the body bytes kept for comparison by default (256 KiB).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 256 * 1024;
/// The largest `max_body_bytes` accepted: captures are held in memory.
pub const MAX_BODY_BYTES_LIMIT: u64 = 16 * 1024 * 1024;

/// Response headers never compared, whatever the config says: they differ
/// between any two servers or are about the connection, not the answer.
pub const DEFAULT_IGNORED_HEADERS: &[&str] = &[
    "age",
    "connection",
    "content-length",
    "date",
    "keep-alive",
    "server",
    "transfer-encoding",
    "via",
    "x-request-id",
    "x-shadowgate-mirror",
];

/// `routes[].mirrors[].compare`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareConfig {
    /// A pool running the current version: it gets the same requests as the
    /// candidate, and its differences from the primary are the noise floor.
    #[serde(default)]
    pub control: Option<String>,
    /// Per side, body bytes kept; past it only length and a streaming hash are compared.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Response headers not compared, on top of [`DEFAULT_IGNORED_HEADERS`].
    #[serde(default)]
    pub ignore_headers: Vec<String>,
    /// JSON fields not compared: `$.a.b` exact, `$..name` at any depth, `[*]` any index.
    #[serde(default)]
    pub ignore_fields: Vec<String>,
    /// Methods compared; by default the safe ones (GET, HEAD, OPTIONS) the mirror copies.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// JSON lines with sampled examples of differences, redacted, rotated by size.
    #[serde(default)]
    pub diff_log: Option<PathBuf>,
    /// Rotate the diff log (one `.1` generation kept) past this size.
    #[serde(default = "default_diff_log_max_bytes")]
    pub diff_log_max_bytes: u64,
    /// At most this many diff log lines a second per mirror.
    #[serde(default = "default_diff_log_per_second")]
    pub diff_log_per_second: u32,
    /// Comparisons of an endpoint before any of its fields can be flagged.
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
    /// Flag a field only when the candidate's diff rate exceeds the control's
    /// (or, without a control, zero) by more than this, in rate points (0.01 = 1%) ...
    #[serde(default = "default_absolute_margin")]
    pub absolute_margin: f64,
    /// ... and by more than this fraction of the control's rate (0.5 = 50% more).
    #[serde(default = "default_relative_margin")]
    pub relative_margin: f64,
    /// A field that differs on at least this share of comparisons is volatile.
    #[serde(default = "default_volatile_rate")]
    pub volatile_rate: f64,
    /// Comparisons per endpoint in the recent window that flagging looks at.
    #[serde(default = "default_window")]
    pub window: u64,
    /// Endpoints (method and path template) tracked per mirror; the rest share one entry.
    #[serde(default = "default_max_endpoints")]
    pub max_endpoints: u32,
    /// Field paths tracked per endpoint; the rest share one entry.
    #[serde(default = "default_max_fields")]
    pub max_fields: u32,
}

fn default_max_body_bytes() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}
/// Compared when `methods` is left out (and mirrored).
pub const DEFAULT_METHODS: &[&str] = &["GET", "HEAD", "OPTIONS"];
fn default_diff_log_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_diff_log_per_second() -> u32 {
    10
}
fn default_min_samples() -> u64 {
    100
}
fn default_absolute_margin() -> f64 {
    0.01
}
fn default_relative_margin() -> f64 {
    0.5
}
fn default_volatile_rate() -> f64 {
    0.95
}
fn default_window() -> u64 {
    1000
}
fn default_max_endpoints() -> u32 {
    200
}
fn default_max_fields() -> u32 {
    100
}

/// A problem in the section: the field path below the mirror and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

fn error(path: String, message: String) -> FieldError {
    FieldError { path, message }
}

/// What validation needs to know about the mirror around the section.
pub struct MirrorContext<'a> {
    pub candidate: &'a str,
    pub primary: &'a str,
    pub mirrored_methods: &'a [Method],
    pub is_upstream: &'a dyn Fn(&str) -> bool,
}

impl CompareConfig {
    /// Check every field; `at` is the section's own path, e.g. `routes[0].mirrors[0].compare`.
    pub fn validate(&self, at: &str, mirror: &MirrorContext<'_>) -> Result<(), FieldError> {
        if let Some(control) = &self.control {
            let path = format!("{at}.control");
            if !(mirror.is_upstream)(control) {
                return Err(error(
                    path,
                    format!("unknown upstream {control:?}; name a pool from upstreams"),
                ));
            }
            if control == mirror.candidate || control == mirror.primary {
                return Err(error(
                    path,
                    format!(
                        "{control:?} is already this route's primary or candidate; the control must be a separate pool running the current version"
                    ),
                ));
            }
        }
        range(
            &format!("{at}.max_body_bytes"),
            self.max_body_bytes,
            0,
            MAX_BODY_BYTES_LIMIT,
        )?;
        for (i, name) in self.ignore_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(error(
                    format!("{at}.ignore_headers[{i}]"),
                    format!("{name:?} is not a valid header name"),
                ));
            }
        }
        for (i, pattern) in self.ignore_fields.iter().enumerate() {
            FieldPattern::parse(pattern)
                .map_err(|why| error(format!("{at}.ignore_fields[{i}]"), why))?;
        }
        let methods = self.methods.as_deref().unwrap_or_default();
        if self.methods.is_some() && methods.is_empty() {
            return Err(error(
                format!("{at}.methods"),
                "an empty method list compares nothing; list methods or leave the key out for GET, HEAD, OPTIONS".into(),
            ));
        }
        for (i, name) in methods.iter().enumerate() {
            let path = format!("{at}.methods[{i}]");
            let method = Method::from_bytes(name.as_bytes())
                .ok()
                .filter(|_| name.bytes().all(|b| b.is_ascii_uppercase()))
                .ok_or_else(|| {
                    error(
                        path.clone(),
                        format!("{name:?} is not an HTTP method; use upper-case names like GET"),
                    )
                })?;
            if !mirror.mirrored_methods.contains(&method) {
                return Err(error(
                    path,
                    format!(
                        "{name} is not mirrored, so it cannot be compared; add it to the mirror's methods or remove it here"
                    ),
                ));
            }
        }
        if let Some(path) = &self.diff_log {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if path.file_name().is_none() || !dir.is_dir() {
                return Err(error(
                    format!("{at}.diff_log"),
                    format!(
                        "{} is not a file in an existing directory; create {} or choose another path",
                        path.display(),
                        dir.display()
                    ),
                ));
            }
        }
        range(
            &format!("{at}.diff_log_max_bytes"),
            self.diff_log_max_bytes,
            4096,
            u64::MAX / 2,
        )?;
        range(
            &format!("{at}.diff_log_per_second"),
            self.diff_log_per_second as u64,
            0,
            100_000,
        )?;
        range(
            &format!("{at}.min_samples"),
            self.min_samples,
            1,
            1_000_000_000,
        )?;
        rate(
            &format!("{at}.absolute_margin"),
            self.absolute_margin,
            0.0,
            1.0,
        )?;
        rate(
            &format!("{at}.relative_margin"),
            self.relative_margin,
            0.0,
            100.0,
        )?;
        rate(
            &format!("{at}.volatile_rate"),
            self.volatile_rate,
            0.01,
            1.0,
        )?;
        range(&format!("{at}.window"), self.window, 10, 1_000_000_000)?;
        if self.window < self.min_samples {
            return Err(error(
                format!("{at}.window"),
                format!(
                    "{} is below min_samples ({}), so nothing could ever be flagged; raise window or lower min_samples",
                    self.window, self.min_samples
                ),
            ));
        }
        range(
            &format!("{at}.max_endpoints"),
            self.max_endpoints as u64,
            1,
            100_000,
        )?;
        range(
            &format!("{at}.max_fields"),
            self.max_fields as u64,
            1,
            100_000,
        )
    }
}

fn range(path: &str, value: u64, min: u64, max: u64) -> Result<(), FieldError> {
    if value < min || value > max {
        return Err(error(
            path.to_string(),
            format!("{value} is out of range; use a value from {min} to {max}"),
        ));
    }
    Ok(())
}

fn rate(path: &str, value: f64, min: f64, max: f64) -> Result<(), FieldError> {
    if !(min..=max).contains(&value) {
        return Err(error(
            path.to_string(),
            format!("{value} is out of range; use a number from {min} to {max}"),
        ));
    }
    Ok(())
}
