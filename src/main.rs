//! The shadowgate binary: parse options, load the config, build the server, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use log::error;
use pingora_core::server::configuration::Opt;
use shadowgate::{Config, build_server};

// Per request, the proxy makes many small, short-lived allocations (headers, tasks,
// buffers); mimalloc serves them with less CPU than glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Edge reverse proxy with safe, streaming traffic mirroring.
#[derive(Parser, Debug)]
#[command(name = "shadowgate", version, about)]
struct Cli {
    /// The configuration file: Pingora's server keys and shadowgate's sections.
    #[arg(
        short,
        long,
        value_name = "FILE",
        default_value = "/etc/shadowgate/shadowgate.yaml"
    )]
    conf: PathBuf,
    /// Check the configuration, print the result and exit.
    #[arg(short, long)]
    test: bool,
    /// Take over the listening sockets of a running shadowgate (zero-downtime upgrade).
    #[arg(short, long)]
    upgrade: bool,
    /// Run in the background.
    #[arg(short, long)]
    daemon: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    let config = match Config::load(&cli.conf) {
        Ok(config) => config,
        Err(e) => {
            eprintln!(
                "shadowgate: invalid configuration {}: {e}",
                cli.conf.display()
            );
            return ExitCode::from(2);
        }
    };
    if cli.test {
        println!("shadowgate: configuration {} is valid", cli.conf.display());
        return ExitCode::SUCCESS;
    }

    let opt = Opt {
        upgrade: cli.upgrade,
        daemon: cli.daemon,
        ..Opt::default()
    };
    let app = match build_server(config, opt) {
        Ok(app) => app,
        Err(e) => {
            error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    app.run();
    ExitCode::SUCCESS
}
