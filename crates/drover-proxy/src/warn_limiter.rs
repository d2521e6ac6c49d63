//! Rate limiting for the warnings of the background loops: when the control
//! plane is down the poller and reporter fail several times a second, and the
//! log should say so once in a while, not each time.

use std::time::{Duration, Instant};

/// Decides whether a failure deserves a `warn!` (first failure after a
/// success, then at most once per `every`) or only a `debug!`.
#[derive(Debug)]
pub struct WarnLimiter {
    every: Duration,
    last_warn: Option<Instant>,
    failures: u64,
}

impl WarnLimiter {
    pub fn new(every: Duration) -> Self {
        WarnLimiter {
            every,
            last_warn: None,
            failures: 0,
        }
    }

    /// Records a failure; true when it should be logged at warn level.
    pub fn failure(&mut self) -> bool {
        self.failures += 1;
        let now = Instant::now();
        let due = self
            .last_warn
            .is_none_or(|t| now.duration_since(t) >= self.every);
        if due {
            self.last_warn = Some(now);
        }
        due
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Records a success; returns how many failures preceded it.
    pub fn success(&mut self) -> u64 {
        let n = self.failures;
        self.failures = 0;
        self.last_warn = None;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_first_then_limits() {
        let mut l = WarnLimiter::new(Duration::from_secs(3600));
        assert!(l.failure());
        assert!(!l.failure());
        assert!(!l.failure());
        assert_eq!(l.failures(), 3);
        assert_eq!(l.success(), 3);
        assert!(l.failure());
    }
}
