//! Rate-limited log lines: a flood of the same event (idle connections
//! closed, connections refused, `accept` failing for lack of file
//! descriptors) must not become a flood of log lines.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one line per this interval for each kind of event.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Decides whether one kind of event is logged now.
#[derive(Debug)]
pub struct LogLimiter {
    state: Mutex<LimiterState>,
}

#[derive(Debug)]
struct LimiterState {
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new()
    }
}

impl LogLimiter {
    /// A limiter that has logged nothing yet.
    pub const fn new() -> LogLimiter {
        LogLimiter {
            state: Mutex::new(LimiterState {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when this event should be logged now, `n` being how many
    /// events of this kind were not logged since the previous line; `None`
    /// (and the event counted) otherwise.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.last {
            Some(t) if now.saturating_duration_since(t) < LOG_INTERVAL => {
                s.suppressed += 1;
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_the_rest() {
        let l = LogLimiter::new();
        let t = Instant::now();
        assert_eq!(l.check_at(t), Some(0));
        for i in 1..100 {
            assert_eq!(l.check_at(t + Duration::from_millis(i)), None);
        }
        assert_eq!(l.check_at(t + LOG_INTERVAL), Some(99));
        assert_eq!(l.check_at(t + LOG_INTERVAL), None);
    }
}
