//! The state × input table of [`Instance::step`]: every state, every input, the state it
//! leads to and the effects it asks for, for a managed resident process with a stop command,
//! whose deadlines have passed. An operation comes with the intent the process commits for
//! it first (stop and kill: stopped and unmanaged; unmanage: unmanaged).
//!
//! The expected table is `table.txt`, reviewed like code: after a deliberate change of the
//! rules, `PROCAGENT_BLESS=1 cargo test --lib lifecycle` rewrites it and `git diff` shows
//! every cell that moved.
//!
//! Below it, the restart rule as its own table: after each kind of death, from a given count
//! of failures in a row, the state, the count and the delay (zero, with the start among the
//! effects and no timer, after a healthy run); and `max_restarts`.

use std::time::Instant;

use super::testutil::*;
use super::*;

/// One representative of each state (held states hold a supervisor start or an operation).
pub fn states(now: Instant) -> Vec<(&'static str, State)> {
    let past = now - s(1);
    vec![
        ("stopped", State::Stopped),
        ("exited", State::Exited),
        ("completed", State::Completed),
        ("backoff", State::Backoff { until: past }),
        ("waiting", State::Waiting { until: past }),
        ("fatal", State::Fatal),
        (
            "retrying",
            State::Retrying {
                hold: Hold::Op(7, Op::Start),
                until: past,
            },
        ),
        (
            "starting",
            State::Starting {
                hold: Hold::Supervise { after_death: true },
                cmd: StartCmd::Start,
                prev: None,
            },
        ),
        (
            "checking",
            State::Checking {
                hold: Hold::Supervise { after_death: false },
                pid: 100,
                until: past,
                exited: None,
            },
        ),
        (
            "running",
            State::Running {
                pid: 100,
                healthy: true,
                since: now - s(100),
            },
        ),
        (
            "stopping",
            State::Stopping {
                hold: Hold::Op(7, Op::Stop),
                step: StopStep::Command,
                until: past,
                pid: Some(100),
            },
        ),
        (
            "reloading",
            State::Reloading {
                hold: Hold::Op(7, Op::Reload),
                pid: Some(100),
            },
        ),
    ]
}

pub fn inputs() -> Vec<(&'static str, Input)> {
    let mut v: Vec<(&'static str, Input)> = Op::ALL
        .iter()
        .map(|op| (op.name(), Input::Op { id: 9, op: *op }))
        .collect();
    v.extend([
        ("found", Input::Found { pid: 101 }),
        ("check_passed", Input::CheckPassed),
        (
            "start_failed",
            Input::StartFailed(StartFailure::Check("no process".into())),
        ),
        (
            "exited",
            Input::Exited {
                pid: 100,
                exit: code(1),
            },
        ),
        ("command_done", Input::CommandDone(Ok(()))),
        ("gone", Input::Gone),
        ("timer", Input::Timer),
        ("adopted", Input::Adopted { pid: 102 }),
        ("lost", Input::Lost),
        ("definition_changed", Input::DefinitionChanged),
        ("unregistered", Input::Unregistered),
        (
            "limit_breach",
            Input::LimitBreach {
                cause: "mem".into(),
            },
        ),
        ("health_failed", Input::HealthFailed { why: "x".into() }),
        ("cgroup_emptied", Input::CgroupEmptied),
        ("shutdown", Input::Shutdown),
    ]);
    v
}

/// `state input -> new state: effects`, one line per cell.
pub fn render() -> String {
    let now = Instant::now();
    let mut out = String::new();
    for (sn, st) in states(now) {
        for (iname, input) in inputs() {
            let c = match &input {
                Input::Op {
                    op: Op::Stop | Op::Kill,
                    ..
                } => unmanaged(),
                Input::Op {
                    op: Op::Unmanage, ..
                } => Ctx {
                    managed: false,
                    ..ctx()
                },
                _ => ctx(),
            };
            let (next, fx) = inst(st).step(&c, input, now, 0.5);
            let hold = next
                .state
                .hold()
                .map(|h| format!("[{}]", h.name()))
                .unwrap_or_default();
            out.push_str(&format!(
                "{sn} {iname} -> {}{hold}: {}\n",
                next.state.name(),
                kinds(&fx).join(" ")
            ));
        }
    }
    out
}

#[test]
fn every_state_times_every_input() {
    let got = render();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/supervisor/lifecycle/table.txt"
    );
    if std::env::var_os("PROCAGENT_BLESS").is_some() {
        std::fs::write(path, &got).expect("write table.txt");
        return;
    }
    let want = include_str!("table.txt");
    // Cells by "state input", so a new row or column shows as itself.
    let cells = |t: &str| -> std::collections::BTreeMap<String, String> {
        t.lines()
            .filter_map(|l| l.split_once(" -> "))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let (w, g) = (cells(want), cells(&got));
    let keys: std::collections::BTreeSet<&String> = w.keys().chain(g.keys()).collect();
    let diff: Vec<String> = keys
        .into_iter()
        .filter(|k| w.get(*k) != g.get(*k))
        .map(|k| {
            format!(
                "  {k}: want {}, got {}",
                w.get(k).map_or("(none)", String::as_str),
                g.get(k).map_or("(none)", String::as_str)
            )
        })
        .collect();
    assert!(
        diff.is_empty(),
        "the lifecycle table changed ({} cells):\n{}\n(PROCAGENT_BLESS=1 rewrites table.txt once the change is intended)",
        diff.len(),
        diff.join("\n")
    );
}

/// The restart rule, cell by cell: which deaths restart at once (a zero delay, no timer) and
/// which back off, from a given count of failures in a row.
#[test]
fn restart_delay_after_each_kind_of_death() {
    let now = Instant::now();
    let run = |since: u64| State::Running {
        pid: 100,
        healthy: true,
        since: now - s(since),
    };
    let held = |hold: Hold| State::Stopping {
        hold,
        step: StopStep::Term,
        until: now + s(10),
        pid: None,
    };
    let checking_dead = State::Checking {
        hold: Hold::Supervise { after_death: true },
        pid: 100,
        until: now + s(10),
        exited: Some(code(1)),
    };
    let exited = || Input::Exited {
        pid: 100,
        exit: code(1),
    };
    let failed = || Input::StartFailed(StartFailure::Check("exited within 1s".into()));
    let no_check = Ctx {
        check: (0, 0),
        ..ctx()
    };
    // (what, ctx, state, failures before, input, "state after, failures after, delay s")
    #[rustfmt::skip]
    let cases: Vec<(&str, Ctx, State, u32, Input, &str)> = vec![
        ("healthy run exits", ctx(), run(100), 0, exited(), "starting 0 0"),
        ("healthy run killed right after its check", ctx(), run(0), 0, exited(), "starting 0 0"),
        ("healthy run after failures", ctx(), run(2), 5, exited(), "starting 0 0"),
        ("healthy run after many failures", ctx(), run(0), 40, exited(), "starting 0 0"),
        ("healthy run's tree gone", ctx(), run(2), 3, Input::Gone, "starting 0 0"),
        ("healthy run's cgroup emptied", ctx(), run(2), 3, Input::CgroupEmptied, "starting 0 0"),
        ("no check window, dead at once", no_check, run(0), 0, exited(), "backoff 1 1"),
        ("no check window, dead again", no_check, run(0), 2, exited(), "backoff 3 4"),
        ("no check window, up 1 s", no_check, run(1), 2, exited(), "starting 0 0"),
        ("start check failed", ctx(), checking_dead, 0, failed(), "backoff 1 1"),
        ("start check failed again", ctx(), checking_dead, 3, failed(), "backoff 4 8"),
        ("start check failed at the cap", ctx(), checking_dead, 12, failed(), "backoff 13 60"),
        ("liveness stop", ctx(), held(Hold::Liveness), 0, Input::Gone, "backoff 1 1"),
        ("liveness stop again", ctx(), held(Hold::Liveness), 2, Input::Gone, "backoff 3 4"),
        ("limit stop", ctx(), held(Hold::Limit), 0, Input::Gone, "backoff 1 1"),
        ("limit stop again", ctx(), held(Hold::Limit), 1, Input::Gone, "backoff 2 2"),
    ];
    for (what, c, st, before, input, want) in cases {
        let mut i = inst(st);
        i.failures = before;
        let (n, fx) = i.step(&c, input, now, 0.5);
        let k = kinds(&fx);
        let got = format!("{} {} {}", n.state.name(), n.failures, n.delay.as_secs());
        assert_eq!(got, want, "{what}: {n:?} {k:?}");
        assert_eq!(n.delay.subsec_nanos(), 0, "{what}: no jitter in this table");
        let want_delay = n.delay.as_secs();
        if want_delay == 0 {
            // At once: the start is among the effects, and nothing waits for a timer.
            assert!(k.contains(&"start(Start)".to_string()), "{what}: {k:?}");
            assert!(
                !k.iter().any(|k| k == "timer" || k == "emit:backoff"),
                "{what}: {k:?}"
            );
        } else {
            assert_eq!(n.deadline(&c), Some(now + s(want_delay)), "{what}");
            assert!(k.contains(&"emit:backoff".to_string()), "{what}: {k:?}");
        }
    }
}

/// `max_restarts`: the failure past it gives up into `fatal` (no timer); a healthy run's
/// death never counts toward it; an operator start or manage leaves it with a fresh count.
#[test]
fn max_restarts_and_leaving_fatal() {
    let now = Instant::now();
    let c = Ctx {
        max_restarts: Some(2),
        ..ctx()
    };
    let checking_dead = State::Checking {
        hold: Hold::Supervise { after_death: true },
        pid: 100,
        until: now + s(10),
        exited: Some(code(1)),
    };
    let failed = || Input::StartFailed(StartFailure::Check("exited within 1s".into()));
    // (failures before, state after)
    for (before, want) in [(0, "backoff"), (1, "backoff"), (2, "fatal"), (7, "fatal")] {
        let mut i = inst(checking_dead);
        i.failures = before;
        let (n, fx) = i.step(&c, failed(), now, 0.5);
        assert_eq!(n.state.name(), want, "from {before}");
        assert_eq!(n.deadline(&c).is_none(), want == "fatal", "from {before}");
        assert_eq!(
            kinds(&fx).contains(&"emit:fatal".to_string()),
            want == "fatal"
        );
    }
    let mut healthy = inst(State::Running {
        pid: 100,
        healthy: true,
        since: now - s(2),
    });
    healthy.failures = 2;
    let exit = Input::Exited {
        pid: 100,
        exit: code(1),
    };
    let (n, _) = healthy.step(&c, exit, now, 0.5);
    assert_eq!((n.state.name(), n.failures), ("starting", 0));
    for op in [Op::Start, Op::Manage, Op::Restart] {
        let mut fatal = inst(State::Fatal);
        fatal.failures = 3;
        let (n, fx) = fatal.step(&c, Input::Op { id: 1, op }, now, 0.5);
        assert_eq!(n.state.name(), "starting", "{op:?}");
        assert_eq!(n.failures, 0, "{op:?}");
        assert!(kinds(&fx).iter().any(|k| k.starts_with("start(")), "{op:?}");
    }
}
