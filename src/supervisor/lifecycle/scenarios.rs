//! Sequences through the lifecycle: backoff timing, periodic cycles, start retries, the
//! supervisor's stops, and how an operation commits its intent.

use std::time::{Duration, Instant};

use super::testutil::*;
use super::*;

/// Drive one instance: each input at `now`.
fn run(
    ctx: &Ctx,
    mut i: Instance,
    now: Instant,
    inputs: Vec<Input>,
) -> (Instance, Vec<Vec<String>>) {
    let mut all = Vec::new();
    for input in inputs {
        let (n, fx) = i.step(ctx, input, now, 0.5);
        all.push(kinds(&fx));
        i = n;
    }
    (i, all)
}

fn running(now: Instant, up: u64) -> Instance {
    inst(State::Running {
        pid: 100,
        healthy: true,
        since: now - s(up),
    })
}

fn backoff_until(i: &Instance) -> Option<Instant> {
    match i.state {
        State::Backoff { until } => Some(until),
        _ => None,
    }
}

fn data_of(fx: &[Effect], kind: &str) -> Option<serde_json::Value> {
    fx.iter().find_map(|e| match e {
        Effect::Emit { kind: k, data, .. } if *k == kind => Some(data.clone()),
        _ => None,
    })
}

#[test]
fn a_healthy_run_is_restarted_at_once_every_time() {
    let c = ctx();
    let mut now = Instant::now();
    let mut i = running(now, 100);
    // Killed ten times, each time soon after its start check passed: never a backoff.
    for round in 1..=10u64 {
        now += s(2);
        let (n, fx) = i.step(
            &c,
            Input::Exited {
                pid: 100,
                exit: code(1),
            },
            now,
            0.5,
        );
        assert!(
            matches!(n.state, State::Starting { .. }),
            "round {round}: {n:?}"
        );
        assert_eq!((n.failures, n.delay), (0, Duration::ZERO), "round {round}");
        let k = kinds(&fx);
        assert!(!k.contains(&"emit:backoff".to_string()), "{k:?}");
        assert!(!k.contains(&"timer".to_string()), "no timer: {k:?}");
        let d = data_of(&fx, "restarting").expect("restarting");
        assert_eq!(d["delay_secs"], serde_json::json!(0.0));
        assert_eq!(data_of(&fx, "exited").expect("exited")["healthy"], true);
        assert_eq!(n.restarts, round);
        let (n, _) = n.step(&c, Input::Found { pid: 100 }, now, 0.5);
        let (n, _) = n.step(&c, Input::CheckPassed, now + s(1), 0.5);
        now += s(1);
        i = n;
    }
}

#[test]
fn failures_back_off_doubling_to_the_cap_and_a_long_run_resets_them() {
    let c = ctx();
    let mut now = Instant::now();
    let mut i = inst(State::Starting {
        hold: Hold::Supervise { after_death: true },
        cmd: StartCmd::Start,
        prev: None,
    });
    // Every failed start check waits longer: 1, 2, 4, ... 60 s.
    let mut delays = Vec::new();
    for _ in 0..9 {
        let (n, _) = i.step(&c, Input::Found { pid: 100 }, now, 0.5);
        let (n, fx) = n.step(
            &c,
            Input::StartFailed(StartFailure::Check("exited".into())),
            now + s(1),
            0.5,
        );
        let until = backoff_until(&n).expect("backoff");
        assert_eq!(until - (now + s(1)), n.delay);
        assert_eq!(
            data_of(&fx, "backoff").expect("backoff")["delay_secs"],
            serde_json::json!(n.delay.as_secs_f64())
        );
        delays.push(n.delay.as_secs());
        let (n, fx) = n.step(&c, Input::Timer, until, 0.5);
        assert_eq!(
            data_of(&fx, "restarting").expect("restarting")["delay_secs"],
            serde_json::json!(n.delay.as_secs_f64())
        );
        now = until;
        i = n;
    }
    assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    assert_eq!(i.restarts, 9, "every attempt after a backoff counts");
    // A run that passes its check keeps the count until it stayed up reset_after (30 s)...
    let (n, _) = i.step(&c, Input::Found { pid: 100 }, now, 0.5);
    let (n, _) = n.step(&c, Input::CheckPassed, now + s(1), 0.5);
    assert_eq!(n.failures, 9);
    let since = now + s(1);
    assert_eq!(n.deadline(&c), Some(since + s(30)));
    let (reset, _) = n.step(&c, Input::Timer, since + s(30), 0.5);
    assert_eq!(reset.failures, 0);
    // ...or until it dies by itself: a healthy run, so restarted at once.
    let (died, fx) = n.step(
        &c,
        Input::Exited {
            pid: 100,
            exit: code(1),
        },
        since + s(3),
        0.5,
    );
    assert!(matches!(died.state, State::Starting { .. }), "{died:?}");
    assert_eq!((died.failures, died.delay), (0, Duration::ZERO));
    assert!(!kinds(&fx).contains(&"emit:backoff".to_string()));
}

#[test]
fn a_failed_start_is_never_retried_at_once() {
    let c = ctx();
    let now = Instant::now();
    let starting = inst(State::Starting {
        hold: Hold::Supervise { after_death: true },
        cmd: StartCmd::Start,
        prev: None,
    });
    let (i, fx) = run(
        &c,
        starting,
        now,
        vec![Input::StartFailed(StartFailure::Check("nothing".into()))],
    );
    assert_eq!(
        fx[0],
        ["emit:start_failed", "persist", "emit:backoff", "timer"]
    );
    assert_eq!(
        backoff_until(&i),
        Some(now + s(1)),
        "the second backoff step"
    );
}

#[test]
fn max_restarts_gives_up_visibly_and_manage_tries_again() {
    let c = Ctx {
        max_restarts: Some(2),
        ..ctx()
    };
    let now = Instant::now();
    let mut i = inst(State::Starting {
        hold: Hold::Supervise { after_death: true },
        cmd: StartCmd::Start,
        prev: None,
    });
    i.failures = 2;
    let (i, fx) = run(
        &c,
        i,
        now,
        vec![Input::StartFailed(StartFailure::Check("exited".into()))],
    );
    assert_eq!(i.state, State::Fatal);
    assert_eq!(i.failures, 3);
    assert!(fx[0].contains(&"emit:fatal".to_string()));
    assert!(i.message.contains("max_restarts 2"));
    // Nothing starts it again by itself...
    let (i2, fx) = i.step(&c, Input::Timer, now + s(3600), 0.5);
    assert_eq!((i2.state, kinds(&fx).len()), (State::Fatal, 0));
    // ...but manage does.
    let (i3, fx) = i.step(
        &c,
        Input::Op {
            id: 1,
            op: Op::Manage,
        },
        now,
        0.5,
    );
    assert!(kinds(&fx).contains(&"start(Start)".to_string()));
    assert_eq!(i3.failures, 0);
}

#[test]
fn operator_start_retries_start_retries_times_start_interval_apart() {
    let c = Ctx {
        start_retries: 2,
        managed: false,
        expect_running: false,
        ..ctx()
    };
    let now = Instant::now();
    let (mut i, _) = inst(State::Stopped).step(
        &c,
        Input::Op {
            id: 5,
            op: Op::Start,
        },
        now,
        0.5,
    );
    let fail = || Input::StartFailed(StartFailure::Command("exit 1".into()));
    for attempt in 1..=2 {
        let (n, fx) = i.step(&c, fail(), now, 0.5);
        assert!(
            matches!(n.state, State::Retrying { until, .. } if until == now + s(3)),
            "attempt {attempt}: {n:?}"
        );
        assert!(!kinds(&fx).iter().any(|k| k.starts_with("answer")));
        let (n, fx) = n.step(&c, Input::Timer, now + s(3), 0.5);
        assert_eq!(kinds(&fx)[0], "start(Start)");
        i = n;
    }
    let (n, fx) = i.step(&c, fail(), now, 0.5);
    assert_eq!(n.state, State::Stopped);
    let answer = fx.iter().find_map(|e| match e {
        Effect::Answer { outcome, .. } => Some(outcome.clone()),
        _ => None,
    });
    assert_eq!(
        answer,
        Some(Outcome::CommandFailed("exit 1 (after 3 attempts)".into()))
    );
}

#[test]
fn periodic_jobs_run_every_cycle_and_skip_a_cycle_while_alive() {
    let c = Ctx {
        auto_type: AutoType::Periodic,
        cycle: s(10),
        ..ctx()
    };
    let t0 = Instant::now();
    // Managed and idle: the first run starts now.
    let (i, fx) = inst(State::Stopped).step(&c, Input::Timer, t0, 0.5);
    assert_eq!(kinds(&fx), ["start(Start,job)"]);
    let (i, _) = i.step(&c, Input::Found { pid: 100 }, t0, 0.5);
    assert!(
        matches!(i.state, State::Running { .. }),
        "a job has no start check"
    );
    // It ends quickly: wait for the next cycle, aligned on the first.
    let (i, _) = i.step(
        &c,
        Input::Exited {
            pid: 100,
            exit: code(0),
        },
        t0 + s(2),
        0.5,
    );
    assert_eq!(i.state, State::Waiting { until: t0 + s(10) });
    let (i, fx) = i.step(&c, Input::Timer, t0 + s(10), 0.5);
    assert_eq!(kinds(&fx)[0], "start(Start,job)");
    let (i, _) = i.step(&c, Input::Found { pid: 101 }, t0 + s(10), 0.5);
    // Still running when the next cycle is due: skipped, schedule kept.
    assert_eq!(i.deadline(&c), Some(t0 + s(20)));
    let (i, fx) = i.step(&c, Input::Timer, t0 + s(20), 0.5);
    assert_eq!(kinds(&fx), ["emit:cycle_skipped", "timer"]);
    assert_eq!(i.deadline(&c), Some(t0 + s(30)));
    // Unmanaged, a finished run does not wait for another.
    let (i, _) = i.step(
        &unmanaged_periodic(),
        Input::Exited {
            pid: 101,
            exit: code(0),
        },
        t0 + s(25),
        0.5,
    );
    assert_eq!(i.state, State::Stopped);
}

fn unmanaged_periodic() -> Ctx {
    Ctx {
        auto_type: AutoType::Periodic,
        ..unmanaged()
    }
}

#[test]
fn health_and_limit_stops_restart_under_backoff() {
    let c = ctx();
    let now = Instant::now();
    let (i, fx) = running(now, 100).step(
        &c,
        Input::HealthFailed {
            why: "3 fails".into(),
        },
        now,
        0.5,
    );
    assert_eq!(
        kinds(&fx),
        ["emit:health_failed", "run_stop", "watch", "timer"]
    );
    let (i, fx) = i.step(&c, Input::Gone, now, 0.5);
    assert_eq!(i.failures, 1);
    assert!(kinds(&fx).contains(&"emit:stopped".to_string()));
    // A liveness stop is a failure: the first step of the backoff is immediate, but the
    // agent caused it, so it is at least one backoff step (1 failure → 0 s here).
    assert!(matches!(
        i.state,
        State::Backoff { .. } | State::Starting { .. }
    ));
    let (i, fx) = running(now, 100).step(
        &c,
        Input::LimitBreach {
            cause: "mem 90% over 50%".into(),
        },
        now,
        0.5,
    );
    assert_eq!(kinds(&fx), ["run_stop", "watch", "timer"]);
    let (i, fx) = i.step(&c, Input::Gone, now, 0.5);
    assert!(kinds(&fx).contains(&"limit_stopped".to_string()));
    assert!(i.message.contains("exceeding its limit"), "{i:?}");
    // Unmanaged processes are not stopped for limits.
    let (i, fx) = running(now, 1).step(
        &unmanaged(),
        Input::LimitBreach { cause: "x".into() },
        now,
        0.5,
    );
    assert!(fx.is_empty() && matches!(i.state, State::Running { .. }));
}

#[test]
fn a_stop_escalates_from_stop_cmd_to_sigterm_to_sigkill_and_then_fails() {
    let c = unmanaged();
    let now = Instant::now();
    let (i, fx) = running(now, 5).step(
        &c,
        Input::Op {
            id: 3,
            op: Op::Stop,
        },
        now,
        0.5,
    );
    assert_eq!(kinds(&fx), ["run_stop", "watch", "timer"]);
    let t1 = now + c.stop_grace;
    let (i, fx) = i.step(&c, Input::Timer, t1, 0.5);
    assert_eq!(kinds(&fx), ["sigterm", "timer"]);
    let t2 = t1 + c.op_timeout;
    let (i, fx) = i.step(&c, Input::Timer, t2, 0.5);
    assert_eq!(kinds(&fx), ["sigkill", "timer"]);
    let (i, fx) = i.step(&c, Input::Timer, t2 + KILL_WAIT, 0.5);
    assert_eq!(kinds(&fx), ["answer:stop_failed"]);
    assert!(
        matches!(i.state, State::Running { pid: 100, .. }),
        "still running"
    );
    // A kill without kill_cmd is SIGKILL at once.
    let (_, fx) = running(now, 5).step(
        &c,
        Input::Op {
            id: 4,
            op: Op::Kill,
        },
        now,
        0.5,
    );
    assert_eq!(kinds(&fx), ["sigkill", "watch", "timer"]);
}

#[test]
fn restart_without_restart_cmd_stops_then_starts() {
    let c = Ctx {
        has_restart_cmd: false,
        ..ctx()
    };
    let now = Instant::now();
    let (i, fx) = running(now, 5).step(
        &c,
        Input::Op {
            id: 8,
            op: Op::Restart,
        },
        now,
        0.5,
    );
    assert_eq!(kinds(&fx), ["run_stop", "watch", "timer"]);
    let (i, fx) = i.step(&c, Input::Gone, now, 0.5);
    assert!(kinds(&fx).contains(&"start(Start)".to_string()), "{fx:?}");
    let (i, _) = i.step(&c, Input::Found { pid: 200 }, now, 0.5);
    let (_, fx) = i.step(&c, Input::CheckPassed, now + s(1), 0.5);
    assert!(kinds(&fx).contains(&"answer:done".to_string()));
}

fn proc_step(p: &Process, c: &Ctx, input: ProcInput, now: Instant) -> (Process, Vec<ProcEffect>) {
    p.step(c, input, now, 0.5)
}

fn answers(fx: &[ProcEffect]) -> Vec<(OpId, String, bool)> {
    fx.iter()
        .filter_map(|e| match e {
            ProcEffect::Answer {
                id,
                outcome,
                not_durable,
            } => Some((
                *id,
                outcome_name(outcome).to_string(),
                not_durable.is_none(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn stop_commits_its_intent_before_signalling_and_acts_when_the_store_refuses() {
    let c = ctx();
    let now = Instant::now();
    let p = Process::new(
        Intent {
            expect_running: true,
            managed: true,
        },
        vec![running(now, 10)],
    );
    let (p, fx) = proc_step(
        &p,
        &c,
        ProcInput::Op {
            id: 1,
            op: Op::Stop,
            only: None,
        },
        now,
    );
    assert_eq!(
        fx,
        vec![ProcEffect::CommitIntent(Intent {
            expect_running: false,
            managed: false
        })],
        "nothing is signalled before the intent is committed"
    );
    // The store refuses: the stop goes on, and its answer says it is not durable.
    let (p, fx) = proc_step(&p, &c, ProcInput::Committed(Err("disk full".into())), now);
    assert!(fx.iter().any(|e| matches!(
        e,
        ProcEffect::Instance {
            effect: Effect::RunStop { .. },
            ..
        }
    )));
    let (p, fx) = proc_step(
        &p,
        &c,
        ProcInput::Instance {
            i: 0,
            input: Input::Gone,
        },
        now,
    );
    assert_eq!(answers(&fx), vec![(1, "done".into(), false)]);
    assert!(!p.intent.managed && !p.intent.expect_running);
}

#[test]
fn start_commits_running_and_managed_only_after_the_start_check() {
    let c = unmanaged();
    let now = Instant::now();
    let p = Process::new(
        Intent::default(),
        vec![Instance::default(), Instance::default()],
    );
    let (p, fx) = proc_step(
        &p,
        &c,
        ProcInput::Op {
            id: 1,
            op: Op::Start,
            only: None,
        },
        now,
    );
    assert_eq!(
        fx.iter()
            .filter(|e| matches!(
                e,
                ProcEffect::Instance {
                    effect: Effect::Start { .. },
                    ..
                }
            ))
            .count(),
        2
    );
    let (p, _) = proc_step(
        &p,
        &c,
        ProcInput::Instance {
            i: 0,
            input: Input::Found { pid: 10 },
        },
        now,
    );
    let (p, _) = proc_step(
        &p,
        &c,
        ProcInput::Instance {
            i: 1,
            input: Input::Found { pid: 11 },
        },
        now,
    );
    let (p, _) = proc_step(
        &p,
        &c,
        ProcInput::Instance {
            i: 0,
            input: Input::CheckPassed,
        },
        now + s(1),
    );
    let (p, fx) = proc_step(
        &p,
        &c,
        ProcInput::Instance {
            i: 1,
            input: Input::CheckPassed,
        },
        now + s(1),
    );
    assert_eq!(
        fx.last(),
        Some(&ProcEffect::CommitIntent(Intent {
            expect_running: true,
            managed: true
        }))
    );
    assert!(answers(&fx).is_empty(), "answered only once committed");
    let (p, fx) = proc_step(&p, &c, ProcInput::Committed(Ok(())), now + s(1));
    assert_eq!(answers(&fx), vec![(1, "done".into(), true)]);
    assert!(p.intent.managed);
    // A start while running is 828, without fan-out.
    let (_, fx) = proc_step(
        &p,
        &c,
        ProcInput::Op {
            id: 2,
            op: Op::Start,
            only: None,
        },
        now + s(2),
    );
    assert_eq!(answers(&fx), vec![(2, "828".into(), true)]);
}

#[test]
fn a_failed_start_leaves_the_intent_as_it_was() {
    let c = unmanaged();
    let now = Instant::now();
    let p = Process::new(Intent::default(), vec![Instance::default()]);
    let (p, _) = proc_step(
        &p,
        &c,
        ProcInput::Op {
            id: 1,
            op: Op::Start,
            only: None,
        },
        now,
    );
    let (p, fx) = proc_step(
        &p,
        &c,
        ProcInput::Instance {
            i: 0,
            input: Input::StartFailed(StartFailure::Check("no process".into())),
        },
        now,
    );
    assert_eq!(answers(&fx), vec![(1, "836".into(), true)]);
    assert_eq!(p.intent, Intent::default());
    assert!(!fx.iter().any(|e| matches!(e, ProcEffect::CommitIntent(_))));
}

#[test]
fn operations_wait_for_a_supervisor_start_and_for_each_other() {
    let c = ctx();
    let now = Instant::now();
    let p = Process::new(
        Intent {
            expect_running: true,
            managed: true,
        },
        vec![Instance::default()],
    );
    // The supervisor starts it (managed, idle).
    let (p, fx) = proc_step(&p, &c, ProcInput::Timer, now);
    assert!(fx.iter().any(|e| matches!(
        e,
        ProcEffect::Instance {
            effect: Effect::Start { .. },
            ..
        }
    )));
    // A stop and a start arrive during the start: both wait.
    let (p, fx) = proc_step(
        &p,
        &c,
        ProcInput::Op {
            id: 1,
            op: Op::Stop,
            only: None,
        },
        now,
    );
    assert!(fx.is_empty());
    let (p, fx) = proc_step(
        &p,
        &c,
        ProcInput::Op {
            id: 2,
            op: Op::Start,
            only: None,
        },
        now,
    );
    assert!(fx.is_empty());
    assert_eq!(p.queue.len(), 2);
    // Found and checked: the stop begins (commit first).
    let (p, _) = proc_step(
        &p,
        &c,
        ProcInput::Instance {
            i: 0,
            input: Input::Found { pid: 7 },
        },
        now,
    );
    let (p, fx) = proc_step(
        &p,
        &c,
        ProcInput::Instance {
            i: 0,
            input: Input::CheckPassed,
        },
        now + s(1),
    );
    assert!(fx.iter().any(|e| matches!(e, ProcEffect::CommitIntent(_))));
    let (p, _) = proc_step(&p, &c, ProcInput::Committed(Ok(())), now + s(1));
    let (p, fx) = proc_step(
        &p,
        &c,
        ProcInput::Instance {
            i: 0,
            input: Input::Gone,
        },
        now + s(1),
    );
    // The stop is answered, then the start begins.
    assert_eq!(answers(&fx), vec![(1, "done".into(), true)]);
    assert!(fx.iter().any(|e| matches!(
        e,
        ProcEffect::Instance {
            effect: Effect::Start { .. },
            ..
        }
    )));
    assert!(p.queue.is_empty());
}

#[test]
fn unregister_waits_for_the_running_operation() {
    let c = ctx();
    let now = Instant::now();
    let p = Process::new(Intent::default(), vec![running(now, 3)]);
    let (p, _) = proc_step(
        &p,
        &c,
        ProcInput::Op {
            id: 1,
            op: Op::Reload,
            only: None,
        },
        now,
    );
    let (p, fx) = proc_step(&p, &c, ProcInput::Unregister { id: 2 }, now);
    assert!(!fx.iter().any(|e| matches!(e, ProcEffect::Forget { .. })));
    let (_, fx) = proc_step(
        &p,
        &c,
        ProcInput::Instance {
            i: 0,
            input: Input::CommandDone(Ok(())),
        },
        now,
    );
    assert_eq!(answers(&fx), vec![(1, "done".into(), true)]);
    assert!(matches!(fx.last(), Some(ProcEffect::Forget { id: 2 })));
    assert!(fx.iter().any(|e| matches!(
        e,
        ProcEffect::Instance {
            effect: Effect::Untrack { .. },
            ..
        }
    )));
}

#[test]
fn missing_commands_are_answered_without_acting() {
    let c = Ctx {
        has_start_cmd: false,
        has_restart_cmd: false,
        has_reload_cmd: false,
        ..unmanaged()
    };
    let now = Instant::now();
    let p = Process::new(Intent::default(), vec![Instance::default()]);
    for (id, op, field) in [
        (1, Op::Start, "start_cmd"),
        (2, Op::Manage, "start_cmd"),
        (3, Op::Restart, "start_cmd"),
        (4, Op::Reload, "reload_cmd"),
    ] {
        let (_, fx) = proc_step(&p, &c, ProcInput::Op { id, op, only: None }, now);
        assert_eq!(
            fx,
            vec![ProcEffect::Answer {
                id,
                outcome: Outcome::MissingCommand(field),
                not_durable: None
            }]
        );
    }
}

/// A process without restart_cmd is restarted by a stop and a start (never refused for the
/// missing restart_cmd); only a process without start_cmd as well is refused, before
/// anything is stopped.
#[test]
fn a_restart_without_restart_cmd_needs_only_start_cmd() {
    let now = Instant::now();
    let p = Process::new(Intent::default(), vec![running(now, 60)]);
    let restart = ProcInput::Op {
        id: 1,
        op: Op::Restart,
        only: None,
    };
    let c = Ctx {
        has_restart_cmd: false,
        ..ctx()
    };
    let (_, fx) = proc_step(&p, &c, restart.clone(), now);
    assert!(
        fx.iter().any(|e| matches!(
            e,
            ProcEffect::Instance {
                effect: Effect::RunStop { kill: false },
                ..
            }
        )),
        "{fx:?}"
    );
    assert!(answers(&fx).is_empty(), "{fx:?}");
    let c = Ctx {
        has_start_cmd: false,
        ..c
    };
    let (_, fx) = proc_step(&p, &c, restart, now);
    assert_eq!(
        fx,
        vec![ProcEffect::Answer {
            id: 1,
            outcome: Outcome::MissingCommand("start_cmd"),
            not_durable: None
        }]
    );
}

/// A config reload's stop-and-start (Replace) whose new start fails keeps the process's
/// intent: it stays managed and expected running, no intent is committed, and the supervisor
/// retries it under backoff (it used to commit managed=false with the stop, leaving the
/// process stopped and unmanaged).
#[test]
fn a_replace_whose_start_fails_keeps_the_previous_intent() {
    let c = ctx();
    let now = Instant::now();
    let managed = Intent {
        expect_running: true,
        managed: true,
    };
    let p = Process::new(managed, vec![running(now, 60)]);
    let op = |id, op| ProcInput::Op { id, op, only: None };
    let at = |input| ProcInput::Instance { i: 0, input };
    let (p, fx) = proc_step(&p, &c, op(1, Op::Replace), now);
    assert!(
        !fx.iter().any(|e| matches!(e, ProcEffect::CommitIntent(_))),
        "the stop half commits nothing: {fx:?}"
    );
    let (p, fx) = proc_step(&p, &c, at(Input::Gone), now);
    assert!(
        fx.iter().any(|e| matches!(
            e,
            ProcEffect::Instance {
                effect: Effect::Start { .. },
                ..
            }
        )),
        "started again at once: {fx:?}"
    );
    // An operator op arriving meanwhile waits: the key stays held from stop to start.
    let (waiting, fx) = proc_step(&p, &c, op(2, Op::Stop), now);
    assert!(answers(&fx).is_empty(), "{fx:?}");
    let (_, fx) = proc_step(
        &waiting,
        &c,
        at(Input::StartFailed(StartFailure::Command("exit 1".into()))),
        now,
    );
    let order: Vec<OpId> = answers(&fx).iter().map(|a| a.0).collect();
    assert_eq!(order.first(), Some(&1), "the replace answers first: {fx:?}");
    // Without it: the failed start answers, and the intent is untouched.
    let (p, fx) = proc_step(
        &p,
        &c,
        at(Input::StartFailed(StartFailure::Command("exit 1".into()))),
        now,
    );
    let a = answers(&fx);
    assert_eq!(a.first().map(|x| x.0), Some(1), "{fx:?}");
    assert_ne!(a[0].1, "done");
    assert_eq!(p.intent, managed);
    assert!(
        !fx.iter().any(|e| matches!(e, ProcEffect::CommitIntent(_))),
        "{fx:?}"
    );
    assert!(
        backoff_until(&p.instances[0]).is_some(),
        "retried under backoff: {:?}",
        p.instances[0].state
    );
}

/// An operator's start (op 0) or restart (op 7) of a periodic job: the start check is the
/// first run's outcome. Each row: the context, the operation, how the first run goes (the
/// inputs the runner feeds after `Found`), the answer, and where the instance is left.
#[test]
fn an_operator_start_of_a_periodic_job_is_judged_by_its_first_run() {
    let managed = Ctx {
        auto_type: AutoType::Periodic,
        cycle: s(10),
        ..ctx()
    };
    let fresh = Ctx {
        has_restart_cmd: false,
        ..unmanaged_periodic()
    };
    let t0 = Instant::now();
    let exited = |c: i32| Input::Exited {
        pid: 100,
        exit: code(c),
    };
    let failed = || {
        Input::StartFailed(StartFailure::Check(
            "first run failed (exit 1); output: boom".into(),
        ))
    };
    type Row = (&'static str, Ctx, Op, Vec<Input>, &'static str, State);
    let rows: Vec<Row> = vec![
        (
            "a short run that exits 0 passes; the job waits for its next cycle",
            fresh,
            Op::Start,
            vec![exited(0), Input::CheckPassed],
            "done",
            State::Waiting { until: t0 + s(10) },
        ),
        (
            "a run still alive at the end of the window passes",
            fresh,
            Op::Start,
            vec![Input::CheckPassed],
            "done",
            State::Running {
                pid: 100,
                healthy: true,
                since: t0,
            },
        ),
        (
            "a run that fails answers the failure and leaves an unmanaged job stopped",
            fresh,
            Op::Start,
            vec![exited(1), failed()],
            "836",
            State::Stopped,
        ),
        (
            "restart without restart_cmd is a start: same rule",
            fresh,
            Op::Restart,
            vec![exited(0), Input::CheckPassed],
            "done",
            State::Waiting { until: t0 + s(10) },
        ),
        (
            "a managed job whose first run fails keeps its schedule (no backoff)",
            Ctx {
                has_restart_cmd: false,
                ..managed
            },
            Op::Restart,
            vec![exited(1), failed()],
            "836",
            State::Waiting { until: t0 + s(10) },
        ),
    ];
    for (why, c, op, inputs, want_answer, want_state) in rows {
        let (mut i, fx) = inst(State::Stopped).step(&c, Input::Op { id: 1, op }, t0, 0.5);
        assert_eq!(kinds(&fx)[0], "start(Start)", "{why}");
        let mut answers = Vec::new();
        let (n, _) = i.step(&c, Input::Found { pid: 100 }, t0, 0.5);
        i = n;
        for input in inputs {
            let (n, fx) = i.step(&c, input, t0, 0.5);
            i = n;
            answers.extend(fx.iter().filter_map(|e| match e {
                Effect::Answer { outcome, .. } => Some(outcome_name(outcome)),
                _ => None,
            }));
        }
        assert_eq!(answers, [want_answer], "{why}");
        assert_eq!(i.state, want_state, "{why}");
        assert_eq!(i.failures, u32::from(want_answer != "done"), "{why}");
    }
}
