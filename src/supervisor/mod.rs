//! The supervision engine: the registry, its durable state, exit watchers, and the loop that
//! keeps managed processes in their expected state.
//!
//! Concurrency model:
//! * The registry sits behind one `std::sync::Mutex`, never held across an `.await`.
//! * Every operation on a process (API operations and supervisor restarts alike) first takes
//!   that process's async operation lock, so operations on one process never interleave;
//!   while one runs, the entry is marked `busy` and exits are attributed to it (an operator
//!   stop is not a crash).
//! * Exits arrive as messages from per-process pidfd watchers (or the poll task) into the
//!   supervisor loop, which records them and asks the pure [`policy`] what to do.
//! * Durable changes of intent (flag, managed) are committed before an operation answers;
//!   runtime facts (pids, restarts) are written in the background.

pub mod defs;
pub mod lifecycle;
pub mod limits;
pub mod ops;
pub mod ownership;
pub mod policy;
pub mod watch;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, watch as tokio_watch};

use crate::config::Config;
use crate::events::EventLog;
use crate::executor::{CommandRequest, Executor};
use crate::host::HostIdentity;
use crate::proto::{ProcDetail, ProcInfo};
use crate::reaper::Reaper;
use crate::registry::{Entry, FLAG_RUNNING, Instance, LastExit, Phase, ProcState, Registry};
use crate::spec::{AutoType, Definition, ProcKey, ProcSpec};
use crate::store::Store;
use crate::sys::ExitInfo;
use crate::tasks::TaskBook;
use policy::{Backoff, Decision, View};

/// Messages to the supervisor loop.
#[derive(Debug)]
pub enum SupMsg {
    /// An instance exited.
    Exited {
        key: ProcKey,
        pid: i32,
        starttime: u64,
        exit: ExitInfo,
    },
    /// Re-evaluate one process.
    Reconcile(ProcKey),
}

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

/// A definition's side of an ownership check, copied out of the registry so that the check
/// can run off the async workers ([`Engine::claim_data`]).
#[derive(Debug, Clone)]
pub struct ClaimData {
    /// The account's uid, once resolved.
    uid: std::sync::OnceLock<u32>,
    pub key: ProcKey,
    pub account: String,
    pub proc_name: String,
    pub setup_path: String,
    pub pid_path: String,
    pub spawns: Vec<ownership::Spawn>,
    pub recorded: Vec<(i32, u64)>,
}

/// What a pid-file probe found.
#[derive(Debug)]
pub enum Probe {
    /// A process that belongs to the definition, attached.
    Adopt(watch::Attached),
    /// The pid file names a process that does not belong to it (or is unusable), and why.
    Refused(String),
    /// No pid file, or its process is gone.
    Nothing,
    /// The check could not be made (the account cannot be resolved, ...).
    Failed(String),
}

impl ClaimData {
    /// Run `f` with the claim built: the account's uid resolved (an NSS lookup: blocking) and
    /// the evidence in place. Blocking; run it on the file-system pool.
    pub fn check(
        &self,
        engine: &Engine,
        setup_real: Option<&str>,
        f: impl FnOnce(&watch::Claim<'_>) -> Probe,
    ) -> Probe {
        match self.with_claim(engine, setup_real, f) {
            Ok(p) => p,
            Err(why) => Probe::Failed(why),
        }
    }

    /// Run `f` with the claim built (see [`ClaimData::check`]). Blocking.
    pub fn with_claim<R>(
        &self,
        engine: &Engine,
        setup_real: Option<&str>,
        f: impl FnOnce(&watch::Claim<'_>) -> R,
    ) -> Result<R, String> {
        let uid = match self.uid.get() {
            Some(u) => *u,
            None => {
                let u = crate::executor::resolve_account(&self.account)
                    .map_err(|e| e.to_string())?
                    .uid;
                *self.uid.get_or_init(|| u)
            }
        };
        let key = self.key.clone();
        let elsewhere = move |pid: i32| engine.reg().key_of_pid(pid).is_some_and(|k| k != key);
        let claim = watch::Claim {
            owner: ownership::Owner {
                uid,
                proc_name: &self.proc_name,
                setup_path: &self.setup_path,
                has_pid_file: !self.pid_path.is_empty(),
            },
            spawns: &self.spawns,
            recorded: &self.recorded,
            setup_real,
            tracked_elsewhere: &elsewhere,
        };
        Ok(f(&claim))
    }

    /// Attach to `pid` under the ownership rule. Blocking; run it on the file-system pool.
    pub fn attach(
        &self,
        engine: &Engine,
        pid: i32,
        want_fd: bool,
    ) -> Result<watch::Attached, String> {
        self.with_claim(engine, None, |c| {
            watch::attach(pid, c, want_fd).map_err(|e| e.to_string())
        })?
    }
}

/// The engine shared by the API, the supervisor loop and the watchers.
pub struct Engine {
    pub config: Config,
    pub host: HostIdentity,
    pub reg: Mutex<Registry>,
    locks: Mutex<HashMap<ProcKey, Arc<tokio::sync::Mutex<()>>>>,
    pub store: Store,
    pub exec: Executor,
    pub reaper: Reaper,
    pub events: EventLog,
    pub tasks: TaskBook,
    /// File-system work on caller-chosen paths, and other blocking work off the runtime.
    pub fs: crate::fspool::FsPool,
    pub ops_sem: Arc<Semaphore>,
    pub detection: Detection,
    pub subreaper: bool,
    pub backoff: Backoff,
    pub started: Instant,
    pub started_unix: i64,
    tx: mpsc::UnboundedSender<SupMsg>,
    /// Metrics hooks (API request counter etc.).
    pub counters: crate::probe::Counters,
}

/// Everything the engine is built from.
pub struct EngineParts {
    pub config: Config,
    pub host: HostIdentity,
    pub store: Store,
    pub loaded: crate::store::Loaded,
    pub reaper: Reaper,
    pub detection: Detection,
    pub subreaper: bool,
}

impl Engine {
    /// Build the engine and its loop receiver.
    pub fn new(parts: EngineParts) -> (Arc<Engine>, mpsc::UnboundedReceiver<SupMsg>) {
        let EngineParts {
            config,
            host,
            store,
            loaded,
            reaper,
            detection,
            subreaper,
        } = parts;
        let (tx, rx) = mpsc::unbounded_channel();
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
                        e.rt.invalid = Some(format!(
                            "the stored definition is invalid and is not acted on: {}; register it again with a valid spec",
                            errs.iter()
                                .map(|e| e.to_string())
                                .collect::<Vec<_>>()
                                .join("; ")
                        ));
                    }
                    let boot = crate::procinfo::boot_id();
                    e.rt.recorded = e
                        .state
                        .instances
                        .iter()
                        .filter(|i| i.boot_id.is_empty() || i.boot_id == boot)
                        .map(|i| (i.pid, i.starttime))
                        .collect();
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
        let engine = Arc::new(Engine {
            config,
            host,
            reg: Mutex::new(reg),
            locks: Mutex::new(HashMap::new()),
            store,
            exec,
            reaper,
            events,
            tasks,
            fs,
            ops_sem: Arc::new(Semaphore::new(ops)),
            detection,
            subreaper,
            backoff,
            started: Instant::now(),
            started_unix: crate::util::unix_now(),
            tx,
            counters: crate::probe::Counters::default(),
        });
        (engine, rx)
    }

    /// Lock the registry.
    pub fn reg(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The operation lock of a process.
    pub fn op_lock(&self, key: &ProcKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        l.entry(key.clone()).or_default().clone()
    }

    /// Ask the loop to re-evaluate a process.
    pub fn reconcile(&self, key: &ProcKey) {
        let _ = self.tx.send(SupMsg::Reconcile(key.clone()));
    }

    fn send(&self, msg: SupMsg) {
        let _ = self.tx.send(msg);
    }

    /// Persist a process's state in the background. The snapshot is queued under the
    /// registry lock, so writes reach the store in the order the state changed (an older
    /// snapshot queued late would overwrite a newer, committed intent).
    pub fn persist_bg(&self, key: &ProcKey) {
        let reg = self.reg();
        if let Some(e) = reg.get(key) {
            self.store.put_state_bg(key, e.state_json());
        }
    }

    /// Persist a process's state and wait for the commit (queued as [`Self::persist_bg`]).
    pub async fn persist(&self, key: &ProcKey) -> Result<(), crate::store::StoreError> {
        let pending = {
            let reg = self.reg();
            match reg.get(key) {
                Some(e) => self.store.put_state_queued(key, e.state_json()),
                None => return Ok(()),
            }
        };
        pending.await
    }

    /// A copy of a process's spec.
    pub fn spec_of(&self, key: &ProcKey) -> Option<ProcSpec> {
        self.reg().get(key).map(|e| e.def.spec.clone())
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
        }
    }

    /// Start tracking an attached process as an instance of `key`: record it, keep its pidfd
    /// and start its exit watcher. Returns false when the key is gone.
    pub fn track(
        self: &Arc<Self>,
        key: &ProcKey,
        att: watch::Attached,
        started_by_agent: bool,
    ) -> bool {
        let pid = att.pid;
        let inst = Instance {
            pid,
            starttime: att.facts.starttime,
            boot_id: crate::procinfo::boot_id().to_string(),
            pgid: att.facts.pgrp,
            sid: att.facts.session,
            since: crate::util::unix_now(),
            started_by_agent,
        };
        let fd = att.fd.map(Arc::new);
        {
            let mut reg = self.reg();
            let Some(e) = reg.get_mut(key) else {
                return false;
            };
            if !e
                .state
                .instances
                .iter()
                .any(|i| i.pid == pid && i.starttime == inst.starttime)
            {
                e.state.instances.retain(|i| i.pid != pid);
                e.state.instances.push(inst.clone());
            }
            e.rt.attached_at.insert(pid, Instant::now());
            if let Some(fd) = &fd {
                e.rt.pidfds.insert(pid, fd.clone());
                let handle = self.spawn_watcher(key.clone(), pid, inst.starttime, fd.clone());
                if let Some(old) = e.rt.watchers.insert(pid, handle) {
                    old.abort();
                }
            }
        }
        self.persist_bg(key);
        true
    }

    fn spawn_watcher(
        self: &Arc<Self>,
        key: ProcKey,
        pid: i32,
        starttime: u64,
        fd: Arc<OwnedFd>,
    ) -> tokio::task::AbortHandle {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            match crate::sys::async_pidfd(fd.clone()) {
                Ok(afd) => {
                    let _ = afd.readable().await;
                }
                Err(e) => {
                    tracing::error!(pid, error = %e, "cannot watch pidfd; polling this process");
                    while watch::alive(pid, starttime) {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            let Some(engine) = weak.upgrade() else { return };
            let exit = watch::collect_exit(pid, Some(&fd), &engine.reaper);
            engine.send(SupMsg::Exited {
                key,
                pid,
                starttime,
                exit,
            });
        })
        .abort_handle()
    }

    /// Forget an instance (after its exit): drop its watcher and pidfd. Returns its uptime.
    pub(crate) fn untrack_locked(e: &mut Entry, pid: i32) -> Option<Duration> {
        e.state.instances.retain(|i| i.pid != pid);
        if let Some(h) = e.rt.watchers.remove(&pid) {
            h.abort();
        }
        e.rt.pidfds.remove(&pid);
        e.rt.attached_at.remove(&pid).map(|t| t.elapsed())
    }

    /// What an ownership check of `key`'s definition needs, copied out of the registry
    /// (`None` when the key is gone or its definition is invalid).
    pub fn claim_data(&self, key: &ProcKey) -> Option<ClaimData> {
        let reg = self.reg();
        let e = reg.get(key)?;
        if e.rt.invalid.is_some() {
            return None;
        }
        Some(ClaimData {
            uid: std::sync::OnceLock::new(),
            key: key.clone(),
            account: e.def.spec.account.clone(),
            proc_name: e.def.spec.proc_name.clone(),
            setup_path: e.def.spec.setup_path.clone(),
            pid_path: e.def.spec.pid_path.clone(),
            spawns: e.rt.spawns.iter().copied().collect(),
            recorded: e.rt.recorded.clone(),
        })
    }

    /// Look for a running process of `key` through its pid file and adopt it when it belongs
    /// to the definition (the ownership rule; used before operations, at start and by the
    /// sweep). The pid file and `/proc` are read on the file-system pool, so a pid file on a
    /// hung mount delays only this process. Returns the number of live instances afterwards,
    /// or why the pid file could not be read in time.
    pub async fn discover(self: &Arc<Self>, key: &ProcKey) -> Result<usize, String> {
        let tracked = self
            .reg()
            .get(key)
            .map(|e| e.state.instances.len())
            .unwrap_or(0);
        let Some(claim) = self.claim_data(key) else {
            return Ok(tracked);
        };
        if tracked > 0 || claim.pid_path.is_empty() {
            return Ok(tracked);
        }
        let engine = self.clone();
        let want_fd = self.detection == Detection::Pidfd;
        let path = std::path::PathBuf::from(&claim.pid_path);
        let job = move || -> Probe {
            let pid = match crate::procinfo::read_pid_file(std::path::Path::new(&claim.pid_path)) {
                Ok(p) => p,
                Err(crate::procinfo::PidFileError::Missing(_)) => return Probe::Nothing,
                Err(e) => return Probe::Refused(e.to_string()),
            };
            let setup_real = std::fs::canonicalize(&claim.setup_path)
                .ok()
                .map(|p| p.display().to_string());
            claim.check(&engine, setup_real.as_deref(), |c| {
                match watch::attach(pid, c, want_fd) {
                    Ok(a) => Probe::Adopt(a),
                    Err(watch::AttachError::Gone(_)) => Probe::Nothing,
                    Err(e) => Probe::Refused(format!(
                        "the pid file {} names pid {pid}, which is not adopted: {e}",
                        claim.pid_path
                    )),
                }
            })
        };
        let probe = self
            .fs
            .run(&path, crate::fspool::PROBE_DEADLINE, job)
            .await
            .map_err(|e| format!("cannot read the pid file: {e}"))?;
        match probe {
            Probe::Adopt(att) => {
                let (pid, origin) = (att.pid, att.origin);
                if !self.track(key, att, false) {
                    return Ok(0);
                }
                {
                    let mut reg = self.reg();
                    if let Some(e) = reg.get_mut(key) {
                        e.rt.last_refusal = None;
                        if e.rt.busy.is_none() {
                            e.rt.phase = Phase::Running;
                        }
                    }
                }
                self.events.emit(
                    Some(key),
                    "adopted",
                    format!(
                        "found running through its pid file (pid {pid}, {})",
                        origin.describe()
                    ),
                    serde_json::json!({"pid": pid}),
                );
                self.refresh_version(key);
                Ok(1)
            }
            Probe::Refused(why) => {
                let new = {
                    let mut reg = self.reg();
                    match reg.get_mut(key) {
                        Some(e) if e.rt.last_refusal.as_deref() != Some(why.as_str()) => {
                            e.rt.last_refusal = Some(why.clone());
                            true
                        }
                        _ => false,
                    }
                };
                if new {
                    self.events
                        .emit(Some(key), "not_adopted", why, serde_json::Value::Null);
                }
                Ok(0)
            }
            Probe::Nothing => Ok(0),
            Probe::Failed(why) => Err(why),
        }
    }

    /// Run `version_cmd` in the background and keep its first output line.
    pub fn refresh_version(self: &Arc<Self>, key: &ProcKey) {
        let Some(spec) = self.spec_of(key) else {
            return;
        };
        let Some(cmd) = spec.command(crate::spec::CommandKind::Version) else {
            return;
        };
        let mut req = self.command_request(key, &spec, "version_cmd", cmd);
        req.timeout = req.timeout.min(Duration::from_secs(30));
        let engine = self.clone();
        let key = key.clone();
        tokio::spawn(async move {
            if let Ok(fin) = engine.exec.run(&req).await
                && fin.success()
            {
                let v = fin
                    .output
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .unwrap_or("")
                    .to_string();
                let v: String = v.chars().take(128).collect();
                if let Some(e) = engine.reg().get_mut(&key) {
                    e.rt.version = v;
                }
            }
        });
    }

    /// Re-adopt every recorded instance after an agent (re)start: the same pid, start time
    /// and boot, and still the definition's process (the ownership rule), is adopted without
    /// restart; otherwise it is gone and supervision will start it. Only `/proc` is read
    /// (on the file-system pool); pid files are read by [`Engine::discover_untracked`]
    /// afterwards, in the background, so a hung pid file delays only its own process.
    pub async fn readopt_all(self: &Arc<Self>) {
        let recorded: Vec<(ProcKey, Vec<Instance>, Option<String>)> = self
            .reg()
            .entries
            .values()
            .map(|e| {
                (
                    e.def.key.clone(),
                    e.state.instances.clone(),
                    e.rt.invalid.clone(),
                )
            })
            .collect();
        let want_fd = self.detection == Detection::Pidfd;
        for (key, insts, invalid) in recorded {
            if let Some(e) = self.reg().get_mut(&key) {
                e.state.instances.clear();
            }
            if let Some(why) = invalid {
                tracing::error!(process = %key, "{why}");
                if let Some(e) = self.reg().get_mut(&key) {
                    e.rt.message = why.clone();
                }
                self.events.emit(
                    Some(&key),
                    "invalid_definition",
                    why,
                    serde_json::Value::Null,
                );
                continue;
            }
            let Some(claim) = self.claim_data(&key) else {
                continue;
            };
            for inst in insts {
                let pid = inst.pid;
                let engine = self.clone();
                let claim = claim.clone();
                let boot = inst.boot_id.clone();
                let r = self
                    .fs
                    .run_unkeyed("re-adoption", Duration::from_secs(5), move || {
                        if !boot.is_empty() && boot != crate::procinfo::boot_id() {
                            return Err("the host rebooted since it was recorded".to_string());
                        }
                        claim.attach(&engine, pid, want_fd)
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                match r {
                    Ok(att) if att.facts.starttime == inst.starttime => {
                        if self.track(&key, att, inst.started_by_agent) {
                            self.events.emit(
                                Some(&key),
                                "adopted",
                                format!("re-adopted pid {} after agent start", inst.pid),
                                serde_json::json!({"pid": inst.pid}),
                            );
                        }
                    }
                    other => {
                        let err = match other {
                            Ok(att) => format!(
                                "pid {} now belongs to another process (start time {} differs from the recorded {})",
                                att.pid, att.facts.starttime, inst.starttime
                            ),
                            Err(e) => e,
                        };
                        let mut reg = self.reg();
                        if let Some(e) = reg.get_mut(&key) {
                            e.state.last_exit = Some(LastExit {
                                pid: inst.pid,
                                at: crate::util::unix_now(),
                                exit: ExitInfo::Unknown,
                                by_operator: false,
                            });
                            if e.def.spec.auto_type == AutoType::SingleRun {
                                e.state.completed = true;
                            }
                        }
                        drop(reg);
                        self.events.emit(
                            Some(&key),
                            "exited",
                            format!("pid {} ended while the agent was down ({err})", inst.pid),
                            serde_json::json!({"pid": inst.pid}),
                        );
                    }
                }
            }
            {
                let mut reg = self.reg();
                if let Some(e) = reg.get_mut(&key) {
                    e.rt.phase = if e.state.instances.is_empty() {
                        if e.state.completed {
                            Phase::Completed
                        } else {
                            Phase::Stopped
                        }
                    } else {
                        Phase::Running
                    };
                    // A long-running adopted process keeps a clean slate.
                    e.rt.failures = 0;
                }
            }
            self.refresh_version(&key);
            self.persist_bg(&key);
        }
    }

    /// Start a background pid-file discovery for every process that has no live instance, is
    /// not held by an operation and has none in flight (at start, and from housekeeping).
    pub fn discover_untracked(self: &Arc<Self>) {
        let keys: Vec<ProcKey> = self.reg().entries.keys().cloned().collect();
        for key in keys {
            self.discover_bg(&key);
        }
    }

    /// [`Engine::discover`] for one process in the background, unless one is in flight or
    /// the process has a live instance, is held by an operation or has no pid file.
    pub fn discover_bg(self: &Arc<Self>, key: &ProcKey) {
        {
            let mut reg = self.reg();
            let Some(e) = reg.get_mut(key) else { return };
            let due = e.state.instances.is_empty()
                && e.rt.busy.is_none()
                && !e.rt.start_pending
                && !e.rt.discovering
                && e.rt.invalid.is_none()
                && !e.def.spec.pid_path.is_empty();
            if !due {
                return;
            }
            e.rt.discovering = true;
        }
        let engine = self.clone();
        let key = key.clone();
        tokio::spawn(async move {
            if let Err(why) = engine.discover(&key).await {
                tracing::debug!(process = %key, "{why}");
            }
            if let Some(e) = engine.reg().get_mut(&key) {
                e.rt.discovering = false;
            }
        });
    }

    /// Handle an instance exit.
    fn on_exit(self: &Arc<Self>, key: ProcKey, pid: i32, starttime: u64, exit: ExitInfo) {
        let now = Instant::now();
        let mut notes: Vec<(&'static str, String, serde_json::Value)> = Vec::new();
        {
            let mut reg = self.reg();
            let Some(e) = reg.get_mut(&key) else { return };
            if !e
                .state
                .instances
                .iter()
                .any(|i| i.pid == pid && i.starttime == starttime)
            {
                return;
            }
            let uptime = Self::untrack_locked(e, pid);
            // While an operation or a supervisor start holds the process, it owns the outcome;
            // only operator operations make the exit "by operator" (not a crash).
            let held = e.rt.busy.is_some();
            let by_operator = e.rt.busy.as_deref().is_some_and(|b| b != ops::SUPERVISE);
            e.state.last_exit = Some(LastExit {
                pid,
                at: crate::util::unix_now(),
                exit,
                by_operator,
            });
            let up = uptime
                .map(|d| format!(" after {:.1}s", d.as_secs_f64()))
                .unwrap_or_default();
            let data = serde_json::json!({"pid": pid, "exit": exit, "uptime_secs": uptime.map(|d| d.as_secs_f64())});
            if e.def.spec.auto_type == AutoType::SingleRun && e.state.instances.is_empty() {
                e.state.completed = true;
            }
            if held {
                // The running operation owns the outcome.
            } else {
                let kind = if e.def.spec.auto_type == AutoType::Periodic {
                    "cycle_finished"
                } else {
                    "exited"
                };
                notes.push((kind, format!("pid {pid} exited ({exit}){up}"), data));
                let alive = e.state.instances.len();
                match e.def.spec.auto_type {
                    AutoType::Resident if e.wants_running() => {
                        e.rt.failures = self.backoff.failures_after_exit(e.rt.failures, uptime);
                        let delay = self
                            .backoff
                            .delay(e.rt.failures, crate::util::random_unit());
                        e.rt.next_attempt = Some(now + delay);
                        e.rt.phase = if alive > 0 {
                            Phase::Running
                        } else {
                            Phase::Backoff
                        };
                        if delay > Duration::ZERO {
                            notes.push((
                                "backoff",
                                format!(
                                    "restart in {:.1}s (failure {} in a row)",
                                    delay.as_secs_f64(),
                                    e.rt.failures
                                ),
                                serde_json::json!({"delay_secs": delay.as_secs_f64(), "failures": e.rt.failures}),
                            ));
                        }
                    }
                    AutoType::SingleRun => {
                        e.rt.phase = if alive > 0 {
                            Phase::Running
                        } else {
                            Phase::Completed
                        };
                    }
                    AutoType::Periodic => {
                        e.rt.phase = if alive > 0 {
                            Phase::Running
                        } else {
                            Phase::Stopped
                        };
                    }
                    _ => {
                        e.rt.phase = if alive > 0 {
                            Phase::Running
                        } else {
                            Phase::Exited
                        };
                        e.rt.message =
                            format!("exited unexpectedly ({exit}); not managed, so not restarted");
                    }
                }
            }
        }
        for (kind, msg, data) in notes {
            self.events.emit(Some(&key), kind, msg, data);
        }
        self.persist_bg(&key);
        self.reconcile_now(&key, now);
    }

    /// Decide for one process and act.
    fn reconcile_now(self: &Arc<Self>, key: &ProcKey, now: Instant) {
        let decision = {
            let reg = self.reg();
            let Some(e) = reg.get(key) else { return };
            policy::decide(&self.view(e), now)
        };
        match decision {
            Decision::Nothing | Decision::WaitUntil(_) => {}
            Decision::SkipCycle => {
                let mut reg = self.reg();
                if let Some(e) = reg.get_mut(key) {
                    e.rt.last_cycle = Some(policy::cycle_start(
                        e.rt.last_cycle,
                        Duration::from_secs(e.def.spec.cycle_time),
                        now,
                    ));
                }
                drop(reg);
                self.events.emit(
                    Some(key),
                    "cycle_skipped",
                    "periodic run skipped: the previous run is still alive",
                    serde_json::Value::Null,
                );
            }
            Decision::Start(n) => {
                {
                    let mut reg = self.reg();
                    let Some(e) = reg.get_mut(key) else { return };
                    e.rt.start_pending = true;
                    if e.def.spec.auto_type == AutoType::Periodic {
                        e.rt.last_cycle = Some(policy::cycle_start(
                            e.rt.last_cycle,
                            Duration::from_secs(e.def.spec.cycle_time),
                            now,
                        ));
                    }
                }
                let engine = self.clone();
                let key = key.clone();
                tokio::spawn(async move { ops::supervise_start(engine, key, n).await });
            }
        }
    }

    fn view(&self, e: &Entry) -> View {
        View {
            wants_running: e.wants_running(),
            auto_type: e.def.spec.auto_type,
            instance_num: e.def.spec.instance_num.max(1),
            alive: e.state.instances.len() as u32,
            busy: e.rt.busy.is_some() || e.rt.start_pending,
            completed: e.state.completed,
            next_attempt: e.rt.next_attempt,
            cycle_time: Duration::from_secs(e.def.spec.cycle_time.max(1)),
            last_cycle: e.rt.last_cycle,
        }
    }

    /// The earliest time some process needs attention.
    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let reg = self.reg();
        reg.entries
            .values()
            .filter_map(|e| match policy::decide(&self.view(e), now) {
                Decision::WaitUntil(t) => Some(t),
                Decision::Start(_) | Decision::SkipCycle => Some(now),
                Decision::Nothing => None,
            })
            .min()
    }

    /// Housekeeping each sweep: adopt processes started outside the agent, reset failure
    /// counts of processes that stayed up, reconcile everything.
    fn housekeeping(self: &Arc<Self>, tick: u64) {
        let keys: Vec<ProcKey> = self.reg().entries.keys().cloned().collect();
        let reset = self.backoff.reset_after;
        for key in &keys {
            let mut reg = self.reg();
            let Some(e) = reg.get_mut(key) else { continue };
            if e.rt.failures > 0
                && e.rt.busy.is_none()
                && !e.state.instances.is_empty()
                && e.rt.attached_at.values().all(|t| t.elapsed() >= reset)
            {
                e.rt.failures = 0;
                e.rt.next_attempt = None;
            }
        }
        self.discover_untracked();
        if self.detection == Detection::Poll {
            self.poll_exits();
        }
        self.schedule_health_checks();
        let now = Instant::now();
        for key in &keys {
            self.reconcile_now(key, now);
        }
        if tick.is_multiple_of(3600) {
            let st = &self.config.store;
            let before = crate::util::unix_millis() - st.task_retention.as_millis() as i64;
            self.store.prune(before, st.max_tasks, st.max_events);
        }
    }

    /// Start the health checks that are due (`health_cmd` of running, idle processes).
    fn schedule_health_checks(self: &Arc<Self>) {
        let interval = self.config.supervisor.health_interval;
        let now = Instant::now();
        let due: Vec<ProcKey> = {
            let mut reg = self.reg();
            reg.entries
                .values_mut()
                .filter(|e| {
                    policy::health_due(
                        !e.def.spec.health_cmd.trim().is_empty() && e.rt.invalid.is_none(),
                        !e.state.instances.is_empty(),
                        e.rt.busy.is_some() || e.rt.health_running,
                        e.rt.last_health,
                        interval,
                        now,
                    )
                })
                .map(|e| {
                    e.rt.health_running = true;
                    e.rt.last_health = Some(now);
                    e.def.key.clone()
                })
                .collect()
        };
        for key in due {
            tokio::spawn(ops::health_check(self.clone(), key));
        }
    }

    /// Poll mode: detect exits by reading /proc.
    fn poll_exits(self: &Arc<Self>) {
        let tracked: Vec<(ProcKey, i32, u64)> = self
            .reg()
            .entries
            .values()
            .flat_map(|e| {
                e.state
                    .instances
                    .iter()
                    .map(|i| (e.def.key.clone(), i.pid, i.starttime))
            })
            .collect();
        let mut any_gone = false;
        for (key, pid, starttime) in tracked {
            if !watch::alive(pid, starttime) {
                if !any_gone {
                    self.reaper.sweep();
                    any_gone = true;
                }
                let exit = watch::collect_exit(pid, None, &self.reaper);
                self.on_exit(key, pid, starttime, exit);
            }
        }
    }

    /// The supervisor loop: exits, reconcile requests, deadlines and housekeeping, until
    /// shutdown.
    pub async fn run_loop(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<SupMsg>,
        mut shutdown: tokio_watch::Receiver<bool>,
    ) {
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
            let now = Instant::now();
            let deadline = self.next_deadline(now).map(tokio::time::Instant::from_std);
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(SupMsg::Exited { key, pid, starttime, exit }) => self.on_exit(key, pid, starttime, exit),
                    Some(SupMsg::Reconcile(key)) => self.reconcile_now(&key, Instant::now()),
                    None => break,
                },
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d.max(tokio::time::Instant::now() + Duration::from_millis(1))).await,
                        None => std::future::pending::<()>().await,
                    }
                } => {
                    let now = Instant::now();
                    let keys: Vec<ProcKey> = self.reg().entries.keys().cloned().collect();
                    for k in keys { self.reconcile_now(&k, now); }
                }
                _ = tick.tick() => {
                    ticks += 1;
                    self.housekeeping(ticks);
                    crate::daemon::watchdog_ping();
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // Views

    /// GSE ProcInfo of a registered process (or the "unregistered" entry).
    pub fn proc_info(
        &self,
        key: &ProcKey,
        labels_in: &crate::spec::Labels,
        host: serde_json::Value,
        agent_id: Option<String>,
    ) -> ProcInfo {
        let now = crate::util::unix_now();
        let reg = self.reg();
        match reg.get(key) {
            None => ProcInfo {
                meta: crate::proto::Meta {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    labels: labels_in.clone(),
                },
                host,
                bk_agent_id: agent_id,
                flag: 0,
                status: 0,
                isauto: false,
                message: "not registered".into(),
                pid: -1,
                version: String::new(),
                register_time: 0,
                last_start_time: 0,
                report_time: now,
                cpu_usage: 0.0,
                mem_usage: 0.0,
                fd: 0,
                disk: 0,
                net: 0,
            },
            Some(e) => {
                let s = e.current_sample().cloned().unwrap_or_default();
                ProcInfo {
                    meta: crate::proto::Meta {
                        namespace: key.namespace.clone(),
                        name: key.name.clone(),
                        labels: e.def.labels.clone(),
                    },
                    host,
                    bk_agent_id: agent_id,
                    flag: e.flag(),
                    status: e.status(),
                    isauto: e.state.managed,
                    message: self.message_of(e),
                    pid: e.main_pid() as i64,
                    version: e.rt.version.clone(),
                    register_time: e.def.register_time,
                    last_start_time: e.state.last_start_time,
                    report_time: if s.at > 0 { s.at } else { now },
                    cpu_usage: s.cpu_usage,
                    mem_usage: s.mem_usage,
                    fd: s.fd,
                    disk: s.disk,
                    net: s.net,
                }
            }
        }
    }

    fn message_of(&self, e: &Entry) -> String {
        if !e.rt.message.is_empty() {
            return e.rt.message.clone();
        }
        match e.rt.phase {
            Phase::Backoff => format!("restarting (failure {} in a row)", e.rt.failures),
            p => p.name().to_string(),
        }
    }

    /// The agent's detailed view of one entry.
    pub fn detail(&self, e: &Entry) -> ProcDetail {
        let s = e.current_sample().cloned().unwrap_or_default();
        let now = Instant::now();
        ProcDetail {
            namespace: e.def.key.namespace.clone(),
            name: e.def.key.name.clone(),
            labels: e.def.labels.clone(),
            source: match &e.def.source {
                crate::spec::Source::Api => "api".into(),
                crate::spec::Source::Config { file } => format!("config:{file}"),
            },
            auto_type: e.def.spec.auto_type.code(),
            flag: e.flag(),
            status: e.status(),
            managed: e.state.managed,
            state: e.rt.phase.name().to_string(),
            pids: e.state.instances.iter().map(|i| i.pid as i64).collect(),
            instance_num: e.def.spec.instance_num,
            restarts: e.state.restarts,
            consecutive_failures: e.rt.failures,
            next_restart_in: e
                .rt
                .next_attempt
                .filter(|t| *t > now && e.wants_running() && e.state.instances.is_empty())
                .map(|t| t.duration_since(now).as_secs_f64()),
            last_exit: e.state.last_exit.as_ref().map(|x| {
                format!(
                    "pid {} {}{}",
                    x.pid,
                    x.exit,
                    if x.by_operator {
                        " (by an operation)"
                    } else {
                        ""
                    }
                )
            }),
            last_exit_time: e.state.last_exit.as_ref().map(|x| x.at).unwrap_or(0),
            message: self.message_of(e),
            version: e.rt.version.clone(),
            register_time: e.def.register_time,
            last_start_time: e.state.last_start_time,
            uptime_secs: e.state.instances.first().map(|i| {
                // From the kernel's start time, so an adopted process shows its real age.
                let now_ticks = crate::procinfo::now_ticks_floor() + 1;
                (now_ticks.saturating_sub(i.starttime) / crate::procinfo::ticks_per_second()) as i64
            }),
            cpu_usage: s.cpu_usage,
            mem_usage: s.mem_usage,
            rss_bytes: s.rss_bytes,
            fd: s.fd,
            disk: s.disk,
            net: s.net,
            sampled_at: s.at,
            limit_stops: e.state.limit_stops,
            last_limit: e
                .state
                .last_limit
                .as_ref()
                .map(|l| format!("{}: {}", l.at, l.cause)),
            health: e.rt.health.clone(),
            busy: e.rt.busy.clone(),
            spec: e.def.spec.clone(),
        }
    }

    /// Whether the expected state is "running" and the process is managed.
    pub fn set_intent_locked(e: &mut Entry, flag: i64, managed: bool) {
        e.state.flag = flag;
        e.state.managed = managed;
        if flag == FLAG_RUNNING && managed {
            e.rt.message.clear();
        }
    }
}
