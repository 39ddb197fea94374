//! The one reaper: the agent is a child subreaper and collects every child and orphan with
//! `waitpid(-1, WNOHANG)`, woken by SIGCHLD and by a periodic sweep (SIGCHLD coalesces).
//!
//! Nothing else in the agent waits on children (no `tokio::process`, no `Child::wait`), so
//! no status is ever stolen. Callers that care about a child's exit register a waiter by pid;
//! statuses nobody asked for are kept for a minute in `recent` (so a waiter registered a
//! moment after the child exited still gets it, and the exit watcher can look up the code of
//! a managed child), then forgotten. The table lock is held across each `waitpid` call, so
//! "not reaped yet" checks ([`Reaper::with_unreaped`]) are race-free: a pid that is not
//! reaped cannot have been reused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::sys::{self, ExitInfo};

#[derive(Default)]
struct Table {
    waiters: HashMap<i32, Vec<oneshot::Sender<ExitInfo>>>,
    recent: HashMap<i32, (ExitInfo, Instant)>,
    reaped_total: u64,
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
            match sys::reap_one() {
                Ok(Some((pid, exit))) => {
                    n += 1;
                    t.reaped_total += 1;
                    match t.waiters.remove(&pid) {
                        Some(ws) => {
                            for w in ws {
                                let _ = w.send(exit);
                            }
                            // Keep it for the exit watcher too.
                            t.recent.insert(pid, (exit, Instant::now()));
                        }
                        None => {
                            t.recent.insert(pid, (exit, Instant::now()));
                        }
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        let mut t = self.lock();
        if t.recent.len() > 64 {
            let now = Instant::now();
            t.recent
                .retain(|_, (_, at)| now.duration_since(*at) < RECENT_TTL);
        }
        n
    }

    /// A receiver that resolves with the exit of child `pid`.
    pub fn wait_for(&self, pid: i32) -> oneshot::Receiver<ExitInfo> {
        let (tx, rx) = oneshot::channel();
        let mut t = self.lock();
        if let Some((exit, _)) = t.recent.get(&pid) {
            let _ = tx.send(*exit);
        } else {
            t.waiters.entry(pid).or_default().push(tx);
        }
        rx
    }

    /// The exit status of `pid` if the reaper collected it recently.
    pub fn recent_exit(&self, pid: i32) -> Option<ExitInfo> {
        self.lock().recent.get(&pid).map(|(e, _)| *e)
    }

    /// Run `f` only if child `pid` has not been reaped (so its pid, and the process group it
    /// leads, cannot have been reused). Returns `None` when it was reaped already.
    pub fn with_unreaped<R>(&self, pid: i32, f: impl FnOnce() -> R) -> Option<R> {
        let t = self.lock();
        if t.recent.contains_key(&pid) {
            return None;
        }
        // Still unreaped (zombie or running), or never our child: the caller knows which.
        Some(f())
    }

    /// Total children reaped since start.
    pub fn reaped_total(&self) -> u64 {
        self.lock().reaped_total
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
