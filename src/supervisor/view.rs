//! What the supervisor shows of a process: [`ProcView`], a snapshot taken under the
//! registry's lock and handed out, so the API builds its wire shapes (GSE content JSON,
//! status entries, GSEKit rows, /metrics) without reaching into the supervisor's state.

use std::time::Instant;

use super::lifecycle::State;
use super::registry::{Entry, LastExit, LimitStop};
use crate::probe::Sample;
use crate::proto::{FLAG_RUNNING, FLAG_STOPPED};
use crate::spec::Definition;

/// One process, as it is now.
#[derive(Debug, Clone)]
pub struct ProcView {
    pub def: std::sync::Arc<Definition>,
    /// GSE flag: the expected state, 1 running or 2 stopped.
    pub flag: i64,
    /// GSE status: 1 when an instance runs, else 2.
    pub status: i64,
    pub managed: bool,
    /// The lifecycle state by name (running, stopped, backoff, waiting, fatal, ...).
    pub state: &'static str,
    /// The running instances, main first: (pid, start time).
    pub instances: Vec<(i32, u64)>,
    pub restarts: u64,
    /// Consecutive failures (the most of any instance).
    pub failures: u32,
    /// Seconds until the next restart attempt, when one is scheduled.
    pub next_restart_in: Option<f64>,
    /// Seconds until a periodic job's next run, while it waits between runs.
    pub next_run_in: Option<f64>,
    /// The delay before the latest restart attempt, or the scheduled one in backoff (the
    /// most of any instance): zero after a healthy run.
    pub restart_delay: f64,
    pub last_exit: Option<LastExit>,
    /// Why it is in its state, when the state does not say it.
    pub message: String,
    pub version: String,
    pub last_start_time: i64,
    /// The latest resource sample, only while something runs.
    pub sample: Option<Sample>,
    pub limit_stops: u64,
    pub last_limit: Option<LimitStop>,
    pub health: Option<String>,
    /// What holds it (an operation, a supervisor start, ...), if anything.
    pub busy: Option<&'static str>,
    /// Why the stored definition cannot be acted on.
    pub invalid: Option<String>,
}

impl ProcView {
    pub fn of(e: &Entry, now: Instant) -> ProcView {
        let lives = &e.life.instances;
        let instances = e.running_instances();
        let running = !instances.is_empty();
        // The process's state: running when an instance runs, else the first held or the
        // first instance's.
        let shown = lives
            .iter()
            .find(|i| matches!(i.state, State::Running { .. }))
            .or_else(|| lives.iter().find(|i| i.state.hold().is_some()))
            .or(lives.first());
        let state = shown.map_or("stopped", |i| i.state.name());
        let failures = lives.iter().map(|i| i.failures).max().unwrap_or(0);
        let next_restart_in = lives
            .iter()
            .filter_map(|i| match i.state {
                State::Backoff { until } if until > now => {
                    Some(until.duration_since(now).as_secs_f64())
                }
                _ => None,
            })
            .reduce(f64::min);
        let next_run_in = lives
            .iter()
            .filter_map(|i| match i.state {
                State::Waiting { until } => {
                    Some(until.saturating_duration_since(now).as_secs_f64())
                }
                _ => None,
            })
            .reduce(f64::min);
        let message = if let Some(why) = &e.invalid {
            why.clone()
        } else {
            match shown {
                Some(i) if !i.message.is_empty() => i.message.clone(),
                Some(i) => match i.state {
                    State::Backoff { .. } => {
                        format!("restarting (failure {} in a row)", i.failures)
                    }
                    State::Waiting { .. } => format!(
                        "waiting for its next run (every {}s)",
                        e.def.spec.cycle_time.max(1)
                    ),
                    s => s.name().to_string(),
                },
                None => "stopped".into(),
            }
        };
        let intent = e.life.intent;
        ProcView {
            def: e.def.clone(),
            flag: if intent.expect_running {
                FLAG_RUNNING
            } else {
                FLAG_STOPPED
            },
            status: if running { FLAG_RUNNING } else { FLAG_STOPPED },
            managed: intent.managed,
            state,
            instances,
            restarts: e.restarts(),
            failures,
            next_restart_in,
            next_run_in,
            restart_delay: lives
                .iter()
                .map(|i| i.delay.as_secs_f64())
                .fold(0.0, f64::max),
            last_exit: e.last_exit.clone(),
            message,
            version: e.version.clone(),
            last_start_time: e.last_start_time,
            sample: if running { e.sample.clone() } else { None },
            limit_stops: e.limit_stops,
            last_limit: e.last_limit.clone(),
            health: e.health.text.clone(),
            busy: lives.iter().find_map(|i| i.state.hold()).map(|h| h.name()),
            invalid: e.invalid.clone(),
        }
    }

    /// The main pid, -1 when nothing runs.
    pub fn main_pid(&self) -> i32 {
        self.instances.first().map(|(p, _)| *p).unwrap_or(-1)
    }

    pub fn pids(&self) -> Vec<i32> {
        self.instances.iter().map(|(p, _)| *p).collect()
    }
}
