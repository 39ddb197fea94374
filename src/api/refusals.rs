//! The log of refused requests and connections, rate-limited: at most [`PER_SECOND`] lines
//! per second for each reason (the envelope's code), so a caller that is refused in a loop
//! cannot flood the agent's log. The refusals left out are counted, and the next line logged
//! for that reason says how many were suppressed since the previous one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines logged per reason and second.
pub const PER_SECOND: u32 = 5;

#[derive(Debug)]
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// The rate limiter; one per server.
#[derive(Debug, Default)]
pub struct RefusalLog {
    windows: Mutex<HashMap<i64, Window>>,
}

impl RefusalLog {
    /// Should a refusal with `code` be logged now? Returns the number suppressed since the
    /// last line of that code when it should, None when this one is suppressed.
    pub fn admit(&self, code: i64, now: Instant) -> Option<u64> {
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let win = w.entry(code).or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(win.start) >= Duration::from_secs(1) {
            win.start = now;
            win.logged = 0;
        }
        if win.logged < PER_SECOND {
            win.logged += 1;
            Some(std::mem::take(&mut win.suppressed))
        } else {
            win.suppressed += 1;
            None
        }
    }

    /// Log one refusal (if the rate allows): who, what, the code and the message.
    pub fn note(&self, uid: Option<u32>, what: &str, code: i64, message: &str) {
        let Some(suppressed) = self.admit(code, Instant::now()) else {
            return;
        };
        let uid = uid.map(i64::from).unwrap_or(-1);
        if suppressed > 0 {
            tracing::warn!(
                uid,
                request = what,
                code,
                suppressed,
                "refused: {message} ({suppressed} more refusals with this code were not logged)"
            );
        } else {
            tracing::warn!(uid, request = what, code, "refused: {message}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_lines_per_second_per_code_and_the_rest_counted() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        let logged = (0..100)
            .filter(|_| log.admit(1_000_403, t0).is_some())
            .count();
        assert_eq!(logged, PER_SECOND as usize);
        // Another reason has its own allowance.
        assert_eq!(log.admit(1_000_429, t0), Some(0));
        // A second later: logged again, with the count of the suppressed ones.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(log.admit(1_000_403, t1), Some(100 - PER_SECOND as u64));
        assert_eq!(log.admit(1_000_403, t1), Some(0));
    }
}
