//! One byte budget shared by every connection of a server for its receive buffers and queued
//! output (`--max-buffered-bytes`): over it, connections stop reading instead of allocating, so
//! what peers send can never make the broker allocate without bound or abort.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes any connection may hold whatever the budget says, so small requests always flow
/// (2 000 connections × 8 KiB = 16 MiB: part of the fixed overhead).
pub(crate) const ALLOWANCE: usize = 8 * 1024;

/// The shared budget.
#[derive(Debug)]
pub(crate) struct Budget {
    max: usize,
    used: AtomicUsize,
    /// Connections waiting for room are woken when some is given back.
    #[cfg(any(feature = "tokio", feature = "smol"))]
    freed: event_listener::Event,
}

impl Budget {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            used: AtomicUsize::new(0),
            #[cfg(any(feature = "tokio", feature = "smol"))]
            freed: event_listener::Event::new(),
        }
    }

    /// Takes `n` bytes if they fit.
    pub(crate) fn try_take(&self, n: usize) -> bool {
        // Never adds and takes back: a failing take leaves `used` alone, so it can neither make
        // a concurrent take that fits fail nor owe anyone a wake.
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&u| u <= self.max)
            })
            .is_ok()
    }

    /// Whether every byte is taken (or more: replies owed are taken whatever the budget).
    pub(crate) fn is_spent(&self) -> bool {
        self.used.load(Ordering::Acquire) >= self.max
    }

    /// Takes `n` bytes whether they fit or not (memory already allocated: replies owed).
    pub(crate) fn force_take(&self, n: usize) {
        self.used.fetch_add(n, Ordering::AcqRel);
    }

    /// Gives `n` bytes back.
    pub(crate) fn give(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.used.fetch_sub(n, Ordering::AcqRel);
        #[cfg(any(feature = "tokio", feature = "smol"))]
        self.freed.notify(usize::MAX);
    }

    /// Bytes taken now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Completes after the next [`give`](Self::give) (create it, check again, then wait).
    #[cfg(any(feature = "tokio", feature = "smol"))]
    pub(crate) fn listen(&self) -> event_listener::EventListener {
        self.freed.listen()
    }

    /// Moves a connection's charge from `*charged` to `now` bytes.
    pub(crate) fn recharge(&self, charged: &mut usize, now: usize) {
        if now > *charged {
            self.force_take(now - *charged);
        } else {
            self.give(*charged - now);
        }
        *charged = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A take that fits always succeeds, however many oversized takes fail beside it.
    #[test]
    fn a_failing_take_never_makes_a_fitting_one_fail() {
        let b = std::sync::Arc::new(Budget::new(100));
        let big = {
            let b = b.clone();
            std::thread::spawn(move || {
                for _ in 0..200_000 {
                    assert!(!b.try_take(1000));
                }
            })
        };
        for _ in 0..200_000 {
            assert!(b.try_take(10));
            b.give(10);
        }
        big.join().unwrap();
        assert_eq!(b.used(), 0);
    }
}
