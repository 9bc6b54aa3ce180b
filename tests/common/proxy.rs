//! Runs the built `shadowgate` binary on loopback with a test's config, and reads its metrics.
//! Readiness is a port that accepts; every wait has a deadline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The built binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_shadowgate")
}

pub use super::ports::free_port;

/// A temporary directory only this user can enter, as shadowgate requires for its upgrade socket.
pub fn private_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .expect("chmod 700");
    dir
}

/// A running shadowgate process.
pub struct Proxy {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub child: Child,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Proxy {
    /// Start shadowgate with `sections` (upstreams, routes, ...) plus a listener,
    /// a metrics endpoint and private runtime paths chosen here.
    pub async fn start(sections: &str) -> Proxy {
        Self::start_with_listener("", sections).await
    }

    /// Like `start`, with `client` as the listener's `client:` limits, e.g.
    /// `"{ header_timeout_ms: 500 }"`.
    pub async fn start_with_client(client: &str, sections: &str) -> Proxy {
        Self::start_with_listener(&format!("    client: {client}"), sections).await
    }

    /// Like `start`, with `listener_extra` written under the proxy's `- address:` line
    /// (keys like `    h2c: true`, or further `  - address:` listeners). In both texts
    /// `RUNTIME` stands for the proxy's private directory.
    pub async fn start_with_listener(listener_extra: &str, sections: &str) -> Proxy {
        let dir = private_dir();
        let addr = free_port();
        let metrics_addr = free_port();
        let config = format!(
            "threads: 2\n\
             pid_file: {dir}/shadowgate.pid\n\
             upgrade_sock: {dir}/upgrade.sock\n\
             grace_period_seconds: 1\n\
             graceful_shutdown_timeout_seconds: 1\n\
             listeners:\n  - address: \"{addr}\"\n\
             {listener_extra}\n\
             metrics:\n  address: \"{metrics_addr}\"\n\
             {sections}\n",
            dir = dir.path().display()
        )
        .replace("RUNTIME", &dir.path().display().to_string());
        let config_path = dir.path().join("shadowgate.yaml");
        std::fs::write(&config_path, config).expect("write config");
        let log_path = dir.path().join("shadowgate.log");
        let child = spawn(&config_path, &log_path, &[]);
        let mut proxy = Proxy {
            addr,
            metrics_addr,
            child,
            config_path,
            log_path,
            dir,
        };
        proxy.wait_ready().await;
        proxy
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Wait until both the proxy and the metrics port accept connections.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for addr in [self.addr, self.metrics_addr] {
            loop {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    break;
                }
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!(
                        "shadowgate exited with {status} before listening:\n{}",
                        self.log()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "shadowgate did not listen on {addr}:\n{}",
                    self.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Wait for a line containing `needle` in the proxy's log.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {timeout:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The metrics page, as text.
    pub async fn metrics_text(&self) -> String {
        let url = format!("http://{}/metrics", self.metrics_addr);
        reqwest::get(url)
            .await
            .expect("scrape metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// The value of one sample, e.g. `metric("shadowgate_mirror_sampled_total", &[("route", "api")])`.
    /// Absent samples read as 0.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sample(&self.metrics_text().await, name, labels)
    }

    /// Wait until a sample satisfies `done`; returns its last value.
    pub async fn wait_for_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        done: impl Fn(f64) -> bool,
        timeout: Duration,
    ) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.metric(name, labels).await;
            if done(value) {
                return value;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{name}{labels:?} is {value}, not the awaited value within {timeout:?}\n{}",
                    self.metrics_text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run the binary to completion with `args` (e.g. `-t -c FILE`); a run that
/// does not end within 20 s is killed and fails the test.
pub fn run_to_end(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let mut command = Command::new(binary());
    command.args(args);
    finish(command, || false)
}

/// Run `command` (the binary, with the caller's arguments) with `RUST_LOG` cleared and its output
/// piped, until it exits or `started` says it got further than it should (then it is killed and
/// its output so far returned). A config check is instant: a run that does neither within 20 s
/// is a bug, not something to wait out, so it is killed and fails the test.
pub fn finish(mut command: Command, mut started: impl FnMut() -> bool) -> std::process::Output {
    let mut child = command
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shadowgate");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait for shadowgate").is_none() {
        if started() {
            let _ = child.kill();
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not end within 20 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The process has exited (or been killed) and its output is small: reading the pipes cannot block.
    child.wait_with_output().expect("shadowgate output")
}

/// Start the binary with a config, logging to a file. Debug logs for shadowgate itself;
/// `SG_TEST_LOG` sets another `RUST_LOG` (e.g. `debug`, to see Pingora's too).
pub fn spawn(config: &Path, log: &Path, extra_args: &[&str]) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open log");
    Command::new(binary())
        .arg("-c")
        .arg(config)
        .args(extra_args)
        .env(
            "RUST_LOG",
            std::env::var("SG_TEST_LOG").unwrap_or("info,shadowgate=debug".into()),
        )
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn shadowgate")
}

/// Sum of the samples of `name` whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
