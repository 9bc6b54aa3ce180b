//! Bare Pingora: the smallest honest Pingora reverse proxy, the CPU floor for `scripts/bench.sh`
//! (target `pingora_bare`). One `http_proxy_service` whose only filter is `upstream_peer`, which
//! always returns the one origin (Pingora's keep-alive upstream pool, as by default); no routing,
//! no forwarding headers, no metrics. Built with the same release profile and allocator as
//! shadowgate and run with the same runtime settings, so shadowgate's CPU per request minus this
//! one's is what shadowgate adds on top of Pingora.
//!
//! `cargo run --release --example bare_pingora -- --listen ADDR --origin ADDR --threads N`

use std::net::SocketAddr;
use std::process::ExitCode;

use async_trait::async_trait;
use pingora::server::Server;
use pingora::server::configuration::ServerConf;
use pingora_core::modules::http::HttpModules;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session, http_proxy_service};

// The allocator shadowgate's binary uses (src/main.rs): the comparison is Pingora against
// shadowgate's own code, not glibc's malloc against mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: bare_pingora --listen ADDR --origin ADDR --threads N";

/// The command line, checked.
struct Args {
    listen: SocketAddr,
    origin: SocketAddr,
    threads: usize,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut listen, mut origin, mut threads) = (None, None, None);
    while let Some(flag) = args.next() {
        if !matches!(flag.as_str(), "--listen" | "--origin" | "--threads") {
            return Err(format!("unknown argument {flag:?}"));
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(parse_addr(&flag, &value)?),
            "--origin" => origin = Some(parse_addr(&flag, &value)?),
            _ => match value.parse::<usize>() {
                Ok(n) if n > 0 => threads = Some(n),
                _ => {
                    return Err(format!(
                        "--threads {value:?} is not a positive whole number"
                    ));
                }
            },
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is missing")?,
        origin: origin.ok_or("--origin is missing")?,
        threads: threads.ok_or("--threads is missing")?,
    })
}

fn parse_addr(flag: &str, value: &str) -> Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|_| format!("{flag} {value:?} is not an address like 127.0.0.1:8080"))
}

/// Every request goes to the one origin.
struct BareProxy {
    origin: SocketAddr,
}

#[async_trait]
impl ProxyHttp for BareProxy {
    type CTX = ();

    fn new_ctx(&self) {}

    /// No downstream modules, as shadowgate: Pingora's default adds a disabled compression module.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_error::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.origin, false, String::new())))
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(problem) => {
            eprintln!("bare_pingora: {problem}; {USAGE}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();

    // shadowgate's runtime defaults (src/config/runtime_dir.rs, apply_runtime_defaults): one
    // thread runs Pingora's per-thread runtime, more keep Pingora's work-stealing default.
    let conf = ServerConf {
        threads: args.threads,
        work_stealing: args.threads > 1,
        ..Default::default()
    };

    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        BareProxy {
            origin: args.origin,
        },
    );
    proxy.add_tcp(&args.listen.to_string());
    server.add_service(proxy);
    server.run_forever()
}
