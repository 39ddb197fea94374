//! The transitions of one instance: [`Instance::step`].

use std::time::{Duration, Instant};

use super::{
    Ctx, Effect, Exit, Hold, Input, Instance, KILL_WAIT, Op, OpId, Outcome, StartCmd, StartFailure,
    State, StopStep,
};
use crate::spec::AutoType;
use crate::sys::ExitInfo;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

impl Instance {
    pub fn new(state: State) -> Instance {
        Instance {
            state,
            failures: 0,
            restarts: 0,
            tries: 0,
            last_cycle: None,
            message: String::new(),
            limit_cause: None,
            delay: Duration::ZERO,
        }
    }

    /// When this instance needs a `Timer` input next.
    pub fn deadline(&self, ctx: &Ctx) -> Option<Instant> {
        match self.state {
            State::Backoff { until }
            | State::Waiting { until }
            | State::Retrying { until, .. }
            | State::Checking { until, .. }
            | State::Stopping { until, .. } => Some(until),
            State::Running { since, .. } => {
                // The failure count resets once it stayed up `reset_after`; a periodic job's
                // next cycle comes due (and is skipped while this run lives).
                let reset = (self.failures > 0).then(|| since + ctx.backoff.reset_after);
                let cycle = (ctx.auto_type == AutoType::Periodic && ctx.wants_running())
                    .then(|| self.next_cycle(ctx, since));
                match (reset, cycle) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            _ => None,
        }
    }

    fn next_cycle(&self, ctx: &Ctx, fallback: Instant) -> Instant {
        self.last_cycle.unwrap_or(fallback) + ctx.cycle.max(secs(1))
    }

    /// One transition (see the module docs). `rng` is a uniform number in [0, 1) (backoff
    /// jitter).
    pub fn step(&self, ctx: &Ctx, input: Input, now: Instant, rng: f64) -> (Instance, Vec<Effect>) {
        let mut next = self.clone();
        let mut fx = Vec::new();
        let settle = !matches!(input, Input::Unregistered | Input::Shutdown);
        next.apply(ctx, input, now, rng, &mut fx);
        if settle {
            next.reconcile(ctx, now, &mut fx);
        }
        if let Some(t) = next.deadline(ctx)
            && Some(t) != self.deadline(ctx)
        {
            fx.push(Effect::Timer(t));
        }
        (next, fx)
    }

    fn apply(&mut self, ctx: &Ctx, input: Input, now: Instant, rng: f64, fx: &mut Vec<Effect>) {
        match input {
            Input::Op { id, op } => self.on_op(ctx, id, op, now, fx),
            Input::Found { pid } => self.on_found(ctx, pid, now, fx),
            Input::CheckPassed => {
                if let State::Checking { .. } = self.state {
                    self.check_verdict(ctx, now, rng, fx);
                }
            }
            Input::StartFailed(f) => self.on_start_failed(ctx, f, now, rng, fx),
            Input::Exited { pid, exit } => self.on_exited(ctx, pid, exit, now, rng, fx),
            Input::CommandDone(r) => self.on_command_done(r, now, fx),
            Input::Gone | Input::CgroupEmptied => self.on_gone(ctx, now, rng, fx),
            Input::Timer => self.on_timer(ctx, now, fx),
            Input::Adopted { pid } => self.on_adopted(pid, now, fx),
            Input::Lost => {
                // A single run that ended while the agent was down has completed.
                if ctx.auto_type == AutoType::SingleRun && self.state.is_idle() {
                    self.state = State::Completed;
                }
            }
            Input::DefinitionChanged | Input::Shutdown => {}
            Input::Unregistered => {
                if let Some(pid) = self.state.pid() {
                    fx.push(Effect::Untrack { pid });
                }
                self.state = State::Stopped;
            }
            Input::LimitBreach { cause } => {
                if let State::Running { pid, .. } = self.state
                    && ctx.managed
                {
                    self.limit_cause = Some(cause);
                    self.begin_stop(ctx, Hold::Limit, false, Some(pid), now, fx);
                }
            }
            Input::HealthFailed { why } => {
                if let State::Running { pid, .. } = self.state
                    && ctx.wants_running()
                {
                    fx.push(Effect::Emit {
                        kind: "health_failed",
                        message: format!("{why}; restarting"),
                        data: serde_json::Value::Null,
                    });
                    self.begin_stop(ctx, Hold::Liveness, false, Some(pid), now, fx);
                }
            }
        }
    }

    fn answer(fx: &mut Vec<Effect>, id: OpId, outcome: Outcome) {
        fx.push(Effect::Answer { id, outcome });
    }

    fn on_op(&mut self, ctx: &Ctx, id: OpId, op: Op, now: Instant, fx: &mut Vec<Effect>) {
        if let Some(h) = self.state.hold() {
            // The process queues operations while an instance is held; never interleave.
            Self::answer(
                fx,
                id,
                Outcome::Busy(format!("the process is busy ({})", h.name())),
            );
            return;
        }
        let hold = Hold::Op(id, op);
        match (op, self.state) {
            (Op::Start, State::Running { pid, .. }) => {
                Self::answer(fx, id, Outcome::AlreadyRunning(vec![pid]));
            }
            (Op::Start, _) => {
                // An operator's start is a fresh attempt: it leaves backoff or fatal, and
                // the count of failures in a row starts again.
                self.tries = 1;
                self.fresh_count();
                self.start(ctx, hold, StartCmd::Start, None, now, fx);
            }
            (Op::Restart, st) if ctx.has_restart_cmd && op != Op::Replace => {
                self.tries = 1;
                self.fresh_count();
                self.start(ctx, hold, StartCmd::Restart, st.pid(), now, fx);
            }
            // Without restart_cmd (and always to replace a definition): stop, then start.
            (Op::Restart | Op::Replace, State::Running { pid, .. }) => {
                self.begin_stop(ctx, hold, false, Some(pid), now, fx);
            }
            (Op::Replace, _) => {
                // Not running: the new definition applies at its next start.
                Self::answer(fx, id, Outcome::Done("not running".into()));
            }
            (Op::Restart, _) => {
                self.tries = 1;
                self.fresh_count();
                self.start(ctx, hold, StartCmd::Start, None, now, fx);
            }
            (Op::Stop | Op::Kill, State::Running { pid, .. }) => {
                self.begin_stop(ctx, hold, op == Op::Kill, Some(pid), now, fx);
            }
            (Op::Stop | Op::Kill, _) => {
                // Nothing runs; whatever was scheduled (a restart, a cycle) is cancelled.
                self.state = State::Stopped;
                self.message.clear();
                Self::answer(fx, id, Outcome::NotRunning);
            }
            (Op::Manage, State::Completed | State::Fatal) => {
                // Managing a finished single run, or a process given up, runs it again.
                self.state = State::Stopped;
                self.fresh_count();
                self.message.clear();
                Self::answer(fx, id, Outcome::Done(String::new()));
            }
            (Op::Unmanage, State::Backoff { .. } | State::Waiting { .. } | State::Fatal) => {
                self.state = State::Stopped;
                Self::answer(fx, id, Outcome::Done(String::new()));
            }
            (Op::Manage | Op::Unmanage, _) => Self::answer(fx, id, Outcome::Done(String::new())),
            (Op::Reload, st) => {
                self.state = State::Reloading {
                    hold,
                    pid: st.pid(),
                };
                fx.push(Effect::RunReload);
            }
        }
    }

    /// Forget the failures in a row (an operator's fresh attempt).
    fn fresh_count(&mut self) {
        self.failures = 0;
        self.delay = Duration::ZERO;
    }

    fn start(
        &mut self,
        ctx: &Ctx,
        hold: Hold,
        cmd: StartCmd,
        prev: Option<i32>,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        if hold == Hold::Job || ctx.auto_type == AutoType::Periodic {
            // The schedule stays aligned (no drift) unless more than a cycle late.
            self.last_cycle = Some(super::super::policy::cycle_start(
                self.last_cycle,
                ctx.cycle.max(secs(1)),
                now,
            ));
        }
        self.state = State::Starting { hold, cmd, prev };
        fx.push(Effect::Start {
            cmd,
            job: hold == Hold::Job,
        });
    }

    fn begin_stop(
        &mut self,
        ctx: &Ctx,
        hold: Hold,
        kill: bool,
        pid: Option<i32>,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let has_cmd = if kill {
            ctx.has_kill_cmd
        } else {
            ctx.has_stop_cmd
        };
        let (step, until) = if has_cmd {
            fx.push(Effect::RunStop { kill });
            let grace = if kill { ctx.kill_grace } else { ctx.stop_grace };
            (StopStep::Command, now + grace)
        } else if kill {
            fx.push(Effect::Signal { kill: true });
            (StopStep::Kill, now + KILL_WAIT)
        } else {
            fx.push(Effect::Signal { kill: false });
            (StopStep::Term, now + ctx.op_timeout)
        };
        fx.push(Effect::WatchGone);
        self.state = State::Stopping {
            hold,
            step,
            until,
            pid,
        };
    }

    fn on_found(&mut self, ctx: &Ctx, pid: i32, now: Instant, fx: &mut Vec<Effect>) {
        let State::Starting { hold, .. } = self.state else {
            return;
        };
        if hold == Hold::Job {
            self.state = State::Running {
                pid,
                healthy: true,
                since: now,
            };
            fx.push(Effect::Emit {
                kind: "job_started",
                message: format!("pid {pid}"),
                data: serde_json::json!({"pid": pid}),
            });
            fx.push(Effect::Persist);
            return;
        }
        // The supervisor checks it through the window and reports the verdict; the deadline
        // only guards against a verdict that never comes.
        let (begin, end) = ctx.check;
        self.state = State::Checking {
            hold,
            pid,
            until: now + secs(end.max(begin)) + ctx.op_timeout,
            exited: None,
        };
    }

    fn on_start_failed(
        &mut self,
        ctx: &Ctx,
        f: StartFailure,
        now: Instant,
        rng: f64,
        fx: &mut Vec<Effect>,
    ) {
        let hold = match self.state {
            State::Starting { hold, .. } | State::Checking { hold, .. } => hold,
            _ => return,
        };
        if let State::Checking {
            pid, exited: None, ..
        } = self.state
        {
            fx.push(Effect::Untrack { pid });
        }
        // A failed start counts, and is never followed by an immediate retry.
        self.failures = self.failures.saturating_add(1);
        self.message = f.message().to_string();
        fx.push(Effect::Emit {
            kind: "start_failed",
            message: f.message().to_string(),
            data: serde_json::json!({"failures": self.failures}),
        });
        fx.push(Effect::Persist);
        match hold {
            Hold::Op(id, _) => {
                if self.tries <= ctx.start_retries {
                    self.tries += 1;
                    self.state = State::Retrying {
                        hold,
                        until: now + ctx.start_interval,
                    };
                    return;
                }
                let msg = if ctx.start_retries > 0 {
                    format!("{} (after {} attempts)", f.message(), ctx.start_retries + 1)
                } else {
                    f.message().to_string()
                };
                let outcome = match f {
                    StartFailure::Check(_) => Outcome::StartCheckFailed(msg),
                    StartFailure::Command(_) => Outcome::CommandFailed(msg),
                };
                Self::answer(fx, id, outcome);
                self.after_failed_start(ctx, now, rng, fx);
            }
            Hold::Job => {
                self.state = match ctx.auto_type {
                    AutoType::SingleRun => State::Completed,
                    _ if ctx.wants_running() => State::Waiting {
                        until: self.next_cycle(ctx, now),
                    },
                    _ => State::Stopped,
                };
            }
            _ => self.after_failed_start(ctx, now, rng, fx),
        }
    }

    /// Where a process whose start failed goes: a single run is over; a managed process
    /// backs off (at least the second step of the backoff); others stop.
    fn after_failed_start(&mut self, ctx: &Ctx, now: Instant, rng: f64, fx: &mut Vec<Effect>) {
        if ctx.auto_type == AutoType::SingleRun {
            self.state = State::Completed;
            return;
        }
        if !ctx.wants_running() {
            self.state = State::Stopped;
            return;
        }
        if ctx.auto_type == AutoType::Periodic {
            // A failed run of a managed job is a failed cycle: the schedule goes on.
            self.state = State::Waiting {
                until: self.next_cycle(ctx, now),
            };
            return;
        }
        if self.gives_up(ctx, fx) {
            return;
        }
        self.back_off(ctx, "start_failed", now, rng, fx);
    }

    /// A failure was counted and the process is not given up: wait `initial` · 2^(n-1) (to
    /// the cap) before the next attempt, visibly. `cause` says which failure: start_failed,
    /// exited (a run that was not healthy), health, limit.
    fn back_off(
        &mut self,
        ctx: &Ctx,
        cause: &'static str,
        now: Instant,
        rng: f64,
        fx: &mut Vec<Effect>,
    ) -> Duration {
        let delay = ctx.backoff.delay(self.failures.max(1), rng);
        self.delay = delay;
        self.state = State::Backoff { until: now + delay };
        fx.push(Effect::Emit {
            kind: "backoff",
            message: format!(
                "next start attempt in {:.1}s (failure {} in a row: {cause})",
                delay.as_secs_f64(),
                self.failures
            ),
            data: serde_json::json!({
                "delay_secs": delay.as_secs_f64(),
                "failures": self.failures,
                "cause": cause,
            }),
        });
        delay
    }

    /// `max_restarts` failures in a row: give up, visibly.
    fn gives_up(&mut self, ctx: &Ctx, fx: &mut Vec<Effect>) -> bool {
        match ctx.max_restarts {
            Some(max) if self.failures > max => {
                self.state = State::Fatal;
                self.message = format!(
                    "given up after {} failures in a row (max_restarts {max}); start or manage it to try again",
                    self.failures
                );
                self.delay = Duration::ZERO;
                fx.push(Effect::Emit {
                    kind: "fatal",
                    message: self.message.clone(),
                    data: serde_json::json!({"failures": self.failures, "max_restarts": max}),
                });
                fx.push(Effect::Persist);
                true
            }
            _ => false,
        }
    }

    fn on_exited(
        &mut self,
        ctx: &Ctx,
        pid: i32,
        exit: Exit,
        now: Instant,
        rng: f64,
        fx: &mut Vec<Effect>,
    ) {
        match self.state {
            State::Running {
                pid: p,
                healthy,
                since,
            } if p == pid => {
                fx.push(Effect::Untrack { pid });
                let uptime = now.saturating_duration_since(since);
                let healthy = super::super::policy::healthy_run(healthy, check_secs(ctx), uptime);
                let kind = if ctx.auto_type == AutoType::Periodic {
                    "cycle_finished"
                } else {
                    "exited"
                };
                fx.push(Effect::Emit {
                    kind,
                    message: format!(
                        "pid {pid} exited ({exit}) after {:.1}s",
                        uptime.as_secs_f64()
                    ),
                    data: serde_json::json!({
                        "pid": pid,
                        "exit": exit.info,
                        "uptime_secs": uptime.as_secs_f64(),
                        "healthy": healthy,
                    }),
                });
                self.on_death(ctx, exit, healthy, now, rng, fx);
                fx.push(Effect::Persist);
            }
            State::Checking {
                hold,
                pid: p,
                until,
                exited: None,
            } if p == pid => {
                // Dead within the window: the verdict (with the command's output) follows.
                fx.push(Effect::Untrack { pid });
                self.state = State::Checking {
                    hold,
                    pid,
                    until,
                    exited: Some(exit),
                };
            }
            State::Stopping {
                hold,
                step,
                until,
                pid: Some(p),
            } if p == pid => {
                fx.push(Effect::Untrack { pid });
                self.state = State::Stopping {
                    hold,
                    step,
                    until,
                    pid: None,
                };
            }
            State::Reloading { hold, pid: Some(p) } if p == pid => {
                fx.push(Effect::Untrack { pid });
                self.state = State::Reloading { hold, pid: None };
            }
            State::Starting {
                hold,
                cmd,
                prev: Some(p),
            } if p == pid => {
                fx.push(Effect::Untrack { pid });
                self.state = State::Starting {
                    hold,
                    cmd,
                    prev: None,
                };
            }
            // A stale exit (a pid no longer tracked): nothing to decide.
            _ => {}
        }
    }

    /// What follows the death of a running process that nothing held: the one place that
    /// decides it (module docs). `healthy`: the run passed its start check (and lasted
    /// [`super::super::policy::MIN_HEALTHY_RUN`]).
    pub fn on_death(
        &mut self,
        ctx: &Ctx,
        exit: Exit,
        healthy: bool,
        now: Instant,
        rng: f64,
        fx: &mut Vec<Effect>,
    ) {
        match ctx.auto_type {
            AutoType::Resident if ctx.wants_running() => {
                self.failures = ctx.backoff.failures_after_exit(self.failures, healthy);
                if !healthy {
                    self.message = format!(
                        "exited ({exit}) less than {}s after its start",
                        super::super::policy::MIN_HEALTHY_RUN.as_secs()
                    );
                }
                self.backoff_or_restart(ctx, now, rng, fx);
            }
            AutoType::Resident => {
                self.state = State::Exited;
                self.message =
                    format!("exited unexpectedly ({exit}); not managed, so not restarted");
            }
            AutoType::SingleRun => self.state = State::Completed,
            AutoType::Periodic => {
                self.state = if ctx.wants_running() {
                    State::Waiting {
                        until: self.next_cycle(ctx, now),
                    }
                } else {
                    State::Stopped
                };
            }
        }
    }

    /// After a death was counted: a healthy run's (no failure) restarts at once, a failure
    /// backs off, too many failures in a row give up.
    fn backoff_or_restart(&mut self, ctx: &Ctx, now: Instant, rng: f64, fx: &mut Vec<Effect>) {
        if self.failures == 0 {
            self.delay = Duration::ZERO;
            self.message.clear();
            self.restart_now(ctx, now, fx);
            return;
        }
        if self.gives_up(ctx, fx) {
            return;
        }
        self.back_off(ctx, "exited", now, rng, fx);
    }

    /// Start again after a death: at once, or at the end of a backoff (`delay` says which).
    fn restart_now(&mut self, ctx: &Ctx, now: Instant, fx: &mut Vec<Effect>) {
        self.restarts += 1;
        fx.push(Effect::Emit {
            kind: "restarting",
            message: format!(
                "restart attempt (restart {}, after {:.1}s)",
                self.restarts,
                self.delay.as_secs_f64()
            ),
            data: serde_json::json!({
                "restarts": self.restarts,
                "delay_secs": self.delay.as_secs_f64(),
                "failures": self.failures,
            }),
        });
        self.start(
            ctx,
            Hold::Supervise { after_death: true },
            StartCmd::Start,
            None,
            now,
            fx,
        );
    }

    fn on_command_done(&mut self, r: Result<(), String>, now: Instant, fx: &mut Vec<Effect>) {
        match self.state {
            State::Reloading { hold, pid } => {
                let outcome = match r {
                    Ok(()) => {
                        fx.push(Effect::Emit {
                            kind: "reloaded",
                            message: "reload_cmd succeeded".into(),
                            data: serde_json::Value::Null,
                        });
                        Outcome::Done(String::new())
                    }
                    Err(why) => Outcome::CommandFailed(why),
                };
                if let Some((id, _)) = hold.op() {
                    Self::answer(fx, id, outcome);
                }
                self.state = match pid {
                    Some(pid) => State::Running {
                        pid,
                        healthy: true,
                        since: now,
                    },
                    None => State::Stopped,
                };
            }
            State::Stopping { .. } => {
                // The stop command ended; the tree must still be gone by the deadline.
                if let Err(why) = r {
                    self.message = why;
                }
            }
            _ => {}
        }
    }

    fn on_gone(&mut self, ctx: &Ctx, now: Instant, rng: f64, fx: &mut Vec<Effect>) {
        let State::Stopping {
            hold, step, pid, ..
        } = self.state
        else {
            if let State::Running {
                pid,
                healthy,
                since,
            } = self.state
            {
                // The tree emptied without an exit report: it died.
                let uptime = now.saturating_duration_since(since);
                let healthy = super::super::policy::healthy_run(healthy, check_secs(ctx), uptime);
                fx.push(Effect::Untrack { pid });
                fx.push(Effect::Emit {
                    kind: "exited",
                    message: format!("pid {pid} is gone (exit status unknown)"),
                    data: serde_json::json!({"pid": pid}),
                });
                let exit = Exit {
                    info: ExitInfo::Unknown,
                    oom: false,
                };
                self.on_death(ctx, exit, healthy, now, rng, fx);
                fx.push(Effect::Persist);
            }
            return;
        };
        if let Some(pid) = pid {
            fx.push(Effect::Untrack { pid });
        }
        let how = step_text(step, hold, ctx);
        fx.push(Effect::Persist);
        self.message.clear();
        match hold {
            Hold::Op(_, Op::Restart | Op::Replace) => {
                // A restart without restart_cmd, or a replacement: stopped, now start.
                self.tries = 1;
                self.start(ctx, hold, StartCmd::Start, None, now, fx);
            }
            Hold::Op(id, op) => {
                self.state = State::Stopped;
                fx.push(Effect::Emit {
                    kind: if op == Op::Kill { "killed" } else { "stopped" },
                    message: how.clone(),
                    data: serde_json::Value::Null,
                });
                Self::answer(fx, id, Outcome::Done(how));
            }
            Hold::Liveness => {
                self.failures = self.failures.saturating_add(1);
                if self.gives_up(ctx, fx) {
                    return;
                }
                let delay = self.back_off(ctx, "health", now, rng, fx);
                fx.push(Effect::Emit {
                    kind: "stopped",
                    message: format!(
                        "{how}; restart in {:.1}s (failure {} in a row)",
                        delay.as_secs_f64(),
                        self.failures
                    ),
                    data: serde_json::json!({"delay_secs": delay.as_secs_f64(), "failures": self.failures}),
                });
            }
            Hold::Limit => self.after_limit_stop(ctx, how, now, rng, fx),
            Hold::Supervise { .. } | Hold::Job => self.state = State::Stopped,
        }
    }

    fn after_limit_stop(
        &mut self,
        ctx: &Ctx,
        how: String,
        now: Instant,
        rng: f64,
        fx: &mut Vec<Effect>,
    ) {
        let cause = self.limit_cause.take().unwrap_or_default();
        fx.push(Effect::LimitStopped {
            cause: cause.clone(),
        });
        match ctx.auto_type {
            AutoType::Resident if ctx.wants_running() => {
                self.failures = self.failures.saturating_add(1);
                if self.gives_up(ctx, fx) {
                    return;
                }
                let delay = self.back_off(ctx, "limit", now, rng, fx);
                self.message = format!(
                    "stopped for exceeding its limit ({cause}); restart in {:.1}s",
                    delay.as_secs_f64()
                );
                fx.push(Effect::Emit {
                    kind: "limit_stopped",
                    message: format!("{how}; restart in {:.1}s", delay.as_secs_f64()),
                    data: serde_json::json!({"step": how, "restart_in_secs": delay.as_secs_f64(), "failures": self.failures}),
                });
            }
            auto => {
                self.state = match auto {
                    AutoType::SingleRun => State::Completed,
                    AutoType::Periodic if ctx.wants_running() => State::Waiting {
                        until: self.next_cycle(ctx, now),
                    },
                    _ => State::Stopped,
                };
                self.message = format!("stopped for exceeding its limit ({cause})");
                fx.push(Effect::Emit {
                    kind: "limit_stopped",
                    data: serde_json::json!({"step": how, "restart_in_secs": null, "failures": null}),
                    message: how,
                });
            }
        }
    }

    fn on_timer(&mut self, ctx: &Ctx, now: Instant, fx: &mut Vec<Effect>) {
        match self.state {
            State::Backoff { until } if until <= now => {
                if ctx.wants_running() {
                    self.restart_now(ctx, now, fx);
                } else {
                    self.state = State::Stopped;
                }
            }
            State::Waiting { until } if until <= now => {
                if ctx.wants_running() {
                    self.start(ctx, Hold::Job, StartCmd::Start, None, now, fx);
                } else {
                    self.state = State::Stopped;
                }
            }
            State::Retrying { hold, until } if until <= now => {
                self.start(ctx, hold, StartCmd::Start, None, now, fx);
            }
            State::Checking { until, .. } if until <= now => {
                // No verdict came: decide from what is known.
                self.check_verdict(ctx, now, 0.5, fx);
            }
            State::Stopping {
                hold,
                step,
                until,
                pid,
            } if until <= now => self.escalate(ctx, hold, step, pid, now, fx),
            State::Running { since, .. } => {
                if self.failures > 0
                    && now.saturating_duration_since(since) >= ctx.backoff.reset_after
                {
                    self.failures = 0;
                }
                if ctx.auto_type == AutoType::Periodic
                    && ctx.wants_running()
                    && self.next_cycle(ctx, since) <= now
                {
                    // A cycle is due while the previous run still lives: skip it.
                    self.last_cycle = Some(super::super::policy::cycle_start(
                        self.last_cycle,
                        ctx.cycle.max(secs(1)),
                        now,
                    ));
                    fx.push(Effect::Emit {
                        kind: "cycle_skipped",
                        message: "periodic run skipped: the previous run is still alive".into(),
                        data: serde_json::Value::Null,
                    });
                }
            }
            _ => {}
        }
    }

    /// The start check is over: passed if the process still lives, failed otherwise.
    fn check_verdict(&mut self, ctx: &Ctx, now: Instant, rng: f64, fx: &mut Vec<Effect>) {
        let State::Checking {
            hold, pid, exited, ..
        } = self.state
        else {
            return;
        };
        if let Some(exit) = exited {
            if ctx.auto_type == AutoType::Periodic && exit.info.success() {
                // A periodic job's start check is its first run: it ran to a clean end.
                self.first_run_done(ctx, hold, pid, exit, now, fx);
                return;
            }
            let (begin, end) = ctx.check;
            let f = StartFailure::Check(format!(
                "start check failed: pid {pid} exited within {}s of the start ({exit})",
                end.max(begin)
            ));
            self.on_start_failed(ctx, f, now, rng, fx);
            return;
        }
        self.state = State::Running {
            pid,
            healthy: true,
            since: now,
        };
        self.tries = 0;
        self.message.clear();
        let what = match hold {
            Hold::Supervise { after_death: true } => "restarted",
            _ => "started",
        };
        fx.push(Effect::Emit {
            kind: what,
            message: format!("pid {pid}"),
            data: serde_json::json!({"pid": pid}),
        });
        fx.push(Effect::Persist);
        if let Some((id, _)) = hold.op() {
            Self::answer(fx, id, Outcome::Done(String::new()));
        }
    }

    /// A periodic job's first run, started by an operator (or by a restart after a failure),
    /// exited 0 within its start check: the start passed, and the job waits for its next
    /// cycle (an operator's start or restart makes it managed).
    fn first_run_done(
        &mut self,
        ctx: &Ctx,
        hold: Hold,
        pid: i32,
        exit: Exit,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let will_run =
            ctx.wants_running() || matches!(hold.op(), Some((_, Op::Start | Op::Restart)));
        self.state = if will_run {
            State::Waiting {
                until: self.next_cycle(ctx, now),
            }
        } else {
            State::Stopped
        };
        self.tries = 0;
        self.failures = 0;
        self.delay = Duration::ZERO;
        self.message.clear();
        fx.push(Effect::Emit {
            kind: "cycle_finished",
            message: format!("pid {pid} exited ({exit}): the first run passed its start check"),
            data: serde_json::json!({"pid": pid, "exit": exit.info, "healthy": true}),
        });
        fx.push(Effect::Persist);
        if let Some((id, _)) = hold.op() {
            Self::answer(fx, id, Outcome::Done("first run exited 0".into()));
        }
    }

    /// The next step of a stop whose deadline passed.
    fn escalate(
        &mut self,
        ctx: &Ctx,
        hold: Hold,
        step: StopStep,
        pid: Option<i32>,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let kill_op = hold.op().is_some_and(|(_, op)| op == Op::Kill);
        let (step, until) = match step {
            StopStep::Command if !kill_op => {
                fx.push(Effect::Signal { kill: false });
                (StopStep::Term, now + ctx.op_timeout)
            }
            StopStep::Command | StopStep::Term => {
                fx.push(Effect::Signal { kill: true });
                (StopStep::Kill, now + KILL_WAIT)
            }
            StopStep::Kill => {
                // Still there after SIGKILL: the stop failed, and it still runs.
                let why = format!(
                    "stop check failed: still running after SIGKILL{}{}",
                    pid.map(|p| format!(": pid {p}")).unwrap_or_default(),
                    if self.message.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", self.message)
                    }
                );
                match hold.op() {
                    Some((id, _)) => Self::answer(fx, id, Outcome::StopFailed(why.clone())),
                    None => fx.push(Effect::Emit {
                        kind: "stop_failed",
                        message: why.clone(),
                        data: serde_json::Value::Null,
                    }),
                }
                self.message = why;
                self.limit_cause = None;
                self.state = match pid {
                    Some(pid) => State::Running {
                        pid,
                        healthy: true,
                        since: now,
                    },
                    None => State::Stopped,
                };
                return;
            }
        };
        self.state = State::Stopping {
            hold,
            step,
            until,
            pid,
        };
    }

    fn on_adopted(&mut self, pid: i32, now: Instant, fx: &mut Vec<Effect>) {
        let adopt = match self.state {
            s if s.is_idle() => true,
            // A supervisor start found the process already running: no duplicate.
            State::Starting {
                hold: Hold::Supervise { .. } | Hold::Job,
                ..
            } => true,
            _ => false,
        };
        if adopt {
            self.state = State::Running {
                pid,
                healthy: true,
                since: now,
            };
            self.message.clear();
            fx.push(Effect::Persist);
        }
    }

    /// After every transition: an idle instance of a process that should run is started (a
    /// resident or single-run process now, a periodic job at its next cycle).
    fn reconcile(&mut self, ctx: &Ctx, now: Instant, fx: &mut Vec<Effect>) {
        if !ctx.wants_running() || !ctx.has_start_cmd {
            return;
        }
        match (ctx.auto_type, self.state) {
            (AutoType::Resident, State::Stopped | State::Exited) => {
                let hold = Hold::Supervise { after_death: false };
                self.start(ctx, hold, StartCmd::Start, None, now, fx);
            }
            (AutoType::SingleRun, State::Stopped | State::Exited) => {
                self.start(ctx, Hold::Job, StartCmd::Start, None, now, fx);
            }
            (AutoType::Periodic, State::Stopped | State::Exited) => {
                let due = self.last_cycle.map_or(now, |t| t + ctx.cycle.max(secs(1)));
                if due <= now {
                    self.start(ctx, Hold::Job, StartCmd::Start, None, now, fx);
                } else {
                    self.state = State::Waiting { until: due };
                }
            }
            _ => {}
        }
    }
}

/// The words for the step that ended a stop.
/// How long the start check lasts, seconds after the start command.
fn check_secs(ctx: &Ctx) -> u64 {
    ctx.check.0.max(ctx.check.1)
}

fn step_text(step: StopStep, hold: Hold, ctx: &Ctx) -> String {
    let kill = hold.op().is_some_and(|(_, op)| op == Op::Kill);
    match step {
        StopStep::Command if kill => "ended by kill_cmd".into(),
        StopStep::Command => "ended by stop_cmd".into(),
        StopStep::Term => "ended by SIGTERM to its process group".into(),
        StopStep::Kill if kill => "killed with SIGKILL".into(),
        StopStep::Kill => format!(
            "killed with SIGKILL after op_timeout {}s",
            ctx.op_timeout.as_secs()
        ),
    }
}
