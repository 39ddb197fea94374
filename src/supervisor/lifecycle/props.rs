//! Properties of the lifecycle over random input sequences: no sequence reaches an
//! inconsistent state, every operation is answered at most once, an operation holding an
//! instance is the one running, and operator intent always wins (after an operator stop or
//! kill, nothing is started until an operator starts, manages or restarts it, or a config
//! reload replaces what runs).

use std::collections::HashSet;
use std::time::Instant;

use proptest::prelude::*;

use super::testutil::*;
use super::*;

/// A random step: what happens, an argument, and how much time passes first.
#[derive(Debug, Clone)]
struct Step {
    what: u8,
    arg: u8,
    dt_ms: u32,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        (any::<u8>(), any::<u8>(), 0u32..20_000).prop_map(|(what, arg, dt_ms)| Step {
            what,
            arg,
            dt_ms,
        }),
        1..120,
    )
}

fn base_ctx(auto: u8, flags: u8) -> Ctx {
    Ctx {
        auto_type: match auto % 3 {
            0 => AutoType::Resident,
            1 => AutoType::Periodic,
            _ => AutoType::SingleRun,
        },
        start_retries: u32::from(flags & 1),
        max_restarts: (flags & 2 != 0).then_some(3),
        has_stop_cmd: flags & 4 != 0,
        has_kill_cmd: flags & 8 != 0,
        has_restart_cmd: flags & 16 != 0,
        has_start_cmd: flags & 32 == 0,
        has_reload_cmd: flags & 64 == 0,
        check: (u64::from(flags >> 7), 1 + u64::from(flags >> 7)),
        ..ctx()
    }
}

fn input_of(s: &Step, next_id: &mut OpId, proc_: &Process) -> ProcInput {
    let pid = proc_.instances[0]
        .state
        .pid()
        .unwrap_or(100 + i32::from(s.arg % 4));
    let i = usize::from(s.arg) % proc_.instances.len();
    let inst = |input| ProcInput::Instance { i, input };
    match s.what % 16 {
        0 | 1 => {
            *next_id += 1;
            ProcInput::Op {
                id: *next_id,
                op: Op::ALL[usize::from(s.arg) % Op::ALL.len()],
                only: None,
            }
        }
        2 => inst(Input::Found { pid }),
        3 => inst(Input::StartFailed(if s.arg.is_multiple_of(2) {
            StartFailure::Check("no".into())
        } else {
            StartFailure::Command("failed".into())
        })),
        4 => inst(Input::Exited {
            pid,
            exit: code(i32::from(s.arg % 3)),
        }),
        5 => inst(Input::CommandDone(if s.arg.is_multiple_of(3) {
            Err("bad".into())
        } else {
            Ok(())
        })),
        6 => inst(Input::Gone),
        7 | 8 => ProcInput::Timer,
        9 => inst(Input::Adopted { pid }),
        10 => inst(Input::LimitBreach {
            cause: "cpu".into(),
        }),
        11 => inst(Input::HealthFailed { why: "x".into() }),
        12 => inst(if s.arg.is_multiple_of(2) {
            Input::CgroupEmptied
        } else {
            Input::Lost
        }),
        13 => ProcInput::Committed(if s.arg.is_multiple_of(4) {
            Err("disk full".into())
        } else {
            Ok(())
        }),
        14 => inst(if s.arg.is_multiple_of(2) {
            Input::CheckPassed
        } else {
            Input::DefinitionChanged
        }),
        _ => ProcInput::Timer,
    }
}

/// What every reachable state satisfies.
fn check_consistent(p: &Process, base: &Ctx, now: Instant) -> Result<(), TestCaseError> {
    prop_assert!(!p.instances.is_empty());
    prop_assert!(p.queue.len() <= MAX_QUEUED);
    for (i, inst) in p.instances.iter().enumerate() {
        if let Some(Hold::Op(id, _)) = inst.state.hold() {
            // An operation holds an instance only while it is the one running, and before
            // that instance answered it.
            let c = p.current.as_ref();
            prop_assert!(c.is_some_and(|c| c.id == id), "{p:?}");
            prop_assert!(
                c.is_some_and(|c| c.answers.get(i).is_some_and(|a| a.is_none())),
                "{p:?}"
            );
        }
        match inst.state {
            State::Stopping { .. }
            | State::Backoff { .. }
            | State::Waiting { .. }
            | State::Retrying { .. }
            | State::Checking { .. } => {
                prop_assert!(inst.deadline(&p.ctx(base)).is_some(), "{inst:?}");
            }
            State::Running { pid, .. } => prop_assert!(pid > 0),
            _ => {}
        }
        if let Some(d) = inst.deadline(&p.ctx(base)) {
            // A deadline is never set in the past by more than the step's own delay.
            prop_assert!(d + s(100_000) > now);
        }
    }
    if let Some(c) = &p.current
        && c.stage == super::process::Stage::Instances
    {
        prop_assert_eq!(c.answers.len(), p.instances.len());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_sequences_stay_consistent_and_operator_intent_wins(
        auto in any::<u8>(),
        flags in any::<u8>(),
        instances in 1usize..4,
        managed in any::<bool>(),
        seq in steps(),
    ) {
        let base = base_ctx(auto, flags);
        let mut now = Instant::now();
        let intent = Intent { expect_running: managed, managed };
        let mut p = Process::new(intent, vec![Instance::default(); instances]);
        let mut next_id: OpId = 0;
        let mut answered: HashSet<OpId> = HashSet::new();
        // An operator stop or kill was answered, and no start, manage or restart asked since.
        let mut stopped_by_operator = false;
        let mut stop_ops: HashSet<OpId> = HashSet::new();
        // The latest start, manage or restart asked (ids grow; operations run in order).
        let mut last_start_like: OpId = 0;
        for st in &seq {
            now += std::time::Duration::from_millis(u64::from(st.dt_ms));
            let input = input_of(st, &mut next_id, &p);
            if let ProcInput::Op { id, op, only: None } = &input {
                match op {
                    // (A replacement starts again only what runs, as the table shows.)
                    Op::Start | Op::Manage | Op::Restart | Op::Replace => {
                        stopped_by_operator = false;
                        last_start_like = *id;
                    }
                    Op::Stop | Op::Kill => {
                        stop_ops.insert(*id);
                    }
                    _ => {}
                }
            }
            let (next, fx) = p.step(&base, input, now, 0.5);
            for e in &fx {
                match e {
                    ProcEffect::Answer { id, outcome, .. } => {
                        prop_assert!(answered.insert(*id), "op {id} answered twice");
                        if stop_ops.contains(id)
                            && *id > last_start_like
                            && matches!(outcome, Outcome::Done(_) | Outcome::NotRunning)
                        {
                            stopped_by_operator = true;
                        }
                    }
                    ProcEffect::Instance { effect: Effect::Start { .. }, .. } => {
                        prop_assert!(
                            !stopped_by_operator,
                            "started after an operator stop: {fx:?}\n{p:?}"
                        );
                    }
                    _ => {}
                }
            }
            if stopped_by_operator {
                prop_assert!(!next.intent.managed, "{next:?}");
            }
            check_consistent(&next, &base, now)?;
            p = next;
        }
    }
}
