//! The access log: one JSON line per request, to a file or stdout, written by a thread of its own.
//! A request only hands its entry to a bounded queue: when the queue is full the line is dropped and counted.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use log::{info, warn};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_prometheus::prometheus::IntCounter;
use serde::{Deserialize, Serialize, Serializer};

use crate::config::ConfigError;

/// Lines that may wait for the writer before new ones are dropped.
pub const QUEUE_LINES: usize = 64 * 1024;

/// The `access_log` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// A file to append to, or `-` for stdout.
    pub path: String,
}

impl AccessLogConfig {
    fn is_stdout(&self) -> bool {
        self.path == "-"
    }

    /// Refuse a path the proxy could not open, so that `-t` catches it. `at` is the section's field path.
    pub fn check(&self, at: &str) -> Result<(), ConfigError> {
        if self.path.is_empty() {
            return Err(ConfigError::new(
                format!("{at}.path"),
                "empty; give a file path, or \"-\" for stdout, or remove access_log to turn it off",
            ));
        }
        if self.is_stdout() {
            return Ok(());
        }
        open_for_append(&self.path).map(drop).map_err(|e| {
            ConfigError::new(
                format!("{at}.path"),
                format!(
                    "cannot open {} for appending: {e}; create its directory or fix the path",
                    self.path
                ),
            )
        })
    }
}

fn open_for_append(path: &str) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// What a request leaves in the log. Strings are owned: the entry outlives the request.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// When the request ended (RFC 3339, UTC, milliseconds).
    #[serde(serialize_with = "rfc3339_millis")]
    pub time: SystemTime,
    /// The client's address, `ip:port`.
    pub client: Option<String>,
    pub method: String,
    pub host: String,
    /// Path without the query, which may carry secrets.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: &'static str,
    /// `TLSv1.3`, `TLSv1.2`; null on a cleartext connection.
    pub tls: Option<&'static str>,
    pub route: Option<String>,
    /// The primary server that got the request last (after any retry).
    pub upstream: Option<String>,
    pub status: u16,
    /// Request body bytes read from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub request_id: String,
    pub mirrors: Vec<MirrorEntry>,
}

/// How one mirror of the route treated the request, as known when the primary ended.
#[derive(Debug, Serialize)]
pub struct MirrorEntry {
    pub upstream: String,
    /// `sampled`, `not_sampled` or `abandoned:<reason>`.
    pub outcome: String,
}

fn rfc3339_millis<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs() as i64;
    let (y, m, d) = crate::tls::civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    s.collect_str(&format_args!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        t / 3600,
        t % 3600 / 60,
        t % 60,
        since.subsec_millis()
    ))
}

enum Message {
    Entry(Box<Entry>),
    /// Close and open the file again (after logrotate moved it).
    Reopen,
}

/// The requests' side of the log: hands entries to the writer without waiting.
pub struct AccessLog {
    queue: SyncSender<Message>,
    dropped: IntCounter,
}

impl AccessLog {
    /// The log and the background service that writes it (and reopens the file on SIGUSR1).
    /// Nothing is opened or spawned until the service starts, after Pingora has daemonized.
    pub fn new(config: &AccessLogConfig, dropped: IntCounter) -> (AccessLog, AccessLogWriter) {
        let (queue, lines) = mpsc::sync_channel(QUEUE_LINES);
        let writer = AccessLogWriter {
            config: config.clone(),
            lines: Mutex::new(Some(lines)),
            reopen: queue.clone(),
        };
        (AccessLog { queue, dropped }, writer)
    }

    /// Queue one entry; a full queue drops it (counted), never delays the request.
    pub fn log(&self, entry: Entry) {
        match self.queue.try_send(Message::Entry(Box::new(entry))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Background service: runs the writer thread and turns SIGUSR1 into a reopen.
pub struct AccessLogWriter {
    config: AccessLogConfig,
    lines: Mutex<Option<Receiver<Message>>>,
    reopen: SyncSender<Message>,
}

#[async_trait]
impl BackgroundService for AccessLogWriter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let lines = match self.lines.lock() {
            Ok(mut slot) => slot.take(),
            Err(_) => None,
        };
        let Some(lines) = lines else { return };
        let config = self.config.clone();
        let spawned = std::thread::Builder::new()
            .name("access log".into())
            .spawn(move || write_lines(&config, lines));
        if let Err(e) = spawned {
            warn!("access log off: cannot start its writer thread: {e}");
            return;
        }
        info!("access log to {}", self.config.path);
        use tokio::signal::unix::{SignalKind, signal};
        let mut usr1 = match signal(SignalKind::user_defined1()) {
            Ok(s) => s,
            Err(e) => {
                warn!("access log: cannot watch SIGUSR1, so it cannot be reopened: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = usr1.recv() => {
                    // A blocking send is fine off the request path: the writer drains the queue.
                    let reopen = self.reopen.clone();
                    let _ = tokio::task::spawn_blocking(move || reopen.send(Message::Reopen)).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Where lines go: stdout or the file, buffered; flushed whenever the queue is drained.
enum Sink {
    Stdout(std::io::Stdout),
    File(BufWriter<File>),
}

impl Sink {
    fn open(config: &AccessLogConfig) -> std::io::Result<Sink> {
        if config.is_stdout() {
            return Ok(Sink::Stdout(std::io::stdout()));
        }
        open_for_append(&config.path).map(|f| Sink::File(BufWriter::with_capacity(64 * 1024, f)))
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(out) => out,
            Sink::File(file) => file,
        }
    }
}

fn write_lines(config: &AccessLogConfig, lines: Receiver<Message>) {
    let mut sink = match Sink::open(config) {
        Ok(sink) => sink,
        Err(e) => {
            warn!("access log off: cannot open {}: {e}", config.path);
            return;
        }
    };
    let mut line = Vec::with_capacity(512);
    while let Ok(first) = lines.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Entry(entry) => {
                    line.clear();
                    if serde_json::to_writer(&mut line, &entry).is_ok() {
                        line.push(b'\n');
                        if let Err(e) = sink.writer().write_all(&line) {
                            warn!("access log: cannot write to {}: {e}", config.path);
                        }
                    }
                }
                Message::Reopen => reopen(config, &mut sink),
            }
            next = lines.try_recv().ok();
        }
        if let Err(e) = sink.writer().flush() {
            warn!("access log: cannot write to {}: {e}", config.path);
        }
    }
}

/// After logrotate moved the file: finish the old one, start a new one at the
/// configured path. On failure, keep writing to the old one and say so.
fn reopen(config: &AccessLogConfig, sink: &mut Sink) {
    if config.is_stdout() {
        return;
    }
    let _ = sink.writer().flush();
    match Sink::open(config) {
        Ok(new) => {
            *sink = new;
            info!("access log reopened: {}", config.path);
        }
        Err(e) => warn!(
            "access log: cannot reopen {}: {e}; still writing to the old file",
            config.path
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_one_json_line_with_every_field() {
        let entry = Entry {
            time: UNIX_EPOCH + Duration::from_millis(1_798_761_599_123),
            client: Some("127.0.0.1:5000".into()),
            method: "GET".into(),
            host: "example.com".into(),
            path: "/a\"b".into(),
            protocol: "HTTP/2",
            tls: Some("TLSv1.3"),
            route: Some("all".into()),
            upstream: Some("127.0.0.1:8000".into()),
            status: 200,
            bytes_in: 0,
            bytes_out: 5,
            duration_ms: 1.5,
            request_id: "abc".into(),
            mirrors: vec![MirrorEntry {
                upstream: "shadow".into(),
                outcome: "sampled".into(),
            }],
        };
        let text = serde_json::to_string(&entry).unwrap();
        assert!(!text.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["time"], "2026-12-31T23:59:59.123Z");
        assert_eq!(v["path"], "/a\"b");
        assert_eq!(v["tls"], "TLSv1.3");
        assert_eq!(v["mirrors"][0]["outcome"], "sampled");
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let dropped = IntCounter::new("t", "t").unwrap();
        let config = AccessLogConfig { path: "-".into() };
        let (log, writer) = AccessLog::new(&config, dropped.clone());
        // No writer running: the queue fills and further lines are dropped.
        let entry = || Entry {
            time: SystemTime::now(),
            client: None,
            method: "GET".into(),
            host: String::new(),
            path: "/".into(),
            protocol: "HTTP/1.1",
            tls: None,
            route: None,
            upstream: None,
            status: 404,
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 0.0,
            request_id: String::new(),
            mirrors: Vec::new(),
        };
        for _ in 0..QUEUE_LINES + 3 {
            log.log(entry());
        }
        assert_eq!(dropped.get(), 3);
        drop(writer);
    }
}
