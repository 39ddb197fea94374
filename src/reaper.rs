//! The one reaper: the agent is a child subreaper and collects every child and orphan,
//! woken by SIGCHLD and by a periodic sweep (SIGCHLD coalesces).
//!
//! Nothing else in the agent waits on children (no `tokio::process`, no `Child::wait`; the
//! exit watcher's pidfd reap goes through [`Reaper::reap_pidfd`]), so no status is ever
//! stolen. A child is named by a [`Child`]: its pid and when it started, because a pid is
//! reused once its child is reaped. Each sweep peeks at an exited child (`WNOWAIT`, so it
//! stays a zombie and its pid cannot be reused), reads the zombie's start time from
//! `/proc/PID/stat`, then reaps it, and files the exit under (pid, start time). Callers
//! register a waiter for a [`Child`]; statuses nobody asked for are kept for a minute in
//! `recent` (so a waiter registered a moment after the child exited still gets it, and the
//! exit watcher can look up the code of a managed child), then pruned by age. An exit is
//! handed only to the child it belongs to: an older child's exit filed under the same pid
//! started before the newer child was spawned, and is not it. The table lock is held across
//! each peek-and-reap, so "not reaped yet" checks ([`Reaper::with_unreaped`]) are race-free:
//! a child that is not reaped cannot have had its pid reused.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::sys::{self, ExitInfo};

/// When a child started, in boot-clock ticks (the unit of `/proc/PID/stat`'s `starttime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// Spawned by the agent after this tick (`procinfo::now_ticks_floor()` taken before the
    /// fork): the child is the earliest one with this pid that started at or after it.
    AtLeast(u64),
    /// Exactly this start time (read from `/proc/PID/stat` while it ran).
    Exactly(u64),
}

/// One child of the agent: its pid and when it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child {
    pub pid: i32,
    pub started: Started,
}

impl Child {
    /// A child the agent forked with `pid` after boot-clock tick `ticks`.
    pub fn spawned(pid: i32, ticks: u64) -> Child {
        Child {
            pid,
            started: Started::AtLeast(ticks),
        }
    }

    /// The process `pid` whose start time is `starttime`.
    pub fn exact(pid: i32, starttime: u64) -> Child {
        Child {
            pid,
            started: Started::Exactly(starttime),
        }
    }
}

/// One reaped exit.
#[derive(Debug, Clone, Copy)]
struct Reaped {
    exit: ExitInfo,
    /// The zombie's start time; `None` when its `/proc/PID/stat` could not be read.
    starttime: Option<u64>,
    /// Boot-clock ticks just after the reap: the child started no later than this.
    reaped_ticks: u64,
    at: Instant,
}

impl Reaped {
    /// The tick this exit is ordered by among exits filed under one pid.
    fn order(&self) -> u64 {
        self.starttime.unwrap_or(self.reaped_ticks)
    }

    /// Can this exit belong to a child that started as `started` says?
    fn belongs_to(&self, started: Started) -> bool {
        match (self.starttime, started) {
            (Some(s), Started::AtLeast(t)) => s >= t,
            (Some(s), Started::Exactly(t)) => s == t,
            // Start time unknown: it started no later than the reap, so it can only be a
            // child that started by then (the best that can be said without /proc).
            (None, Started::AtLeast(t) | Started::Exactly(t)) => self.reaped_ticks >= t,
        }
    }
}

/// The reaper's bookkeeping, without any syscall (table-tested below).
#[derive(Default)]
struct Table {
    waiters: HashMap<i32, Vec<(Started, oneshot::Sender<ExitInfo>)>>,
    recent: HashMap<i32, Vec<Reaped>>,
}

impl Table {
    /// The exit of `child`, if it was reaped recently: the earliest exit filed under its pid
    /// that can be its own (a later one is a child that reused the pid after it).
    fn find(&self, child: Child) -> Option<&Reaped> {
        self.recent
            .get(&child.pid)?
            .iter()
            .filter(|r| r.belongs_to(child.started))
            .min_by_key(|r| r.order())
    }

    /// File the exit of `pid` and hand it to the waiters of that child.
    fn record(&mut self, pid: i32, r: Reaped) {
        if let Some(ws) = self.waiters.get_mut(&pid) {
            let mut i = 0;
            while i < ws.len() {
                if r.belongs_to(ws[i].0) {
                    let (_, tx) = ws.swap_remove(i);
                    let _ = tx.send(r.exit);
                } else {
                    i += 1;
                }
            }
            if ws.is_empty() {
                self.waiters.remove(&pid);
            }
        }
        // Kept for the exit watcher too, waiters or not.
        self.recent.entry(pid).or_default().push(r);
    }

    /// Resolve `tx` with `child`'s exit now if it is known, else when it is reaped.
    fn wait(&mut self, child: Child, tx: oneshot::Sender<ExitInfo>) {
        match self.find(child) {
            Some(r) => {
                let _ = tx.send(r.exit);
            }
            None => self
                .waiters
                .entry(child.pid)
                .or_default()
                .push((child.started, tx)),
        }
    }

    /// Forget exits older than [`RECENT_TTL`] and waiters whose receiver is gone.
    fn prune(&mut self, now: Instant) {
        self.recent.retain(|_, rs| {
            rs.retain(|r| now.saturating_duration_since(r.at) < RECENT_TTL);
            !rs.is_empty()
        });
        self.waiters.retain(|_, ws| {
            ws.retain(|(_, tx)| !tx.is_closed());
            !ws.is_empty()
        });
    }
}

/// Handle to the reaper; cheap to clone.
#[derive(Clone, Default)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

const RECENT_TTL: Duration = Duration::from_secs(60);

impl Reaper {
    pub fn new() -> Reaper {
        Reaper::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reap every exited child now. Returns how many were reaped.
    pub fn sweep(&self) -> usize {
        let mut n = 0;
        loop {
            let mut t = self.lock();
            // Peek first: the zombie keeps its pid (and its /proc entry) until it is reaped
            // below, under the same lock.
            let Ok(Some((pid, _))) = sys::peek_exited() else {
                break;
            };
            let starttime = crate::procinfo::read_stat(pid).map(|s| s.starttime);
            let exit = match sys::reap_exited(pid) {
                Ok(Some(exit)) => exit,
                // Not reapable after all: leave it to the next sweep rather than spin.
                Ok(None) | Err(_) => break,
            };
            n += 1;
            t.record(
                pid,
                Reaped {
                    exit,
                    starttime,
                    reaped_ticks: crate::procinfo::now_ticks_floor() + 1,
                    at: Instant::now(),
                },
            );
        }
        self.lock().prune(Instant::now());
        n
    }

    /// Reap `child` through its pidfd if it is our child and has exited, filing the exit like
    /// a sweep does (under the table lock, so [`Reaper::with_unreaped`] stays race-free).
    /// `None` when it is not our child or has not exited.
    pub fn reap_pidfd(&self, child: Child, fd: BorrowedFd<'_>) -> Option<ExitInfo> {
        let mut t = self.lock();
        let exit = sys::pidfd_try_reap(fd).ok().flatten()?;
        let starttime = match child.started {
            Started::Exactly(s) => Some(s),
            Started::AtLeast(_) => None,
        };
        t.record(
            child.pid,
            Reaped {
                exit,
                starttime,
                reaped_ticks: crate::procinfo::now_ticks_floor() + 1,
                at: Instant::now(),
            },
        );
        Some(exit)
    }

    /// A receiver that resolves with the exit of `child`.
    pub fn wait_for(&self, child: Child) -> oneshot::Receiver<ExitInfo> {
        let (tx, rx) = oneshot::channel();
        self.lock().wait(child, tx);
        rx
    }

    /// The exit status of `child` if the reaper collected it recently.
    pub fn recent_exit(&self, child: Child) -> Option<ExitInfo> {
        self.lock().find(child).map(|r| r.exit)
    }

    /// Run `f` only if `child` has not been reaped (so its pid, and the process group it
    /// leads, cannot have been reused). Returns `None` when it was reaped already.
    pub fn with_unreaped<R>(&self, child: Child, f: impl FnOnce() -> R) -> Option<R> {
        let t = self.lock();
        if t.find(child).is_some() {
            return None;
        }
        // Still unreaped (zombie or running), or never our child: the caller knows which.
        Some(f())
    }

    /// Run the reaper until `shutdown` resolves: on SIGCHLD and every `sweep` period.
    pub async fn run(self, sweep: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGCHLD; reaping on the periodic sweep only");
                None
            }
        };
        let mut tick = tokio::time::interval(sweep);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = async {
                    match sigchld.as_mut() {
                        Some(s) => { s.recv().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {}
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            self.sweep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: i32 = 4242;

    fn reaped(code: i32, starttime: Option<u64>, reaped_ticks: u64) -> Reaped {
        Reaped {
            exit: ExitInfo::Code(code),
            starttime,
            reaped_ticks,
            at: Instant::now(),
        }
    }

    fn table(entries: &[Reaped]) -> Table {
        let mut t = Table::default();
        for r in entries {
            t.record(P, *r);
        }
        t
    }

    /// Which exit (by code) each kind of caller is handed, for the exits filed under one pid.
    #[test]
    fn an_exit_is_handed_only_to_its_own_child() {
        let old = reaped(1, Some(100), 110);
        let newer = reaped(2, Some(300), 310);
        let unknown = reaped(3, None, 150);
        #[rustfmt::skip]
        let cases: &[(&str, &[Reaped], Child, Option<i32>)] = &[
            // A new child spawned after the old one was reaped is not given its exit.
            ("stale exit, new child", &[old], Child::spawned(P, 200), None),
            ("stale exit, new child (exact)", &[old], Child::exact(P, 201), None),
            ("own exit (spawn bound)", &[old], Child::spawned(P, 99), Some(1)),
            ("own exit (spawn bound = start)", &[old], Child::spawned(P, 100), Some(1)),
            ("own exit (exact)", &[old], Child::exact(P, 100), Some(1)),
            // Two children with one pid: each gets its own.
            ("earliest after the bound", &[old, newer], Child::spawned(P, 50), Some(1)),
            ("earliest after the bound, order-free", &[newer, old], Child::spawned(P, 50), Some(1)),
            ("the later child", &[old, newer], Child::spawned(P, 200), Some(2)),
            ("the later child (exact)", &[old, newer], Child::exact(P, 300), Some(2)),
            ("the older child (exact)", &[newer, old], Child::exact(P, 100), Some(1)),
            ("a third child", &[old, newer], Child::spawned(P, 400), None),
            // Start time unread: it started no later than its reap.
            ("unknown start, reaped before the spawn", &[unknown], Child::spawned(P, 200), None),
            ("unknown start, reaped after the spawn", &[unknown], Child::spawned(P, 120), Some(3)),
            ("unknown start, exact before the reap", &[unknown], Child::exact(P, 140), Some(3)),
            ("unknown start, exact after the reap", &[unknown], Child::exact(P, 160), None),
            // Another pid is never matched.
            ("other pid", &[old], Child::spawned(P + 1, 0), None),
        ];
        for (name, entries, child, want) in cases {
            let t = table(entries);
            assert_eq!(
                t.find(*child).map(|r| r.exit),
                want.map(ExitInfo::Code),
                "find: {name}"
            );
            // wait_for resolves at once exactly when find has the exit.
            let mut t = t;
            let (tx, mut rx) = oneshot::channel();
            t.wait(*child, tx);
            assert_eq!(rx.try_recv().ok(), want.map(ExitInfo::Code), "wait: {name}");
        }
    }

    /// A waiter registered for a new child is not woken by the exit of an older child filed
    /// under its pid, and is woken by its own.
    #[test]
    fn waiters_get_their_own_childs_exit() {
        let mut t = Table::default();
        let (tx_new, mut rx_new) = oneshot::channel();
        t.wait(Child::spawned(P, 200), tx_new);
        let (tx_exact, mut rx_exact) = oneshot::channel();
        t.wait(Child::exact(P, 100), tx_exact);
        t.record(P, reaped(1, Some(100), 110));
        assert_eq!(rx_exact.try_recv().ok(), Some(ExitInfo::Code(1)));
        assert!(rx_new.try_recv().is_err(), "new child woken by an old exit");
        t.record(P, reaped(2, Some(250), 260));
        assert_eq!(rx_new.try_recv().ok(), Some(ExitInfo::Code(2)));
        assert!(t.waiters.is_empty());
    }

    /// The regression (issue 13): a stale exit filed under a pid made the reaper believe a new
    /// child with that pid was gone, so `with_unreaped` (and with it `kill_group`) skipped
    /// it, and `wait_for` handed it the old exit.
    #[test]
    fn a_stale_exit_does_not_make_a_new_child_look_reaped() {
        let r = Reaper::new();
        r.lock().record(P, reaped(9, Some(100), 110));
        let new = Child::spawned(P, 500);
        assert_eq!(r.with_unreaped(new, || "killed"), Some("killed"));
        assert!(r.wait_for(new).try_recv().is_err());
        assert_eq!(r.recent_exit(new), None);
        let old = Child::exact(P, 100);
        assert_eq!(r.with_unreaped(old, || "killed"), None);
        assert_eq!(r.recent_exit(old), Some(ExitInfo::Code(9)));
    }

    #[test]
    fn exits_are_pruned_by_age_and_dead_waiters_dropped() {
        let now = Instant::now();
        let mut t = Table::default();
        let mut stale = reaped(1, Some(100), 110);
        stale.at = now - RECENT_TTL - Duration::from_secs(1);
        t.record(P, stale);
        t.record(P, reaped(2, Some(300), 310));
        t.record(P + 1, stale);
        let (tx, rx) = oneshot::channel();
        t.wait(Child::spawned(P + 2, 0), tx);
        drop(rx);
        let (tx, _rx_kept) = oneshot::channel();
        t.wait(Child::spawned(P + 3, 0), tx);
        t.prune(now);
        assert_eq!(t.recent.get(&P).map(Vec::len), Some(1));
        assert_eq!(
            t.find(Child::spawned(P, 0)).map(|r| r.exit),
            Some(ExitInfo::Code(2))
        );
        assert!(!t.recent.contains_key(&(P + 1)));
        assert!(!t.waiters.contains_key(&(P + 2)));
        assert!(t.waiters.contains_key(&(P + 3)));
    }
}
