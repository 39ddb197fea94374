//! Pure supervision rules the lifecycle applies: restart backoff, failure counting, periodic
//! cycles and health verdicts. Nothing here does I/O or reads a clock: `now` and randomness are parameters, so
//! every rule is table-tested below.
//!
//! Backoff: the first failure after a healthy run restarts at once (delay 0, the fast path
//! that makes restarts take milliseconds); each further consecutive failure doubles the delay
//! from `initial` up to `max`, with ±`jitter` spread. A process that stays up `reset_after`
//! has its failure count reset. A crash-looping process is retried forever at the capped
//! delay: never a fork storm, never silently given up.

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

impl Backoff {
    /// The delay before the next attempt after `failures` consecutive failures (counting the
    /// one that just happened). `unit` is a random number in [0, 1).
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        if failures <= 1 {
            return Duration::ZERO;
        }
        let exp = (failures - 2).min(30);
        let base = self.initial.saturating_mul(1u32 << exp).min(self.max);
        let factor = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        base.mul_f64(factor.max(0.0)).min(self.max)
    }

    /// The failure count after an instance died having run for `uptime` (`None` when it never
    /// passed its start check).
    pub fn failures_after_exit(&self, failures: u32, uptime: Option<Duration>) -> u32 {
        match uptime {
            Some(u) if u >= self.reset_after => 1,
            _ => failures.saturating_add(1),
        }
    }
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
        let cases = [
            (0, 0),
            (1, 0),
            (2, 1),
            (3, 2),
            (4, 4),
            (5, 8),
            (6, 16),
            (7, 32),
            (8, 60),
            (9, 60),
            (100, 60),
        ];
        for (failures, want) in cases {
            assert_eq!(b.delay(failures, 0.5), s(want), "failures={failures}");
        }
    }

    #[test]
    fn backoff_jitter_stays_in_band_and_under_cap() {
        let b = Backoff::default();
        for u in [0.0, 0.25, 0.5, 0.75, 0.999] {
            let d = b.delay(3, u); // base 2 s
            assert!(
                d >= Duration::from_millis(1800) && d <= Duration::from_millis(2200),
                "{d:?}"
            );
            assert!(b.delay(50, u) <= s(60));
        }
        assert_ne!(b.delay(3, 0.0), b.delay(3, 0.99));
    }

    #[test]
    fn failure_counting() {
        let b = Backoff::default();
        let cases = [
            (0, Some(s(100)), 1),
            (5, Some(s(100)), 1),
            (5, Some(s(29)), 6),
            (0, None, 1),
            (3, None, 4),
            (u32::MAX, None, u32::MAX),
        ];
        for (failures, uptime, want) in cases {
            assert_eq!(b.failures_after_exit(failures, uptime), want);
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
