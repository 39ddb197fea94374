//! `procagentd`: the agent daemon. Runs in the foreground (never forks itself); systemd or
//! the operator's shell supervises it.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use procagent::daemon_cli::Args;
use tracing_subscriber::EnvFilter;

/// jemalloc, set up by `procagent::sys::JEMALLOC_CONF` (one arena, no thread caches): the
/// agent's heap stays near what it holds (docs/performance.md, "Memory").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Where the journal listens.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Is stderr the journal stream systemd gave this service (`$JOURNAL_STREAM` names the
/// device and inode of stderr)?
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// Logging: journald (structured fields, priorities) when `log_target` says so or, with
/// `auto`, when systemd connected stderr to the journal; stderr otherwise, as text or JSON
/// lines (`log_format`). `PROCAGENT_LOG` overrides `log_level`.
fn init_logging(cfg: &procagent::config::Config) {
    use procagent::config::{LogFormat, LogTarget};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_env("PROCAGENT_LOG")
        .or_else(|_| EnvFilter::try_new(&cfg.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let journal_wanted = match cfg.log_target {
        LogTarget::Stderr => false,
        LogTarget::Journald => true,
        LogTarget::Auto => std::path::Path::new(JOURNAL_SOCKET).exists() && stderr_is_journal(),
    };
    let mut fallback_note = None;
    if journal_wanted {
        match tracing_journald::layer() {
            Ok(j) => {
                let j = j.with_syslog_identifier("procagentd".to_string());
                tracing_subscriber::registry().with(filter).with(j).init();
                return;
            }
            Err(e) => {
                fallback_note = Some(format!(
                    "journald is not reachable ({e}); logging to stderr"
                ))
            }
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cfg.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    if let Some(n) = fallback_note {
        tracing::warn!("{n}");
    }
}

fn main() -> ExitCode {
    procagent::sys::limit_malloc_arenas();
    let args = Args::parse();
    if let Some(dir) = &args.output_keeper {
        return output_keeper(dir);
    }
    // First, while the agent holds only its standard descriptors: the low numbers its
    // commands receive their files through (a command then never copies the thousands of
    // descriptors the agent holds; see procagent::sys::reserve_spawn_slots).
    let slots = procagent::sys::reserve_spawn_slots();
    let cfg = match procagent::config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("procagentd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        for note in &cfg.notes {
            println!("note: {note}");
        }
        for w in procagent::config::path_warnings(&cfg) {
            println!("warning: {w}");
        }
        println!(
            "{}: ok ({} processes declared)",
            cfg.file.display(),
            cfg.processes.len()
        );
        return ExitCode::SUCCESS;
    }
    init_logging(&cfg);
    tracing::debug!("allocator: {}", procagent::sys::allocator_settings());
    match slots {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            "this kernel failed the trial of close_range(CLOSE_RANGE_UNSHARE) (before 5.9, or without the fix for CVE-2024-45025): each command gets a copy of every descriptor of the agent (slower starts)"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "no descriptor slots reserved: each command gets a copy of every descriptor of the agent (slower starts)")
        }
    }
    match real_main(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("procagentd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The output keeper mode: no config, logs to the stderr it was given (the agent's).
fn output_keeper(dir: &std::path::Path) -> ExitCode {
    let filter =
        EnvFilter::try_from_env("PROCAGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match procagent::output::keeper::run(dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
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
    let res = rt.block_on(async move {
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
    });
    // A blocking task stuck in the kernel (a read on a hung mount) must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    res
}
