//! The supervisor's surface for the API and the daemon: snapshots of processes
//! ([`ProcView`]), operations (answered with a typed [`Operated`]), and the sampler's hooks.
//! Nothing here hands out the registry itself.

use std::sync::Arc;
use std::time::Instant;

use super::defs::{DefError, PutMode, Writer};
use super::lifecycle::{Input, Op, OpId, Outcome, ProcInput, State};
use super::view::ProcView;
use super::{Engine, limits};
use crate::probe::{Sample, Target};
use crate::proto::OpType;
use crate::spec::{Definition, Labels, ProcKey, ProcSpec};

/// How an operation went.
#[derive(Debug, Clone)]
pub struct Operated {
    /// The lifecycle's answer, or why a definition it carried was refused.
    pub result: Result<Outcome, DefError>,
    /// Why the operation's intent is not durable, when the store refused it.
    pub not_durable: Option<String>,
    /// The process afterwards (`None` when not registered).
    pub view: Option<ProcView>,
}

/// How many processes, managed and running.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub processes: u64,
    pub managed: u64,
    pub running: u64,
}

fn op_of(op: OpType) -> Option<Op> {
    Some(match op {
        OpType::Start => Op::Start,
        OpType::Stop => Op::Stop,
        OpType::Kill => Op::Kill,
        OpType::Delegate => Op::Manage,
        OpType::Undelegate => Op::Unmanage,
        OpType::Restart => Op::Restart,
        OpType::Reload => Op::Reload,
        OpType::Status => return None,
    })
}

impl Engine {
    /// Every process, in key order.
    pub fn views(&self) -> Vec<ProcView> {
        self.views_where(|_| true)
    }

    /// The processes whose definition passes `f`, in key order.
    pub fn views_where(&self, f: impl Fn(&Definition) -> bool) -> Vec<ProcView> {
        let now = Instant::now();
        self.reg()
            .entries
            .values()
            .filter(|e| f(&e.def))
            .map(|e| ProcView::of(e, now))
            .collect()
    }

    /// One process.
    pub fn view(&self, key: &ProcKey) -> Option<ProcView> {
        self.reg().get(key).map(|e| ProcView::of(e, Instant::now()))
    }

    /// Is `key` registered?
    pub fn is_registered(&self, key: &ProcKey) -> bool {
        self.reg().get(key).is_some()
    }

    /// A copy of a process's spec.
    pub fn spec_of(&self, key: &ProcKey) -> Option<ProcSpec> {
        self.reg().get(key).map(|e| e.def.spec.clone())
    }

    /// A copy of a process's definition.
    pub fn definition(&self, key: &ProcKey) -> Option<Definition> {
        self.reg().get(key).map(|e| (*e.def).clone())
    }

    /// Every registered key, in order.
    pub fn keys(&self) -> Vec<ProcKey> {
        self.reg().entries.keys().cloned().collect()
    }

    pub fn counts(&self) -> Counts {
        let reg = self.reg();
        Counts {
            processes: reg.entries.len() as u64,
            managed: reg
                .entries
                .values()
                .filter(|e| e.life.intent.managed)
                .count() as u64,
            running: reg
                .entries
                .values()
                .filter(|e| !e.tracked.is_empty())
                .count() as u64,
        }
    }

    /// Run one operation a caller asked for. A definition it carries inline is written first
    /// (never for a status query, which writes nothing and runs nothing), then the caller's
    /// account rule is checked again against the definition it acts on (it may have been
    /// replaced since the request was accepted); the process's pid file is looked at (a
    /// process started outside the agent is adopted first); then the operation is queued on
    /// the process's lifecycle and its answer awaited.
    pub async fn operate(
        self: &Arc<Self>,
        key: &ProcKey,
        op: OpType,
        inline: Option<(ProcSpec, Labels)>,
        w: &Writer,
    ) -> Operated {
        let done = |result, not_durable, engine: &Engine| Operated {
            result,
            not_durable,
            view: engine.view(key),
        };
        if op.mutating() {
            if let Some((spec, labels)) = inline {
                let _defining = super::defs::Defining::begin(self, key);
                let lock = self.def_lock(key);
                let _g = lock.lock().await;
                if let Err(e) = self
                    .put_definition_locked(key, labels, spec, PutMode::Upsert, w)
                    .await
                {
                    return done(Err(e), None, self);
                }
            }
            let account = self.spec_of(key).map(|s| s.account);
            if let Some(Err(e)) = account.map(|a| w.check(&a)) {
                return done(Err(e), None, self);
            }
        }
        let invalid = self.reg().get(key).map(|e| e.invalid.clone());
        let Some(invalid) = invalid else {
            return done(Ok(Outcome::NotRegistered), None, self);
        };
        let Some(lop) = op_of(op) else {
            // A pure read of what the agent knows: no pid-file probe, no adoption, no command
            // (the supervisor's sweep adopts processes started outside the agent).
            return done(Ok(Outcome::Done(String::new())), None, self);
        };
        if let Some(why) = invalid {
            return done(Ok(Outcome::Invalid(why)), None, self);
        }
        self.events.emit(
            Some(key),
            "operator",
            format!("operation {} requested", op.name()),
            serde_json::json!({"op_type": op.code()}),
        );
        // A process started outside the agent (its pid file) is adopted before acting, so
        // that start answers 828 and stop stops it.
        let unknown = self.discover(key, None).await.err();
        if let Some(why) = &unknown
            && !matches!(lop, Op::Stop | Op::Kill)
        {
            return done(
                Ok(Outcome::CommandFailed(format!(
                    "cannot tell whether the process is running: {why}"
                ))),
                None,
                self,
            );
        }
        let (outcome, not_durable) = self.submit(key, lop, w.only.clone()).await;
        // A stop whose pid file could not be read: the intent is stopped, but whether
        // something ran is unknown; say so rather than "not running".
        let outcome = match (unknown, outcome) {
            (Some(why), Outcome::NotRunning) => {
                Outcome::CommandFailed(format!("cannot tell whether the process is running: {why}"))
            }
            (_, o) => o,
        };
        done(Ok(outcome), not_durable, self)
    }

    /// Queue `op` on `key`'s lifecycle and wait for its answer.
    async fn submit(
        self: &Arc<Self>,
        key: &ProcKey,
        op: Op,
        only: Option<String>,
    ) -> super::Answer {
        let id: OpId = self.op_id();
        let answer = self.answer_of(id);
        if !self.feed(key, ProcInput::Op { id, op, only }) {
            return (Outcome::NotRegistered, None);
        }
        answer.await.unwrap_or((
            Outcome::CommandFailed("the operation was abandoned (agent shutting down)".into()),
            None,
        ))
    }

    /// Stop and start a process again with its replaced definition (a config reload),
    /// keeping its intent: a failed start leaves it as it was (managed processes go on under
    /// backoff).
    pub async fn replace(self: &Arc<Self>, key: &ProcKey) -> Operated {
        let (outcome, not_durable) = self.submit(key, Op::Replace, None).await;
        Operated {
            result: Ok(outcome),
            not_durable,
            view: self.view(key),
        }
    }

    /// Unregister once nothing runs on the process (its lifecycle's queue).
    pub(crate) async fn forget(self: &Arc<Self>, key: &ProcKey) {
        let id = self.op_id();
        let answer = self.answer_of(id);
        if self.feed(key, ProcInput::Unregister { id }) {
            let _ = answer.await;
        }
    }

    /// What the sampler reads: every process with running instances.
    pub fn sample_targets(&self) -> Vec<Target> {
        self.reg()
            .entries
            .values()
            .filter(|e| !e.tracked.is_empty())
            .map(|e| {
                let instances = e.running_instances();
                let cgroups = match self.cgroups.tree() {
                    Some(tree) => instances
                        .iter()
                        .filter_map(|(pid, _)| e.instance_of(*pid))
                        .map(|i| tree.instance(&e.def.key, i))
                        .collect(),
                    None => Vec::new(),
                };
                Target {
                    key: e.def.key.clone(),
                    instances,
                    cgroups,
                    limited: e.def.spec.cpu_lmt > 0.0 || e.def.spec.mem_lmt > 0.0,
                }
            })
            .collect()
    }

    /// A sampling pass's figures: kept for status, checked against the limits; a process
    /// that stayed over its limit for `metrics.limit_samples` samples is stopped by its
    /// lifecycle (and restarted under backoff).
    pub fn apply_samples(
        self: &Arc<Self>,
        targets: &[Target],
        samples: Vec<Option<Sample>>,
        cpus: usize,
    ) {
        let needed = self.config.metrics.limit_samples;
        let mut breaches = Vec::new();
        {
            let mut reg = self.reg();
            let now = Instant::now();
            for e in reg.entries.values_mut() {
                if e.tracked.is_empty() {
                    e.sample = None;
                    e.over_limit = 0;
                }
            }
            for (t, s) in targets.iter().zip(samples) {
                let Some(e) = reg.get_mut(&t.key) else {
                    continue;
                };
                // The instances changed while we read (a restart): this sample is of the old.
                if ProcView::of(e, now).instances != t.instances {
                    continue;
                }
                let Some(s) = s else { continue };
                let running = e
                    .life
                    .instances
                    .iter()
                    .any(|i| matches!(i.state, State::Running { .. }));
                // A cpu limit throttled by cpu.max is the kernel's to keep, not a stop.
                let throttled = self.enforcement(&e.def.spec).1 == "cpu.max";
                let v = limits::check(&limits::Input {
                    eligible: e.life.intent.managed && running && !e.life.busy(),
                    cpu_usage: s.cpu_usage,
                    mem_usage: s.mem_usage,
                    cpu_lmt: if throttled { 0.0 } else { e.def.spec.cpu_lmt },
                    mem_lmt: e.def.spec.mem_lmt,
                    cpus,
                    over_limit: e.over_limit,
                    needed,
                });
                e.over_limit = v.over_limit;
                if let Some(b) = v.breach {
                    breaches.push((t.key.clone(), b, t.instances.clone()));
                }
                e.sample = Some(s);
            }
        }
        for (key, b, instances) in breaches {
            let cause = b.describe();
            let pids: Vec<i32> = instances.iter().map(|(p, _)| *p).collect();
            let mut data = b.data();
            data["pids"] = serde_json::json!(pids);
            self.events.emit(
                Some(&key),
                "limit_exceeded",
                format!(
                    "{cause}; stopping pid {}",
                    pids.iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                data,
            );
            self.feed_running(&key, Input::LimitBreach { cause });
        }
    }
}
