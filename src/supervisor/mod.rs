//! The supervisor: it owns every process's state and keeps managed processes in their
//! expected state.
//!
//! # How it fits together
//! * [`lifecycle`] is the pure state machine: every transition of a process goes through it.
//! * [`driver`] feeds it (operations, exits, effect results, deadlines) under the registry's
//!   lock and dispatches the effects it returns, in order, without waiting on anything.
//! * [`runner`] carries out the effects that take time (start a command and find its process,
//!   stop commands, signals, watching a tree go, intent commits) as tasks that report back
//!   through the driver; [`discover`] finds running processes (pid files, re-adoption) under
//!   the [`ownership`] rule; [`probes`] runs health and version commands on their own budget.
//! * [`handle`] is the narrow surface the API and the daemon use: [`view::ProcView`]
//!   snapshots, operations, definitions, samples.
//! * The registry ([`registry`]) is private to this module.
//!
//! Concurrency: the registry sits behind one `std::sync::Mutex`, never held across an
//! `.await`; file-system work, `/proc` scans, NSS lookups and forks run on the
//! [`crate::fspool`] pool. Operations on one process are queued by its lifecycle, never
//! interleaved; commands of operations and supervisor starts take a permit of
//! `supervisor.max_parallel_ops`, health and version commands one of their own budget.

pub mod contain;
pub mod defs;
pub mod discover;
pub mod driver;
pub mod handle;
pub mod keylocks;
pub mod lifecycle;
pub mod limits;
pub mod ownership;
pub mod policy;
pub mod probes;
mod registry;
pub mod runner;
pub mod stop;
pub mod view;
pub mod watch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore, oneshot, watch as tokio_watch};

use crate::config::Config;
use crate::events::EventLog;
use crate::executor::{CommandRequest, Executor};
use crate::host::HostIdentity;
use crate::reaper::Reaper;
use crate::spec::{Definition, ProcKey, ProcSpec};
use crate::store::Store;
use crate::tasks::TaskBook;
use lifecycle::{Backoff, OpId, Outcome};
use registry::{Entry, Registry};
pub use registry::{Instance, LastExit, LimitStop, ProcState};

/// How exits are being detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    Pidfd,
    Poll,
}

impl Detection {
    pub fn name(self) -> &'static str {
        match self {
            Detection::Pidfd => "pidfd",
            Detection::Poll => "poll",
        }
    }
}

/// The answer of an operation: its outcome, and why its intent is not durable when the
/// store refused it.
pub type Answer = (Outcome, Option<String>);

/// The supervisor, shared by the API, the daemon and its own tasks.
pub struct Engine {
    pub config: Config,
    pub host: HostIdentity,
    pub store: Store,
    pub exec: Executor,
    pub reaper: Reaper,
    pub events: EventLog,
    pub tasks: TaskBook,
    /// File-system work on caller-chosen paths, and other blocking work off the runtime.
    pub fs: crate::fspool::FsPool,
    pub detection: Detection,
    pub subreaper: bool,
    /// Containment: off, or the agent's cgroup subtree.
    pub cgroups: crate::cgroup::Mode,
    /// Containment with the memory controller: the watches of instances' `memory.events`.
    pub memwatch: Option<Arc<crate::cgwatch::Watcher>>,
    /// MemTotal and cpus, read once when a cgroup limit is first computed.
    host_figures: std::sync::OnceLock<crate::probe::HostFigures>,
    pub started: Instant,
    pub started_unix: i64,
    /// Metrics hooks (API request counter etc.).
    pub counters: crate::probe::Counters,
    backoff: Backoff,
    reg: Mutex<Registry>,
    /// Permits for the commands of operations and supervisor starts.
    ops: Arc<Semaphore>,
    /// Permits for health and version commands.
    probes: Arc<Semaphore>,
    /// Operations waiting for their answer.
    waiters: Mutex<HashMap<OpId, oneshot::Sender<Answer>>>,
    next_op: AtomicU64,
    /// Wakes the loop when a deadline moved.
    wake: Notify,
    /// Wakes definition writes waiting for an operation to end.
    op_ended: Notify,
    /// Definition writes of one key take turns (entries live only while a write runs).
    def_locks: keylocks::KeyLocks<ProcKey>,
}

/// Everything the supervisor is built from.
pub struct EngineParts {
    pub config: Config,
    pub host: HostIdentity,
    pub store: Store,
    pub loaded: crate::store::Loaded,
    pub reaper: Reaper,
    pub detection: Detection,
    pub subreaper: bool,
    /// Containment (decided at start: [`crate::cgroup::detect`]).
    pub cgroups: crate::cgroup::Mode,
}

/// At most this many health and version commands run at once.
pub const MAX_PROBES: usize = 8;

impl Engine {
    /// Build the supervisor from its parts and the stored registry.
    pub fn new(parts: EngineParts) -> Arc<Engine> {
        let EngineParts {
            config,
            host,
            store,
            loaded,
            reaper,
            detection,
            subreaper,
            cgroups,
        } = parts;
        let output_dir = config.state_dir.join("output");
        let fs = crate::fspool::FsPool::default();
        let output = crate::output::OutputClient::start(
            output_dir.clone(),
            crate::output::Settings {
                limits: crate::output::Limits {
                    file_bytes: config.store.output_file_bytes,
                    files: config.store.output_files,
                    min_free: config.store.reserve_bytes.saturating_mul(2),
                },
                tail_bytes: config.store.max_output_bytes,
                program: PathBuf::from("/proc/self/exe"),
            },
        );
        let exec = Executor::new(
            reaper.clone(),
            fs.clone(),
            output,
            output_dir,
            config.supervisor.umask,
        );
        let events = EventLog::new(store.clone(), 10_000, loaded.events);
        let tasks = TaskBook::new(store.clone(), 5_000, loaded.tasks);
        let mut reg = Registry::default();
        let mut states: HashMap<ProcKey, ProcState> = HashMap::new();
        for (k, json) in loaded.states {
            match serde_json::from_str::<ProcState>(&json) {
                Ok(s) => {
                    states.insert(k, s);
                }
                Err(e) => {
                    tracing::error!(process = %k, error = %e, "unreadable stored state; starting from defaults")
                }
            }
        }
        for json in loaded.definitions {
            match serde_json::from_str::<Definition>(&json) {
                Ok(def) => {
                    let st = states.remove(&def.key).unwrap_or_default();
                    let mut e = Entry::new(def, st);
                    let errs = e.def.spec.validate();
                    if !errs.is_empty() {
                        e.invalid = Some(format!(
                            "the stored definition is invalid and is not acted on: {}; register it again with a valid spec",
                            errs.iter()
                                .map(|e| e.to_string())
                                .collect::<Vec<_>>()
                                .join("; ")
                        ));
                    }
                    reg.entries.insert(e.def.key.clone(), e);
                }
                Err(e) => {
                    tracing::error!(error = %e, "unreadable stored definition skipped (left in the database)")
                }
            }
        }
        let backoff = Backoff {
            initial: config.supervisor.backoff_initial,
            max: config.supervisor.backoff_max,
            reset_after: config.supervisor.backoff_reset,
            jitter: config.supervisor.backoff_jitter,
        };
        let ops = config.supervisor.max_parallel_ops;
        let memwatch = match cgroups.tree() {
            Some(t) if t.has("memory") => match crate::cgwatch::Watcher::new() {
                Ok(w) => Some(Arc::new(w)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch memory events (inotify); memory limits are polled");
                    None
                }
            },
            _ => None,
        };
        Arc::new(Engine {
            config,
            host,
            store,
            exec,
            reaper,
            events,
            tasks,
            fs,
            detection,
            subreaper,
            cgroups,
            memwatch,
            host_figures: std::sync::OnceLock::new(),
            started: Instant::now(),
            started_unix: crate::util::unix_now(),
            counters: crate::probe::Counters::default(),
            backoff,
            reg: Mutex::new(reg),
            ops: Arc::new(Semaphore::new(ops)),
            probes: Arc::new(Semaphore::new(MAX_PROBES)),
            waiters: Mutex::new(HashMap::new()),
            next_op: AtomicU64::new(1),
            wake: Notify::new(),
            op_ended: Notify::new(),
            def_locks: keylocks::KeyLocks::default(),
        })
    }

    /// Lock the registry (never across an `.await`).
    fn reg(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock of definition writes to `key` ([`keylocks::KeyLocks`]).
    pub(crate) fn def_lock(&self, key: &ProcKey) -> Arc<tokio::sync::Mutex<()>> {
        self.def_locks.get(key)
    }

    /// The command request for one of a process's commands.
    pub fn command_request(
        &self,
        key: &ProcKey,
        spec: &ProcSpec,
        label: &str,
        command: &str,
    ) -> CommandRequest {
        CommandRequest {
            key: key.clone(),
            label: label.to_string(),
            command: command.to_string(),
            cwd: PathBuf::from(&spec.setup_path),
            account: spec.account.clone(),
            env: spec.env.clone(),
            timeout: Duration::from_secs(spec.op_timeout.max(1)),
            cgroup: self.placement(key, None),
        }
    }

    /// Where a command of `key` runs with containment on: instance `i`'s cgroup for its
    /// start and restart commands, the control leaf (`None`) for the others.
    pub fn placement(&self, key: &ProcKey, i: Option<usize>) -> Option<crate::cgroup::Placement> {
        let tree = self.cgroups.tree()?;
        Some(crate::cgroup::Placement {
            tree: tree.clone(),
            dir: match i {
                Some(i) => tree.instance(key, i),
                None => tree.control(key),
            },
        })
    }

    /// The supervisor loop: deadlines of the lifecycle (backoff, cycles, stop steps) and the
    /// housekeeping tick, until shutdown.
    pub async fn run_loop(self: Arc<Self>, mut shutdown: tokio_watch::Receiver<bool>) {
        let sweep = if self.detection == Detection::Poll {
            self.config
                .supervisor
                .poll_interval
                .min(self.config.supervisor.sweep_interval)
        } else {
            self.config.supervisor.sweep_interval
        };
        // The tick also pings systemd's watchdog: at least twice per watchdog timeout.
        let sweep = crate::daemon::watchdog_interval().map_or(sweep, |w| sweep.min(w));
        let mut tick = tokio::time::interval(sweep);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            let deadline = self.next_deadline().map(tokio::time::Instant::from_std);
            let woken = self.wake.notified();
            tokio::select! {
                _ = woken => {}
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending::<()>().await,
                    }
                } => self.fire_due(Instant::now()),
                _ = tick.tick() => {
                    ticks += 1;
                    self.housekeeping(ticks);
                    crate::daemon::watchdog_ping();
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    /// Containment: remove the cgroups of keys that are no longer registered, once they hold
    /// no process (`rmdir` refuses a cgroup that does; so nothing that holds one is removed).
    /// On the pool.
    pub fn prune_cgroups(self: &Arc<Self>) {
        let Some(tree) = self.cgroups.tree().cloned() else {
            return;
        };
        let known: std::collections::HashSet<PathBuf> =
            self.keys().iter().map(|k| tree.process_dir(k)).collect();
        let fs = self.fs.clone();
        tokio::spawn(async move {
            let _ = fs
                .run_unkeyed(
                    "removing unused cgroups",
                    Duration::from_secs(10),
                    move || crate::cgroup::prune(&tree, &known),
                )
                .await;
        });
    }

    /// Housekeeping each tick: adopt processes started outside the agent, poll exits (poll
    /// mode), run the health checks that are due, give free heap memory back, prune old
    /// history.
    fn housekeeping(self: &Arc<Self>, tick: u64) {
        self.discover_untracked_in_turn();
        if self.detection == Detection::Poll {
            self.poll_exits();
        }
        self.schedule_health_checks();
        // The first tick comes at once: leftovers of keys no longer known are removed at start.
        if tick == 1 || tick.is_multiple_of(300) {
            self.prune_cgroups();
        }
        // Memory a large answer left free goes back to the kernel (glibc keeps it): once it
        // is sent, at the next tick.
        if crate::api::take_trim_due() {
            tokio::task::spawn_blocking(crate::sys::trim_heap);
        }
        if tick.is_multiple_of(3600) {
            let st = &self.config.store;
            let before = crate::util::unix_millis() - st.task_retention.as_millis() as i64;
            self.store.prune(before, st.max_tasks, st.max_events);
        }
    }
}
