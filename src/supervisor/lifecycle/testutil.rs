//! Builders shared by the lifecycle's tests.

use std::time::Duration;

use super::*;

pub fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A managed resident process with commands, no jitter, start check 1 s.
pub fn ctx() -> Ctx {
    Ctx {
        auto_type: AutoType::Resident,
        managed: true,
        expect_running: true,
        backoff: Backoff {
            jitter: 0.0,
            ..Backoff::default()
        },
        check: (1, 1),
        op_timeout: s(10),
        stop_grace: s(5),
        kill_grace: s(2),
        cycle: s(10),
        start_retries: 0,
        start_interval: s(3),
        max_restarts: None,
        has_start_cmd: true,
        has_stop_cmd: true,
        has_kill_cmd: false,
        has_restart_cmd: true,
        has_reload_cmd: true,
    }
}

pub fn unmanaged() -> Ctx {
    Ctx {
        managed: false,
        expect_running: false,
        ..ctx()
    }
}

pub fn code(c: i32) -> Exit {
    Exit {
        info: ExitInfo::Code(c),
        oom: false,
    }
}

pub fn inst(state: State) -> Instance {
    Instance::new(state)
}

/// The kinds of effects, for compact expectations.
pub fn kinds(fx: &[Effect]) -> Vec<String> {
    fx.iter()
        .map(|e| match e {
            Effect::Start { cmd, job } => {
                format!("start({cmd:?}{})", if *job { ",job" } else { "" })
            }
            Effect::RunStop { kill } => {
                if *kill {
                    "run_kill".into()
                } else {
                    "run_stop".into()
                }
            }
            Effect::RunReload => "run_reload".into(),
            Effect::Signal { kill } => {
                if *kill {
                    "sigkill".into()
                } else {
                    "sigterm".into()
                }
            }
            Effect::WatchGone => "watch".into(),
            Effect::Persist => "persist".into(),
            Effect::Emit { kind, .. } => format!("emit:{kind}"),
            Effect::Answer { outcome, .. } => format!("answer:{}", outcome_name(outcome)),
            Effect::Untrack { .. } => "untrack".into(),
            Effect::Timer(_) => "timer".into(),
            Effect::LimitStopped { .. } => "limit_stopped".into(),
        })
        .collect()
}

pub fn outcome_name(o: &Outcome) -> &'static str {
    match o {
        Outcome::Done(_) => "done",
        Outcome::AlreadyRunning(_) => "828",
        Outcome::NotRunning => "829",
        Outcome::StartCheckFailed(_) => "836",
        Outcome::StopFailed(_) => "stop_failed",
        Outcome::CommandFailed(_) => "65535",
        Outcome::MissingCommand(_) => "830",
        Outcome::Invalid(_) => "invalid",
        Outcome::Unavailable(_) => "unavailable",
        Outcome::NotRegistered => "851",
        Outcome::Busy(_) => "busy",
        Outcome::Forbidden(_) => "forbidden",
    }
}
