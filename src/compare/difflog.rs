//! Examples of differences: redacted, rate-limited JSON lines in a file rotated by size,
//! and the last few kept in memory for the report page.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// What stands in for a secret.
pub const REDACTED: &str = "[redacted]";

/// Header fields whose values never leave the proxy.
const SECRET_HEADERS: &[&str] = &[
    "header:authorization",
    "header:proxy-authorization",
    "header:cookie",
    "header:set-cookie",
];

/// JSON member names (lower case, substring) whose values are redacted too.
const SECRET_FIELD_WORDS: &[&str] = &["authorization", "cookie", "password", "secret", "token"];

/// Whether a field's values must be redacted.
pub fn is_secret(path: &str) -> bool {
    if path.starts_with("header:") {
        return SECRET_HEADERS.contains(&path);
    }
    let last = path
        .rsplit(['.', '['])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    SECRET_FIELD_WORDS.iter().any(|w| last.contains(w))
}

/// One field of an example, each side's fragment already redacted.
#[derive(Debug, Clone, Serialize)]
pub struct ExampleField {
    pub path: String,
    pub kind: &'static str,
    pub primary: Option<String>,
    pub candidate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control: Option<String>,
}

impl ExampleField {
    pub fn new(
        path: &str,
        kind: &'static str,
        primary: Option<String>,
        candidate: Option<String>,
        control: Option<String>,
    ) -> Self {
        let secret = is_secret(path);
        let hide = |v: Option<String>| v.map(|v| if secret { REDACTED.to_string() } else { v });
        ExampleField {
            path: path.to_string(),
            kind,
            primary: hide(primary),
            candidate: hide(candidate),
            control: hide(control),
        }
    }
}

/// Status or latency of each side.
#[derive(Debug, Clone, Serialize)]
pub struct PerSide<T> {
    pub primary: T,
    pub candidate: T,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control: Option<T>,
}

/// One sampled comparison with differences.
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    /// Unix time in milliseconds.
    pub ts: u64,
    /// The request's `x-request-id`, or one made up for this comparison.
    pub id: String,
    pub route: String,
    pub mirror: String,
    pub method: String,
    /// Path without the query, which may carry secrets.
    pub path: String,
    pub status: PerSide<u16>,
    pub latency_ms: PerSide<f64>,
    pub fields: Vec<ExampleField>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What became of one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Logged {
    Written,
    RateLimited,
    Failed,
}

/// The diff log file of one mirror.
pub struct DiffLog {
    path: PathBuf,
    max_bytes: u64,
    per_second: u32,
    file: Option<File>,
    size: u64,
    second: u64,
    in_second: u32,
}

impl DiffLog {
    pub fn new(path: &Path, max_bytes: u64, per_second: u32) -> Self {
        DiffLog {
            path: path.to_path_buf(),
            max_bytes,
            per_second,
            file: None,
            size: 0,
            second: 0,
            in_second: 0,
        }
    }

    /// Append one example as a JSON line, unless this second's quota is used.
    pub fn write(&mut self, example: &Example) -> Logged {
        let second = example.ts / 1000;
        if second != self.second {
            self.second = second;
            self.in_second = 0;
        }
        if self.in_second >= self.per_second {
            return Logged::RateLimited;
        }
        self.in_second += 1;
        let Ok(mut line) = serde_json::to_vec(example) else {
            return Logged::Failed;
        };
        line.push(b'\n');
        match self.append(&line) {
            Ok(()) => Logged::Written,
            Err(e) => {
                log::warn!("diff log {}: {e}", self.path.display());
                self.file = None;
                Logged::Failed
            }
        }
    }

    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.file.is_some() && self.size + line.len() as u64 > self.max_bytes {
            // One older generation is kept: `diffs.jsonl.1`.
            self.file = None;
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            std::fs::rename(&self.path, rotated)?;
        }
        if self.file.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.size = file.metadata()?.len();
            self.file = Some(file);
        }
        if let Some(file) = &mut self.file {
            file.write_all(line)?;
            self.size += line.len() as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(ts: u64) -> Example {
        Example {
            ts,
            id: "r1".into(),
            route: "r".into(),
            mirror: "m".into(),
            method: "GET".into(),
            path: "/".into(),
            status: PerSide {
                primary: 200,
                candidate: 200,
                control: None,
            },
            latency_ms: PerSide {
                primary: 1.0,
                candidate: 1.0,
                control: None,
            },
            fields: vec![ExampleField::new(
                "header:set-cookie",
                "value",
                Some("sid=secret1".into()),
                Some("sid=secret2".into()),
                None,
            )],
        }
    }

    #[test]
    fn secrets_are_redacted() {
        assert!(is_secret("header:authorization"));
        assert!(is_secret("$.user.api_token"));
        assert!(is_secret("$.items[*].Password"));
        assert!(!is_secret("header:etag"));
        assert!(!is_secret("$.price"));
        let line = serde_json::to_string(&example(0)).unwrap();
        assert!(!line.contains("secret1") && line.contains(REDACTED));
    }

    #[test]
    fn rate_limited_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let mut log = DiffLog::new(&path, 600, 3);
        let results: Vec<Logged> = (0..5).map(|_| log.write(&example(1000))).collect();
        assert_eq!(results.iter().filter(|r| **r == Logged::Written).count(), 3);
        assert_eq!(log.write(&example(2000)), Logged::Written);
        let rotated = dir.path().join("d.jsonl.1");
        assert!(rotated.exists());
        assert!(std::fs::metadata(&path).unwrap().len() <= 600);
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
    }
}
