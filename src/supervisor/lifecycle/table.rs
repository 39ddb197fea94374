//! The state × input table of [`Instance::step`]: every state, every input, the state it
//! leads to and the effects it asks for, for a managed resident process with a stop command,
//! whose deadlines have passed. An operation comes with the intent the process commits for
//! it first (stop and kill: stopped and unmanaged; unmanage: unmanaged).
//!
//! The expected table is `table.txt`, reviewed like code: after a deliberate change of the
//! rules, `PROCAGENT_BLESS=1 cargo test --lib lifecycle` rewrites it and `git diff` shows
//! every cell that moved.

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
