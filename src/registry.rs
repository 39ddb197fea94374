//! The in-memory registry: every definition with its durable state and its runtime state.
//!
//! [`ProcState`] is what survives an agent restart (stored as JSON in SQLite): the expected
//! state (GSE `flag`), whether the process is managed (托管), the identity of each running
//! instance, restart count and last exit. [`Runtime`] is rebuilt at start: phase, backoff,
//! watcher handles, latest sample, busy marker.
//!
//! Entries are kept in a `BTreeMap` so listings are deterministic (namespace, then name).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::spec::{Definition, ProcKey};
use crate::sys::ExitInfo;

/// GSE flag / status values.
pub const FLAG_UNREGISTERED: i64 = 0;
pub const FLAG_RUNNING: i64 = 1;
pub const FLAG_STOPPED: i64 = 2;

/// A running instance, identified by pid + start time + boot id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub pid: i32,
    /// `/proc/PID/stat` start time, clock ticks since boot.
    pub starttime: u64,
    pub boot_id: String,
    /// Process group at attach time (for whole-tree stops).
    pub pgid: i32,
    /// Session at attach time.
    #[serde(default)]
    pub sid: i32,
    /// Unix seconds when the agent attached (started or adopted) it.
    pub since: i64,
    /// Whether the agent spawned it in this incarnation (not persisted meaningfully; an
    /// adopted process after a restart is not our child).
    #[serde(default)]
    pub started_by_agent: bool,
}

/// The last exit of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    pub pid: i32,
    pub at: i64,
    pub exit: ExitInfo,
    /// Whether an operator operation (stop/kill/restart) caused it.
    pub by_operator: bool,
}

/// Durable per-process state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcState {
    /// Expected state: 0 unset, 1 running, 2 stopped.
    pub flag: i64,
    /// Kept alive by the agent.
    pub managed: bool,
    pub instances: Vec<Instance>,
    pub last_start_time: i64,
    pub restarts: u64,
    pub last_exit: Option<LastExit>,
    /// A single-run process that already ran to completion under supervision.
    #[serde(default)]
    pub completed: bool,
    /// Times the agent stopped it for staying over `cpu_lmt` / `mem_lmt`.
    #[serde(default)]
    pub limit_stops: u64,
    /// The latest of those stops.
    #[serde(default)]
    pub last_limit: Option<LimitStop>,
}

/// A stop for exceeding a resource limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitStop {
    /// Unix seconds.
    pub at: i64,
    /// Which limit, the figures and for how many samples.
    pub cause: String,
}

impl Default for ProcState {
    fn default() -> Self {
        ProcState {
            flag: FLAG_UNREGISTERED,
            managed: false,
            instances: Vec::new(),
            last_start_time: 0,
            restarts: 0,
            last_exit: None,
            completed: false,
            limit_stops: 0,
            last_limit: None,
        }
    }
}

/// Finer-grained state for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Stopped,
    Starting,
    Running,
    Stopping,
    /// Dead and managed: waiting for the next restart attempt.
    Backoff,
    /// Dead and not managed (crashed or finished while unmanaged).
    Exited,
    /// A single-run process that finished.
    Completed,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Stopped => "stopped",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Backoff => "backoff",
            Phase::Exited => "exited",
            Phase::Completed => "completed",
        }
    }
}

/// Latest resource sample of a process (filled by the probe).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub at: i64,
    pub cpu_usage: f64,
    pub mem_usage: f64,
    pub rss_bytes: u64,
    pub fd: i64,
    pub disk: i64,
    pub net: i64,
}

/// Runtime-only state.
#[derive(Debug)]
pub struct Runtime {
    pub phase: Phase,
    /// Name of the operation holding the process, if any.
    pub busy: Option<String>,
    /// A supervisor start is scheduled or running.
    pub start_pending: bool,
    /// Consecutive failed starts / early deaths.
    pub failures: u32,
    /// When the next restart attempt may happen.
    pub next_attempt: Option<Instant>,
    /// Monotonic time each instance was attached, by pid.
    pub attached_at: HashMap<i32, Instant>,
    /// Watcher tasks, by pid.
    pub watchers: HashMap<i32, tokio::task::AbortHandle>,
    /// pidfds we hold, by pid (signal only through them).
    pub pidfds: HashMap<i32, std::sync::Arc<std::os::fd::OwnedFd>>,
    pub message: String,
    pub version: String,
    /// Start of the current periodic cycle.
    pub last_cycle: Option<Instant>,
    pub sample: Option<Sample>,
    /// Consecutive samples over a limit.
    pub over_limit: u32,
    /// Consecutive failed health checks and the last result.
    pub health_failures: u32,
    pub health: Option<String>,
    pub last_health: Option<Instant>,
    /// A health check is running now.
    pub health_running: bool,
    /// Commands the agent ran for this process in this incarnation (start, restart, reload),
    /// newest first, at most [`MAX_SPAWNS`]: the origin evidence of the ownership rule.
    pub spawns: std::collections::VecDeque<crate::supervisor::ownership::Spawn>,
    /// The identities (pid, start time) recorded for it before this agent started, of this
    /// boot: origin evidence for re-adoption.
    pub recorded: Vec<(i32, u64)>,
    /// Why the stored definition cannot be acted on (it fails today's validation, e.g. an
    /// empty program name): reported, never started, adopted or signalled.
    pub invalid: Option<String>,
    /// A background pid-file discovery is in flight.
    pub discovering: bool,
    /// The last reason a process named by the pid file was not adopted (reported once).
    pub last_refusal: Option<String>,
}

/// How many spawn records a process keeps.
pub const MAX_SPAWNS: usize = 8;

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            phase: Phase::Stopped,
            busy: None,
            start_pending: false,
            failures: 0,
            next_attempt: None,
            attached_at: HashMap::new(),
            watchers: HashMap::new(),
            pidfds: HashMap::new(),
            message: String::new(),
            version: String::new(),
            last_cycle: None,
            sample: None,
            over_limit: 0,
            health_failures: 0,
            health: None,
            last_health: None,
            health_running: false,
            spawns: std::collections::VecDeque::new(),
            recorded: Vec::new(),
            invalid: None,
            discovering: false,
            last_refusal: None,
        }
    }
}

/// One registry entry.
#[derive(Debug)]
pub struct Entry {
    pub def: Definition,
    pub state: ProcState,
    pub rt: Runtime,
}

impl Entry {
    pub fn new(def: Definition, state: ProcState) -> Entry {
        Entry {
            def,
            state,
            rt: Runtime::default(),
        }
    }

    /// GSE status: 1 running when at least one instance is alive, else 2.
    pub fn status(&self) -> i64 {
        if self.state.instances.is_empty() {
            FLAG_STOPPED
        } else {
            FLAG_RUNNING
        }
    }

    /// GSE flag as reported: the expected state, 2 when never set.
    pub fn flag(&self) -> i64 {
        match self.state.flag {
            FLAG_RUNNING => FLAG_RUNNING,
            _ => FLAG_STOPPED,
        }
    }

    /// The main pid (first instance), -1 when none.
    pub fn main_pid(&self) -> i32 {
        self.state.instances.first().map(|i| i.pid).unwrap_or(-1)
    }

    /// The latest resource sample, only while something runs (a process that just stopped
    /// must not show the figures of its last sample).
    pub fn current_sample(&self) -> Option<&Sample> {
        if self.state.instances.is_empty() {
            None
        } else {
            self.rt.sample.as_ref()
        }
    }

    /// Should supervision keep it running?
    pub fn wants_running(&self) -> bool {
        self.state.managed && self.state.flag == FLAG_RUNNING && self.rt.invalid.is_none()
    }

    /// Remember a command the agent ran for this process (ownership evidence).
    pub fn note_spawn(&mut self, spawn: crate::supervisor::ownership::Spawn) {
        self.rt.spawns.push_front(spawn);
        self.rt.spawns.truncate(MAX_SPAWNS);
    }

    pub fn state_json(&self) -> String {
        serde_json::to_string(&self.state).unwrap_or_else(|_| "{}".into())
    }
}

/// All entries.
#[derive(Debug, Default)]
pub struct Registry {
    pub entries: BTreeMap<ProcKey, Entry>,
}

impl Registry {
    pub fn get(&self, key: &ProcKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    pub fn get_mut(&mut self, key: &ProcKey) -> Option<&mut Entry> {
        self.entries.get_mut(key)
    }

    /// The key of the definition whose identity is `setup_path` + `proc_name` (+ `value_key`),
    /// for operate_process v2 (a definition is never duplicated across key schemes).
    pub fn find_by_identity(
        &self,
        setup_path: &str,
        proc_name: &str,
        value_key: &str,
    ) -> Option<ProcKey> {
        self.entries
            .values()
            .find(|e| {
                if value_key.is_empty() {
                    e.def.spec.value_key.is_empty()
                        && e.def.spec.setup_path == setup_path
                        && e.def.spec.proc_name == proc_name
                } else {
                    e.def.spec.value_key == value_key
                }
            })
            .map(|e| e.def.key.clone())
    }

    /// Which entry tracks this pid?
    pub fn key_of_pid(&self, pid: i32) -> Option<ProcKey> {
        self.entries
            .values()
            .find(|e| e.state.instances.iter().any(|i| i.pid == pid))
            .map(|e| e.def.key.clone())
    }
}
