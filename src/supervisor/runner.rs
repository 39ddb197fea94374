//! The effects that take time, each a task that reports back through the driver: start a
//! command and find its process, then watch it through its start check; run a stop, kill or
//! reload command; signal a process tree; watch until it is gone.
//!
//! Commands take a permit of `supervisor.max_parallel_ops` while they are prepared, while
//! they run and while their process is looked for; a start check only waits (a timer, not a
//! permit).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::lifecycle::{Hold, Input, StartCmd, StartFailure};
use super::ownership::{Origin, Spawn};
use super::stop::Targets;
use super::{Detection, Engine, watch};
use crate::spec::{AutoType, CommandKind, ProcKey, ProcSpec};
use crate::sys::ExitInfo;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn with_output(out: &str) -> String {
    if out.trim().is_empty() {
        String::new()
    } else {
        format!("; output: {}", out.trim())
    }
}

/// The start effect of instance `i`: a supervisor start first looks for a process of the
/// definition that already runs (never a duplicate); then the command runs, its process is
/// found (its pid file, or the command itself when it stays in the foreground) and watched
/// through the start check window; the verdict goes to the lifecycle.
pub async fn start(
    engine: Arc<Engine>,
    key: ProcKey,
    i: usize,
    spec: ProcSpec,
    cmd: StartCmd,
    job: bool,
    hold: Hold,
) {
    let fail = |f: StartFailure| engine.feed_instance(&key, i, Input::StartFailed(f));
    // The permit covers the whole way to the process being found, its preparation
    // included: a thousand starts at once (a host coming up, an operate_proc_multi) then
    // reach the file-system pool at most `max_parallel_ops` at a time instead of flooding
    // it past its deadlines.
    let permit = engine.ops.clone().acquire_owned().await;
    if hold.op().is_none() {
        match engine.discover(&key, Some(i)).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(why) => {
                return fail(StartFailure::Command(format!(
                    "not started: cannot tell whether it already runs ({why})"
                )));
            }
        }
    }
    if cmd == StartCmd::Start
        && let Err(why) = clear_leftovers(&engine, &key, i, spec.op_timeout).await
    {
        return fail(StartFailure::Command(format!("not started: {why}")));
    }
    let which = match cmd {
        StartCmd::Start => CommandKind::Start,
        StartCmd::Restart => CommandKind::Restart,
    };
    let Some(command) = spec.command(which) else {
        return fail(StartFailure::Command(format!("{} is empty", which.field())));
    };
    if let Err(why) = engine.prepare_instance(&key, i, &spec).await {
        return fail(StartFailure::Command(format!("not started: {why}")));
    }
    let mut req = engine.command_request(&key, &spec, which.field(), command);
    // Containment: the start command runs in the instance's own cgroup, so whatever it
    // forks or daemonizes stays there.
    req.cgroup = engine.placement(&key, Some(i));
    let mut sp = match engine.exec.spawn(&req).await {
        Ok(sp) => sp,
        Err(e) => return fail(StartFailure::Command(format!("{}: {e}", which.field()))),
    };
    engine.note_spawn(
        &key,
        Spawn {
            shell: sp.pid,
            ticks: sp.spawned_ticks,
            token: sp.token,
        },
    );
    let t0 = Instant::now();
    let before = engine.tracked_pids(&key);
    // A periodic job is the command itself whoever starts it; started by an operator (or
    // after a failure) its first run is its start check: a clean exit within the window
    // passes, as does a run still alive at its end.
    let periodic = spec.auto_type == AutoType::Periodic;
    let foreground = job || periodic;
    let (begin, end) = if job {
        (0, 0)
    } else {
        spec.start_check_window()
    };
    let begin_at = t0 + secs(begin);
    let end_at = t0 + secs(end.max(begin));
    // When the process is found through its pid file, give the file at least a second to
    // appear (a daemon often writes it after its start command has returned) before deciding
    // that the command itself, still running, is the process, or that nothing started.
    let settle_at = if spec.pid_path.is_empty() || foreground {
        t0
    } else {
        begin_at.max(t0 + secs(1))
    };
    let op_deadline = t0 + secs(spec.op_timeout.max(1));
    let mut shell_exit: Option<ExitInfo> = None;
    let mut poll = Duration::from_millis(2);
    let found: i32 = loop {
        // The pid file may already name the new process while it is still on its way to exec
        // the program (`setsid prog &` writes `$!` before the exec): wait for it.
        let mut exec_pending = false;
        if !spec.pid_path.is_empty() {
            match find_fresh(&engine, &key, sp.spawned_ticks, &before).await {
                Fresh::Found(att) => {
                    let pid = att.pid;
                    if !engine.feed_found(&key, i, att) {
                        return;
                    }
                    break pid;
                }
                Fresh::Pending => exec_pending = true,
                Fresh::Nothing => {}
            }
        }
        let now = Instant::now();
        if shell_exit.is_none() && now >= settle_at {
            // Foreground: the command itself is the process. With a pid file, only when it is
            // the program (`exec prog`): a shell that is still busy daemonizing is not the
            // process (taking it made the daemon it then started a duplicate). A periodic or
            // single-run job is the command itself, pid file or not.
            if let Some(att) = attach_command(&engine, &key, sp.pid, foreground).await {
                if !engine.feed_found(&key, i, att) {
                    return;
                }
                break sp.pid;
            }
        }
        if let Some(ex) = shell_exit {
            if job {
                // A job that finished before it could be attached to.
                if ex.success() {
                    engine.feed_job_ended(&key, i, sp.pid, ex);
                } else {
                    let out = engine.exec.collect(&sp).await;
                    fail(StartFailure::Command(format!(
                        "{} failed ({ex}): {}",
                        which.field(),
                        out.trim()
                    )));
                }
                return;
            }
            if periodic {
                // The first run ended before it could be attached to: it is the verdict.
                if ex.success() {
                    engine.feed_job_ended(&key, i, sp.pid, ex);
                    engine.feed_instance(&key, i, Input::CheckPassed);
                } else {
                    let out = engine.exec.collect(&sp).await;
                    fail(first_run_failed(ex, &out));
                }
                return;
            }
            if !ex.success() {
                let out = engine.exec.collect(&sp).await;
                return fail(StartFailure::Command(format!(
                    "{} failed ({ex}): {}",
                    which.field(),
                    out.trim()
                )));
            }
            if now >= settle_at && !exec_pending {
                if which == CommandKind::Restart
                    && let Some(prev) = engine.pid_of(&key, i).filter(|p| before.contains(p))
                {
                    // A graceful restart that kept its pid.
                    engine.feed_instance(&key, i, Input::Found { pid: prev });
                    break prev;
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
                return fail(StartFailure::Check(format!(
                    "start check failed after {begin}s: {where_} ({} {ex}){}",
                    which.field(),
                    with_output(&out)
                )));
            }
        }
        if now >= op_deadline && shell_exit.is_some() {
            let stray = end_stray(&engine, &key, &spec, &sp).await;
            let out = engine.exec.collect(&sp).await;
            return fail(StartFailure::Check(format!(
                "start check failed: the process in pid file {} never became {:?} within op_timeout {}s{stray}{}",
                spec.pid_path,
                spec.proc_name,
                spec.op_timeout,
                with_output(&out)
            )));
        }
        if now >= op_deadline {
            engine.exec.kill_group(&sp).await;
            let out = engine.exec.collect(&sp).await;
            return fail(StartFailure::Command(format!(
                "{} did not finish within op_timeout {}s{}",
                which.field(),
                spec.op_timeout,
                with_output(&out)
            )));
        }
        tokio::select! {
            r = &mut sp.exit, if shell_exit.is_none() => {
                shell_exit = Some(r.unwrap_or(ExitInfo::Unknown));
            }
            _ = tokio::time::sleep(poll) => {}
        }
        poll = (poll * 2).min(Duration::from_millis(25));
    };
    drop(permit);
    if job {
        return;
    }
    // The start check: it must stay alive through the window (a timer, no permit held).
    loop {
        match engine.checking(&key, i) {
            None => return,
            Some(Some(exit)) if periodic && exit.info.success() => {
                return engine.feed_instance(&key, i, Input::CheckPassed);
            }
            Some(Some(exit)) if periodic => {
                let out = engine.exec.collect(&sp).await;
                return fail(first_run_failed(exit.info, &out));
            }
            Some(Some(exit)) => {
                let out = engine.exec.collect(&sp).await;
                return fail(StartFailure::Check(format!(
                    "start check failed: pid {found} exited within {}s of the start ({exit}){}",
                    end.max(begin),
                    with_output(&out)
                )));
            }
            Some(None) => {}
        }
        let now = Instant::now();
        if now >= end_at {
            return engine.feed_instance(&key, i, Input::CheckPassed);
        }
        tokio::time::sleep((end_at - now).min(Duration::from_millis(100))).await;
    }
}

/// A periodic job's first run, its start check, failed.
fn first_run_failed(exit: ExitInfo, out: &str) -> StartFailure {
    StartFailure::Check(format!(
        "start check failed: the first run of the periodic job exited ({exit}){}",
        with_output(out)
    ))
}

/// What the pid file says during a start.
enum Fresh {
    /// A process the start command started, which belongs to the definition.
    Found(watch::Attached),
    /// A live process started after the command that is not the program yet: look again.
    Pending,
    Nothing,
}

/// Look at the pid file during a start (on the file-system pool): a process that the start
/// command started (ownership rule, origin "spawned") and that was not tracked before.
async fn find_fresh(engine: &Arc<Engine>, key: &ProcKey, min_ticks: u64, before: &[i32]) -> Fresh {
    let Some(claim) = engine.claim_of(key) else {
        return Fresh::Nothing;
    };
    let claim = Arc::new(claim);
    let Ok(who) = claim.fs_identity(&engine.fs).await else {
        return Fresh::Nothing;
    };
    let before = before.to_vec();
    let want_fd = engine.detection == Detection::Pidfd;
    let e2 = engine.clone();
    let path = std::path::PathBuf::from(&claim.pid_path);
    let job = move || -> Fresh {
        let Ok(pid) = claim.read_pid_file() else {
            return Fresh::Nothing;
        };
        if before.contains(&pid) {
            return Fresh::Nothing;
        }
        match claim.attach(&e2, pid, want_fd) {
            Ok(att) if att.origin == Origin::Spawned => Fresh::Found(att),
            _ => {
                let pending = crate::procinfo::read_stat(pid)
                    .is_some_and(|st| !st.is_exited() && st.starttime >= min_ticks);
                if pending {
                    Fresh::Pending
                } else {
                    Fresh::Nothing
                }
            }
        }
    };
    engine
        .fs
        .run_as(&path, who, crate::fspool::PROBE_DEADLINE, job)
        .await
        .unwrap_or(Fresh::Nothing)
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
    let mut claim = engine.claim_of(key)?;
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

/// After a start whose pid file names a process that never became the program (a wrong
/// `proc_name`, say), end that process when it is provably ours, so that every retry does not
/// leave another copy running: it started after this start command, it is in the command's
/// session or carries its lineage token (an orphan of this command reparented to the agent;
/// being the agent's child alone proves nothing), no definition tracks it, and it may be
/// signalled for this definition. Killed through a pidfd, on the pool. Returns a note for
/// the error message.
async fn end_stray(
    engine: &Arc<Engine>,
    key: &ProcKey,
    spec: &ProcSpec,
    sp: &crate::executor::Spawned,
) -> String {
    let (min_ticks, shell_pid, token) = (sp.spawned_ticks, sp.pid, sp.token);
    let Some(claim) = engine.claim_of(key) else {
        return String::new();
    };
    let claim = Arc::new(claim);
    let Ok(who) = claim.fs_identity(&engine.fs).await else {
        return String::new();
    };
    let e2 = engine.clone();
    let path = std::path::PathBuf::from(&spec.pid_path);
    let job = move || -> Option<(i32, String)> {
        let pid = claim.read_pid_file().ok()?;
        let fd = Arc::new(crate::sys::pidfd_open(pid).ok()?);
        let f = crate::procinfo::read_facts(pid)?;
        let ours = f.starttime >= min_ticks
            && !f.exited
            && (f.session == shell_pid || f.lineage == Some(token))
            && !e2.tracked_elsewhere(pid, &claim.key)
            && !e2.tracked_pids(&claim.key).contains(&pid);
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
        .run_as(&path, who, crate::fspool::PROBE_DEADLINE, job)
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

/// Run the stop (or kill) command of instance `i`; the lifecycle hears how it ended.
pub async fn stop_command(engine: Arc<Engine>, key: ProcKey, i: usize, spec: ProcSpec, kill: bool) {
    let which = if kill {
        CommandKind::Kill
    } else {
        CommandKind::Stop
    };
    let Some(command) = spec.command(which) else {
        return engine.feed_instance(&key, i, Input::CommandDone(Ok(())));
    };
    let _permit = engine.ops.clone().acquire_owned().await;
    let req = engine.command_request(&key, &spec, which.field(), command);
    let r = match engine.exec.run(&req).await {
        Ok(fin) if fin.success() => Ok(()),
        Ok(fin) => {
            let why = if fin.timed_out {
                format!("timed out after {}s", spec.op_timeout)
            } else {
                fin.exit.to_string()
            };
            Err(format!("{} {why}: {}", which.field(), fin.output.trim()))
        }
        Err(e) => Err(format!("{}: {e}", which.field())),
    };
    engine.feed_instance(&key, i, Input::CommandDone(r));
}

/// Run reload_cmd for instance `i`.
pub async fn reload(engine: Arc<Engine>, key: ProcKey, i: usize, spec: ProcSpec) {
    let Some(command) = spec.command(CommandKind::Reload) else {
        return engine.feed_instance(
            &key,
            i,
            Input::CommandDone(Err("reload_cmd is empty".into())),
        );
    };
    let permit = engine.ops.clone().acquire_owned().await;
    let req = engine.command_request(&key, &spec, "reload_cmd", command);
    let r = match engine.exec.run(&req).await {
        Ok(fin) if fin.success() => Ok(()),
        Ok(fin) => {
            let why = if fin.timed_out {
                format!(
                    "timed out after op_timeout {}s (its process group was killed)",
                    spec.op_timeout
                )
            } else {
                fin.exit.to_string()
            };
            Err(format!("reload_cmd failed ({why}): {}", fin.output.trim()))
        }
        Err(e) => Err(format!("reload_cmd: {e}")),
    };
    drop(permit);
    let ok = r.is_ok();
    engine.feed_instance(&key, i, Input::CommandDone(r));
    if ok {
        engine.refresh_version(&key);
    }
}

/// Containment: before instance `i` is started, what is left in its cgroup of an earlier run
/// (the workers of a master that died, a daemon its start command left behind) is stopped,
/// as systemd's default KillMode does: SIGTERM to each (through pidfds, checked to be still
/// in the cgroup), then `cgroup.kill` after `op_timeout`; the start waits until the cgroup is
/// empty. Nothing to do with containment off, or when the cgroup is empty.
async fn clear_leftovers(
    engine: &Arc<Engine>,
    key: &ProcKey,
    i: usize,
    op_timeout: u64,
) -> Result<(), String> {
    let Some(tree) = engine.cgroups.tree().cloned() else {
        return Ok(());
    };
    let Some(claim) = engine.claim_of(key) else {
        return Ok(());
    };
    let claim = Arc::new(claim);
    let dir = tree.instance(key, i);
    let deadline = Instant::now() + secs(op_timeout.max(1));
    let (mut signalled, mut killed) = (false, false);
    let mut step = Duration::from_millis(2);
    loop {
        let (t, d, c, e2) = (tree.clone(), dir.clone(), claim.clone(), engine.clone());
        let now = Instant::now();
        let kill = now >= deadline && !killed;
        let term = !signalled;
        let (populated, foreign) = engine
            .fs
            .run_unkeyed("clearing a cgroup", Duration::from_secs(5), move || {
                let populated = crate::cgroup::populated(&d) == Some(true);
                let sig = if kill {
                    Signal::SIGKILL
                } else {
                    Signal::SIGTERM
                };
                let foreign = if populated && (kill || term) {
                    super::stop::signal_cgroup(&e2, &t, &d, &c, sig)
                } else {
                    Vec::new()
                };
                (populated, foreign)
            })
            .await
            .map_err(|e| e.to_string())?;
        if !foreign.is_empty() {
            // Never ended for this definition: what another account left here stays, and
            // nothing is started beside it.
            return Err(format!(
                "its cgroup {} holds processes that do not belong to it (pids {foreign:?}); they are left alone",
                dir.display()
            ));
        }
        if !populated {
            if signalled {
                engine.events.emit(
                    Some(key),
                    "leftovers_stopped",
                    format!(
                        "processes left in {} by an earlier run were stopped{}",
                        dir.display(),
                        if killed { " (cgroup.kill)" } else { "" }
                    ),
                    serde_json::json!({ "instance": i }),
                );
            }
            return Ok(());
        }
        signalled = true;
        if kill {
            killed = true;
        } else if killed && now >= deadline + Duration::from_secs(5) {
            return Err(format!(
                "{} still holds processes after cgroup.kill",
                dir.display()
            ));
        }
        tokio::time::sleep(step).await;
        step = (step * 2).min(Duration::from_millis(50));
    }
}

/// Signal a process tree (on the pool: /proc is read).
pub async fn signal(engine: Arc<Engine>, t: Arc<Targets>, kill: bool) {
    let sig = if kill {
        Signal::SIGKILL
    } else {
        Signal::SIGTERM
    };
    let e2 = engine.clone();
    let _ = engine
        .fs
        .run_unkeyed("signal", Duration::from_secs(5), move || t.signal(&e2, sig))
        .await;
}

/// Watch until nothing of instance `i`'s tree is left (one /proc snapshot per look, on the
/// pool), then tell the lifecycle; give up when the instance is no longer being stopped.
pub async fn watch_gone(engine: Arc<Engine>, key: ProcKey, i: usize, t: Arc<Targets>) {
    let mut step = Duration::from_millis(5);
    // Containment: the cgroup's `cgroup.events` is watched (inotify), so the stop hears at
    // once when the cgroup empties; the /proc look stays for what lies outside it, at a slow
    // pace.
    let watch = t
        .cgroup
        .as_ref()
        .and_then(|(_, dir)| crate::cgroup::events_watch(dir).ok())
        .and_then(|fd| crate::sys::async_owned(fd).ok());
    loop {
        if !engine.stopping(&key, i) {
            return;
        }
        let (e2, t2) = (engine.clone(), t.clone());
        let left = engine
            .fs
            .run_unkeyed("stop check", Duration::from_secs(5), move || t2.left(&e2))
            .await
            .unwrap_or_else(|_| vec![-1]);
        if left.is_empty() {
            return engine.feed_instance(&key, i, Input::Gone);
        }
        match &watch {
            Some(w) => {
                let slow = tokio::time::sleep(Duration::from_millis(500));
                tokio::select! {
                    r = w.readable() => {
                        if let Ok(mut g) = r {
                            crate::cgroup::drain_events(g.get_inner());
                            g.clear_ready();
                        }
                    }
                    _ = slow => {}
                }
            }
            None => {
                tokio::time::sleep(step).await;
                step = (step * 2).min(Duration::from_millis(50));
            }
        }
    }
}
