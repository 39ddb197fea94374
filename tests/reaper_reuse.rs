//! The reaper on real processes with a really reused pid: a child that gets the pid of an
//! older, already-reaped child is not handed the older one's exit, and is not taken for
//! reaped (so a kill of its group is not skipped). Root only: the reuse is forced by writing
//! `/proc/sys/kernel/ns_last_pid`. This binary holds one test, because the reaper collects
//! every child of the test process.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use procagent::procinfo;
use procagent::reaper::{Child, Reaper};
use procagent::sys::ExitInfo;
use tokio::sync::oneshot::error::TryRecvError;

/// Fork `sh -c CMD` and return its pid and the reaper's name for it (never waited on here:
/// the reaper collects it).
fn spawn(cmd: &str) -> (i32, Child) {
    let ticks = procinfo::now_ticks_floor();
    let child = Command::new("/bin/sh")
        .args(["-c", cmd])
        .spawn()
        .expect("spawn sh");
    let pid = child.id() as i32;
    drop(child);
    (pid, Child::spawned(pid, ticks))
}

/// Sweep until `rx` resolves (bounded).
fn reaped(
    reaper: &Reaper,
    rx: &mut tokio::sync::oneshot::Receiver<ExitInfo>,
    what: &str,
) -> ExitInfo {
    common::wait_for(what, Duration::from_secs(10), || {
        reaper.sweep();
        rx.try_recv().ok()
    })
}

#[test]
fn a_reused_pid_is_not_handed_the_old_childs_exit() {
    if !common::is_root() {
        eprintln!("skipped: forcing a pid reuse (ns_last_pid) needs root");
        return;
    }
    let reaper = Reaper::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Other processes on the host fork too and may take the pid first: retry.
    for attempt in 0.. {
        if Instant::now() >= deadline {
            eprintln!("skipped: no pid reuse could be forced in {attempt} attempts");
            return;
        }
        // The old child: exits with 7 and is reaped (its exit stays in `recent`).
        let (old_pid, old) = spawn("exit 7");
        let mut rx_old = reaper.wait_for(old);
        assert_eq!(
            reaped(&reaper, &mut rx_old, "the old child's exit"),
            ExitInfo::Code(7)
        );
        // Start times are in clock ticks: let one pass so the two children differ in theirs.
        let after = procinfo::now_ticks_floor() + 2;
        common::wait_for("a clock tick", Duration::from_secs(5), || {
            (procinfo::now_ticks_floor() > after).then_some(())
        });
        if std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", old_pid - 1)).is_err() {
            eprintln!("skipped: cannot write /proc/sys/kernel/ns_last_pid");
            return;
        }
        let (new_pid, new) = spawn("exec sleep 60");
        let mut rx_new = reaper.wait_for(new);
        if new_pid != old_pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(new_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            reaped(&reaper, &mut rx_new, "a child that missed the pid");
            continue;
        }
        // The new child runs with the old child's pid.
        assert!(
            matches!(rx_new.try_recv(), Err(TryRecvError::Empty)),
            "the new child was handed an exit while it runs"
        );
        assert_eq!(reaper.recent_exit(new), None);
        assert_eq!(reaper.recent_exit(old), Some(ExitInfo::Code(7)));
        // It is not taken for reaped: the kill runs (as kill_group's does).
        let killed = reaper.with_unreaped(new, || {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(new_pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
        });
        assert_eq!(killed, Some(true), "with_unreaped skipped a live child");
        assert_eq!(
            reaped(&reaper, &mut rx_new, "the new child's exit"),
            ExitInfo::Signal(9)
        );
        // Each child's exit stays its own.
        assert_eq!(reaper.recent_exit(old), Some(ExitInfo::Code(7)));
        assert_eq!(reaper.recent_exit(new), Some(ExitInfo::Signal(9)));
        return;
    }
}
