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
        let before = self.used.fetch_add(n, Ordering::AcqRel);
        if before.saturating_add(n) <= self.max {
            return true;
        }
        // Undone without waking anyone: nothing was given back that wasn't there before (waking
        // the starved here would make them all retry, fail and wake each other, forever).
        self.used.fetch_sub(n, Ordering::AcqRel);
        false
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
