//! Accept failures (out of descriptors, say): the accept loop backs off while they last and logs
//! them at most once a second, with a count, instead of a line per attempt.

use std::io;
use std::time::{Duration, Instant};

/// The first pause after a failed accept; it doubles while accepts keep failing.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause.
const MAX_BACKOFF: Duration = Duration::from_millis(200);
/// At most one log line per this.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// The accept loop's failure state.
#[derive(Debug, Default)]
pub(crate) struct AcceptErrors {
    /// Failures since the last log line.
    unlogged: u64,
    last_log: Option<Instant>,
    backoff: Duration,
}

impl AcceptErrors {
    /// Records a failure; returns how long to pause before accepting again.
    pub(crate) fn failed(&mut self, error: &io::Error) -> Duration {
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            tracing::warn!(
                %error,
                failures = self.unlogged,
                "accept failed (logged at most once a second)"
            );
            self.unlogged = 0;
            self.last_log = Some(now);
        }
        self.backoff = (self.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
        self.backoff
    }

    /// Records a success: the next failure pauses briefly again.
    pub(crate) fn succeeded(&mut self) {
        self.backoff = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_doubling_to_a_ceiling_and_a_success_resets() {
        let mut a = AcceptErrors::default();
        let e = io::Error::from_raw_os_error(24);
        let pauses: Vec<_> = (0..7).map(|_| a.failed(&e)).collect();
        let ms: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 200, 200]);
        // One line for the first failure; the other six wait for the next second.
        assert_eq!(a.unlogged, 6);
        a.succeeded();
        assert_eq!(a.failed(&e), FIRST_BACKOFF);
    }
}
