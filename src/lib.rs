//! shadowgate: an edge reverse proxy on Pingora whose headline is safe, streaming traffic mirroring.
//! `build_server` turns a validated [`Config`] into a ready-to-run Pingora server; `main`, tests and benches share it.

pub mod compare;
pub mod config;
pub mod metrics;
pub mod mirror;
pub mod process;
pub mod proxy;
pub mod request;
pub mod routing;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use log::info;
use pingora_core::server::configuration::Opt;
use pingora_core::server::{
    RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, UnixShutdownSignalWatch,
};
use pingora_core::services::background::background_service;

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
    let proxy = ShadowGate::new(&config, &pools, &metrics, mirror_runtime, draining.clone());

    let mut proxy_service = pingora_proxy::http_proxy_service_with_name(
        &server.configuration,
        proxy,
        "shadowgate proxy",
    );
    for listener in &config.listeners {
        proxy_service.add_tcp(&listener.address.to_string());
        info!("listening on http://{}", listener.address);
    }
    server.add_service(proxy_service);
    server.add_service(background_service("upstream health checks", health_checks));
    let setup = process::ProcessSetup {
        listeners: config.listeners.iter().map(|l| l.address.0).collect(),
        metrics: metrics.clone(),
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
