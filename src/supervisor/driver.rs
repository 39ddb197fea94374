//! Driving the lifecycle: inputs go in under the registry's lock ([`Engine::feed`]), the
//! effects that come out are dispatched in order before the lock is released (cheap ones
//! done there and then, the others handed to [`super::runner`] tasks that report back), and
//! the facts the lifecycle does not keep (tracked pids and their watchers, the last exit,
//! the last start time, limit stops) are kept here.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::lifecycle::{
    Ctx, Effect, Exit, Hold, Input, Op, OpId, Outcome, ProcEffect, ProcInput, State,
};
use super::registry::{Entry, LastExit, LimitStop, Registry, Tracked};
use super::{Answer, Detection, Engine, Instance, runner, stop, watch};
use crate::spec::{CommandKind, ProcKey};
use crate::sys::ExitInfo;

impl Engine {
    /// The lifecycle context of an entry's definition.
    pub(crate) fn base_ctx(&self, e: &Entry) -> Ctx {
        let s = &e.def.spec;
        let valid = e.invalid.is_none();
        Ctx {
            auto_type: s.auto_type,
            managed: e.life.intent.managed,
            expect_running: e.life.intent.expect_running,
            backoff: self.backoff,
            check: s.start_check_window(),
            op_timeout: Duration::from_secs(s.op_timeout.max(1)),
            stop_grace: Duration::from_secs(s.stop_check_secs.max(1)),
            kill_grace: Duration::from_secs(2),
            cycle: Duration::from_secs(s.cycle_time.max(1)),
            start_retries: s.start_retries.unwrap_or(0),
            start_interval: Duration::from_secs(s.start_interval.unwrap_or(10)),
            max_restarts: s.max_restarts,
            has_start_cmd: valid && s.command(CommandKind::Start).is_some(),
            has_stop_cmd: s.command(CommandKind::Stop).is_some(),
            has_kill_cmd: s.command(CommandKind::Kill).is_some(),
            has_restart_cmd: s.command(CommandKind::Restart).is_some(),
            has_reload_cmd: s.command(CommandKind::Reload).is_some(),
        }
    }

    /// A new operation id.
    pub(crate) fn op_id(&self) -> OpId {
        self.next_op.fetch_add(1, Ordering::Relaxed)
    }

    /// Wait for the answer of operation `id` (registered before it is fed).
    pub(crate) fn answer_of(&self, id: OpId) -> tokio::sync::oneshot::Receiver<Answer> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        rx
    }

    /// Wait until no operation runs on `key` (a definition write applies between
    /// operations, never in the middle of one).
    pub(crate) async fn no_operation(&self, key: &ProcKey) {
        loop {
            let ended = self.op_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let running = self
                .reg()
                .get(key)
                .is_some_and(|e| e.life.current.is_some());
            if !running {
                return;
            }
            ended.await;
        }
    }

    fn complete(&self, id: OpId, answer: Answer) {
        let w = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(w) = w {
            let _ = w.send(answer);
        }
        self.op_ended.notify_waiters();
    }

    /// Feed `input` to `key`'s process. Returns false when the key is not registered.
    pub(crate) fn feed(self: &Arc<Self>, key: &ProcKey, input: ProcInput) -> bool {
        let mut reg = self.reg();
        self.feed_locked(&mut reg, key, input)
    }

    /// Feed `input` to instance `i` of `key`.
    pub(crate) fn feed_instance(self: &Arc<Self>, key: &ProcKey, i: usize, input: Input) {
        self.feed(key, ProcInput::Instance { i, input });
    }

    fn feed_locked(self: &Arc<Self>, reg: &mut Registry, key: &ProcKey, input: ProcInput) -> bool {
        let Some(e) = reg.get(key) else {
            return false;
        };
        let base = self.base_ctx(e);
        let before: Vec<State> = e.life.instances.iter().map(|i| i.state).collect();
        let current_op = e.life.current.as_ref().map(|c| c.op);
        let (life, fx) = e
            .life
            .step(&base, input, Instant::now(), crate::util::random_unit());
        let Some(e) = reg.get_mut(key) else {
            return false;
        };
        e.life = life;
        // Entering "running" from a start: the start time and the version.
        let mut started = false;
        for (i, inst) in e.life.instances.iter().enumerate() {
            let was = before.get(i).copied();
            if matches!(inst.state, State::Running { .. })
                && matches!(
                    was,
                    Some(State::Checking { .. } | State::Starting { .. } | State::Retrying { .. })
                )
            {
                started = true;
            }
        }
        if started {
            e.last_start_time = crate::util::unix_now();
            e.health.failures = 0;
        }
        for f in fx {
            self.dispatch(reg, key, current_op, f);
        }
        if let Some(e) = reg.get_mut(key) {
            let committing = e
                .life
                .current
                .as_ref()
                .is_some_and(|c| !matches!(c.stage, super::lifecycle::Stage::Instances));
            if !committing {
                e.pending_intent = None;
            }
        }
        if started && let Some(e) = reg.get(key) {
            self.refresh_version_of(key, &e.def.spec);
        }
        true
    }

    /// Carry out one effect (see the module docs), under the lock.
    fn dispatch(
        self: &Arc<Self>,
        reg: &mut Registry,
        key: &ProcKey,
        op: Option<Op>,
        f: ProcEffect,
    ) {
        match f {
            ProcEffect::Instance { i, effect } => self.dispatch_instance(reg, key, i, effect),
            ProcEffect::CommitIntent(intent) => {
                let Some(e) = reg.get_mut(key) else { return };
                e.pending_intent = Some(intent);
                let json = e.state_json();
                // Stop, kill and unmanage must land even on a full state directory.
                let urgent = matches!(op, Some(Op::Stop | Op::Kill | Op::Unmanage))
                    || (!intent.managed && !intent.expect_running);
                let pending: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
                    if urgent {
                        Box::pin(self.store.put_state_urgent(key, json))
                    } else {
                        Box::pin(self.store.put_state_queued(key, json))
                    };
                let (engine, key) = (self.clone(), key.clone());
                tokio::spawn(async move {
                    let r = pending.await.map_err(|e| e.to_string());
                    if let Err(why) = &r {
                        tracing::warn!(process = %key, error = %why, "intent not committed");
                    }
                    engine.feed(&key, ProcInput::Committed(r));
                });
            }
            ProcEffect::Answer {
                id,
                outcome,
                not_durable,
            } => self.complete(id, (outcome, not_durable)),
            ProcEffect::Forget { id } => {
                reg.remove(key);
                self.complete(id, (Outcome::Done(String::new()), None));
            }
        }
    }

    fn dispatch_instance(
        self: &Arc<Self>,
        reg: &mut Registry,
        key: &ProcKey,
        i: usize,
        effect: Effect,
    ) {
        let Some(e) = reg.get_mut(key) else { return };
        let state = e.life.instances.get(i).map(|x| x.state);
        match effect {
            Effect::Start { cmd, job } => {
                let hold = state.and_then(|s| s.hold()).unwrap_or(Hold::Job);
                let spec = e.def.spec.clone();
                tokio::spawn(runner::start(
                    self.clone(),
                    key.clone(),
                    i,
                    spec,
                    cmd,
                    job,
                    hold,
                ));
            }
            Effect::RunStop { kill } => {
                let spec = e.def.spec.clone();
                tokio::spawn(runner::stop_command(
                    self.clone(),
                    key.clone(),
                    i,
                    spec,
                    kill,
                ));
            }
            Effect::RunReload => {
                let spec = e.def.spec.clone();
                tokio::spawn(runner::reload(self.clone(), key.clone(), i, spec));
            }
            Effect::Signal { kill } => {
                let t = stop::Targets::of(self, reg, key, i, state.and_then(|s| s.pid()));
                tokio::spawn(runner::signal(self.clone(), Arc::new(t), kill));
            }
            Effect::WatchGone => {
                let t = stop::Targets::of(self, reg, key, i, state.and_then(|s| s.pid()));
                tokio::spawn(runner::watch_gone(
                    self.clone(),
                    key.clone(),
                    i,
                    Arc::new(t),
                ));
            }
            Effect::Persist => self.store.put_state_bg(key, e.state_json()),
            Effect::Emit {
                kind,
                message,
                mut data,
            } => {
                // A backoff says when its attempt comes, in wall-clock time (the lifecycle
                // knows only the delay).
                if kind == "backoff"
                    && let Some(d) = data.get("delay_secs").and_then(serde_json::Value::as_f64)
                    && let Some(m) = data.as_object_mut()
                {
                    let at = crate::util::unix_millis() + (d * 1000.0).round() as i64;
                    m.insert("next_attempt_ms".into(), at.into());
                }
                self.events.emit(Some(key), kind, message, data)
            }
            Effect::Answer { id, outcome } => self.complete(id, (outcome, None)),
            Effect::Untrack { pid } => {
                reg.untrack(key, pid);
            }
            Effect::Timer(_) => self.wake.notify_one(),
            Effect::LimitStopped { cause } => {
                e.limit_stops += 1;
                e.last_limit = Some(LimitStop {
                    at: crate::util::unix_now(),
                    cause,
                });
                e.over_limit = 0;
                e.sample = None;
            }
        }
    }

    /// Start tracking `att` for `key`: its identity, pidfd and exit watcher.
    fn track_locked(
        self: &Arc<Self>,
        reg: &mut Registry,
        key: &ProcKey,
        att: watch::Attached,
        by_agent: bool,
    ) {
        let pid = att.pid;
        let identity = Instance {
            pid,
            starttime: att.facts.starttime,
            boot_id: crate::procinfo::boot_id().to_string(),
            pgid: att.facts.pgrp,
            sid: att.facts.session,
            since: crate::util::unix_now(),
            started_by_agent: by_agent,
        };
        let fd = att.fd.map(Arc::new);
        let watcher = fd
            .clone()
            .map(|fd| self.spawn_watcher(key.clone(), pid, identity.starttime, fd));
        reg.track(
            key,
            Tracked {
                identity,
                fd,
                watcher,
                attached_at: Instant::now(),
            },
        );
    }

    fn spawn_watcher(
        self: &Arc<Self>,
        key: ProcKey,
        pid: i32,
        starttime: u64,
        fd: Arc<std::os::fd::OwnedFd>,
    ) -> tokio::task::AbortHandle {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            match crate::sys::async_pidfd(fd.clone()) {
                Ok(afd) => {
                    let _ = afd.readable().await;
                }
                Err(e) => {
                    tracing::error!(pid, error = %e, "cannot watch pidfd; polling this process");
                    loop {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let Some(engine) = weak.upgrade() else { return };
                        let alive = engine
                            .fs
                            .run_unkeyed("exit poll", Duration::from_secs(5), move || {
                                watch::alive(pid, starttime)
                            })
                            .await
                            .unwrap_or(true);
                        if !alive {
                            break;
                        }
                    }
                }
            }
            let Some(engine) = weak.upgrade() else { return };
            let exit = watch::collect_exit(pid, starttime, Some(&fd), &engine.reaper);
            engine.feed_exit(&key, pid, starttime, exit);
        })
        .abort_handle()
    }

    /// A start found its process: track it and tell instance `i`, if it still waits for one.
    /// Returns false (the process is then left alone, untracked) otherwise.
    pub(crate) fn feed_found(
        self: &Arc<Self>,
        key: &ProcKey,
        i: usize,
        att: watch::Attached,
    ) -> bool {
        let mut reg = self.reg();
        let waiting = reg
            .get(key)
            .and_then(|e| e.life.instances.get(i))
            .is_some_and(|x| matches!(x.state, State::Starting { .. }));
        if !waiting {
            return false;
        }
        let pid = att.pid;
        if att.outside_cgroup
            && let Some(spec) = reg.get(key).map(|e| e.def.spec.clone())
        {
            self.move_into_cgroup(key, i, spec, &att);
        }
        if !reg.get(key).is_some_and(|e| e.tracked.contains_key(&pid)) {
            self.track_locked(&mut reg, key, att, true);
        }
        self.feed_locked(
            &mut reg,
            key,
            ProcInput::Instance {
                i,
                input: Input::Found { pid },
            },
        )
    }

    /// A job that ended before it could be attached to: found, and exited.
    pub(crate) fn feed_job_ended(
        self: &Arc<Self>,
        key: &ProcKey,
        i: usize,
        pid: i32,
        exit: ExitInfo,
    ) {
        let mut reg = self.reg();
        if let Some(e) = reg.get_mut(key) {
            e.last_exit = Some(LastExit {
                pid,
                at: crate::util::unix_now(),
                exit,
                by_operator: false,
                oom: false,
            });
        }
        self.feed_locked(
            &mut reg,
            key,
            ProcInput::Instance {
                i,
                input: Input::Found { pid },
            },
        );
        self.feed_locked(
            &mut reg,
            key,
            ProcInput::Instance {
                i,
                input: exited(pid, exit),
            },
        );
    }

    /// Discovery found a running process of `key`: adopt it into instance `i` (or the first
    /// idle one). Returns false when it was not adopted (another key tracks it, no instance
    /// takes it).
    pub(crate) fn feed_adopted(
        self: &Arc<Self>,
        key: &ProcKey,
        i: Option<usize>,
        att: watch::Attached,
        by_agent: bool,
    ) -> bool {
        let mut reg = self.reg();
        let pid = att.pid;
        if reg.key_of_pid(pid).is_some() {
            return false;
        }
        let Some(e) = reg.get(key) else { return false };
        let Some(i) = i.or_else(|| e.idle_instance()) else {
            return false;
        };
        if att.outside_cgroup
            && let Some(spec) = reg.get(key).map(|e| e.def.spec.clone())
        {
            self.move_into_cgroup(key, i, spec, &att);
        }
        self.track_locked(&mut reg, key, att, by_agent);
        self.feed_locked(
            &mut reg,
            key,
            ProcInput::Instance {
                i,
                input: Input::Adopted { pid },
            },
        );
        // Adopted only if the instance took it; otherwise let it go.
        let taken = reg
            .get(key)
            .and_then(|e| e.life.instances.get(i))
            .is_some_and(|x| x.state.pid() == Some(pid));
        if !taken {
            reg.untrack(key, pid);
        } else if let Some(e) = reg.get_mut(key) {
            e.last_refusal = None;
            self.store.put_state_bg(key, e.state_json());
        }
        taken
    }

    /// A tracked process exited (its watcher, or the poll).
    pub(crate) fn feed_exit(
        self: &Arc<Self>,
        key: &ProcKey,
        pid: i32,
        starttime: u64,
        exit: ExitInfo,
    ) {
        let mut reg = self.reg();
        let Some(e) = reg.get_mut(key) else { return };
        if e.tracked
            .get(&pid)
            .is_none_or(|t| t.identity.starttime != starttime)
        {
            return;
        }
        let i = e.instance_of(pid);
        let hold = i.and_then(|i| e.life.instances[i].state.hold());
        // Containment with the memory controller: the cgroup says whether the OOM killer
        // did it (a small read of memory.events, only for a SIGKILL).
        let oom = matches!(exit, ExitInfo::Signal(9)) && i.is_some_and(|i| self.took_oom(key, i));
        e.last_exit = Some(LastExit {
            pid,
            at: crate::util::unix_now(),
            exit,
            by_operator: hold.is_some_and(Hold::by_operator),
            oom,
        });
        match i {
            Some(i) => {
                self.feed_locked(
                    &mut reg,
                    key,
                    ProcInput::Instance {
                        i,
                        input: Input::Exited {
                            pid,
                            exit: Exit { info: exit, oom },
                        },
                    },
                );
            }
            None => {
                reg.untrack(key, pid);
            }
        }
        if let Some(e) = reg.get(key) {
            self.store.put_state_bg(key, e.state_json());
        }
    }

    /// Poll mode: exits noticed by reading /proc (on the pool), fed like a watcher's.
    pub(crate) fn poll_exits(self: &Arc<Self>) {
        let tracked: Vec<(ProcKey, i32, u64)> = self
            .reg()
            .entries
            .values()
            .flat_map(|e| {
                e.tracked
                    .values()
                    .map(|t| (e.def.key.clone(), t.identity.pid, t.identity.starttime))
            })
            .collect();
        if tracked.is_empty() || self.detection != Detection::Poll {
            return;
        }
        let engine = self.clone();
        tokio::spawn(async move {
            let e2 = engine.clone();
            let gone = engine
                .fs
                .run_unkeyed("exit poll", Duration::from_secs(5), move || {
                    let snap = crate::procinfo::Snapshot::take();
                    let gone: Vec<(ProcKey, i32, u64)> = tracked
                        .into_iter()
                        .filter(|(_, pid, st)| !snap.alive(*pid, *st))
                        .collect();
                    if !gone.is_empty() {
                        e2.reaper.sweep();
                    }
                    gone
                })
                .await
                .unwrap_or_default();
            for (key, pid, st) in gone {
                let exit = watch::collect_exit(pid, st, None, &engine.reaper);
                engine.feed_exit(&key, pid, st, exit);
            }
        });
    }

    /// The earliest deadline of any process.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let reg = self.reg();
        reg.entries
            .values()
            .filter_map(|e| e.life.deadline(&self.base_ctx(e)))
            .min()
    }

    /// Feed `Timer` to every process whose deadline passed.
    pub(crate) fn fire_due(self: &Arc<Self>, now: Instant) {
        let due: Vec<ProcKey> = {
            let reg = self.reg();
            reg.entries
                .values()
                .filter(|e| e.life.deadline(&self.base_ctx(e)).is_some_and(|d| d <= now))
                .map(|e| e.def.key.clone())
                .collect()
        };
        for key in due {
            self.feed(&key, ProcInput::Timer);
        }
    }

    /// Ask every process to reconsider (at agent start: start what should run).
    pub(crate) fn reconcile_all(self: &Arc<Self>) {
        let keys: Vec<ProcKey> = self.reg().entries.keys().cloned().collect();
        for key in keys {
            self.feed(&key, ProcInput::Timer);
        }
    }

    /// Instance `i` of `key` is checking its start: `Some(exited)` while it is.
    pub(crate) fn checking(&self, key: &ProcKey, i: usize) -> Option<Option<Exit>> {
        let reg = self.reg();
        match reg.get(key)?.life.instances.get(i)?.state {
            State::Checking { exited, .. } => Some(exited),
            _ => None,
        }
    }

    /// Instance `i` of `key` is being stopped.
    pub(crate) fn stopping(&self, key: &ProcKey, i: usize) -> bool {
        let reg = self.reg();
        reg.get(key)
            .and_then(|e| e.life.instances.get(i))
            .is_some_and(|x| matches!(x.state, State::Stopping { .. }))
    }

    /// The pids tracked for `key` now.
    pub(crate) fn tracked_pids(&self, key: &ProcKey) -> Vec<i32> {
        self.reg()
            .get(key)
            .map(|e| e.tracked.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Record a command the agent ran for `key` (ownership evidence).
    pub(crate) fn note_spawn(&self, key: &ProcKey, spawn: super::ownership::Spawn) {
        if let Some(e) = self.reg().get_mut(key) {
            e.note_spawn(spawn);
        }
    }

    /// The live pid of instance `i`, if it runs.
    pub(crate) fn pid_of(&self, key: &ProcKey, i: usize) -> Option<i32> {
        self.reg()
            .get(key)
            .and_then(|e| e.life.instances.get(i))
            .and_then(|x| x.state.pid())
    }

    /// Feed the instances of `key` an input that concerns the whole process (health, limit).
    pub(crate) fn feed_running(self: &Arc<Self>, key: &ProcKey, input: Input) {
        let mut reg = self.reg();
        let running: Vec<usize> = reg
            .get(key)
            .map(|e| {
                e.life
                    .instances
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| matches!(x.state, State::Running { .. }))
                    .map(|(i, _)| i)
                    .collect()
            })
            .unwrap_or_default();
        for i in running {
            self.feed_locked(
                &mut reg,
                key,
                ProcInput::Instance {
                    i,
                    input: input.clone(),
                },
            );
        }
    }
}

/// The input for `pid`'s exit as the reaper or its pidfd told it (an OOM kill is told by the
/// cgroup, not here).
fn exited(pid: i32, exit: crate::sys::ExitInfo) -> Input {
    Input::Exited {
        pid,
        exit: Exit {
            info: exit,
            oom: false,
        },
    }
}
