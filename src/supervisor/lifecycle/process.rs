//! The process as the operator sees it: its durable intent, its instances, and its
//! operations, one at a time: [`Process::step`].
//!
//! An operation waits in the queue while another runs or any instance is held (a supervisor
//! start, a stop for failed health checks, ...). When it begins:
//! * stop, kill, manage and unmanage commit their intent first (an agent killed halfway comes
//!   back knowing it); when the store refuses, stop, kill and unmanage act anyway and say so
//!   in their answer (the store keeps retrying), manage answers the store's refusal;
//! * start and restart act first and commit "running, managed" once every instance passed its
//!   start check (a failed start leaves the intent as it was); a replacement (config reload)
//!   keeps the intent it had, whatever happens;
//! * the operation goes to every instance; the answers are combined into one;
//! * a definition write waiting for the running operation goes before the queued ones.

use std::collections::VecDeque;
use std::time::Instant;

use super::{Ctx, Effect, Input, Instance, Op, OpId, Outcome, State};

/// Most operations queued for one process; more are answered busy.
pub const MAX_QUEUED: usize = 256;

/// The durable intent of a process (GSE flag and 托管).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Intent {
    /// Expected state "running" (flag 1) rather than "stopped".
    pub expect_running: bool,
    /// Kept alive by the agent.
    pub managed: bool,
}

/// Something waiting its turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queued {
    /// An operation, and the only account it may act on (`None`: any; an admin's operation
    /// acts only on processes of their own account, checked again when it begins).
    Op(OpId, Op, Option<String>),
    /// Unregister the process once nothing runs on it.
    Forget(OpId),
}

/// Where the running operation is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Committing this intent before acting.
    CommitBefore(Intent),
    /// Sent to the instances; waiting for their answers.
    Instances,
    /// Done on every instance; committing this intent, then answering.
    CommitAfter(Intent, Outcome),
}

/// The operation being carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub id: OpId,
    pub op: Op,
    pub stage: Stage,
    pub answers: Vec<Option<Outcome>>,
    /// Why its intent is not durable, once the store refused it (the answer says so).
    pub not_durable: Option<String>,
}

/// A process: intent, instances, operations.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Process {
    pub intent: Intent,
    /// The definition's account (empty: the agent's own).
    pub account: String,
    pub instances: Vec<Instance>,
    pub queue: VecDeque<Queued>,
    pub current: Option<Current>,
    /// Definition writes waiting to apply: queued operations do not begin meanwhile (a
    /// change of definition applies between operations, before the next one).
    pub defining: u32,
}

/// What happens to a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcInput {
    /// An operator operation, and the only account it may act on (`None`: any).
    Op {
        id: OpId,
        op: Op,
        only: Option<String>,
    },
    /// Unregister (answered with `Forget` when nothing runs on it any more).
    Unregister { id: OpId },
    /// Something happened to instance `i`.
    Instance { i: usize, input: Input },
    /// The intent commit finished.
    Committed(Result<(), String>),
    /// Deadlines may have passed; every instance reconsiders.
    Timer,
    /// A definition write begins (`true`: operations wait) or ends (`false`).
    Defining(bool),
}

/// What the supervisor must do for a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcEffect {
    Instance {
        i: usize,
        effect: Effect,
    },
    /// Commit this intent to the store; answer `Committed`.
    CommitIntent(Intent),
    /// The answer of an operation. `not_durable`: why the store refused its intent (the
    /// operation acted anyway).
    Answer {
        id: OpId,
        outcome: Outcome,
        not_durable: Option<String>,
    },
    /// The process may be removed now (an `Unregister`).
    Forget {
        id: OpId,
    },
}

impl Process {
    pub fn new(intent: Intent, instances: Vec<Instance>) -> Process {
        Process {
            intent,
            account: String::new(),
            instances,
            queue: VecDeque::new(),
            current: None,
            defining: 0,
        }
    }

    /// The context of an instance step: the definition's, with this process's intent.
    pub fn ctx(&self, base: &Ctx) -> Ctx {
        Ctx {
            managed: self.intent.managed,
            expect_running: self.intent.expect_running,
            ..*base
        }
    }

    /// Grow to `n` instances (new ones stopped); shrink by dropping idle instances from the
    /// end (running ones beyond `n` stay until they end).
    pub fn resize(&mut self, n: usize) {
        while self.instances.len() < n {
            self.instances.push(Instance::default());
        }
        while self.instances.len() > n.max(1)
            && self.instances.last().is_some_and(|i| i.state.is_idle())
        {
            self.instances.pop();
        }
    }

    /// The earliest deadline of any instance.
    pub fn deadline(&self, base: &Ctx) -> Option<Instant> {
        let ctx = self.ctx(base);
        self.instances.iter().filter_map(|i| i.deadline(&ctx)).min()
    }

    /// Is an operation running or an instance held?
    pub fn busy(&self) -> bool {
        self.current.is_some() || self.instances.iter().any(|i| i.state.hold().is_some())
    }

    /// One transition (see the module docs).
    pub fn step(
        &self,
        base: &Ctx,
        input: ProcInput,
        now: Instant,
        rng: f64,
    ) -> (Process, Vec<ProcEffect>) {
        let mut next = self.clone();
        let mut fx = Vec::new();
        match input {
            ProcInput::Op { id, op, only } => {
                if next.queue.len() >= MAX_QUEUED {
                    fx.push(ProcEffect::Answer {
                        id,
                        outcome: Outcome::Busy(format!(
                            "{MAX_QUEUED} operations are already waiting for this process"
                        )),
                        not_durable: None,
                    });
                } else {
                    next.queue.push_back(Queued::Op(id, op, only));
                }
            }
            ProcInput::Unregister { id } => next.queue.push_back(Queued::Forget(id)),
            ProcInput::Instance { i, input } => {
                next.instance_step(base, i, input, now, rng, &mut fx)
            }
            ProcInput::Committed(r) => next.committed(base, r, now, rng, &mut fx),
            ProcInput::Timer => {
                for i in 0..next.instances.len() {
                    next.instance_step(base, i, Input::Timer, now, rng, &mut fx);
                }
            }
            ProcInput::Defining(true) => next.defining += 1,
            ProcInput::Defining(false) => next.defining = next.defining.saturating_sub(1),
        }
        next.pump(base, now, rng, &mut fx);
        (next, fx)
    }

    fn instance_step(
        &mut self,
        base: &Ctx,
        i: usize,
        input: Input,
        now: Instant,
        rng: f64,
        fx: &mut Vec<ProcEffect>,
    ) {
        let ctx = self.ctx(base);
        let Some(inst) = self.instances.get(i) else {
            return;
        };
        let (new, effects) = inst.step(&ctx, input, now, rng);
        self.instances[i] = new;
        for e in effects {
            match e {
                Effect::Answer { id, outcome } => match &mut self.current {
                    Some(c) if c.id == id && c.stage == Stage::Instances => {
                        if let Some(slot) = c.answers.get_mut(i) {
                            *slot = Some(outcome);
                        }
                    }
                    _ => fx.push(ProcEffect::Answer {
                        id,
                        outcome,
                        not_durable: None,
                    }),
                },
                effect => fx.push(ProcEffect::Instance { i, effect }),
            }
        }
        self.finish_if_answered(fx);
    }

    /// Begin what waits, while nothing holds the process.
    fn pump(&mut self, base: &Ctx, now: Instant, rng: f64, fx: &mut Vec<ProcEffect>) {
        while !self.busy() && self.defining == 0 {
            let Some(q) = self.queue.pop_front() else {
                return;
            };
            match q {
                Queued::Forget(id) => {
                    for i in 0..self.instances.len() {
                        self.instance_step(base, i, Input::Unregistered, now, rng, fx);
                    }
                    self.queue.clear();
                    fx.push(ProcEffect::Forget { id });
                    return;
                }
                Queued::Op(id, op, only) => {
                    if let Some(own) = only.filter(|a| *a != self.account) {
                        // The definition changed hands while the operation waited.
                        let shown = if self.account.is_empty() {
                            "the agent's own account (root)".to_string()
                        } else {
                            self.account.clone()
                        };
                        self.answer_now(
                            fx,
                            id,
                            Outcome::Forbidden(format!(
                                "{own} may only manage processes that run as {own}, not as {shown} (the definition changed while the operation waited)"
                            )),
                        );
                        continue;
                    }
                    self.begin(base, id, op, now, rng, fx)
                }
            }
        }
    }

    fn answer_now(&mut self, fx: &mut Vec<ProcEffect>, id: OpId, outcome: Outcome) {
        fx.push(ProcEffect::Answer {
            id,
            outcome,
            not_durable: None,
        });
    }

    fn begin(
        &mut self,
        base: &Ctx,
        id: OpId,
        op: Op,
        now: Instant,
        rng: f64,
        fx: &mut Vec<ProcEffect>,
    ) {
        let missing = match op {
            Op::Start | Op::Manage if !base.has_start_cmd => Some("start_cmd"),
            // Without restart_cmd a restart is a stop, then a start: it needs start_cmd.
            Op::Restart if !base.has_restart_cmd && !base.has_start_cmd => Some("start_cmd"),
            Op::Reload if !base.has_reload_cmd => Some("reload_cmd"),
            _ => None,
        };
        if let Some(field) = missing {
            self.answer_now(fx, id, Outcome::MissingCommand(field));
            return;
        }
        let running: Vec<i32> = self
            .instances
            .iter()
            .filter_map(|i| match i.state {
                State::Running { pid, .. } => Some(pid),
                _ => None,
            })
            .collect();
        if op == Op::Start && !running.is_empty() {
            self.answer_now(fx, id, Outcome::AlreadyRunning(running));
            return;
        }
        let before = match op {
            Op::Stop | Op::Kill => Some(Intent {
                expect_running: false,
                managed: false,
            }),
            Op::Manage => Some(Intent {
                expect_running: true,
                managed: true,
            }),
            Op::Unmanage => Some(Intent {
                managed: false,
                ..self.intent
            }),
            _ => None,
        };
        self.current = Some(Current {
            id,
            op,
            stage: Stage::Instances,
            answers: Vec::new(),
            not_durable: None,
        });
        match before {
            Some(intent) => {
                if let Some(c) = &mut self.current {
                    c.stage = Stage::CommitBefore(intent);
                }
                fx.push(ProcEffect::CommitIntent(intent));
            }
            None => self.fan_out(base, now, rng, fx),
        }
    }

    fn fan_out(&mut self, base: &Ctx, now: Instant, rng: f64, fx: &mut Vec<ProcEffect>) {
        let Some(c) = &mut self.current else { return };
        c.stage = Stage::Instances;
        c.answers = vec![None; self.instances.len()];
        let (id, op) = (c.id, c.op);
        for i in 0..self.instances.len() {
            self.instance_step(base, i, Input::Op { id, op }, now, rng, fx);
        }
        self.finish_if_answered(fx);
    }

    fn committed(
        &mut self,
        base: &Ctx,
        r: Result<(), String>,
        now: Instant,
        rng: f64,
        fx: &mut Vec<ProcEffect>,
    ) {
        let Some(c) = self.current.clone() else {
            return;
        };
        match (c.stage, r) {
            (Stage::CommitBefore(intent), Ok(())) => {
                self.intent = intent;
                self.fan_out(base, now, rng, fx);
            }
            (Stage::CommitBefore(intent), Err(why)) => {
                if matches!(c.op, Op::Stop | Op::Kill | Op::Unmanage) {
                    // Act anyway: the operator's stop must happen; the answer says the intent
                    // is not durable yet (the store keeps retrying it).
                    self.intent = intent;
                    if let Some(cur) = &mut self.current {
                        cur.not_durable = Some(why);
                    }
                    self.fan_out(base, now, rng, fx);
                } else {
                    self.current = None;
                    self.answer_now(
                        fx,
                        c.id,
                        Outcome::Unavailable(format!("the state store refused the change: {why}")),
                    );
                }
            }
            (Stage::CommitAfter(intent, outcome), Ok(())) => {
                self.intent = intent;
                self.current = None;
                fx.push(ProcEffect::Answer {
                    id: c.id,
                    outcome,
                    not_durable: c.not_durable,
                });
            }
            (Stage::CommitAfter(..), Err(why)) => {
                self.current = None;
                self.answer_now(
                    fx,
                    c.id,
                    Outcome::Unavailable(format!("the state store refused the change: {why}")),
                );
            }
            (Stage::Instances, _) => {}
        }
    }

    /// Once every instance answered: combine, commit what follows a success, answer.
    fn finish_if_answered(&mut self, fx: &mut Vec<ProcEffect>) {
        let Some(c) = &self.current else { return };
        if c.stage != Stage::Instances || c.answers.iter().any(Option::is_none) {
            return;
        }
        let answers: Vec<Outcome> = c.answers.iter().flatten().cloned().collect();
        let outcome = combine(c.op, &answers);
        if matches!(c.op, Op::Start | Op::Restart) && outcome.is_done() {
            let intent = Intent {
                expect_running: true,
                managed: true,
            };
            if let Some(cur) = &mut self.current {
                cur.stage = Stage::CommitAfter(intent, outcome);
            }
            fx.push(ProcEffect::CommitIntent(intent));
            return;
        }
        let (id, not_durable) = (c.id, c.not_durable.clone());
        self.current = None;
        fx.push(ProcEffect::Answer {
            id,
            outcome,
            not_durable,
        });
    }
}

/// One answer from the instances' answers: the first failure; for stop and kill "not
/// running" only when nothing ran; otherwise done, with the first note.
fn combine(op: Op, answers: &[Outcome]) -> Outcome {
    let failure = answers
        .iter()
        .find(|a| !a.is_done() && !matches!(a, Outcome::NotRunning));
    if let Some(f) = failure {
        return f.clone();
    }
    if matches!(op, Op::Stop | Op::Kill) && answers.iter().all(|a| *a == Outcome::NotRunning) {
        return Outcome::NotRunning;
    }
    let note = answers
        .iter()
        .find_map(|a| match a {
            Outcome::Done(n) if !n.is_empty() => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default();
    Outcome::Done(note)
}
