//! The receive buffer: grows with the bytes that arrive (never with the Length a frame claims),
//! within the server's memory budget, and is given back when a connection goes quiet.

use crate::server::budget::{ALLOWANCE, Budget};

/// Bytes first offered to a read; doubled while reads fill what they are offered.
pub(crate) const FIRST_CHUNK: usize = 4 * 1024;
/// The largest read offered when no frame size is known.
const MAX_CHUNK: usize = 1024 * 1024;

/// Received bytes: `buf[start..end]` is unconsumed. The buffer keeps its initialized length, so
/// bytes are zeroed once when it grows, never per read.
#[derive(Debug)]
pub(crate) struct RxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// What the last [`prepare`](Self::prepare) offered, to grow the next offer.
    offered: usize,
    chunk: usize,
    /// The frame size the core is waiting for, to read it in as few calls as possible.
    want: usize,
    /// What this buffer holds of the memory budget.
    charged: usize,
}

impl Default for RxBuf {
    fn default() -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            end: 0,
            offered: 0,
            chunk: FIRST_CHUNK,
            want: 0,
            charged: 0,
        }
    }
}

impl RxBuf {
    /// Makes room at the end to read into; `false` when there is none because the budget is
    /// spent (or the allocation failed).
    pub(crate) fn prepare(&mut self, budget: &Budget) -> bool {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && (self.start >= self.buf.len() / 2 || self.end == self.buf.len())
        {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let unread = self.end - self.start;
        // Toward the awaited frame, but at most doubling what has arrived: a Length alone
        // (16 bytes claiming 10 MiB) must not buy a 10 MiB buffer.
        let room = self
            .want
            .saturating_sub(unread)
            .min(unread.max(self.chunk))
            .max(self.chunk);
        let len = self.end + room;
        if self.buf.len() < len {
            let grow = len - self.buf.len();
            let granted = if len <= ALLOWANCE {
                budget.force_take(grow);
                true
            } else {
                budget.try_take(grow)
            };
            if granted && self.buf.try_reserve_exact(grow).is_ok() {
                self.buf.resize(len, 0);
                self.charged += grow;
            } else if granted {
                tracing::warn!(bytes = grow, "receive buffer allocation failed");
                budget.give(grow);
            }
        }
        // Read into what is there, if anything.
        self.offered = self.buf.len() - self.end;
        self.offered > 0
    }

    /// The room [`prepare`](Self::prepare) made.
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`spare`](Self::spare).
    pub(crate) fn filled(&mut self, n: usize) {
        self.end += n;
        if n > 0 && n == self.offered {
            self.chunk = (self.chunk * 2).min(MAX_CHUNK);
        }
    }

    /// The bytes received and not consumed.
    pub(crate) fn unread(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Drops `n` bytes from the front (a frame handled).
    pub(crate) fn consume(&mut self, n: usize) {
        self.start += n;
        self.want = 0;
    }

    /// The size of the frame being received, once known.
    pub(crate) fn expect(&mut self, frame_len: usize) {
        self.want = frame_len;
    }

    /// Whether the buffer holds nothing unconsumed but still holds memory.
    pub(crate) fn is_idle(&self) -> bool {
        self.start == self.end && self.buf.capacity() > 0
    }

    /// Whether it holds no memory at all.
    pub(crate) fn is_released(&self) -> bool {
        self.buf.capacity() == 0
    }

    /// Gives the memory back (if nothing is unconsumed).
    pub(crate) fn release(&mut self, budget: &Budget) {
        if self.is_idle() {
            let charged = std::mem::take(&mut self.charged);
            *self = Self::default();
            budget.give(charged);
        }
    }

    /// What it holds of the budget.
    pub(crate) fn charged(&self) -> usize {
        self.charged
    }

    /// The buffer's size (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }
}
