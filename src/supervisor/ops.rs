//! Operations on one process: start, stop, status, manage, unmanage, restart, reload, kill,
//! and the supervisor's own restarts. Each runs under the process's operation lock.
//!
//! Outcomes use GSE's per-key codes: 0 success, 828 already running (start), 829 not running
//! (stop/kill), 836 post-check failed (not running after start; still running after stop —
//! the message then starts with "stop"), 65535 a command failed (message = its output),
//! 830 the spec lacks the command the operation needs, 851 not registered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::defs::{self, PutMode, Writer};
use super::ownership::{Origin, Spawn};
use super::policy;
use super::watch;
use super::{ClaimData, Detection, Engine};
use crate::proto::{KeyResult, OpType, codes};
use crate::registry::{FLAG_RUNNING, FLAG_STOPPED, Instance, Phase};
use crate::spec::{AutoType, CommandKind, Labels, ProcKey, ProcSpec};
use crate::sys::ExitInfo;

/// A failed operation step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpFail {
    pub code: i64,
    pub msg: String,
}

impl OpFail {
    fn new(code: i64, msg: impl Into<String>) -> OpFail {
        OpFail {
            code,
            msg: msg.into(),
        }
    }
}

impl From<OpFail> for KeyResult {
    fn from(f: OpFail) -> KeyResult {
        KeyResult::err(f.code, f.msg)
    }
}

/// Marks the entry busy for the life of an operation; clears it and asks for a reconcile
/// when dropped.
struct Busy<'a> {
    engine: &'a Arc<Engine>,
    key: ProcKey,
}

impl<'a> Busy<'a> {
    fn set(engine: &'a Arc<Engine>, key: &ProcKey, what: &str) -> Busy<'a> {
        if let Some(e) = engine.reg().get_mut(key) {
            e.rt.busy = Some(what.to_string());
        }
        Busy {
            engine,
            key: key.clone(),
        }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.engine.reg().get_mut(&self.key) {
            e.rt.busy = None;
            if e.rt.phase == Phase::Starting || e.rt.phase == Phase::Stopping {
                e.rt.phase = if e.state.instances.is_empty() {
                    Phase::Stopped
                } else {
                    Phase::Running
                };
            }
        }
        self.engine.reconcile(&self.key);
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The `busy` marker of a supervisor start (exits during it are not operator actions).
pub const SUPERVISE: &str = "supervise";

/// Why a start is happening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// An operator's start/restart: full start check.
    Operator,
    /// Keeping a resident process running: full start check.
    Supervisor,
    /// A periodic cycle or a single run under supervision: the command itself is the job,
    /// tracked from the moment it starts; no start check (a job may legitimately finish fast).
    Job,
}

/// Run one operation on a registered process (the caller holds no lock).
pub async fn run_op(engine: Arc<Engine>, key: ProcKey, op: OpType) -> KeyResult {
    let _permit = engine.ops_sem.clone().acquire_owned().await;
    let lock = engine.op_lock(&key);
    let _guard = lock.lock().await;
    op_locked(&engine, &key, op).await
}

/// Run an operation a caller asked for, with the definition it sent inline, under the
/// process's operation lock: the inline definition is written first (never for a status
/// query, which writes nothing and runs nothing), then the caller's account rule is checked
/// again against the definition the operation acts on (it may have been replaced since the
/// request was accepted), then the operation runs.
pub async fn run_requested(
    engine: Arc<Engine>,
    key: ProcKey,
    op: OpType,
    inline: Option<(ProcSpec, Labels)>,
    w: &Writer,
) -> KeyResult {
    let _permit = engine.ops_sem.clone().acquire_owned().await;
    let lock = engine.op_lock(&key);
    let _guard = lock.lock().await;
    if op.mutating() {
        if let Some((spec, labels)) = inline {
            let (r, _) =
                defs::put_definition_locked(&engine, &key, labels, spec, PutMode::Upsert, w).await;
            if r.error_code != codes::SUCCESS {
                return r;
            }
        }
        let account = engine.reg().get(&key).map(|e| e.def.spec.account.clone());
        if let Some(Err(r)) = account.map(|a| w.check(&a)) {
            return r;
        }
    }
    op_locked(&engine, &key, op).await
}

/// One operation, for a caller that holds the process's operation lock.
async fn op_locked(engine: &Arc<Engine>, key: &ProcKey, op: OpType) -> KeyResult {
    let Some(spec) = engine.spec_of(key) else {
        return match op {
            OpType::Status => KeyResult {
                error_code: codes::NOT_REGISTERED,
                error_msg: format!("process {key} is not registered"),
                content: status_content(engine, key),
            },
            _ => KeyResult::err(
                codes::NOT_REGISTERED,
                format!("process {key} is not registered; register it or send its spec inline"),
            ),
        };
    };
    let invalid = engine.reg().get(key).and_then(|e| e.rt.invalid.clone());
    if let Some(why) = invalid
        && op != OpType::Status
    {
        return KeyResult::err(codes::SPEC_INVALID, why);
    }
    if op != OpType::Status {
        engine.events.emit(
            Some(key),
            "operator",
            format!("operation {} requested", op.name()),
            serde_json::json!({"op_type": op.code()}),
        );
    }
    match op {
        // A pure read of what the agent knows: no pid-file probe, no adoption, no command
        // (the supervisor's sweep adopts processes started outside the agent).
        OpType::Status => KeyResult::ok(status_content(engine, key)),
        OpType::Start => op_start(engine, key, &spec).await,
        OpType::Stop => op_stop(engine, key, &spec, false).await,
        OpType::Kill => op_stop(engine, key, &spec, true).await,
        OpType::Delegate => op_delegate(engine, key, &spec, true).await,
        OpType::Undelegate => op_delegate(engine, key, &spec, false).await,
        OpType::Restart => op_restart(engine, key, &spec).await,
        OpType::Reload => op_reload(engine, key, &spec).await,
    }
}

/// Set the durable intent (expected state `flag`, `managed`) in memory.
fn set_intent(
    engine: &Arc<Engine>,
    key: &ProcKey,
    flag: Option<i64>,
    managed: Option<bool>,
) -> Result<(), OpFail> {
    let mut reg = engine.reg();
    let Some(e) = reg.get_mut(key) else {
        return Err(OpFail::new(
            codes::NOT_REGISTERED,
            format!("process {key} was unregistered"),
        ));
    };
    let f = flag.unwrap_or(e.state.flag);
    let m = managed.unwrap_or(e.state.managed);
    Engine::set_intent_locked(e, f, m);
    if managed == Some(true) || flag == Some(FLAG_RUNNING) {
        e.rt.failures = 0;
        e.rt.next_attempt = None;
    }
    Ok(())
}

async fn commit_intent(
    engine: &Arc<Engine>,
    key: &ProcKey,
    flag: Option<i64>,
    managed: Option<bool>,
) -> Result<(), OpFail> {
    set_intent(engine, key, flag, managed)?;
    engine.persist(key).await.map_err(|e| {
        OpFail::new(
            codes::UNAVAILABLE,
            format!("the state store refused the change: {e}"),
        )
    })
}

/// The intent of a stop, kill or unmanage, which must act even on a full state directory:
/// committed through the store's reserve if need be; when even that fails the operation goes
/// on, and the returned note (for its result) says the intent is not durable yet (the
/// store keeps retrying it).
async fn commit_urgent_intent(
    engine: &Arc<Engine>,
    key: &ProcKey,
    flag: Option<i64>,
    managed: Option<bool>,
) -> Result<Option<String>, OpFail> {
    set_intent(engine, key, flag, managed)?;
    // Queued under the registry lock, in order with every other write of this state.
    let pending = {
        let reg = engine.reg();
        reg.get(key)
            .map(|e| engine.store.put_state_urgent(key, e.state_json()))
    };
    let Some(pending) = pending else {
        return Ok(None);
    };
    match pending.await {
        Ok(()) => Ok(None),
        Err(e) => {
            tracing::warn!(process = %key, error = %e, "intent not durable yet; acting anyway");
            Ok(Some(format!(
                "not durable: the state directory could not record this yet ({e}); an agent killed before it does would not know of it"
            )))
        }
    }
}

/// `msg`, followed by the durability note when there is one.
fn with_note(msg: String, note: &Option<String>) -> String {
    match note {
        Some(n) => format!("{msg}; {n}"),
        None => msg,
    }
}

fn alive_pids(engine: &Engine, key: &ProcKey) -> Vec<i32> {
    engine
        .reg()
        .get(key)
        .map(|e| e.state.instances.iter().map(|i| i.pid).collect())
        .unwrap_or_default()
}

/// Whether the process runs (through its pid file when nothing is tracked), as an operation's
/// failure when that cannot be told in time.
async fn running_now(engine: &Arc<Engine>, key: &ProcKey) -> Result<usize, KeyResult> {
    engine.discover(key).await.map_err(|why| {
        KeyResult::err(
            codes::OP_FAILED,
            format!("cannot tell whether the process is running: {why}"),
        )
    })
}

async fn op_start(engine: &Arc<Engine>, key: &ProcKey, spec: &ProcSpec) -> KeyResult {
    let running = match running_now(engine, key).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    if running > 0 {
        let pids = alive_pids(engine, key);
        return KeyResult::err(
            codes::PROC_RUNNING,
            format!(
                "process is already running (pid {}); no need to start",
                join_pids(&pids)
            ),
        );
    }
    if spec.command(CommandKind::Start).is_none() {
        return missing(CommandKind::Start);
    }
    let _busy = Busy::set(engine, key, "start");
    if let Some(e) = engine.reg().get_mut(key) {
        e.state.completed = false;
        e.rt.last_cycle = Some(Instant::now());
    }
    let n = spec.instance_num.max(1);
    let mut pids = Vec::new();
    for _ in 0..n {
        match start_with_retries(engine, key, spec, CommandKind::Start).await {
            Ok(pid) => pids.push(pid),
            Err(f) => return f.into(),
        }
    }
    if let Err(f) = commit_intent(engine, key, Some(FLAG_RUNNING), Some(true)).await {
        return f.into();
    }
    KeyResult::ok(control_content(engine, key, spec))
}

fn missing(which: CommandKind) -> KeyResult {
    KeyResult::err(
        codes::SPEC_INVALID,
        format!(
            "{} is empty: this process has no command for that operation",
            which.field()
        ),
    )
}

fn join_pids(p: &[i32]) -> String {
    p.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Start one instance: run the start (or restart) command, find the process (pid file, or the
/// command itself when it stays in the foreground), then hold it through the start check.
/// Returns the pid.
pub async fn start_instance(
    engine: &Arc<Engine>,
    key: &ProcKey,
    spec: &ProcSpec,
    which: CommandKind,
    purpose: Purpose,
) -> Result<i32, OpFail> {
    let cmd = spec
        .command(which)
        .ok_or_else(|| OpFail::new(codes::SPEC_INVALID, format!("{} is empty", which.field())))?;
    let req = engine.command_request(key, spec, which.field(), cmd);
    if let Some(e) = engine.reg().get_mut(key) {
        e.rt.phase = Phase::Starting;
    }
    let mut sp = engine
        .exec
        .spawn(&req)
        .await
        .map_err(|e| OpFail::new(codes::OP_FAILED, format!("{}: {e}", which.field())))?;
    if let Some(e) = engine.reg().get_mut(key) {
        e.note_spawn(Spawn {
            shell: sp.pid,
            ticks: sp.spawned_ticks,
        });
    }
    let t0 = Instant::now();
    let want_fd = engine.detection == Detection::Pidfd;
    let before: Vec<Instance> = engine
        .reg()
        .get(key)
        .map(|e| e.state.instances.clone())
        .unwrap_or_default();
    let (begin, end) = if purpose == Purpose::Job {
        (0, 0)
    } else {
        spec.start_check_window()
    };
    let begin_at = t0 + secs(begin);
    let end_at = t0 + secs(end.max(begin));
    // When the process is found through its pid file, give the file at least a second to
    // appear (a daemon often writes it after its start command has returned) before deciding
    // that the command itself, still running, is the process, or that nothing started.
    let settle_at = if spec.pid_path.is_empty() || purpose == Purpose::Job {
        t0
    } else {
        begin_at.max(t0 + Duration::from_secs(1))
    };
    let op_deadline = t0 + secs(spec.op_timeout.max(1));
    let mut shell_exit: Option<ExitInfo> = None;
    let mut found: Option<i32> = None;
    let mut poll = Duration::from_millis(2);
    loop {
        // The pid file may already name the new process while it is still on its way to
        // exec the program (`setsid prog &` writes `$!` before the exec): wait for it.
        let mut exec_pending = false;
        if found.is_none() && !spec.pid_path.is_empty() {
            match find_fresh(engine, key, spec, sp.spawned_ticks, want_fd, &before).await {
                Fresh::Found(pid) => found = Some(pid),
                Fresh::Pending => exec_pending = true,
                Fresh::Nothing => {}
            }
        }
        let now = Instant::now();
        let shell_alive = shell_exit.is_none();
        if found.is_none() && shell_alive && now >= settle_at {
            // Foreground: the command itself is the process. With a pid file, only when it
            // is the program (`exec prog`): a shell that is still busy daemonizing is not
            // the process (taking it made the daemon it then started a duplicate, found by
            // the crash-safety test).
            // A periodic or single-run job is the command itself, pid file or not.
            if let Some(att) = attach_command(engine, key, sp.pid, purpose == Purpose::Job).await
                && engine.track(key, att, true)
            {
                found = Some(sp.pid);
            }
        }
        if found.is_none()
            && purpose == Purpose::Job
            && let Some(ex) = shell_exit
        {
            // A job that finished before we could even attach to it.
            let out = engine.exec.collect(&sp).await;
            job_finished(engine, key, sp.pid, ex);
            return if ex.success() {
                Ok(sp.pid)
            } else {
                Err(OpFail::new(
                    codes::OP_FAILED,
                    format!("{} failed ({ex}): {}", which.field(), out.trim()),
                ))
            };
        }
        if found.is_none()
            && let Some(ex) = shell_exit
        {
            if !ex.success() {
                let out = engine.exec.collect(&sp).await;
                return Err(OpFail::new(
                    codes::OP_FAILED,
                    format!("{} failed ({ex}): {}", which.field(), out.trim()),
                ));
            }
            if now >= settle_at && !exec_pending {
                if which == CommandKind::Restart && !before.is_empty() {
                    let still: Vec<i32> = alive_pids(engine, key);
                    if let Some(p) = still.first() {
                        // A graceful restart that kept its pid.
                        return finish_start(engine, key, *p, purpose).await;
                    }
                }
                let out = engine.exec.collect(&sp).await;
                let where_ = if spec.pid_path.is_empty() {
                    "the command exited at once".to_string()
                } else {
                    format!(
                        "no live {:?} process found through pid file {}",
                        spec.proc_name, spec.pid_path
                    )
                };
                return Err(OpFail::new(
                    codes::POST_CHECK_ERROR,
                    format!(
                        "start check failed after {}s: {where_} ({} {ex}){}",
                        begin,
                        which.field(),
                        if out.trim().is_empty() {
                            String::new()
                        } else {
                            format!("; output: {}", out.trim())
                        }
                    ),
                ));
            }
        }
        if found.is_some() && now >= begin_at {
            break;
        }
        if now >= op_deadline && found.is_none() && shell_exit.is_some() {
            let stray = end_stray(engine, key, spec, sp.spawned_ticks, sp.pid).await;
            return Err(OpFail::new(
                codes::POST_CHECK_ERROR,
                format!(
                    "start check failed: the process in pid file {} never became {:?} within op_timeout {}s{stray}",
                    spec.pid_path, spec.proc_name, spec.op_timeout
                ),
            ));
        }
        if now >= op_deadline && found.is_none() {
            engine.exec.kill_group(sp.pid);
            return Err(OpFail::new(
                codes::OP_FAILED,
                format!(
                    "{} did not finish within op_timeout {}s",
                    which.field(),
                    spec.op_timeout
                ),
            ));
        }
        let wait = if found.is_some() {
            begin_at
                .saturating_duration_since(now)
                .max(Duration::from_millis(1))
        } else {
            poll
        };
        tokio::select! {
            r = &mut sp.exit, if shell_exit.is_none() => {
                shell_exit = Some(r.unwrap_or(ExitInfo::Unknown));
            }
            _ = tokio::time::sleep(wait) => {}
        }
        poll = (poll * 2).min(Duration::from_millis(25));
    }
    let Some(pid) = found else {
        return Err(OpFail::new(
            codes::POST_CHECK_ERROR,
            "start check failed: no process",
        ));
    };
    // Hold through the start check window.
    loop {
        let (tracked, last_exit) = {
            let reg = engine.reg();
            match reg.get(key) {
                Some(e) => (
                    e.state.instances.iter().any(|i| i.pid == pid),
                    e.state.last_exit.clone().filter(|x| x.pid == pid),
                ),
                None => (false, None),
            }
        };
        let starttime = engine.reg().get(key).and_then(|e| {
            e.state
                .instances
                .iter()
                .find(|i| i.pid == pid)
                .map(|i| i.starttime)
        });
        let alive = tracked && starttime.is_some_and(|t| watch::alive(pid, t));
        if !alive && purpose != Purpose::Job {
            let out = engine.exec.collect(&sp).await;
            let how = last_exit
                .map(|x| x.exit.to_string())
                .unwrap_or_else(|| "exit status unknown".into());
            return Err(OpFail::new(
                codes::POST_CHECK_ERROR,
                format!(
                    "start check failed: pid {pid} exited within {}s of the start ({how}){}",
                    end.max(begin),
                    if out.trim().is_empty() {
                        String::new()
                    } else {
                        format!("; output: {}", out.trim())
                    }
                ),
            ));
        }
        let now = Instant::now();
        if now >= end_at || purpose == Purpose::Job {
            break;
        }
        tokio::time::sleep((end_at - now).min(Duration::from_millis(100))).await;
    }
    finish_start(engine, key, pid, purpose).await
}

async fn finish_start(
    engine: &Arc<Engine>,
    key: &ProcKey,
    pid: i32,
    purpose: Purpose,
) -> Result<i32, OpFail> {
    let restarted = engine
        .reg()
        .get(key)
        .is_some_and(|e| e.state.last_exit.as_ref().is_some_and(|x| !x.by_operator));
    {
        let mut reg = engine.reg();
        if let Some(e) = reg.get_mut(key) {
            e.state.last_start_time = crate::util::unix_now();
            e.rt.phase = Phase::Running;
            e.rt.message.clear();
        }
    }
    engine.persist_bg(key);
    let what = match purpose {
        Purpose::Operator => "started",
        Purpose::Supervisor if restarted => "restarted",
        Purpose::Supervisor => "started",
        Purpose::Job => "job_started",
    };
    engine.events.emit(
        Some(key),
        what,
        format!("{what} (pid {pid})"),
        serde_json::json!({"pid": pid}),
    );
    engine.refresh_version(key);
    Ok(pid)
}

/// After a start whose pid file names a process that never became the program (a wrong
/// `proc_name`, say), end that process when it is provably ours, so that every retry does not
/// leave another copy running: it started after this start command, it is either in the
/// command's session or an orphan reparented to the agent (only our own descendants can be,
/// as the agent is a child subreaper), no definition tracks it, and it may be signalled for
/// this definition (its account). Killed through a pidfd after those checks, on the
/// file-system pool. Returns a note for the error message.
async fn end_stray(
    engine: &Arc<Engine>,
    key: &ProcKey,
    spec: &ProcSpec,
    min_ticks: u64,
    shell_pid: i32,
) -> String {
    let Some(claim) = engine.claim_data(key) else {
        return String::new();
    };
    let e2 = engine.clone();
    let path = std::path::PathBuf::from(&spec.pid_path);
    let job = move || -> Option<(i32, String)> {
        let pid = crate::procinfo::read_pid_file(std::path::Path::new(&claim.pid_path)).ok()?;
        let fd = Arc::new(crate::sys::pidfd_open(pid).ok()?);
        let f = crate::procinfo::read_facts(pid)?;
        let ours = f.starttime >= min_ticks
            && !f.exited
            && (f.session == shell_pid || f.ppid == std::process::id() as i32)
            && e2.reg().key_of_pid(pid).is_none();
        if !ours {
            return None;
        }
        let sent = claim
            .with_claim(&e2, None, |c| {
                watch::signal_member(pid, Some(&fd), Some(f.starttime), None, c, Signal::SIGKILL)
            })
            .unwrap_or(false);
        sent.then_some((pid, f.comm))
    };
    let Ok(Some((pid, comm))) = engine
        .fs
        .run(&path, crate::fspool::PROBE_DEADLINE, job)
        .await
    else {
        return String::new();
    };
    engine.events.emit(
        Some(key),
        "stray_killed",
        format!(
            "pid {pid} ({comm:?}) named in the pid file was started by this start command but is not {:?}: killed so retries do not pile up copies",
            spec.proc_name
        ),
        serde_json::json!({"pid": pid, "comm": comm}),
    );
    format!("; pid {pid} ({comm:?}) it started was killed")
}

/// Record a job (periodic cycle or single run) that ended before it was tracked.
fn job_finished(engine: &Arc<Engine>, key: &ProcKey, pid: i32, exit: ExitInfo) {
    let kind = {
        let mut reg = engine.reg();
        let Some(e) = reg.get_mut(key) else { return };
        e.state.last_exit = Some(crate::registry::LastExit {
            pid,
            at: crate::util::unix_now(),
            exit,
            by_operator: false,
        });
        if e.def.spec.auto_type == AutoType::SingleRun {
            e.state.completed = true;
            e.rt.phase = Phase::Completed;
            "exited"
        } else {
            e.rt.phase = Phase::Stopped;
            "cycle_finished"
        }
    };
    engine.events.emit(
        Some(key),
        kind,
        format!("pid {pid} exited ({exit})"),
        serde_json::json!({"pid": pid, "exit": exit}),
    );
    engine.persist_bg(key);
}

/// What the pid file says during a start.
enum Fresh {
    /// It names a process started by this command that belongs to the definition: tracked.
    Found(i32),
    /// It names a live process started after the command that is not the program yet (a fork
    /// on its way to exec it, `setsid prog &` writes `$!` before the exec): look again.
    Pending,
    Nothing,
}

/// Look at the pid file during a start (on the file-system pool): a process that the start
/// command started (ownership rule, origin "spawned") and that was not an instance before.
async fn find_fresh(
    engine: &Arc<Engine>,
    key: &ProcKey,
    spec: &ProcSpec,
    min_ticks: u64,
    want_fd: bool,
    before: &[Instance],
) -> Fresh {
    let Some(claim) = engine.claim_data(key) else {
        return Fresh::Nothing;
    };
    let before: Vec<i32> = before.iter().map(|i| i.pid).collect();
    let e2 = engine.clone();
    let path = std::path::PathBuf::from(&spec.pid_path);
    let job = move || -> Result<Option<watch::Attached>, bool> {
        let pid = crate::procinfo::read_pid_file(std::path::Path::new(&claim.pid_path))
            .map_err(|_| false)?;
        if before.contains(&pid) {
            return Err(false);
        }
        match claim.attach(&e2, pid, want_fd) {
            Ok(att) if att.origin == Origin::Spawned => Ok(Some(att)),
            _ => {
                // Started after the command and alive, but not (yet) the program.
                let pending = crate::procinfo::read_stat(pid)
                    .is_some_and(|st| !st.is_exited() && st.starttime >= min_ticks);
                Err(pending)
            }
        }
    };
    match engine
        .fs
        .run(&path, crate::fspool::PROBE_DEADLINE, job)
        .await
    {
        Ok(Ok(Some(att))) => {
            let pid = att.pid;
            if engine.track(key, att, true) {
                Fresh::Found(pid)
            } else {
                Fresh::Nothing
            }
        }
        Ok(Err(true)) => Fresh::Pending,
        _ => Fresh::Nothing,
    }
}

/// Attach to a start command's own process when it is the definition's process: the command
/// itself for a definition without a pid file (or a job), else only once it exec'd the
/// program. On the file-system pool (it reads /proc and resolves the account).
async fn attach_command(
    engine: &Arc<Engine>,
    key: &ProcKey,
    pid: i32,
    is_job: bool,
) -> Option<watch::Attached> {
    let mut claim = engine.claim_data(key)?;
    if is_job {
        claim.pid_path.clear();
    }
    let want_fd = engine.detection == Detection::Pidfd;
    let e2 = engine.clone();
    engine
        .fs
        .run_unkeyed("attach", crate::fspool::PROBE_DEADLINE, move || {
            claim.attach(&e2, pid, want_fd).ok()
        })
        .await
        .ok()
        .flatten()
}

/// What a stop must end: the instances (with their pidfds), the process groups whose members
/// go with them, and the definition's claim (the ownership rule decides, before every
/// signal, that a process may be signalled for it).
struct Targets {
    instances: Vec<Instance>,
    groups: Vec<i32>,
    fds: std::collections::HashMap<i32, Arc<std::os::fd::OwnedFd>>,
    claim: Option<ClaimData>,
}

fn targets(engine: &Engine, key: &ProcKey) -> Targets {
    let (instances, fds) = engine
        .reg()
        .get(key)
        .map(|e| (e.state.instances.clone(), e.rt.pidfds.clone()))
        .unwrap_or_default();
    let own_pgid = nix::unistd::getpgrp().as_raw();
    let mut groups = Vec::new();
    for i in &instances {
        // Whole-group kills only for groups the process leads or that our command created:
        // never the agent's own group, never init's.
        if i.pgid > 1
            && i.pgid != own_pgid
            && (i.pgid == i.pid || i.started_by_agent)
            && !groups.contains(&i.pgid)
        {
            groups.push(i.pgid);
        }
    }
    Targets {
        instances,
        groups,
        fds,
        claim: engine.claim_data(key),
    }
}

impl Targets {
    /// What is left, from one /proc snapshot: the instances still alive and the members of
    /// their groups that may be signalled for the definition. Blocking.
    fn left(&self, engine: &Engine) -> Vec<i32> {
        let snap = crate::procinfo::Snapshot::take();
        let mut left: Vec<i32> = self
            .instances
            .iter()
            .filter(|i| snap.alive(i.pid, i.starttime))
            .map(|i| i.pid)
            .collect();
        let Some(claim) = &self.claim else {
            return left;
        };
        let members: Vec<i32> = self
            .groups
            .iter()
            .flat_map(|g| snap.group(*g).map(|s| s.pid))
            .filter(|p| !left.contains(p))
            .collect();
        if members.is_empty() {
            return left;
        }
        let _ = claim.with_claim(engine, None, |c| {
            for p in members {
                if crate::procinfo::read_facts(p).is_some_and(|f| watch::may_signal_member(&f, c))
                    && !left.contains(&p)
                {
                    left.push(p);
                }
            }
        });
        left
    }

    /// Send `sig` to every instance, its descendants and the members of its groups that may
    /// be signalled for the definition, each through a pidfd after its checks. Blocking.
    fn signal(&self, engine: &Engine, sig: Signal) {
        let Some(claim) = &self.claim else { return };
        let snap = crate::procinfo::Snapshot::take();
        let _ = claim.with_claim(engine, None, |c| {
            for i in &self.instances {
                watch::signal_member(i.pid, self.fds.get(&i.pid), Some(i.starttime), None, c, sig);
                for d in snap.descendants(i.pid) {
                    watch::signal_member(d.pid, None, Some(d.starttime), None, c, sig);
                }
            }
            for g in &self.groups {
                for m in snap.group(*g) {
                    watch::signal_member(m.pid, None, None, Some(*g), c, sig);
                }
            }
        });
    }
}

/// [`Targets::left`] on the file-system pool (a /proc scan must not block a worker). When the
/// pool cannot answer, assume something is left.
async fn remaining(engine: &Arc<Engine>, t: &Arc<Targets>) -> Vec<i32> {
    let (e2, t2) = (engine.clone(), t.clone());
    engine
        .fs
        .run_unkeyed("stop check", Duration::from_secs(5), move || t2.left(&e2))
        .await
        .unwrap_or_else(|_| vec![-1])
}

async fn signal_all(engine: &Arc<Engine>, t: &Arc<Targets>, sig: Signal) {
    let (e2, t2) = (engine.clone(), t.clone());
    let _ = engine
        .fs
        .run_unkeyed("signal", Duration::from_secs(5), move || {
            t2.signal(&e2, sig)
        })
        .await;
}

async fn wait_gone(engine: &Arc<Engine>, t: &Arc<Targets>, within: Duration) -> bool {
    let until = Instant::now() + within;
    let mut step = Duration::from_millis(5);
    loop {
        if remaining(engine, t).await.is_empty() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(step).await;
        step = (step * 2).min(Duration::from_millis(50));
    }
}

/// Stop (or kill) every instance and its process group. Returns which step ended it.
pub async fn stop_all(
    engine: &Arc<Engine>,
    key: &ProcKey,
    spec: &ProcSpec,
    kill: bool,
) -> Result<String, OpFail> {
    let t = Arc::new(targets(engine, key));
    let which = if kill {
        CommandKind::Kill
    } else {
        CommandKind::Stop
    };
    let mut notes = Vec::new();
    if let Some(cmd) = spec.command(which) {
        let req = engine.command_request(key, spec, which.field(), cmd);
        match engine.exec.run(&req).await {
            Ok(fin) => {
                if !fin.success() {
                    let why = if fin.timed_out {
                        format!("timed out after {}s", spec.op_timeout)
                    } else {
                        fin.exit.to_string()
                    };
                    notes.push(format!("{} {why}: {}", which.field(), fin.output.trim()));
                }
            }
            Err(e) => notes.push(format!("{}: {e}", which.field())),
        }
        let grace = if kill {
            secs(2)
        } else {
            secs(spec.stop_check_secs.max(1))
        };
        if wait_gone(engine, &t, grace).await {
            return Ok(format!("ended by {}", which.field()));
        }
    }
    if !kill {
        signal_all(engine, &t, Signal::SIGTERM).await;
        if wait_gone(engine, &t, secs(spec.op_timeout.max(1))).await {
            return Ok("ended by SIGTERM to its process group".into());
        }
    }
    signal_all(engine, &t, Signal::SIGKILL).await;
    if wait_gone(engine, &t, secs(5)).await {
        return Ok(if kill {
            "killed with SIGKILL".into()
        } else {
            format!("killed with SIGKILL after op_timeout {}s", spec.op_timeout)
        });
    }
    let left = remaining(engine, &t).await;
    Err(OpFail::new(
        codes::POST_CHECK_ERROR,
        format!(
            "stop check failed: still running after SIGKILL: pid {}{}",
            join_pids(&left),
            if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join("; "))
            }
        ),
    ))
}

async fn op_stop(engine: &Arc<Engine>, key: &ProcKey, spec: &ProcSpec, kill: bool) -> KeyResult {
    let running = match running_now(engine, key).await {
        Ok(n) => n,
        Err(r) => {
            // Whatever runs, the operator wants it stopped: keep it from being restarted.
            let _ = commit_intent(engine, key, Some(FLAG_STOPPED), Some(false)).await;
            return r;
        }
    };
    if running == 0 {
        // Nothing to stop; still, the operator's intent is "stopped": cancel supervision.
        let note = match commit_urgent_intent(engine, key, Some(FLAG_STOPPED), Some(false)).await {
            Ok(n) => n,
            Err(f) => return f.into(),
        };
        if let Some(e) = engine.reg().get_mut(key) {
            e.rt.phase = Phase::Stopped;
            e.rt.next_attempt = None;
        }
        return KeyResult::err(
            codes::PROC_NOT_RUNNING,
            with_note("process is not running; no need to stop".into(), &note),
        );
    }
    let _busy = Busy::set(engine, key, if kill { "kill" } else { "stop" });
    if let Some(e) = engine.reg().get_mut(key) {
        e.rt.phase = Phase::Stopping;
    }
    // The operator's intent is committed before anything is signalled: an agent killed in the
    // middle of the stop comes back knowing the process is to stay stopped (and does not
    // restart it). On a full state directory it acts all the same, and says so.
    let note = match commit_urgent_intent(engine, key, Some(FLAG_STOPPED), Some(false)).await {
        Ok(n) => n,
        Err(f) => return f.into(),
    };
    match stop_all(engine, key, spec, kill).await {
        Ok(step) => {
            // The watchers may not have reported yet: drop what is gone now.
            settle_exits(engine, key, true);
            if let Some(e) = engine.reg().get_mut(key) {
                e.rt.phase = Phase::Stopped;
                e.rt.message.clear();
            }
            engine.events.emit(
                Some(key),
                if kill { "killed" } else { "stopped" },
                step.clone(),
                serde_json::Value::Null,
            );
            let mut r = KeyResult::ok(control_content(engine, key, spec));
            r.error_msg = with_note(format!("success: {step}"), &note);
            r
        }
        Err(f) => {
            engine.events.emit(
                Some(key),
                "stop_failed",
                f.msg.clone(),
                serde_json::Value::Null,
            );
            let mut r: KeyResult = f.into();
            r.error_msg = with_note(r.error_msg, &note);
            r
        }
    }
}

/// Remove instances that are gone (their exit may still be in flight to the loop).
fn settle_exits(engine: &Arc<Engine>, key: &ProcKey, by_operator: bool) {
    if let Some(e) = engine.reg().get_mut(key) {
        settle_gone_locked(e, &engine.reaper, by_operator, None);
    }
    engine.persist_bg(key);
}

/// Record the instances of `e` that are no longer alive (all, or only those in `only`):
/// their exit as the last exit, then untrack them ([`Engine::untrack_locked`]).
fn settle_gone_locked(
    e: &mut crate::registry::Entry,
    reaper: &crate::reaper::Reaper,
    by_operator: bool,
    only: Option<&[i32]>,
) {
    let gone: Vec<i32> = e
        .state
        .instances
        .iter()
        .filter(|i| only.is_none_or(|p| p.contains(&i.pid)) && !watch::alive(i.pid, i.starttime))
        .map(|i| i.pid)
        .collect();
    for pid in gone {
        let exit = watch::collect_exit(pid, e.rt.pidfds.get(&pid).map(|f| f.as_ref()), reaper);
        e.state.last_exit = Some(crate::registry::LastExit {
            pid,
            at: crate::util::unix_now(),
            exit,
            by_operator,
        });
        Engine::untrack_locked(e, pid);
    }
}

async fn op_delegate(
    engine: &Arc<Engine>,
    key: &ProcKey,
    spec: &ProcSpec,
    manage: bool,
) -> KeyResult {
    if manage {
        if spec.command(CommandKind::Start).is_none() {
            return missing(CommandKind::Start);
        }
        if let Err(r) = running_now(engine, key).await {
            return r;
        }
        if let Some(e) = engine.reg().get_mut(key) {
            e.state.completed = false;
        }
        if let Err(f) = commit_intent(engine, key, Some(FLAG_RUNNING), Some(true)).await {
            return f.into();
        }
        engine.events.emit(
            Some(key),
            "managed",
            "now managed: kept running by the agent",
            serde_json::Value::Null,
        );
    } else {
        let note = match commit_urgent_intent(engine, key, None, Some(false)).await {
            Ok(n) => n,
            Err(f) => return f.into(),
        };
        if let Some(e) = engine.reg().get_mut(key) {
            e.rt.next_attempt = None;
            if e.state.instances.is_empty() && e.rt.phase == Phase::Backoff {
                e.rt.phase = Phase::Stopped;
            }
        }
        engine.events.emit(
            Some(key),
            "unmanaged",
            "no longer managed: left as it is",
            serde_json::Value::Null,
        );
        if note.is_some() {
            let mut r = KeyResult::ok(control_content(engine, key, spec));
            r.error_msg = with_note(r.error_msg, &note);
            return r;
        }
    }
    KeyResult::ok(control_content(engine, key, spec))
}

async fn op_restart(engine: &Arc<Engine>, key: &ProcKey, spec: &ProcSpec) -> KeyResult {
    if spec.command(CommandKind::Restart).is_none() {
        return missing(CommandKind::Restart);
    }
    if let Err(r) = running_now(engine, key).await {
        return r;
    }
    let _busy = Busy::set(engine, key, "restart");
    if let Some(e) = engine.reg().get_mut(key) {
        e.state.completed = false;
        e.rt.last_cycle = Some(Instant::now());
    }
    match start_with_retries(engine, key, spec, CommandKind::Restart).await {
        Ok(_) => {
            settle_exits(engine, key, true);
            if let Err(f) = commit_intent(engine, key, Some(FLAG_RUNNING), Some(true)).await {
                return f.into();
            }
            KeyResult::ok(control_content(engine, key, spec))
        }
        Err(f) => {
            settle_exits(engine, key, true);
            f.into()
        }
    }
}

async fn op_reload(engine: &Arc<Engine>, key: &ProcKey, spec: &ProcSpec) -> KeyResult {
    let Some(cmd) = spec.command(CommandKind::Reload) else {
        return missing(CommandKind::Reload);
    };
    if let Err(r) = running_now(engine, key).await {
        return r;
    }
    let _busy = Busy::set(engine, key, "reload");
    let req = engine.command_request(key, spec, "reload_cmd", cmd);
    match engine.exec.run(&req).await {
        Ok(fin) if fin.success() => {
            engine.events.emit(
                Some(key),
                "reloaded",
                "reload_cmd succeeded",
                serde_json::Value::Null,
            );
            engine.refresh_version(key);
            KeyResult::ok(control_content(engine, key, spec))
        }
        Ok(fin) => {
            let why = if fin.timed_out {
                format!(
                    "timed out after op_timeout {}s (its process group was killed)",
                    spec.op_timeout
                )
            } else {
                fin.exit.to_string()
            };
            KeyResult::err(
                codes::OP_FAILED,
                format!("reload_cmd failed ({why}): {}", fin.output.trim()),
            )
        }
        Err(e) => KeyResult::err(codes::OP_FAILED, format!("reload_cmd: {e}")),
    }
}

/// A supervisor start of `n` instances (restart after a crash, first start of a managed
/// process, a periodic cycle).
pub async fn supervise_start(engine: Arc<Engine>, key: ProcKey, n: u32) {
    let _permit = engine.ops_sem.clone().acquire_owned().await;
    let lock = engine.op_lock(&key);
    let guard = lock.lock().await;
    // Never start a duplicate: a live, right process named by the pid file is adopted instead;
    // when the pid file cannot be read in time, nothing is started (retried under backoff).
    if let Err(why) = engine.discover(&key).await {
        let spec = {
            let mut reg = engine.reg();
            let Some(e) = reg.get_mut(&key) else { return };
            e.rt.start_pending = false;
            e.def.spec.clone()
        };
        let f = OpFail::new(
            codes::OP_FAILED,
            format!("not started: cannot tell whether it already runs ({why})"),
        );
        note_start_failure(&engine, &key, &spec, &f);
        engine.persist_bg(&key);
        drop(guard);
        engine.reconcile(&key);
        return;
    }
    let (spec, go, is_restart) = {
        let mut reg = engine.reg();
        match reg.get_mut(&key) {
            Some(e) => {
                e.rt.start_pending = false;
                let alive = e.state.instances.len() as u32;
                let go = e.wants_running()
                    && e.rt.busy.is_none()
                    && match e.def.spec.auto_type {
                        AutoType::Resident => alive < e.def.spec.instance_num.max(1),
                        AutoType::SingleRun => !e.state.completed && alive == 0,
                        AutoType::Periodic => alive == 0,
                    };
                (
                    e.def.spec.clone(),
                    go,
                    e.state.last_exit.is_some() && e.def.spec.auto_type == AutoType::Resident,
                )
            }
            None => return,
        }
    };
    if !go {
        drop(guard);
        engine.reconcile(&key);
        return;
    }
    let purpose = if spec.auto_type == AutoType::Resident {
        Purpose::Supervisor
    } else {
        Purpose::Job
    };
    let _busy = Busy::set(&engine, &key, SUPERVISE);
    for _ in 0..n {
        // Every attempt after a crash counts, successful or not, so a crash loop shows.
        if is_restart {
            let n = engine.reg().get_mut(&key).map(|e| {
                e.state.restarts += 1;
                e.state.restarts
            });
            engine.events.emit(
                Some(&key),
                "restarting",
                format!("restart attempt (restart {})", n.unwrap_or(0)),
                serde_json::json!({"restarts": n}),
            );
        }
        if let Err(f) = start_instance(&engine, &key, &spec, CommandKind::Start, purpose).await {
            let (failures, delay) = note_start_failure(&engine, &key, &spec, &f);
            if spec.auto_type == AutoType::Resident {
                engine.events.emit(
                    Some(&key),
                    "backoff",
                    format!(
                        "next start attempt in {:.1}s (failure {failures} in a row)",
                        delay.as_secs_f64()
                    ),
                    serde_json::json!({"delay_secs": delay.as_secs_f64(), "failures": failures}),
                );
            }
            break;
        }
    }
    engine.persist_bg(&key);
}

/// Record a failed start: one more consecutive failure, the next attempt pushed out by the
/// backoff policy, a `start_failed` event. Returns (failures, delay).
fn note_start_failure(
    engine: &Arc<Engine>,
    key: &ProcKey,
    spec: &ProcSpec,
    f: &OpFail,
) -> (u32, Duration) {
    let (failures, delay) = {
        let mut reg = engine.reg();
        let Some(e) = reg.get_mut(key) else {
            return (0, Duration::ZERO);
        };
        e.rt.failures = e.rt.failures.saturating_add(1);
        // A failed start is never followed by an immediate retry.
        let d = engine
            .backoff
            .delay(e.rt.failures.max(2), crate::util::random_unit());
        e.rt.next_attempt = Some(Instant::now() + d);
        if spec.auto_type == AutoType::SingleRun {
            e.state.completed = true;
            e.rt.phase = Phase::Completed;
        } else if e.state.instances.is_empty() {
            e.rt.phase = if e.wants_running() {
                Phase::Backoff
            } else {
                Phase::Stopped
            };
        }
        e.rt.message = f.msg.clone();
        (e.rt.failures, d)
    };
    engine.events.emit(
        Some(key),
        "start_failed",
        f.msg.clone(),
        serde_json::json!({"code": f.code, "failures": failures}),
    );
    (failures, delay)
}

/// An operator start or restart: try once, plus `start_retries` more times `start_interval`
/// seconds apart when the spec says so. The last failure is the answer (836 or 65535); if the
/// process is managed, supervision goes on under the backoff policy afterwards.
async fn start_with_retries(
    engine: &Arc<Engine>,
    key: &ProcKey,
    spec: &ProcSpec,
    which: CommandKind,
) -> Result<i32, OpFail> {
    let retries = spec.start_retries.unwrap_or(0);
    let mut attempt = 0;
    loop {
        match start_instance(engine, key, spec, which, Purpose::Operator).await {
            Ok(pid) => return Ok(pid),
            Err(f) => {
                note_start_failure(engine, key, spec, &f);
                if attempt >= retries {
                    let msg = if retries > 0 {
                        format!("{} (after {} attempts)", f.msg, retries + 1)
                    } else {
                        f.msg
                    };
                    return Err(OpFail { code: f.code, msg });
                }
                attempt += 1;
                tokio::time::sleep(secs(spec.start_interval.unwrap_or(10))).await;
            }
        }
    }
}

/// `content` of a status query: GSE's `{"process":[{"procname", "instance":[{...}]}]}` with
/// `pid` -1 when not running.
pub fn status_content(engine: &Engine, key: &ProcKey) -> String {
    let reg = engine.reg();
    let agent = engine.host.agent_id_or_fallback();
    let utctime = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let v = match reg.get(key) {
        None => serde_json::json!({
            "process": [{"procname": key.name, "instance": [{"pid": -1, "isAuto": false, "processName": key.name}]}],
            "bk_agent_id": agent, "utctime": utctime, "timezone": 0
        }),
        Some(e) => {
            let s = e.current_sample().cloned().unwrap_or_default();
            let pids: Vec<i64> = if e.state.instances.is_empty() {
                vec![-1]
            } else {
                e.state.instances.iter().map(|i| i.pid as i64).collect()
            };
            let instances: Vec<serde_json::Value> = pids
                .iter()
                .map(|pid| {
                    serde_json::json!({
                        "pid": pid,
                        "isAuto": e.state.managed,
                        "processName": e.def.spec.proc_name,
                        "setupPath": e.def.spec.setup_path,
                        "version": e.rt.version,
                        "cpuUsage": s.cpu_usage,
                        "phyMemUsage": s.mem_usage,
                        "usePhyMem": s.rss_bytes,
                        "diskSize": s.disk,
                        "fd": s.fd,
                        "health": e.rt.health.clone().unwrap_or_default(),
                        "startTime": e.state.last_start_time,
                        "register_time": e.def.register_time,
                        "last_start_time": e.state.last_start_time,
                        "report_time": crate::util::unix_now(),
                        "stat": if *pid > 0 { "running" } else { "stopped" },
                    })
                })
                .collect();
            serde_json::json!({
                "process": [{"procname": e.def.spec.proc_name, "instance": instances}],
                "bk_agent_id": agent, "utctime": utctime, "timezone": 0
            })
        }
    };
    v.to_string()
}

/// `content` of a control operation: `{"value":[{"procName", "setupPath", "result", "isAuto", ...}]}`.
pub fn control_content(engine: &Engine, key: &ProcKey, spec: &ProcSpec) -> String {
    let (managed, pids) = engine
        .reg()
        .get(key)
        .map(|e| {
            (
                e.state.managed,
                e.state
                    .instances
                    .iter()
                    .map(|i| i.pid as i64)
                    .collect::<Vec<_>>(),
            )
        })
        .unwrap_or((false, Vec::new()));
    serde_json::json!({
        "value": [{
            "procName": spec.proc_name,
            "setupPath": spec.setup_path,
            "funcID": spec.func_id,
            "instanceID": spec.instance_id,
            "result": "success",
            "isAuto": managed,
            "pid": pids.first().copied().unwrap_or(-1),
            "bk_agent_id": engine.host.agent_id_or_fallback(),
        }]
    })
    .to_string()
}

/// Run a process's `health_cmd` once and act on the verdict: after
/// `supervisor.health_failures` failures in a row a managed process is treated as dead
/// (stopped, then restarted under the backoff policy).
pub async fn health_check(engine: Arc<Engine>, key: ProcKey) {
    let spec = engine.spec_of(&key);
    let cmd = spec
        .as_ref()
        .and_then(|s| s.command(CommandKind::Health).map(str::to_string));
    let (Some(spec), Some(cmd)) = (spec, cmd) else {
        if let Some(e) = engine.reg().get_mut(&key) {
            e.rt.health_running = false;
        }
        return;
    };
    let req = engine.command_request(&key, &spec, "health_cmd", &cmd);
    let (passed, text) = match engine.exec.run(&req).await {
        Ok(fin) if fin.success() => (true, "ok".to_string()),
        Ok(fin) if fin.timed_out => (
            false,
            format!("timed out after op_timeout {}s", spec.op_timeout),
        ),
        Ok(fin) => (
            false,
            format!(
                "{}: {}",
                fin.exit,
                crate::util::tail_bounded(fin.output.trim(), 512)
            ),
        ),
        Err(e) => (false, e.to_string()),
    };
    let threshold = engine.config.supervisor.health_failures;
    let (failures, dead, managed) = {
        let mut reg = engine.reg();
        let Some(e) = reg.get_mut(&key) else { return };
        e.rt.health_running = false;
        let (n, dead) = policy::health_verdict(e.rt.health_failures, passed, threshold);
        e.rt.health_failures = n;
        let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        e.rt.health = Some(if passed {
            format!("ok at {when}")
        } else {
            format!("failed {n}/{threshold} at {when}: {text}")
        });
        (n, dead, e.wants_running())
    };
    if passed {
        return;
    }
    engine.events.emit(
        Some(&key),
        "health_check_failed",
        format!("health_cmd failed ({failures} of {threshold} in a row): {text}"),
        serde_json::json!({"failures": failures, "threshold": threshold}),
    );
    if dead && managed {
        liveness_restart(
            &engine,
            &key,
            "health_failed",
            format!("health_cmd failed {failures} times in a row; restarting"),
        )
        .await;
    }
}

/// Treat a running, managed process as dead (failed health checks, limit exceeded): stop it
/// like an operator stop would, but keep it managed and let the supervisor restart it under
/// the backoff policy, counting a failure.
pub async fn liveness_restart(engine: &Arc<Engine>, key: &ProcKey, kind: &str, message: String) {
    let lock = engine.op_lock(key);
    let _guard = lock.lock().await;
    let Some(spec) = engine.spec_of(key) else {
        return;
    };
    let proceed = engine
        .reg()
        .get(key)
        .is_some_and(|e| e.wants_running() && !e.state.instances.is_empty());
    if !proceed {
        return;
    }
    engine
        .events
        .emit(Some(key), kind, message, serde_json::Value::Null);
    let _busy = Busy::set(engine, key, SUPERVISE);
    if let Some(e) = engine.reg().get_mut(key) {
        e.rt.phase = Phase::Stopping;
    }
    let outcome = stop_all(engine, key, &spec, false).await;
    settle_exits(engine, key, false);
    let (failures, delay) = {
        let mut reg = engine.reg();
        let Some(e) = reg.get_mut(key) else { return };
        e.rt.failures = e.rt.failures.saturating_add(1);
        e.rt.health_failures = 0;
        let d = engine
            .backoff
            .delay(e.rt.failures, crate::util::random_unit());
        e.rt.next_attempt = Some(Instant::now() + d);
        e.rt.phase = Phase::Backoff;
        (e.rt.failures, d)
    };
    match outcome {
        Ok(step) => engine.events.emit(
            Some(key),
            "stopped",
            format!(
                "{step}; restart in {:.1}s (failure {failures} in a row)",
                delay.as_secs_f64()
            ),
            serde_json::json!({"delay_secs": delay.as_secs_f64(), "failures": failures}),
        ),
        Err(f) => engine
            .events
            .emit(Some(key), "stop_failed", f.msg, serde_json::Value::Null),
    }
}

/// Stop a managed process that stayed over its `cpu_lmt` / `mem_lmt` (the sampler decided,
/// through the pure [`super::limits::check`]): the same stop as an operator's (`stop_cmd`,
/// then SIGTERM / SIGKILL to what is left), under the process's operation lock and busy
/// marker so its exit is not handled twice. The process stays managed: its exit is recorded
/// as not caused by an operator, a `limit_exceeded` event carries the figures, and a
/// resident process is restarted under the backoff policy (an uptime shorter than
/// `backoff_reset` counts as a failure, so one that keeps exceeding its limit backs off).
pub async fn enforce_limit(engine: Arc<Engine>, key: ProcKey, breach: super::limits::Breach) {
    let _permit = engine.ops_sem.clone().acquire_owned().await;
    let lock = engine.op_lock(&key);
    let _guard = lock.lock().await;
    // Re-check under the lock: an operator may have stopped or unmanaged it meanwhile.
    let (spec, pids, uptime) = {
        let reg = engine.reg();
        let Some(e) = reg.get(&key) else { return };
        if !e.state.managed
            || e.state.instances.is_empty()
            || e.rt.busy.is_some()
            || e.rt.start_pending
        {
            return;
        }
        (
            e.def.spec.clone(),
            e.state.instances.iter().map(|i| i.pid).collect::<Vec<_>>(),
            e.rt.attached_at.values().map(|t| t.elapsed()).min(),
        )
    };
    let cause = breach.describe();
    let _busy = Busy::set(&engine, &key, "limit");
    if let Some(e) = engine.reg().get_mut(&key) {
        e.rt.phase = Phase::Stopping;
    }
    let mut data = breach.data();
    data["pids"] = serde_json::json!(pids);
    engine.events.emit(
        Some(&key),
        "limit_exceeded",
        format!("{cause}; stopping pid {}", join_pids(&pids)),
        data,
    );
    let step = match stop_all(&engine, &key, &spec, false).await {
        Ok(step) => step,
        Err(f) => {
            if let Some(e) = engine.reg().get_mut(&key) {
                e.rt.message = format!(
                    "over its limit ({cause}) but could not be stopped: {}",
                    f.msg
                );
            }
            engine.events.emit(
                Some(&key),
                "stop_failed",
                f.msg.clone(),
                serde_json::json!({"reason": "limit_exceeded"}),
            );
            return;
        }
    };
    let now = Instant::now();
    let mut note = None;
    {
        let mut reg = engine.reg();
        let Some(e) = reg.get_mut(&key) else { return };
        // Record the exits now (the watchers may not have reported yet; one that already did
        // was attributed to the busy operation, which is this one).
        settle_gone_locked(e, &engine.reaper, false, Some(&pids));
        if let Some(x) = e.state.last_exit.as_mut()
            && pids.contains(&x.pid)
        {
            // Not an operator's stop: the restart that follows is a restart.
            x.by_operator = false;
        }
        e.state.limit_stops += 1;
        e.state.last_limit = Some(crate::registry::LimitStop {
            at: crate::util::unix_now(),
            cause: cause.clone(),
        });
        e.rt.over_limit = 0;
        e.rt.sample = None;
        match e.def.spec.auto_type {
            AutoType::Resident if e.wants_running() => {
                e.rt.failures = engine.backoff.failures_after_exit(e.rt.failures, uptime);
                let delay = engine
                    .backoff
                    .delay(e.rt.failures, crate::util::random_unit());
                e.rt.next_attempt = Some(now + delay);
                e.rt.phase = Phase::Backoff;
                e.rt.message = format!(
                    "stopped for exceeding its limit ({cause}); restart in {:.1}s",
                    delay.as_secs_f64()
                );
                note = Some((delay, e.rt.failures));
            }
            AutoType::SingleRun => {
                e.state.completed = true;
                e.rt.phase = Phase::Completed;
                e.rt.message = format!("stopped for exceeding its limit ({cause})");
            }
            _ => {
                e.rt.phase = if e.state.instances.is_empty() {
                    Phase::Stopped
                } else {
                    Phase::Running
                };
                e.rt.message = format!("stopped for exceeding its limit ({cause})");
            }
        }
    }
    engine.events.emit(
        Some(&key),
        "limit_stopped",
        match note {
            Some((d, _)) => format!("{step}; restart in {:.1}s", d.as_secs_f64()),
            None => step.clone(),
        },
        serde_json::json!({
            "step": step,
            "restart_in_secs": note.map(|(d, _)| d.as_secs_f64()),
            "failures": note.map(|(_, f)| f),
        }),
    );
    engine.persist_bg(&key);
}
