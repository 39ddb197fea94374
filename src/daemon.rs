//! The daemon's entry point: [`run`] wires the store, the reaper, the engine, the supervisor
//! loop and the API together, and owns the start and stop order. The binary and the tests
//! call it the same way.
//!
//! Start order: state directory and its lock (a second daemon on the same state dir refuses
//! to start) → the root socket (`api.root_socket`, 0600; removed again when the daemon
//! stops) → subreaper → store (refuses a corrupted database) → engine (registry loaded) →
//! config processes applied → re-adoption of every recorded process → supervisor loop →
//! API → READY to systemd. Stop order (SIGTERM): STOPPING to systemd, stop accepting, stop
//! the loop, flush the store; managed processes keep running.
//!
//! The main socket is bound by the caller (the binary binds it before anything else, so a
//! second agent on the same socket fails at once) and handed to [`run`]; both sockets are
//! served by [`crate::api::serve`].
//!
//! SIGHUP reloads the config's `[[process]]` definitions (see [`crate::api::reload`]); with
//! `agent.watch_conf_dir = true`, a change of a `*.toml` file in `agent.conf_dir` does the
//! same after 500 ms without further changes (several saves in a row reload once).
//!
//! systemd (`Type=notify`): READY=1 is sent once the socket is bound (by the caller, before
//! [`run`]), every recorded process is re-adopted and the API is serving. WATCHDOG=1 comes
//! from the supervisor loop's tick, so a wedged loop stops the pings; the tick is at most
//! half of `$WATCHDOG_USEC` ([`watchdog_interval`]).

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
    #[error("cannot listen on the root socket {path} (api.root_socket): {source}")]
    RootSocket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A socket file this daemon created, removed when the daemon stops (or fails to start).
struct SocketFile(std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
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
    mut config: Config,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let _lock = lock_state_dir(&config)?;
    // The root socket, bound once the state directory is ours (a second agent on the same
    // state directory stops at the lock and never touches it).
    let root_path = config.api.root_socket.clone();
    let root_listener =
        crate::api::bind_private(&root_path).map_err(|source| DaemonError::RootSocket {
            path: root_path.display().to_string(),
            source,
        })?;
    let _root_file = SocketFile(root_path.clone());
    // Take SIGHUP over before anything slow, so a reload signal never kills a starting agent.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| tracing::warn!(error = %e, "cannot handle SIGHUP; reload through the API"))
        .ok();
    let inherited = crate::sys::mark_inherited_fds_cloexec();
    if inherited > 0 {
        tracing::debug!(inherited, "inherited descriptors marked close-on-exec");
    }
    match crate::sys::raise_nofile_limit() {
        Ok((old, new)) if new > old => {
            tracing::debug!(old, new, "open-file limit raised for pidfds")
        }
        Ok((_, new)) if new < 4096 => tracing::warn!(
            limit = new,
            "the open-file limit is low: the agent holds one pidfd per watched process"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
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
    let (store, loaded) = Store::open(
        &config.state_dir.join("state.db"),
        5_000,
        10_000,
        config.store.reserve_bytes,
    )?;
    let host = HostIdentity::resolve(&config.host);
    let (stop_tx, stop_rx) = watch::channel(false);
    let reaper = Reaper::new();
    let reaper_task = tokio::spawn(
        reaper
            .clone()
            .run(config.supervisor.sweep_interval, stop_rx.clone()),
    );
    reaper.sweep();
    // The declared processes are applied once, below, and then live in the registry: the
    // engine's copy of the config does not keep them (a MiB at N = 1000, held twice before).
    let processes = std::mem::take(&mut config.processes);
    let setting = config.supervisor.cgroup_root.clone();
    let cgroups = tokio::task::spawn_blocking(move || crate::cgroup::detect(&setting))
        .await
        .unwrap_or_else(|e| crate::cgroup::Mode::Off {
            why: format!("detection failed: {e}"),
        });
    tracing::info!(containment = %cgroups.describe(), "containment");
    let engine = Engine::new(EngineParts {
        config,
        host,
        store: store.clone(),
        loaded,
        reaper,
        detection,
        subreaper,
        cgroups,
    });
    tracing::info!(
        ip = %engine.host.ip,
        bk_cloud_id = engine.host.bk_cloud_id,
        detection = engine.detection.name(),
        processes = engine.counts().processes,
        "procagentd starting"
    );
    // Re-adopt what was recorded before touching anything else, so a config change never
    // makes the agent start a duplicate of a process that is still running.
    engine.readopt_all().await;
    // Pid files (which may sit on a hung mount) are read in the background: each process
    // waits only for its own.
    engine.discover_untracked();
    if let Err(e) = engine.apply_config(&processes).await {
        tracing::error!(error = %e, "cannot apply the config's processes");
        return Err(e.into());
    }
    drop(processes);
    // Now every process is known: start what should run.
    engine.reconcile_all();
    engine.events.emit(
        None,
        "agent_started",
        format!("procagentd {} started", env!("CARGO_PKG_VERSION")),
        serde_json::Value::Null,
    );
    let loop_task = tokio::spawn(engine.clone().run_loop(stop_rx.clone()));
    let sampler = tokio::spawn(crate::probe::run_sampler(engine.clone(), stop_rx.clone()));
    // Containment with the memory controller: memory.high and OOM kills answered at once.
    let memwatch = tokio::spawn(engine.clone().memwatch_loop(stop_rx.clone()));
    // The socket (and its directory) belong to socket_group, else to the admin group.
    let api_cfg = &engine.config.api;
    for (what, g) in [
        ("admin_group", &api_cfg.admin_group),
        ("readonly_group", &api_cfg.readonly_group),
        ("socket_group", &api_cfg.socket_group),
    ] {
        if let Some(g) = g
            && !matches!(nix::unistd::Group::from_name(g), Ok(Some(_)))
        {
            tracing::warn!(group = %g, "api.{what} names a group that does not exist; nobody gets its access");
        }
    }
    if let Some(g) = api_cfg
        .socket_group
        .as_ref()
        .or(api_cfg.admin_group.as_ref())
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
    let listeners = crate::api::Listeners {
        main: listener,
        main_path: engine.config.socket.clone(),
        root: Some((root_listener, root_path)),
    };
    let server = tokio::spawn(crate::api::serve(
        engine.clone(),
        listeners,
        stop_rx.clone(),
    ));
    let hup_task = hangup.map(|h| tokio::spawn(on_hangup(engine.clone(), h, stop_rx.clone())));
    let conf_watch = if engine.config.watch_conf_dir {
        watch_conf_dir(engine.clone(), stop_rx.clone())
    } else {
        None
    };
    notify_ready();
    shutdown.await;
    sd_notify_send("STOPPING=1");
    tracing::info!("shutting down; managed processes keep running");
    let _ = stop_tx.send(true);
    let _ = server.await;
    if let Some(t) = hup_task {
        let _ = t.await;
    }
    if let Some(t) = conf_watch {
        let _ = t.await;
    }
    let _ = loop_task.await;
    let _ = sampler.await;
    let _ = memwatch.await;
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

/// Reload the config on every SIGHUP until shutdown.
async fn on_hangup(
    engine: std::sync::Arc<Engine>,
    mut hup: tokio::signal::unix::Signal,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = hup.recv() => {
                if r.is_none() { break; }
                tracing::info!("SIGHUP: reloading the config");
                crate::api::reload::reload_logged(&engine, "SIGHUP").await;
            }
            _ = stop.changed() => break,
        }
    }
}

/// How long the conf_dir watcher waits for changes to settle before it reloads.
pub const CONF_DIR_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Watch `conf_dir` for changes of `*.toml` files and reload, debounced. Returns None (after
/// logging why) when there is nothing to watch or the watch cannot be set up.
fn watch_conf_dir(
    engine: std::sync::Arc<Engine>,
    mut stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    use notify::Watcher;
    let Some(dir) = engine.config.conf_dir.clone() else {
        tracing::warn!("agent.watch_conf_dir is set but agent.conf_dir is not; nothing to watch");
        return None;
    };
    // One pending "something changed" at most: a burst of inotify events coalesces into it
    // (a full channel means a change is already waiting), so the channel is bounded.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let handler = move |res: notify::Result<notify::Event>| match res {
        Ok(ev) => {
            let relevant = !matches!(ev.kind, notify::EventKind::Access(_))
                && ev
                    .paths
                    .iter()
                    .any(|p| p.extension().is_some_and(|x| x == "toml"));
            if relevant {
                let _ = tx.try_send(());
            }
        }
        Err(e) => tracing::warn!(error = %e, "conf_dir watch error"),
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch conf_dir; reload with SIGHUP or `procagent reload`");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch conf_dir; reload with SIGHUP or `procagent reload`");
        return None;
    }
    tracing::info!(dir = %dir.display(), "watching conf_dir for changes");
    Some(tokio::spawn(async move {
        let _watcher = watcher;
        loop {
            tokio::select! {
                r = rx.recv() => if r.is_none() { break },
                _ = stop.changed() => break,
            }
            // Debounce: wait until no change arrived for CONF_DIR_DEBOUNCE.
            loop {
                tokio::select! {
                    r = tokio::time::timeout(CONF_DIR_DEBOUNCE, rx.recv()) => match r {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    },
                    _ = stop.changed() => return,
                }
            }
            tracing::info!(dir = %dir.display(), "conf_dir changed: reloading the config");
            crate::api::reload::reload_logged(&engine, "conf_dir").await;
        }
    }))
}

/// Tell systemd we are ready (no-op without NOTIFY_SOCKET).
fn notify_ready() {
    sd_notify_send("READY=1\nSTATUS=supervising");
}

/// Set the status line `systemctl status` shows (no-op without NOTIFY_SOCKET).
pub fn sd_status(status: &str) {
    sd_notify_send(&format!("STATUS={status}"));
}

/// How often the watchdog wants a ping: half of `$WATCHDOG_USEC`, when systemd set it for
/// this process (`$WATCHDOG_PID` absent or ours). None when there is no watchdog.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    static IV: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *IV.get_or_init(|| {
        parse_watchdog(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    })
}

/// The ping interval for `WATCHDOG_USEC` and `WATCHDOG_PID` values (pure, for tests).
pub fn parse_watchdog(
    usec: Option<&str>,
    pid: Option<&str>,
    my_pid: u32,
) -> Option<std::time::Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(p) = pid
        && p.trim().parse::<u32>().ok() != Some(my_pid)
    {
        return None;
    }
    Some(std::time::Duration::from_micros(usec / 2).max(std::time::Duration::from_millis(50)))
}

/// Ping the systemd watchdog (called from the supervisor loop's tick, so a wedged loop is
/// noticed). No-op without a watchdog.
pub fn watchdog_ping() {
    if watchdog_interval().is_some() {
        sd_notify_send("WATCHDOG=1");
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_us_only() {
        assert_eq!(parse_watchdog(None, None, 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("junk"), None, 7), None);
        assert_eq!(
            parse_watchdog(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            parse_watchdog(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(parse_watchdog(Some("30000000"), Some("8"), 7), None);
        assert_eq!(
            parse_watchdog(Some("10"), None, 7),
            Some(Duration::from_millis(50))
        );
    }
}
