//! Fetches that wait for data (protocol §6.1): a table of waiting fetches per partition, woken
//! by appends to that partition, and one timer thread for their deadlines.
//!
//! A waiting fetch is a [`Reply`] kept here with its fetch position; it costs no CPU while it
//! waits (the timer thread sleeps until the earliest deadline) and its memory is bounded by the
//! connections' in-flight tables.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use streambus_adapters::Reply;

use crate::storage::{FetchPlan, StorageError};

/// One waiting fetch.
#[derive(Debug)]
pub(crate) struct Waiter {
    id: u64,
    /// The answer, with what it needs to record metrics.
    pub(crate) reply: Reply,
    pub(crate) started: Instant,
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) offset: i64,
    pub(crate) max_bytes: u32,
    /// Records bytes that end the wait (already `min(MinBytes, MaxBytes)`; at least one record
    /// is always needed).
    pub(crate) min_bytes: u64,
    #[allow(dead_code)]
    deadline: Instant,
}

impl Waiter {
    /// Whether `plan` (what the fetch would return now) ends the wait.
    pub(crate) fn satisfied_by(plan: &FetchPlan, min_bytes: u64) -> bool {
        plan.count > 0 && plan.len >= min_bytes
    }
}

type Key = (String, u32);

#[derive(Debug, Default)]
struct State {
    by_partition: HashMap<Key, Vec<Waiter>>,
    /// Deadlines, earliest first; entries whose waiter has gone are skipped when they come up.
    deadlines: BinaryHeap<Reverse<(Instant, u64, Key)>>,
    next_id: u64,
    /// Shutting down: nothing waits any more.
    closed: bool,
}

/// What [`LongPolls::register`] decided.
#[derive(Debug)]
pub(crate) enum Registered {
    /// The fetch waits; it will be answered through [`LongPolls`].
    Waiting,
    /// Answer it now (the broker is stopping, or the fetch failed or is already satisfied).
    Now(Reply, Result<FetchPlan, StorageError>),
}

/// The table of waiting fetches.
#[derive(Debug, Default)]
pub(crate) struct LongPolls {
    state: Mutex<State>,
    /// Wakes the timer thread when an earlier deadline arrives or on shutdown.
    timer: Condvar,
    /// Fetches waiting: appends skip the lock when none does.
    waiting: AtomicUsize,
}

impl State {
    /// Drops the deadline entries of waiters that were answered early, once they outnumber the
    /// live ones: otherwise every long-poll answered by an append would leave its entry (and a
    /// copy of its topic name) until its deadline, and the timer thread would wake for it.
    fn compact(&mut self) {
        let live: usize = self.by_partition.values().map(Vec::len).sum();
        if self.deadlines.len() <= 2 * live + 64 {
            return;
        }
        let ids: std::collections::HashSet<u64> =
            self.by_partition.values().flatten().map(|w| w.id).collect();
        self.deadlines
            .retain(|Reverse((_, id, _))| ids.contains(id));
    }
}

impl LongPolls {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fetches waiting now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Registers a fetch that found too little data, unless `plan` — run again under the table's
    /// lock, so no append can slip between the check and the registration — says otherwise.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn register(
        &self,
        topic: &str,
        partition: u32,
        reply: Reply,
        started: Instant,
        (offset, max_bytes, min_bytes): (i64, u32, u64),
        deadline: Instant,
        plan: impl FnOnce() -> Result<FetchPlan, StorageError>,
    ) -> Registered {
        let mut st = self.lock();
        if st.closed {
            drop(st);
            return Registered::Now(reply, plan());
        }
        // Counted before the check: an append that lands after the check sees a waiter and
        // takes the lock (SeqCst here, a SeqCst fence in `appended`: one of the two sees the
        // other).
        self.waiting.fetch_add(1, Ordering::SeqCst);
        match plan() {
            Ok(p) if !Waiter::satisfied_by(&p, min_bytes) => {}
            other => {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return Registered::Now(reply, other);
            }
        }
        let id = st.next_id;
        st.next_id += 1;
        let key: Key = (topic.to_owned(), partition);
        let earliest = st.deadlines.peek().map(|Reverse((d, ..))| *d);
        st.deadlines.push(Reverse((deadline, id, key.clone())));
        st.by_partition.entry(key).or_default().push(Waiter {
            id,
            reply,
            started,
            topic: topic.to_owned(),
            partition,
            offset,
            max_bytes,
            min_bytes,
            deadline,
        });
        drop(st);
        if earliest.is_none_or(|e| deadline < e) {
            self.timer.notify_one();
        }
        Registered::Waiting
    }

    /// After an append to `topic`/`partition`: takes the fetches that `plan` now satisfies,
    /// for the caller to answer (with the plan they were judged by). Fetches whose connection
    /// closed are dropped.
    pub(crate) fn appended(
        &self,
        topic: &str,
        partition: u32,
        end: i64,
        mut plan: impl FnMut(&Waiter) -> Result<FetchPlan, StorageError>,
    ) -> Vec<(Waiter, Result<FetchPlan, StorageError>)> {
        let mut ready = Vec::new();
        // The append is visible; now look for waiters (pairs with `register`).
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return ready;
        }
        let mut st = self.lock();
        let key = (topic.to_owned(), partition);
        let Some(waiters) = st.by_partition.get_mut(&key) else {
            return ready;
        };
        let mut i = 0;
        let mut dropped = 0;
        while i < waiters.len() {
            let w = &waiters[i];
            if w.reply.is_closed() {
                // Its connection is gone: nobody to answer.
                waiters.swap_remove(i);
                dropped += 1;
                continue;
            }
            if w.offset >= end {
                i += 1;
                continue;
            }
            match plan(w) {
                Ok(p) if !Waiter::satisfied_by(&p, w.min_bytes) => i += 1,
                result => ready.push((waiters.swap_remove(i), result)),
            }
        }
        if waiters.is_empty() {
            st.by_partition.remove(&key);
        }
        if !ready.is_empty() || dropped > 0 {
            st.compact();
        }
        drop(st);
        self.waiting
            .fetch_sub(ready.len() + dropped, Ordering::Relaxed);
        ready
    }

    /// Takes every fetch waiting on `topic` (it was deleted).
    pub(crate) fn remove_topic(&self, topic: &str) -> Vec<Waiter> {
        self.remove_where(|(t, _)| t == topic)
    }

    /// Takes the fetches waiting on one partition (its leadership moved away).
    pub(crate) fn remove_partition(&self, topic: &str, partition: u32) -> Vec<Waiter> {
        self.remove_where(|(t, p)| t == topic && *p == partition)
    }

    fn remove_where(&self, matches: impl Fn(&Key) -> bool) -> Vec<Waiter> {
        let mut st = self.lock();
        let keys: Vec<Key> = st
            .by_partition
            .keys()
            .filter(|k| matches(k))
            .cloned()
            .collect();
        let out: Vec<Waiter> = keys
            .iter()
            .filter_map(|k| st.by_partition.remove(k))
            .flatten()
            .collect();
        st.compact();
        drop(st);
        self.waiting.fetch_sub(out.len(), Ordering::Relaxed);
        out
    }

    /// Takes every waiting fetch and makes later ones answer at once (shutdown).
    pub(crate) fn close(&self) -> Vec<Waiter> {
        let mut st = self.lock();
        st.closed = true;
        st.deadlines.clear();
        let out: Vec<Waiter> = std::mem::take(&mut st.by_partition)
            .into_values()
            .flatten()
            .collect();
        drop(st);
        self.waiting.fetch_sub(out.len(), Ordering::Relaxed);
        self.timer.notify_all();
        out
    }

    /// The timer thread's wait: sleeps until the earliest deadline (or a wake), then returns
    /// the fetches whose deadline has passed. `None` once closed.
    pub(crate) fn next_expired(&self) -> Option<Vec<Waiter>> {
        let mut st = self.lock();
        loop {
            if st.closed {
                return None;
            }
            let now = Instant::now();
            let mut expired = Vec::new();
            while let Some(Reverse((deadline, ..))) = st.deadlines.peek() {
                if *deadline > now {
                    break;
                }
                let Some(Reverse((_, id, key))) = st.deadlines.pop() else {
                    break;
                };
                if let Some(ws) = st.by_partition.get_mut(&key) {
                    if let Some(i) = ws.iter().position(|w| w.id == id) {
                        expired.push(ws.swap_remove(i));
                    }
                    if ws.is_empty() {
                        st.by_partition.remove(&key);
                    }
                }
            }
            if !expired.is_empty() {
                self.waiting.fetch_sub(expired.len(), Ordering::Relaxed);
                return Some(expired);
            }
            st = match st.deadlines.peek().map(|Reverse((d, ..))| *d) {
                Some(d) => {
                    self.timer
                        .wait_timeout(st, d.saturating_duration_since(now))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self.timer.wait(st).unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waiters answered early leave no pile of deadline entries behind.
    #[test]
    fn deadlines_of_waiters_answered_early_are_dropped() {
        let mut st = State::default();
        let later = Instant::now() + std::time::Duration::from_secs(30);
        for id in 0..1000 {
            st.deadlines.push(Reverse((later, id, ("t".to_owned(), 0))));
        }
        // None of them waits any more (answered by appends): compaction empties the heap.
        st.compact();
        assert_eq!(st.deadlines.len(), 0);
        // A few stale entries beside live ones are left for their deadline.
        st.deadlines
            .push(Reverse((later, 5000, ("t".to_owned(), 0))));
        st.compact();
        assert_eq!(st.deadlines.len(), 1);
    }
}
