//! The lifecycle of a managed process, as a pure state machine.
//!
//! Every transition the agent makes goes through [`Instance::step`] (one process instance;
//! `instance_num` > 1 means several) or [`Process::step`] (the process as the operator sees
//! it: its durable intent, and its operations taken one at a time and fanned out to its
//! instances). Both are pure, `(state, input, now, rng) -> (new state, effects)`: nothing here
//! does I/O or reads a clock, so every rule is table-tested. The supervisor feeds the inputs
//! (exits, the results of the effects it ran, operator operations, deadlines) and runs the
//! effects (commands, signals, store writes, events, answers).
//!
//! # Instance states ([`State`])
//! `Stopped`; `Exited` (died while not managed); `Completed` (a single run that ended);
//! `Backoff` (managed and dead: the next attempt at a deadline); `Waiting` (a periodic job
//! between runs); `Fatal` (given up after `max_restarts` failures in a row); `Retrying`
//! (between the attempts of an operator start); `Starting` (the start or restart command runs
//! and its process is looked for); `Checking` (found: it must stay alive through the start
//! check window); `Running`; `Stopping` (stop command, then SIGTERM, then SIGKILL, each with a
//! deadline); `Reloading` (reload_cmd runs while the process keeps running).
//!
//! A state being worked through carries its [`Hold`]: an operator operation, a supervisor
//! start, a job run, a liveness or a limit stop. The hold owns the outcome (an exit during an
//! operator stop is not a crash) and, for an operation, the answer. While an instance is held,
//! further operations wait in the process's queue.
//!
//! # Inputs ([`Input`], [`ProcInput`])
//! An operator operation; the start's process found, or the start failed; an exit (code,
//! signal, OOM kill); a stop, kill or reload command finished; nothing of the process tree is
//! left; a deadline passed; discovery found the process running; the definition changed or
//! was unregistered; a limit breach; failed health checks; the cgroup emptied; the intent
//! commit's result; the agent shuts down.
//!
//! # Effects ([`Effect`], [`ProcEffect`])
//! Start (run the start or restart command and find its process), run the stop, kill or reload
//! command, signal the tree, watch until the tree is gone, persist, emit an event, set a
//! timer, forget the pid, count a limit stop, commit the intent, answer an operation.
//!
//! # What happens when a managed process dies
//! [`Instance::on_death`], the one place: a resident process that is managed is restarted at
//! once after a healthy run (it passed its start check), after a backoff delay otherwise (the
//! rules are [`super::policy`]'s); after `max_restarts` failures in a row it is given up; a
//! single run completes; a periodic job waits for its next cycle; an unmanaged process is left
//! exited. The stops the agent causes itself (liveness, limits) are failures: they back off
//! too.

mod instance;
mod process;

use std::time::{Duration, Instant};

pub use super::policy::Backoff;
use crate::spec::AutoType;
use crate::sys::ExitInfo;
pub use process::{Current, Intent, MAX_QUEUED, ProcEffect, ProcInput, Process, Queued, Stage};

/// The id of an operator operation (unique while the agent runs).
pub type OpId = u64;

/// What an operator asks of a process (GSE op types 0, 1, 9, 3, 4, 7, 8; and a config
/// reload's replacement).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Start,
    Stop,
    Kill,
    Manage,
    Unmanage,
    Restart,
    Reload,
    /// Stop and start again with a replaced definition (a config reload), keeping the
    /// process's managed state.
    Replace,
}

impl Op {
    pub const ALL: [Op; 8] = [
        Op::Start,
        Op::Stop,
        Op::Kill,
        Op::Manage,
        Op::Unmanage,
        Op::Restart,
        Op::Reload,
        Op::Replace,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Kill => "kill",
            Op::Manage => "manage",
            Op::Unmanage => "unmanage",
            Op::Restart => "restart",
            Op::Reload => "reload",
            Op::Replace => "replace",
        }
    }
}

/// Who owns the outcome of a state that is being worked through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// An operator's operation: it gets the answer, and exits are its doing.
    Op(OpId, Op),
    /// The supervisor keeps the process running (`after_death`: this start is a restart).
    Supervise { after_death: bool },
    /// A periodic cycle or a single run: the command itself is the job, no start check.
    Job,
    /// Stopped for failing its health checks, restarted under backoff afterwards.
    Liveness,
    /// Stopped for staying over its resource limits.
    Limit,
}

impl Hold {
    /// The operator operation, if the hold is one.
    pub fn op(self) -> Option<(OpId, Op)> {
        match self {
            Hold::Op(id, op) => Some((id, op)),
            _ => None,
        }
    }

    /// Whether exits while held are an operator's doing.
    pub fn by_operator(self) -> bool {
        matches!(self, Hold::Op(..))
    }

    /// A short name (`busy` in status).
    pub fn name(self) -> &'static str {
        match self {
            Hold::Op(_, op) => op.name(),
            Hold::Supervise { .. } => "supervise",
            Hold::Job => "job",
            Hold::Liveness => "health",
            Hold::Limit => "limit",
        }
    }
}

/// Which command a start runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartCmd {
    Start,
    Restart,
}

/// The steps of a stop, each with a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopStep {
    /// stop_cmd (or kill_cmd) runs; the tree must be gone by the deadline.
    Command,
    /// SIGTERM was sent to the tree.
    Term,
    /// SIGKILL was sent to the tree.
    Kill,
}

/// The state of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Stopped,
    /// Died while not managed: not restarted.
    Exited,
    /// A single-run process that ran to its end.
    Completed,
    /// Managed and dead: the next start attempt is at `until`.
    Backoff {
        until: Instant,
    },
    /// A periodic job between runs: the next run is at `until`.
    Waiting {
        until: Instant,
    },
    /// Managed, but given up after `max_restarts` failures in a row.
    Fatal,
    /// Between two attempts of an operator start (`start_retries`, `start_interval`).
    Retrying {
        hold: Hold,
        until: Instant,
    },
    /// The start (or restart) command runs; its process is being looked for. `prev` is the
    /// pid that ran before a restart (its exit belongs to the restart).
    Starting {
        hold: Hold,
        cmd: StartCmd,
        prev: Option<i32>,
    },
    /// Found: the start check runs (the supervisor reports its verdict); `exited` once the
    /// process died meanwhile. `until` is a safety deadline, past the window and op_timeout.
    Checking {
        hold: Hold,
        pid: i32,
        until: Instant,
        exited: Option<Exit>,
    },
    /// Running since `since`; `healthy` once it passed its start check (or was adopted).
    Running {
        pid: i32,
        healthy: bool,
        since: Instant,
    },
    /// Being stopped; `pid` is the main process while it lives.
    Stopping {
        hold: Hold,
        step: StopStep,
        until: Instant,
        pid: Option<i32>,
    },
    /// reload_cmd runs; `pid` is the process while it lives.
    Reloading {
        hold: Hold,
        pid: Option<i32>,
    },
}

impl State {
    /// The name operators see (status `state`).
    pub fn name(&self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Exited => "exited",
            State::Completed => "completed",
            State::Backoff { .. } => "backoff",
            State::Waiting { .. } => "waiting",
            State::Fatal => "fatal",
            State::Retrying { .. } | State::Starting { .. } | State::Checking { .. } => "starting",
            State::Running { .. } => "running",
            State::Stopping { .. } => "stopping",
            State::Reloading { .. } => "reloading",
        }
    }

    /// Who holds it, if anyone.
    pub fn hold(&self) -> Option<Hold> {
        match *self {
            State::Retrying { hold, .. }
            | State::Starting { hold, .. }
            | State::Checking { hold, .. }
            | State::Stopping { hold, .. }
            | State::Reloading { hold, .. } => Some(hold),
            _ => None,
        }
    }

    /// The pid the agent tracks for the instance, if any.
    pub fn pid(&self) -> Option<i32> {
        match *self {
            State::Checking {
                pid, exited: None, ..
            }
            | State::Running { pid, .. } => Some(pid),
            State::Stopping { pid, .. } | State::Reloading { pid, .. } => pid,
            State::Starting { prev, .. } => prev,
            _ => None,
        }
    }

    /// Not running, nothing in progress.
    pub fn is_idle(&self) -> bool {
        matches!(
            self,
            State::Stopped
                | State::Exited
                | State::Completed
                | State::Backoff { .. }
                | State::Waiting { .. }
                | State::Fatal
        )
    }
}

/// How a process ended, as far as the agent knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub info: ExitInfo,
    /// The kernel's OOM killer ended it (cgroup memory.events, with containment).
    pub oom: bool,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.oom {
            write!(f, "{} (killed by the OOM killer)", self.info)
        } else {
            write!(f, "{}", self.info)
        }
    }
}

/// Why a start produced no process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFailure {
    /// The start check failed (nothing found, or it exited within the window).
    Check(String),
    /// The command failed or timed out; the message carries its output.
    Command(String),
}

impl StartFailure {
    pub fn message(&self) -> &str {
        match self {
            StartFailure::Check(m) | StartFailure::Command(m) => m,
        }
    }
}

/// The answer of an operation, typed (the API maps it to GSE codes, in one place).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done; the note says how (the step that ended a stop, ...).
    Done(String),
    /// start: the right process already runs.
    AlreadyRunning(Vec<i32>),
    /// stop, kill: nothing runs.
    NotRunning,
    /// The start check failed.
    StartCheckFailed(String),
    /// The stop could not be verified.
    StopFailed(String),
    /// A command failed, or could not be run.
    CommandFailed(String),
    /// The definition lacks the command the operation needs (the spec field).
    MissingCommand(&'static str),
    /// The definition cannot be acted on.
    Invalid(String),
    /// The state store refused the intent.
    Unavailable(String),
    /// The process is not registered.
    NotRegistered,
    /// Too many operations are queued for the process.
    Busy(String),
    /// The caller may not act on the process as it is now.
    Forbidden(String),
}

impl Outcome {
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Done(_))
    }
}

/// What a step needs to know about the process: its definition and its durable intent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ctx {
    pub auto_type: AutoType,
    /// Kept alive by the agent (托管).
    pub managed: bool,
    /// The expected state is "running" (GSE flag 1).
    pub expect_running: bool,
    pub backoff: Backoff,
    /// The start check window, seconds after the start command: (begin, end).
    pub check: (u64, u64),
    pub op_timeout: Duration,
    /// How long a stop command has to end the tree before SIGTERM.
    pub stop_grace: Duration,
    /// How long a kill command has before SIGKILL.
    pub kill_grace: Duration,
    /// A periodic job's cycle.
    pub cycle: Duration,
    pub start_retries: u32,
    pub start_interval: Duration,
    /// Failures in a row after which a managed process is given up (`None`: never).
    pub max_restarts: Option<u32>,
    pub has_start_cmd: bool,
    pub has_stop_cmd: bool,
    pub has_kill_cmd: bool,
    pub has_restart_cmd: bool,
    pub has_reload_cmd: bool,
}

impl Ctx {
    /// Should supervision keep it running?
    pub fn wants_running(&self) -> bool {
        self.managed && self.expect_running
    }
}

/// What happens to one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// An operator operation (sent only to an instance nothing holds).
    Op { id: OpId, op: Op },
    /// The start's process was found and is tracked; its start check runs.
    Found { pid: i32 },
    /// The start check passed: it stayed alive through the window.
    CheckPassed,
    /// The start produced no process.
    StartFailed(StartFailure),
    /// The instance's process exited.
    Exited { pid: i32, exit: Exit },
    /// A stop, kill or reload command finished (`Err`: why it failed).
    CommandDone(Result<(), String>),
    /// Nothing of the instance's process tree is left.
    Gone,
    /// A deadline of the current state ([`Instance::deadline`]) passed, or the supervisor
    /// asks the instance to reconsider (its intent changed, the agent started).
    Timer,
    /// Discovery found the process running (pid file and ownership rule, re-adoption).
    Adopted { pid: i32 },
    /// The process recorded for the instance is gone (it ended while the agent was down).
    Lost,
    /// The definition was replaced.
    DefinitionChanged,
    /// The definition was unregistered: forget the process, leave it running.
    Unregistered,
    /// The sampler found it over its limits for long enough.
    LimitBreach { cause: String },
    /// Its health check failed as many times in a row as allowed.
    HealthFailed { why: String },
    /// Its cgroup emptied (containment): nothing of it is left.
    CgroupEmptied,
    /// The agent shuts down: processes keep running, nothing new starts.
    Shutdown,
}

/// What the supervisor must do for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Run the start (or restart) command and find its process: answers `Found`,
    /// `StartFailed`, or `Adopted` when the definition's process already runs (a supervisor
    /// start never starts a duplicate). `job`: the command itself is the process.
    Start { cmd: StartCmd, job: bool },
    /// Run the stop (`kill` false) or kill command: answers `CommandDone`.
    RunStop { kill: bool },
    /// Run reload_cmd: answers `CommandDone`.
    RunReload,
    /// Signal the instance's process tree (pidfds, the ownership rule).
    Signal { kill: bool },
    /// Watch until nothing of the tree is left: answers `Gone`.
    WatchGone,
    /// Record the instance's facts in the store, in the background.
    Persist,
    /// An event for the history, with its data.
    Emit {
        kind: &'static str,
        message: String,
        data: serde_json::Value,
    },
    /// The answer of an operation on this instance (collected by the process).
    Answer { id: OpId, outcome: Outcome },
    /// Stop watching the pid: it is gone, or no longer the agent's.
    Untrack { pid: i32 },
    /// Wake the instance with `Timer` at this time.
    Timer(Instant),
    /// A stop for exceeding a limit finished: count it, with its cause.
    LimitStopped { cause: String },
}

/// How long SIGKILL has to end the tree before a stop is declared failed.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// One process instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub state: State,
    /// Consecutive failures: failed starts, early deaths, liveness and limit stops.
    pub failures: u32,
    /// Restarts by the supervisor after a death.
    pub restarts: u64,
    /// Attempts of the current operator start.
    pub tries: u32,
    /// When the current periodic cycle began.
    pub last_cycle: Option<Instant>,
    /// Why it is in its state, when the state does not say it (empty otherwise).
    pub message: String,
    /// The cause of a limit stop in progress.
    pub limit_cause: Option<String>,
    /// The delay before the latest restart attempt, or before the scheduled one while in
    /// backoff: zero after a healthy run.
    pub delay: Duration,
}

impl Default for Instance {
    fn default() -> Self {
        Instance::new(State::Stopped)
    }
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod scenarios;
#[cfg(test)]
mod table;
#[cfg(test)]
mod testutil;
