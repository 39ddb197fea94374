//! `procagentd`: the agent daemon. Runs in the foreground (never forks itself); systemd or
//! the operator's shell supervises it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// procagentd: supervise processes and serve GSE's process APIs on a unix socket.
#[derive(Debug, Parser)]
#[command(name = "procagentd", version, about)]
struct Args {
    /// The agent config (TOML).
    #[arg(long, short, default_value = "/etc/procagent/agent.toml")]
    config: PathBuf,
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
}

fn init_logging(cfg: &procagent::config::Config) {
    let filter = EnvFilter::try_from_env("PROCAGENT_LOG")
        .or_else(|_| EnvFilter::try_new(&cfg.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cfg.log_format {
        procagent::config::LogFormat::Json => builder.json().init(),
        procagent::config::LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match procagent::config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("procagentd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!(
            "{}: ok ({} processes declared)",
            args.config.display(),
            cfg.processes.len()
        );
        return ExitCode::SUCCESS;
    }
    init_logging(&cfg);
    match real_main(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("procagentd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cfg: procagent::config::Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let socket = cfg.socket.clone();
        let listener = procagent::api::bind(&socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
        let shutdown = async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).ok();
            let mut int = signal(SignalKind::interrupt()).ok();
            tokio::select! {
                _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
                _ = async { match int.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
            }
        };
        let res = procagent::daemon::run(cfg, listener, shutdown).await;
        let _ = std::fs::remove_file(&socket);
        res.map_err(anyhow::Error::from)
    })
}
