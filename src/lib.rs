//! shadowgate: an edge reverse proxy on Pingora whose headline is safe, streaming traffic mirroring.
//! `build_server` turns a validated [`Config`] into a ready-to-run Pingora server; `main`, tests and benches share it.

pub mod access_log;
pub mod compare;
pub mod config;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod mirror;
pub mod path;
pub mod process;
pub mod proxy;
pub mod request;
pub mod request_id;
pub mod routing;
pub mod tls;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use log::info;
use pingora_core::protocols::l4::stream::L4BufferSettings;
use pingora_core::server::configuration::Opt;
use pingora_core::server::{
    RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, UnixShutdownSignalWatch,
};
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;

pub use config::{Config, ConfigError};
use metrics::Metrics;
use mirror::MirrorRuntime;
use proxy::ShadowGate;

/// A built server, ready to run.
pub struct App {
    server: Server,
    draining: Arc<AtomicBool>,
}

/// Build the Pingora server with the proxy, health checks and metrics services.
pub fn build_server(mut config: Config, opt: Opt) -> std::io::Result<App> {
    config::prepare_runtime_dirs(&config.server)?;
    let mut server = Server::new_with_opt_and_conf(opt, std::mem::take(&mut config.server));
    server.bootstrap();

    let metrics = Metrics::global();
    let (pools, health_checks) = upstream::build_pools(&config.upstreams, &metrics);
    let mirror_runtime = Arc::new(MirrorRuntime::new(
        config.mirror_budget_bytes,
        server.configuration.upstream_keepalive_pool_size,
        config.mirror_threads as usize,
        &metrics,
    ));
    let draining = Arc::new(AtomicBool::new(false));
    let mut proxy = ShadowGate::new(&config, &pools, &metrics, mirror_runtime, draining.clone());
    if let Some(access_log) = &config.access_log {
        let (log, writer) =
            access_log::AccessLog::new(access_log, metrics.access_log_dropped.clone());
        proxy = proxy.with_access_log(Arc::new(log));
        server.add_service(background_service("access log", writer));
    }
    add_proxy_services(&mut server, &config, proxy, &metrics)?;
    server.add_service(background_service("upstream health checks", health_checks));
    let setup = process::ProcessSetup {
        listeners: config.listeners.iter().map(|l| l.address.0).collect(),
    };
    server.add_service(background_service("process setup", setup));
    if let Some(metrics_config) = &config.metrics {
        let mut service = compare::http::service();
        service.add_tcp(&metrics_config.address.to_string());
        info!(
            "metrics on http://{0}/metrics, shadow verdicts on http://{0}/compare(.html)",
            metrics_config.address
        );
        server.add_service(service);
    }
    Ok(App { server, draining })
}

/// The listeners, in one proxy service, or two when cleartext listeners differ
/// in `h2c` (Pingora's h2c switch is per service, and each service runs its own
/// `threads`). Both share one proxy. TLS listeners may join either: Pingora
/// ignores h2c on TLS connections.
fn add_proxy_services(
    server: &mut Server,
    config: &Config,
    proxy: ShadowGate,
    metrics: &Metrics,
) -> std::io::Result<()> {
    let cleartext_with = |h2c: bool| {
        config
            .listeners
            .iter()
            .any(|l| l.tls.is_none() && l.h2c == h2c)
    };
    let tls_joins_h2c = cleartext_with(true) && !cleartext_with(false);
    for h2c in [false, true] {
        let listeners: Vec<_> = config
            .listeners
            .iter()
            .filter(|l| match l.tls {
                Some(_) => tls_joins_h2c == h2c,
                None => l.h2c == h2c,
            })
            .cloned()
            .collect();
        if listeners.is_empty() {
            continue;
        }
        let name = if h2c {
            "shadowgate proxy (h2c)"
        } else {
            "shadowgate proxy"
        };
        let mut http_proxy = pingora_proxy::http_proxy(&server.configuration, proxy.clone());
        let mut options = pingora_core::apps::HttpServerOptions::default();
        options.h2c = h2c;
        http_proxy.server_options = Some(options);
        // Every connection passes the listener's client limits first; they also set its
        // HTTP/2 idle timeout and request count.
        let gate = listener::ClientGate::new(Arc::new(http_proxy), &listeners, metrics);
        let tls_admission = gate.tls_admission();
        let mut service = Service::new(name.to_string(), gate);
        // TLS connections are counted against the client caps before their handshake.
        service.endpoints().set_pre_tls_callback(tls_admission);
        for listener in &listeners {
            let address = listener.address.to_string();
            let read_buffer = listener.client.read_buffer_bytes as usize;
            let mut endpoint = pingora_core::listeners::ListenerConfig::tcp(address.clone())
                .l4_buffer(L4BufferSettings::default().read(read_buffer));
            match &listener.tls {
                Some(tls) => {
                    // Like NGINX's `client_header_timeout`, the header deadline also bounds
                    // the handshake (Pingora's own limit is 60 s).
                    endpoint = endpoint
                        .tls(tls.settings()?)
                        .handshake_timeout(listener.client.header_timeout());
                    let alpn = if tls.h2 { "h2, http/1.1" } else { "http/1.1" };
                    info!("listening on https://{address} (ALPN {alpn})");
                }
                None => {
                    let h2c = if h2c { " (and h2c)" } else { "" };
                    info!("listening on http://{address}{h2c}");
                }
            }
            info!("{address}: client limits {:?}", listener.client);
            service.add_listener(endpoint);
        }
        server.add_service(service);
    }
    Ok(())
}

impl App {
    /// Run until a signal stops the server: SIGQUIT hands the listening sockets
    /// to a new process (`-u`), SIGTERM drains and stops, SIGINT stops at once.
    pub fn run(self) {
        let signals = DrainOnShutdown {
            draining: self.draining,
        };
        self.server.run(RunArgs {
            shutdown_signal: Box::new(signals),
        });
    }
}

/// Pingora stops watching signals once a graceful stop begins, and then sleeps
/// through `grace_period_seconds`: keep SIGINT meaning "stop now" during that time.
fn exit_on_sigint_while_draining() {
    let watcher = std::thread::Builder::new()
        .name("sigint while draining".into())
        .spawn(|| {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                if let Ok(mut interrupt) = signal(SignalKind::interrupt()) {
                    info!("graceful stop under way; SIGINT stops at once");
                    interrupt.recv().await;
                    log::warn!("SIGINT during the graceful stop: exiting now");
                    std::process::exit(130);
                }
            });
        });
    if let Err(e) = watcher {
        log::warn!("cannot watch for SIGINT during the graceful stop: {e}");
    }
}

/// Pingora's Unix signal handling, plus: from the moment a shutdown or upgrade
/// starts, every response says `Connection: close`. Pingora drops idle keep-alive
/// connections when it stops; this way busy clients have already moved on.
struct DrainOnShutdown {
    draining: Arc<AtomicBool>,
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let signal = UnixShutdownSignalWatch.recv().await;
        self.draining.store(true, Ordering::Relaxed);
        info!(
            "shutdown signal received ({signal:?}): closing keep-alive connections as responses finish"
        );
        if !matches!(signal, ShutdownSignal::FastShutdown) {
            exit_on_sigint_while_draining();
        }
        signal
    }
}
