//! The daemon's entry point: [`run`] wires the store, the reaper, the engine, the supervisor
//! loop and the API together, and owns the start and stop order. The binary and the tests
//! call it the same way.
//!
//! Start order: state directory and its lock (a second daemon on the same state dir refuses
//! to start) → subreaper → store (refuses a corrupted database) → engine (registry loaded) →
//! config processes applied → re-adoption of every recorded process → supervisor loop →
//! API → READY to systemd. Stop order (SIGTERM): stop accepting, stop the loop, flush the
//! store; managed processes keep running.

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::config::{Config, DetectMode};
use crate::host::HostIdentity;
use crate::reaper::Reaper;
use crate::store::{Store, StoreError};
use crate::supervisor::{Detection, Engine, EngineParts};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot prepare the state directory {path}: {source}")]
    StateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("another procagentd is already running on the state directory {0} (its lock is held)")]
    AlreadyRunning(String),
    #[error("exit_detection = \"pidfd\" but this kernel has no usable pidfd_open (Linux 5.3+)")]
    NoPidfd,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Holds the state directory's lock for the daemon's lifetime.
pub struct StateLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Create the state directory (0750) and take its lock.
pub fn lock_state_dir(config: &Config) -> Result<StateLock, DaemonError> {
    let dir = &config.state_dir;
    let err = |source| DaemonError::StateDir {
        path: dir.display().to_string(),
        source,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)).map_err(err)?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir.join("output"))
        .map_err(err)?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("procagentd.lock"))
        .map_err(err)?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => {
            let _ = std::fs::write(
                dir.join("procagentd.pid"),
                format!("{}\n", std::process::id()),
            );
            Ok(StateLock { _lock: l })
        }
        Err((_, _)) => Err(DaemonError::AlreadyRunning(dir.display().to_string())),
    }
}

/// Run the daemon until `shutdown` resolves. Managed processes keep running afterwards.
pub async fn run(
    config: Config,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let _lock = lock_state_dir(&config)?;
    let subreaper = match crate::sys::set_child_subreaper() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot become a child subreaper; exit codes of daemonized processes may be unknown");
            false
        }
    };
    let detection = match config.supervisor.exit_detection {
        DetectMode::Poll => Detection::Poll,
        DetectMode::Pidfd => {
            if !crate::sys::pidfd_supported() {
                return Err(DaemonError::NoPidfd);
            }
            Detection::Pidfd
        }
        DetectMode::Auto => {
            if crate::sys::pidfd_supported() {
                Detection::Pidfd
            } else {
                tracing::warn!("pidfd is not available on this kernel; polling /proc for exits");
                Detection::Poll
            }
        }
    };
    let (store, loaded) = Store::open(&config.state_dir.join("state.db"), 5_000, 10_000)?;
    let host = HostIdentity::resolve(&config.host);
    let (stop_tx, stop_rx) = watch::channel(false);
    let reaper = Reaper::new();
    let reaper_task = tokio::spawn(
        reaper
            .clone()
            .run(config.supervisor.sweep_interval, stop_rx.clone()),
    );
    reaper.sweep();
    let processes = config.processes.clone();
    let (engine, rx) = Engine::new(EngineParts {
        config,
        host,
        store: store.clone(),
        loaded,
        reaper,
        detection,
        subreaper,
    });
    tracing::info!(
        ip = %engine.host.ip,
        bk_cloud_id = engine.host.bk_cloud_id,
        detection = engine.detection.name(),
        processes = engine.reg().entries.len(),
        "procagentd starting"
    );
    // Re-adopt what was recorded before touching anything else, so a config change never
    // makes the agent start a duplicate of a process that is still running.
    engine.readopt_all();
    if let Err(e) = crate::supervisor::defs::apply_config(&engine, &processes).await {
        tracing::error!(error = %e, "cannot apply the config's processes");
        return Err(e.into());
    }
    engine.events.emit(
        None,
        "agent_started",
        format!("procagentd {} started", env!("CARGO_PKG_VERSION")),
        serde_json::Value::Null,
    );
    let loop_task = tokio::spawn(engine.clone().run_loop(rx, stop_rx.clone()));
    let sampler = tokio::spawn(crate::probe::run_sampler(engine.clone(), stop_rx.clone()));
    if let Some(g) = &engine.config.api.socket_group
        && let Err(e) = crate::api::chown_socket(&engine.config.socket, g)
    {
        tracing::warn!(error = %e, group = %g, "cannot give the socket to its group");
    }
    let metrics_tcp = match engine.config.metrics.listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                tracing::info!(%addr, "serving /metrics on loopback TCP");
                Some(tokio::spawn(crate::api::metrics::serve_tcp(
                    engine.clone(),
                    l,
                    stop_rx.clone(),
                )))
            }
            Err(e) => {
                // Metrics are not worth refusing to supervise: say so loudly and go on.
                tracing::error!(%addr, error = %e, "cannot listen for /metrics; serving it on the socket only");
                engine.events.emit(
                    None,
                    "metrics_listen_failed",
                    format!("cannot listen on {addr} for /metrics: {e}"),
                    serde_json::Value::Null,
                );
                None
            }
        },
        None => None,
    };
    notify_ready();
    let server = tokio::spawn(crate::api::serve(engine.clone(), listener, stop_rx.clone()));
    shutdown.await;
    tracing::info!("shutting down; managed processes keep running");
    let _ = stop_tx.send(true);
    let _ = server.await;
    let _ = loop_task.await;
    let _ = sampler.await;
    if let Some(t) = metrics_tcp {
        let _ = t.await;
    }
    let _ = reaper_task.await;
    // Everything not yet committed (latest pids, events) goes to disk before we exit.
    if let Err(e) = store.flush().await {
        tracing::error!(error = %e, "final store flush failed");
    }
    engine.events.emit(
        None,
        "agent_stopped",
        "procagentd stopped",
        serde_json::Value::Null,
    );
    let _ = store.flush().await;
    drop(engine);
    Ok(())
}

/// Tell systemd we are ready (no-op without NOTIFY_SOCKET).
fn notify_ready() {
    sd_notify_send("READY=1\nSTATUS=supervising");
}

/// Ping the systemd watchdog (called from the supervisor loop's tick, so a wedged loop is
/// noticed). No-op without NOTIFY_SOCKET.
pub fn watchdog_ping() {
    sd_notify_send("WATCHDOG=1");
}

/// Send a datagram to `$NOTIFY_SOCKET` (the sd_notify protocol).
fn sd_notify_send(msg: &str) {
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else {
        return;
    };
    if path.is_empty() {
        return;
    }
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let res = if let Some(abstract_name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|addr| sock.send_to_addr(msg.as_bytes(), &addr))
    } else {
        sock.send_to(msg.as_bytes(), &path)
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}
