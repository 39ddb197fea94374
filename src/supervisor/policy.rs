//! Pure supervision rules the lifecycle applies: restart backoff, failure counting, periodic
//! cycles and health verdicts. Nothing here does I/O or reads a clock: `now` and randomness are parameters, so
//! every rule is table-tested below.
//!
//! Restarts: the death of a healthy run (one that passed its start check, and lasted at least
//! [`MIN_HEALTHY_RUN`] from its start) is not a failure: the count of consecutive failures
//! goes back to 0 and the restart is immediate (delay 0), however often it happens. Failures
//! are the runs that did not pass their start check and the stops the agent itself caused
//! (limit stops, liveness failures); the n-th failure in a row waits `initial` · 2^(n-1), up
//! to `max`, with ±`jitter` spread. A run that stays up `reset_after` also resets the count (so
//! a limit stop after a long run starts the backoff from its first step again). A
//! crash-looping process is retried forever at the capped delay, unless its `max_restarts`
//! gives it up: never a fork storm, never silently given up.

use std::time::{Duration, Instant};

/// Restart backoff settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
    /// Fraction of spread: 0.1 means each delay is scaled by a factor in [0.9, 1.1].
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            reset_after: Duration::from_secs(30),
            jitter: 0.1,
        }
    }
}

/// A run shorter than this from its start is never healthy, whatever its start check said:
/// with a start check window of 0 s there is no check, and a process that dies at once must
/// back off rather than be restarted in a tight loop (runit waits 1 s for the same reason).
pub const MIN_HEALTHY_RUN: Duration = Duration::from_secs(1);

impl Backoff {
    /// The delay before the next attempt after `failures` consecutive failures (counting the
    /// one that just happened; 0 after a healthy run). `unit` is a random number in [0, 1).
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let exp = (failures - 1).min(30);
        let base = self.initial.saturating_mul(1u32 << exp).min(self.max);
        let factor = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        base.mul_f64(factor.max(0.0)).min(self.max)
    }

    /// The failure count after an instance died by itself: 0 when the run was healthy, one
    /// more otherwise.
    pub fn failures_after_exit(&self, failures: u32, healthy: bool) -> u32 {
        if healthy {
            0
        } else {
            failures.saturating_add(1)
        }
    }
}

/// Was a run healthy? It passed its start check (`passed`), and from its start (the check
/// window `check_secs`, then `uptime` since the check passed) it lasted [`MIN_HEALTHY_RUN`].
pub fn healthy_run(passed: bool, check_secs: u64, uptime: Duration) -> bool {
    passed && Duration::from_secs(check_secs).saturating_add(uptime) >= MIN_HEALTHY_RUN
}

/// When a periodic cycle that was due at `due` starts at `now`: keep the schedule aligned
/// (no drift) unless we are more than one cycle late.
pub fn cycle_start(last_cycle: Option<Instant>, cycle_time: Duration, now: Instant) -> Instant {
    match last_cycle {
        Some(t) => {
            let due = t + cycle_time;
            if now >= due && now.duration_since(due) < cycle_time {
                due
            } else {
                now
            }
        }
        None => now,
    }
}

/// Is a health check due? Only for a process with a `health_cmd` that runs, is not held by
/// an operation, and has no check running, once per `interval`.
pub fn health_due(
    has_cmd: bool,
    running: bool,
    busy: bool,
    last: Option<Instant>,
    interval: Duration,
    now: Instant,
) -> bool {
    has_cmd && running && !busy && last.is_none_or(|t| now.duration_since(t) >= interval)
}

/// After a health check: the new count of consecutive failures, and whether the process is
/// to be treated as dead (the count reached `threshold`).
pub fn health_verdict(failures: u32, passed: bool, threshold: u32) -> (u32, bool) {
    if passed {
        (0, false)
    } else {
        let n = failures.saturating_add(1);
        (n, n >= threshold.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: u64) -> Duration {
        Duration::from_secs(x)
    }

    #[test]
    fn backoff_table() {
        let b = Backoff {
            jitter: 0.0,
            ..Backoff::default()
        };
        // (failures in a row, delay): 0 is the death of a healthy run, restarted at once.
        let cases = [
            (0, 0),
            (1, 1),
            (2, 2),
            (3, 4),
            (4, 8),
            (5, 16),
            (6, 32),
            (7, 60),
            (8, 60),
            (100, 60),
            (u32::MAX, 60),
        ];
        for (failures, want) in cases {
            assert_eq!(b.delay(failures, 0.5), s(want), "failures={failures}");
        }
        // Jitter never delays a healthy run's restart.
        assert_eq!(Backoff::default().delay(0, 0.99), Duration::ZERO);
    }

    #[test]
    fn backoff_jitter_stays_in_band_and_under_cap() {
        let b = Backoff::default();
        for u in [0.0, 0.25, 0.5, 0.75, 0.999] {
            let d = b.delay(2, u); // base 2 s
            assert!(
                d >= Duration::from_millis(1800) && d <= Duration::from_millis(2200),
                "{d:?}"
            );
            assert!(b.delay(50, u) <= s(60));
        }
        assert_ne!(b.delay(2, 0.0), b.delay(2, 0.99));
    }

    #[test]
    fn failure_counting() {
        let b = Backoff::default();
        // (failures, healthy, after): a healthy run resets however many came before.
        let cases = [
            (0, true, 0),
            (5, true, 0),
            (u32::MAX, true, 0),
            (0, false, 1),
            (3, false, 4),
            (u32::MAX, false, u32::MAX),
        ];
        for (failures, healthy, want) in cases {
            assert_eq!(b.failures_after_exit(failures, healthy), want);
        }
    }

    #[test]
    fn a_healthy_run_passed_its_check_and_lasted_a_second() {
        let ms = Duration::from_millis;
        // (passed, check window s, uptime since the check, healthy)
        let cases = [
            (true, 1, ms(0), true),
            (true, 5, ms(2), true),
            (true, 0, ms(999), false),
            (true, 0, ms(1000), true),
            (true, 0, s(100), true),
            (false, 5, s(100), false),
        ];
        for (passed, check, up, want) in cases {
            assert_eq!(
                healthy_run(passed, check, up),
                want,
                "{passed} {check} {up:?}"
            );
        }
    }

    #[test]
    fn health_table() {
        let now = Instant::now();
        let i = s(10);
        let cases = [
            (true, true, false, None, true),
            (false, true, false, None, false),
            (true, false, false, None, false),
            (true, true, true, None, false),
            (true, true, false, Some(now - s(5)), false),
            (true, true, false, Some(now - s(10)), true),
        ];
        for (cmd, running, busy, last, want) in cases {
            assert_eq!(
                health_due(cmd, running, busy, last, i, now),
                want,
                "{cmd} {running} {busy} {last:?}"
            );
        }
        assert_eq!(health_verdict(0, true, 3), (0, false));
        assert_eq!(health_verdict(2, true, 3), (0, false));
        assert_eq!(health_verdict(0, false, 3), (1, false));
        assert_eq!(health_verdict(2, false, 3), (3, true));
        assert_eq!(health_verdict(5, false, 3), (6, true));
        assert_eq!(health_verdict(0, false, 0), (1, true));
    }

    #[test]
    fn cycles_do_not_drift() {
        let t0 = Instant::now();
        assert_eq!(cycle_start(None, s(10), t0), t0);
        assert_eq!(
            cycle_start(Some(t0), s(10), t0 + s(10) + Duration::from_millis(30)),
            t0 + s(10)
        );
        assert_eq!(cycle_start(Some(t0), s(10), t0 + s(35)), t0 + s(35));
    }
}
