//! [`Producer`]: batching per partition, linger, retries.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Poll, Waker};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use streambus_core::{Encode, Header, Headers, Message, ProducerInfo};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::client::{Client, Lane, mismatch, validate_topic};
use crate::conn::{Callback, Reply, Req};
use crate::error::{Context, Error, ErrorCode, Result};
use crate::partition::partition_for_key;
use crate::types::{Record, RecordMetadata};

/// What [`Producer::send`] does when the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BufferFull {
    /// Wait for room up to this long, then fail with [`Error::TimedOut`].
    Block(Duration),
    /// Fail at once with [`Error::InvalidInput`] ("buffer full"), which is not retriable
    /// by itself: slow down and send again.
    FailFast,
}

/// Settings of a [`Producer`]. Every duration is at most 365 days ([`Error::Config`] names
/// one that is longer).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProducerConfig {
    /// How long a batch waits for more records before it is sent (default 5 ms). A batch
    /// that fills up goes at once.
    pub linger: Duration,
    /// Record bytes per batch at most (default 1 MiB; the maximum frame caps it too).
    pub batch_max_bytes: usize,
    /// Records per batch at most (default 10 000).
    pub batch_max_records: u32,
    /// Record bytes buffered (batching, in flight or retrying) at most (default 32 MiB).
    pub buffer_max_bytes: usize,
    /// What `send` does when the buffer is full (default: block up to 60 s).
    pub buffer_full: BufferFull,
    /// From `send` to the record's acknowledgement or failure, retries included (default
    /// 2 min).
    pub delivery_timeout: Duration,
    /// Attempts after the first for a batch that failed with a retriable error (default 10).
    pub retries: usize,
    /// First retry delay (default 100 ms); doubles up to 2 s, with jitter. After a lost
    /// partition leader (NotLeader, or its connection lost in a cluster) the Metadata is read
    /// every `retry_backoff` during the delay, and the batch is retried as soon as it names
    /// another leader.
    pub retry_backoff: Duration,
    /// Idempotent produce (protocol §6.2, default on): the broker appends a retried batch
    /// once and answers its retry with the original offsets. Off: retries may duplicate.
    pub idempotence: bool,
    /// Batches of one partition sent and not yet answered at most (default 5, as Kafka's
    /// `max.in.flight.requests.per.connection`), all on one connection so the broker appends
    /// them in order. After a failure the partition's batches are retried one at a time, in
    /// order, before any new one goes. At most 5 with idempotence (the broker remembers a
    /// producer's last 5 batches, protocol §6.2). Used with idempotence only: without it a
    /// batch that failed and was appended anyway could land after a later one, so it is 1.
    pub max_in_flight: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            linger: Duration::from_millis(5),
            batch_max_bytes: 1 << 20,
            batch_max_records: 10_000,
            buffer_max_bytes: 32 << 20,
            buffer_full: BufferFull::Block(Duration::from_secs(60)),
            delivery_timeout: Duration::from_secs(120),
            retries: 10,
            retry_backoff: Duration::from_millis(100),
            idempotence: true,
            max_in_flight: 5,
        }
    }
}

impl ProducerConfig {
    /// Sets [`linger`](Self::linger).
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }
    /// Sets [`batch_max_bytes`](Self::batch_max_bytes).
    pub fn batch_max_bytes(mut self, n: usize) -> Self {
        self.batch_max_bytes = n;
        self
    }
    /// Sets [`batch_max_records`](Self::batch_max_records).
    pub fn batch_max_records(mut self, n: u32) -> Self {
        self.batch_max_records = n;
        self
    }
    /// Sets [`buffer_max_bytes`](Self::buffer_max_bytes).
    pub fn buffer_max_bytes(mut self, n: usize) -> Self {
        self.buffer_max_bytes = n;
        self
    }
    /// Sets [`buffer_full`](Self::buffer_full).
    pub fn buffer_full(mut self, b: BufferFull) -> Self {
        self.buffer_full = b;
        self
    }
    /// Sets [`delivery_timeout`](Self::delivery_timeout).
    pub fn delivery_timeout(mut self, d: Duration) -> Self {
        self.delivery_timeout = d;
        self
    }
    /// Sets [`retries`](Self::retries).
    pub fn retries(mut self, n: usize) -> Self {
        self.retries = n;
        self
    }
    /// Sets [`retry_backoff`](Self::retry_backoff).
    pub fn retry_backoff(mut self, d: Duration) -> Self {
        self.retry_backoff = d;
        self
    }
    /// Sets [`idempotence`](Self::idempotence).
    pub fn idempotence(mut self, on: bool) -> Self {
        self.idempotence = on;
        self
    }
    /// Sets [`max_in_flight`](Self::max_in_flight).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.batch_max_bytes == 0 || self.batch_max_records == 0 {
            return Err(Error::config(
                "batch_max_bytes",
                "batches must hold a record",
            ));
        }
        if self.buffer_max_bytes < self.batch_max_bytes {
            return Err(Error::config(
                "buffer_max_bytes",
                "must be at least batch_max_bytes",
            ));
        }
        if self.max_in_flight == 0 {
            return Err(Error::config(
                "max_in_flight",
                "at least one batch per partition must be able to go",
            ));
        }
        if self.idempotence && self.max_in_flight > MAX_IDEMPOTENT_IN_FLIGHT {
            return Err(Error::config(
                "max_in_flight",
                "at most 5 with idempotence: the broker remembers a producer's last 5 batches \
                 (protocol §6.2), so a retry of an older one could not be recognised",
            ));
        }
        if self.delivery_timeout.is_zero() {
            return Err(Error::config(
                "delivery_timeout",
                "must be greater than zero",
            ));
        }
        Error::check_duration("linger", self.linger)?;
        Error::check_duration("delivery_timeout", self.delivery_timeout)?;
        Error::check_duration("retry_backoff", self.retry_backoff)?;
        if let BufferFull::Block(d) = self.buffer_full {
            Error::check_duration("buffer_full", d)?;
        }
        if matches!(self.buffer_full, BufferFull::Block(d) if d.is_zero()) {
            return Err(Error::config(
                "buffer_full",
                "a zero block timeout: use BufferFull::FailFast",
            ));
        }
        Ok(())
    }
}

/// The outcome of one record: resolves to where it landed, or its error. Dropping it does not
/// cancel the record (its failure is still reported by [`Producer::close`]).
///
/// Every record of a batch shares one outcome (no allocation per record).
#[derive(Debug)]
#[must_use = "a Delivery reports the record's error; await it or keep the producer's close() report"]
pub struct Delivery {
    outcome: Arc<Outcome>,
    /// The record's index in its batch.
    index: u32,
}

/// A batch's result (its base offset, or its error), set once, awaited by its records.
#[derive(Debug)]
struct Outcome {
    /// The batch's topic and partition, for its records' [`RecordMetadata`] (kept here once
    /// rather than in each [`Delivery`]).
    topic: Arc<str>,
    partition: u32,
    /// Set once; read without a lock.
    result: OnceLock<Result<i64>>,
    /// Tasks and threads waiting for it.
    waiters: Mutex<Waiters>,
    /// Threads waiting for it ([`Delivery::wait`]).
    done: Condvar,
}

#[derive(Debug, Default)]
struct Waiters {
    tasks: Vec<Waker>,
    /// Threads blocked in [`Delivery::wait`]: the condvar is signalled only when there are
    /// some (a notify is a futex syscall even with nobody waiting, about 1 µs a batch).
    threads: usize,
}

impl Outcome {
    fn new(topic: Arc<str>, partition: u32) -> Self {
        Self {
            topic,
            partition,
            result: OnceLock::new(),
            waiters: Mutex::default(),
            done: Condvar::new(),
        }
    }

    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the result (the first one wins) and wakes every waiter. The result is published
    /// before the waiters' lock is taken, and waiters check it again under that lock, so
    /// none is missed.
    fn set(&self, result: Result<i64>) {
        if self.result.set(result).is_err() {
            return;
        }
        let (tasks, threads) = {
            let mut w = self.waiters();
            (std::mem::take(&mut w.tasks), w.threads)
        };
        if threads > 0 {
            self.done.notify_all();
        }
        for w in tasks {
            w.wake();
        }
    }
}

impl Outcome {
    /// The result, or `Pending` with `cx`'s waker registered to be woken when it is set.
    fn poll_result(&self, cx: &std::task::Context<'_>) -> Poll<&Result<i64>> {
        if let Some(r) = self.result.get() {
            return Poll::Ready(r);
        }
        let mut waiters = self.waiters();
        if let Some(r) = self.result.get() {
            return Poll::Ready(r);
        }
        if !waiters.tasks.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.tasks.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Blocks the thread until the result is set (not inside an async runtime).
    fn wait_result(&self) -> &Result<i64> {
        let mut guard = self.waiters();
        guard.threads += 1;
        loop {
            if let Some(r) = self.result.get() {
                guard.threads -= 1;
                return r;
            }
            guard = self.done.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Where the record `index` of this batch landed, or its error.
    fn record(&self, result: &Result<i64>, index: u32) -> Result<RecordMetadata> {
        match result {
            Ok(base) => Ok(RecordMetadata {
                topic: self.topic.clone(),
                partition: self.partition,
                offset: base.saturating_add(i64::from(index)),
            }),
            Err(e) => Err(e.clone()),
        }
    }
}

impl Delivery {
    fn resolve(&self, result: &Result<i64>) -> Result<RecordMetadata> {
        self.outcome.record(result, self.index)
    }

    /// Blocks the thread until the outcome is known (not inside an async runtime).
    pub fn wait(self) -> Result<RecordMetadata> {
        self.resolve(self.outcome.wait_result())
    }
}

impl Future for Delivery {
    type Output = Result<RecordMetadata>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        self.outcome.poll_result(cx).map(|r| self.resolve(r))
    }
}

/// The outcomes of many records, kept together: consecutive records of one batch take one
/// entry, not one each (a batch of 1 000 records costs one entry rather than 1 000
/// [`Delivery`]s to keep and await). Fill it with
/// [`Producer::enqueue_many`] (or [`push`](Self::push) [`Delivery`]s), then await it (or
/// [`wait`](Self::wait) on a thread): it resolves once every record is acknowledged, to
/// where each landed ([`Delivered`]), or to the error of the first record that failed.
///
/// Every failed record's error is also in [`Producer::close`]'s report, awaited or not; to
/// know which records failed, and why, one by one, keep their [`Delivery`]s instead.
///
/// Runs need records of one partition in a row: an explicit partition or key, or a topic of
/// one partition. Keyless records of a topic of several partitions go round robin, each to
/// the next partition, so each is a run of its own (still one entry, no await, per record).
///
/// ```no_run
/// # async fn demo(producer: streambus_client::Producer) -> Result<(), streambus_client::Error> {
/// use streambus_client::{Deliveries, Record};
/// let mut deliveries = Deliveries::new();
/// let records = (0..1000).map(|i| Record::new("orders", format!("{i}")));
/// producer.enqueue_many(records, &mut deliveries).await?;
/// let landed = deliveries.await?;
/// assert_eq!(landed.len(), 1000);
/// println!("the last record is at offset {}", landed.get(999).map_or(-1, |m| m.offset));
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
#[must_use = "Deliveries report their records' errors; await them or keep the producer's close() report"]
pub struct Deliveries {
    runs: Vec<Run>,
    len: usize,
    /// Runs known to be resolved (polling resumes here).
    resolved: usize,
}

/// Consecutive records of one batch: its indexes `first..first + count`, which are the
/// records `start..start + count` of their [`Deliveries`].
#[derive(Debug)]
struct Run {
    outcome: Arc<Outcome>,
    first: u32,
    count: u32,
    start: usize,
}

impl Deliveries {
    /// None yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no record.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds the outcome of one more record (after those already held).
    pub fn push(&mut self, delivery: Delivery) {
        if !self.extend_run(&delivery.outcome, delivery.index) {
            self.start_run(delivery.outcome, delivery.index);
        }
    }

    /// Counts record `index` of the batch `outcome` in the last run if it follows that run's
    /// records; `false` (nothing counted) if not.
    fn extend_run(&mut self, outcome: &Arc<Outcome>, index: u32) -> bool {
        let Some(last) = self.runs.last_mut() else {
            return false;
        };
        if !Arc::ptr_eq(&last.outcome, outcome) || last.first.checked_add(last.count) != Some(index)
        {
            return false;
        }
        last.count += 1;
        self.len += 1;
        true
    }

    /// Starts a run with record `index` of the batch `outcome`.
    fn start_run(&mut self, outcome: Arc<Outcome>, index: u32) {
        self.runs.push(Run {
            outcome,
            first: index,
            count: 1,
            start: self.len,
        });
        self.len += 1;
    }

    /// Blocks the thread until every record's outcome is known (not inside an async
    /// runtime).
    pub fn wait(self) -> Result<Delivered> {
        for run in &self.runs {
            run.outcome.wait_result();
        }
        self.finish()
    }

    /// Once every run is resolved: where the records landed, or the first error.
    fn finish(&self) -> Result<Delivered> {
        let mut runs = Vec::with_capacity(self.runs.len());
        for run in &self.runs {
            match run.outcome.result.get() {
                Some(Ok(base)) => runs.push(LandedRun {
                    topic: run.outcome.topic.clone(),
                    partition: run.outcome.partition,
                    offset: base.saturating_add(i64::from(run.first)),
                    start: run.start,
                }),
                Some(Err(e)) => return Err(e.clone()),
                None => {
                    return Err(Error::invalid(
                        Context::new("produce"),
                        "a record's outcome is not known yet",
                    ));
                }
            }
        }
        Ok(Delivered {
            runs,
            len: self.len,
        })
    }
}

/// Where [`Producer::take_locked`] puts the outcome of each record it takes: record `index`
/// of the batch whose outcome is `outcome`.
trait Sink {
    fn taken(&mut self, outcome: &Arc<Outcome>, index: u32);
    /// A record's own [`Delivery`] (one taken the slow way, by `enqueue`).
    fn delivery(&mut self, delivery: Delivery);
}

/// Runs of records of one batch, with no per-record reference count.
impl Sink for Deliveries {
    fn taken(&mut self, outcome: &Arc<Outcome>, index: u32) {
        if !self.extend_run(outcome, index) {
            self.start_run(outcome.clone(), index);
        }
    }

    fn delivery(&mut self, delivery: Delivery) {
        self.push(delivery);
    }
}

/// A [`Delivery`] per record, into any collection of them.
struct Each<'a, D>(&'a mut D);

impl<D: Extend<Delivery>> Sink for Each<'_, D> {
    fn taken(&mut self, outcome: &Arc<Outcome>, index: u32) {
        self.delivery(Delivery {
            outcome: outcome.clone(),
            index,
        });
    }

    fn delivery(&mut self, delivery: Delivery) {
        self.0.extend(Some(delivery));
    }
}

/// The one record of [`Producer::enqueue`].
impl Sink for Option<Delivery> {
    fn taken(&mut self, outcome: &Arc<Outcome>, index: u32) {
        *self = Some(Delivery {
            outcome: outcome.clone(),
            index,
        });
    }

    fn delivery(&mut self, delivery: Delivery) {
        *self = Some(delivery);
    }
}

impl Extend<Delivery> for Deliveries {
    fn extend<T: IntoIterator<Item = Delivery>>(&mut self, iter: T) {
        for d in iter {
            self.push(d);
        }
    }
}

impl FromIterator<Delivery> for Deliveries {
    fn from_iter<T: IntoIterator<Item = Delivery>>(iter: T) -> Self {
        let mut all = Self::new();
        all.extend(iter);
        all
    }
}

impl Future for Deliveries {
    type Output = Result<Delivered>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        while let Some(run) = self.runs.get(self.resolved) {
            if run.outcome.poll_result(cx).is_pending() {
                return Poll::Pending;
            }
            self.resolved += 1;
        }
        Poll::Ready(self.finish())
    }
}

/// Where every record of a [`Deliveries`] landed, in the order they were taken.
#[derive(Debug, Clone, Default)]
pub struct Delivered {
    runs: Vec<LandedRun>,
    len: usize,
}

/// Consecutive records that landed together: the records `start..` of their
/// [`Delivered`] (up to the next run's start), from `offset` on.
#[derive(Debug, Clone)]
struct LandedRun {
    topic: Arc<str>,
    partition: u32,
    offset: i64,
    start: usize,
}

impl LandedRun {
    fn record(&self, i: usize) -> RecordMetadata {
        RecordMetadata {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self
                .offset
                .saturating_add(i64::try_from(i.saturating_sub(self.start)).unwrap_or(i64::MAX)),
        }
    }
}

impl Delivered {
    /// Records.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there were none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the record `i` (counted from 0, in the order they were taken) landed.
    pub fn get(&self, i: usize) -> Option<RecordMetadata> {
        if i >= self.len {
            return None;
        }
        let run = self.runs.partition_point(|r| r.start <= i).checked_sub(1)?;
        self.runs.get(run).map(|r| r.record(i))
    }

    /// Where each record landed, in the order they were taken.
    pub fn iter(&self) -> impl Iterator<Item = RecordMetadata> + '_ {
        self.runs.iter().enumerate().flat_map(move |(n, run)| {
            let end = self.runs.get(n + 1).map_or(self.len, |next| next.start);
            (run.start..end).map(move |i| run.record(i))
        })
    }
}

type Key = (Arc<str>, u32);

/// A [`Key`] borrowed: hashes as the key does (the topic's `str`, then the partition).
#[derive(Hash)]
struct QueueRef<'a>(&'a str, u32);

impl hashbrown::Equivalent<Key> for QueueRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        key.1 == self.1 && *key.0 == *self.0
    }
}

/// FxHash (rustc's hasher, from `rustc-hash`) for the producer's maps: keys are topic names
/// the application chose, not peer input, so a fast non-keyed hash is fine (SipHash cost ~5% of
/// a send).
type FxBuild = rustc_hash::FxBuildHasher;

#[derive(Debug)]
struct Batch {
    /// The encoded records: its first `filled` bytes (those after are room, left over from a
    /// reused buffer, written over rather than zeroed again).
    records: Vec<u8>,
    filled: usize,
    count: u32,
    outcome: Arc<Outcome>,
    /// When the batch opened (linger counts from here).
    opened: Instant,
    /// The delivery deadline of its first record.
    deadline: Instant,
    /// A caller awaits a record of it: no linger.
    urgent: bool,
}

impl Drop for Batch {
    /// A batch dropped unanswered (its runtime shut down) fails its records rather than
    /// leave them waiting.
    fn drop(&mut self) {
        self.outcome.set(Err(Error::Closed {
            context: Context::new("produce"),
            what: "producer",
        }));
    }
}

#[derive(Debug, Default)]
struct PartitionQueue {
    open: Option<Batch>,
    sealed: VecDeque<Batch>,
    /// The batches sent and not yet finished, oldest first.
    flights: VecDeque<Flight>,
    /// The connection the flights went on (the next one goes there too, while any is in
    /// flight: one connection keeps them in order).
    lane: Option<Lane>,
    /// A flight failed, or could not be sent at once: [`recover`] finishes the flights in
    /// order, and nothing new is sent until it is done.
    recovering: bool,
    /// Idempotence: the (producer id, epoch) that `next_sequence` counts for.
    sequence_of: (i64, i16),
    /// Idempotence: the next batch's base sequence.
    next_sequence: i32,
}

#[derive(Debug)]
struct Flight {
    /// Names the flight to the answer of its first attempt.
    id: u64,
    batch: Batch,
    /// The batch's records, shared with the request.
    records: Arc<Vec<u8>>,
    /// Idempotence: the batch's producer fields, the same on every attempt.
    producer: Option<ProducerInfo>,
    first: First,
}

/// A flight's first attempt.
#[derive(Debug)]
enum First {
    /// Sent, not answered yet.
    Sent,
    /// Its answer (the base offset, or why it failed).
    Answered(Result<i64>),
    /// Not sent: no connection had room (or no time was left); [`recover`] sends it.
    NotSent,
}

/// An idempotent producer's identity (protocol §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    /// Random, non-zero, 63 bits.
    producer_id: i64,
    epoch: i16,
}

impl Identity {
    fn new() -> Self {
        Self {
            producer_id: random_producer_id(),
            epoch: 0,
        }
    }

    /// A new epoch (a new id once the epochs run out): every partition's sequence restarts
    /// at 0.
    fn bump(&mut self) {
        match self.epoch.checked_add(1) {
            Some(e) => self.epoch = e,
            None => *self = Self::new(),
        }
    }
}

/// A random producer id in `1..=i64::MAX`.
fn random_producer_id() -> i64 {
    // Should the OS have no entropy to give, the time's nanoseconds still make collisions
    // between producers unlikely.
    let r = getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    i64::try_from(r >> 1).unwrap_or(i64::MAX).max(1)
}

/// The sequence after a batch of `count` records from `seq` (after `i32::MAX` comes 0).
fn next_sequence(seq: i32, count: u32) -> i32 {
    i32::try_from((i64::from(seq) + i64::from(count)) % (1 << 31)).unwrap_or(0)
}

impl PartitionQueue {
    /// Whether another batch may be sent now (`window`: batches in flight at most).
    fn room(&self, window: usize) -> bool {
        !self.recovering && self.flights.len() < window
    }
}

#[derive(Debug)]
struct TopicState {
    partitions: u32,
    /// The round-robin cursor for keyless records.
    next: u32,
    /// When the partition count was read.
    read_at: Instant,
}

/// Batches in flight per partition at most with idempotence: the broker remembers each
/// producer's last 5 batches per partition (protocol §6.2) to answer their retries.
const MAX_IDEMPOTENT_IN_FLIGHT: usize = 5;

/// Buffer bytes the producer takes from its semaphore at a time, for the records to come
/// (about 500 small ones): see [`State::reserve`].
const PERMIT_CHUNK: usize = 64 << 10;

/// Records [`Producer::enqueue_many`] takes from its iterator at a time (8 KiB of `Record`s:
/// they stay in the L1 cache until encoded).
const TAKE_CHUNK: usize = 64;

/// How long a topic's partition count is trusted before it is read again.
const TOPIC_MAX_AGE: Duration = Duration::from_secs(60);

/// Broker codes after which the topic's partition count is read again.
fn stale_topic(e: &Error) -> bool {
    matches!(
        e.code(),
        Some(ErrorCode::PARTITION_NOT_FOUND | ErrorCode::TOPIC_NOT_FOUND)
    ) || e.code() == Some(ErrorCode::NOT_LEADER)
}

#[derive(Debug, Default)]
struct State {
    /// Partition count per topic and the round-robin cursor.
    topics: HashMap<Arc<str>, TopicState, FxBuild>,
    /// hashbrown's map: looked up per record by a borrowed [`QueueRef`], with no reference
    /// count moved.
    queues: hashbrown::HashMap<Key, PartitionQueue, FxBuild>,
    failures: Vec<Error>,
    /// Batch buffers to reuse (their pages are already mapped).
    spare: Vec<Vec<u8>>,
    /// Flushes in progress: linger is zero meanwhile.
    flushing: usize,
    /// The producer's identity, when idempotent.
    identity: Option<Identity>,
    /// Records taken and not yet resolved (counted under the lock the record is taken under:
    /// no atomic of its own per record).
    outstanding: usize,
    /// The next flight's id.
    next_flight: u64,
    /// Buffer permits taken from the semaphore ahead of the records that will use them (at
    /// most [`PERMIT_CHUNK`]): records are counted under the lock, with no atomic operation
    /// of their own. Given back whenever the semaphore runs short, and not taken again while
    /// a caller waits for room ([`waiting`](Self::waiting)): nobody waits for room this holds.
    reserve: usize,
    /// Callers waiting for room in the buffer ([`BufferFull::Block`]): counted by
    /// [`Producer::try_take`] under the lock that refused them, uncounted when their wait ends.
    waiting: usize,
}

/// One of [`State`]'s counts (a caller waiting for room, a flush in progress), already
/// counted, taken back when this is dropped: however the future that holds it ends.
struct Counted<'a>(&'a Inner, fn(&mut State) -> &mut usize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        let n = (self.1)(&mut st);
        *n = n.saturating_sub(1);
    }
}

impl State {
    /// Takes `size` bytes of room in the producer's buffer (`buffer`), from the reserve or
    /// else from the semaphore (a chunk at a time, the rest kept in the reserve); `false` when
    /// there is not that much room.
    fn reserve(&mut self, buffer: &Semaphore, size: usize) -> bool {
        if self.waiting == 0
            && let Some(left) = self.reserve.checked_sub(size)
        {
            self.reserve = left;
            return true;
        }
        // What the reserve lacks for this record, and a chunk more for the next ones.
        let chunk = size
            .saturating_sub(self.reserve)
            .saturating_add(PERMIT_CHUNK);
        if self.waiting == 0
            && let Ok(n) = u32::try_from(chunk)
            && let Ok(p) = buffer.try_acquire_many(n)
        {
            p.forget();
            self.reserve = PERMIT_CHUNK;
            return true;
        }
        // Short of room, or others wait for it: the reserve goes back first, then the record
        // takes what it needs.
        buffer.add_permits(std::mem::take(&mut self.reserve));
        match u32::try_from(size).map(|n| buffer.try_acquire_many(n)) {
            Ok(Ok(p)) => {
                p.forget();
                true
            }
            _ => false,
        }
    }
}

#[derive(Debug)]
struct Inner {
    client: Client,
    config: ProducerConfig,
    state: Mutex<State>,
    buffer: Semaphore,
    idle: Notify,
    wake_linger: Notify,
    /// A flight's first attempt was answered while its partition recovers.
    answered: Notify,
    /// Batches in flight per partition at most: `max_in_flight` with idempotence, else 1.
    window: usize,
    closed: AtomicBool,
}

/// A batching producer. Cheap to clone; clones share batches and buffer.
///
/// Records are grouped per topic-partition into batches, sent when a batch is full or its
/// [`linger`](ProducerConfig::linger) has passed, up to
/// [`max_in_flight`](ProducerConfig::max_in_flight) batches in flight per partition (one
/// without idempotence), on one connection, so records keep their order. Partitions: the
/// record's explicit one, else the key hash
/// ([`partition_for_key`]), else round robin; partition counts come from the broker's
/// [`Metadata`](Client::metadata) (a topic that does not exist yet counts as one partition,
/// which is what the broker's auto-create makes) and are read again after
/// `PartitionNotFound`, `TopicNotFound` or `NotLeader`, and at least every minute. Each batch
/// goes to its partition's leader (see [`Client`]); a batch refused with `NotLeader` (a
/// cluster's leadership moved), or whose leader's connection was lost, reads the metadata
/// again before it is retried, and the retry goes to the leader it names.
///
/// **Retries.** A batch that fails with a retriable error (see [`Error::is_retriable`]) is sent
/// again with exponential backoff and jitter, up to [`retries`](ProducerConfig::retries) times
/// and within the [`delivery_timeout`](ProducerConfig::delivery_timeout). When one of a
/// partition's batches in flight fails, nothing new goes to that partition until its batches
/// in flight are settled, oldest first, one at a time: each acknowledged keeps its answer,
/// each that failed is retried, including one the broker refused with `OutOfOrderSequence`
/// or `UnknownProducer` for the gap the earlier failed batch left.
///
/// **Idempotence** ([`ProducerConfig::idempotence`], on by default; protocol §6.2): the
/// producer has a random 63-bit producer id and an epoch (0 at first), and numbers each
/// partition's records; a retry carries the same numbers, so a batch that the broker appended
/// but whose answer was lost is appended once, and its retry is answered with the original
/// offsets. Each record lands once, in order per partition, as long as the broker keeps the
/// producer's state (see the broker's `--max-producers-per-partition`). A batch that fails
/// for good (the broker answered `OutOfOrderSequence` or `UnknownProducer`, or the retries or
/// the delivery timeout ran out) fails its records with that error, whether or not an
/// earlier attempt landed: such a failure is never silent. The producer then starts a new
/// epoch, sequences from 0. With idempotence off, delivery is at-least-once: a retry may
/// append a batch twice.
///
/// ```no_run
/// # async fn demo(client: streambus_client::Client) -> Result<(), streambus_client::Error> {
/// use streambus_client::{Producer, Record};
/// let producer = Producer::new(&client);
/// // One record, awaited:
/// let at = producer.send(Record::new("orders", "a")).await?;
/// // Many records, batched, awaited together:
/// let mut pending = Vec::new();
/// for i in 0..1000 {
///     pending.push(producer.enqueue(Record::new("orders", format!("{i}"))).await?);
/// }
/// for d in pending {
///     d.await?;
/// }
/// producer.close().await.map_err(|mut errors| errors.remove(0))?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Producer {
    inner: Arc<Inner>,
    _last: Arc<LastHandle>,
}

/// Dropped with the last [`Producer`] handle: sends whatever is still batched, so dropping a
/// producer without [`close`](Producer::close) loses no record that was taken (their
/// [`Delivery`]s still resolve).
#[derive(Debug)]
struct LastHandle(Arc<Inner>);

impl Drop for LastHandle {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        seal_due(&self.0, &mut st, Instant::now(), true);
    }
}

impl Producer {
    /// A producer with the default settings.
    pub fn new(client: &Client) -> Self {
        match Self::with_config(client, ProducerConfig::default()) {
            Ok(p) => p,
            // The defaults are valid; keep a producer that reports the error on use anyway.
            Err(_) => Self::build(client, ProducerConfig::default()),
        }
    }

    /// A producer with `config`; invalid settings are [`Error::Config`].
    pub fn with_config(client: &Client, config: ProducerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self::build(client, config))
    }

    fn build(client: &Client, config: ProducerConfig) -> Self {
        let window = if config.idempotence {
            config.max_in_flight
        } else {
            1
        };
        let inner = Arc::new(Inner {
            client: client.clone(),
            buffer: Semaphore::new(config.buffer_max_bytes),
            answered: Notify::new(),
            window,
            state: Mutex::new(State {
                identity: config.idempotence.then(Identity::new),
                ..State::default()
            }),
            config,
            idle: Notify::new(),
            wake_linger: Notify::new(),
            closed: AtomicBool::new(false),
        });
        client
            .inner
            .pool
            .runtime()
            .spawn(linger_task(Arc::downgrade(&inner)));
        Self {
            _last: Arc::new(LastHandle(inner.clone())),
            inner,
        }
    }

    /// Sends `record` and waits for its acknowledgement: where it landed, or why it failed.
    /// To have many records in flight (and batched), use [`enqueue`](Self::enqueue).
    ///
    /// The record's batch does not linger (the caller is waiting): it goes as soon as its
    /// partition has room for another batch in flight, with whatever other records joined it.
    pub async fn send(&self, record: Record) -> Result<RecordMetadata> {
        self.take(record, true).await?.await
    }

    /// Adds `record` to its partition's batch and returns at once with a [`Delivery`] to
    /// await. Waits only when the buffer is full (per [`BufferFull`]). Errors here mean the
    /// record was not taken: invalid topic or partition, a record larger than the maximum
    /// frame, a full buffer, or a closed producer.
    pub async fn enqueue(&self, record: Record) -> Result<Delivery> {
        self.take(record, false).await
    }

    /// [`enqueue`](Self::enqueue) for many records, taking the producer's lock once for as
    /// many of them as it can (once per 64 records when their topics are known and the buffer
    /// has room) rather than once per record; the [`Delivery`] of each record taken is added to
    /// `deliveries`, in order: a `Vec<Delivery>` (one outcome per record) or a
    /// [`Deliveries`] (one entry per run of records sharing a batch, awaited at once, and no
    /// [`Delivery`] made per record: the cheapest way to produce many records).
    ///
    /// # Errors
    ///
    /// The first record refused (as [`enqueue`](Self::enqueue) would refuse it) ends the
    /// call with its error: the records before it were taken (their deliveries are in
    /// `deliveries`), it and the records after it were not.
    ///
    /// ```no_run
    /// # async fn demo(producer: streambus_client::Producer) -> Result<(), streambus_client::Error> {
    /// use streambus_client::Record;
    /// let mut deliveries = Vec::new();
    /// let records = (0..100).map(|i| Record::new("orders", format!("{i}")));
    /// producer.enqueue_many(records, &mut deliveries).await?;
    /// for d in deliveries {
    ///     d.await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn enqueue_many<I, D>(&self, records: I, deliveries: &mut D) -> Result<()>
    where
        I: IntoIterator<Item = Record>,
        D: Extend<Delivery> + 'static,
    {
        // A `Deliveries` takes each run of records of one batch as one entry, with no
        // `Delivery` (no reference count moved) per record.
        let any: &mut dyn std::any::Any = deliveries;
        if let Some(runs) = any.downcast_mut::<Deliveries>() {
            return self.enqueue_into(records, runs).await;
        }
        self.enqueue_into(records, &mut Each(deliveries)).await
    }

    /// [`enqueue_many`](Self::enqueue_many) into `sink`.
    async fn enqueue_into<I, S>(&self, records: I, sink: &mut S) -> Result<()>
    where
        I: IntoIterator<Item = Record>,
        S: Sink,
    {
        // Taken from the caller's iterator a chunk at a time, before the lock (no code of the
        // caller's runs under it): a chunk stays in the cache from here to its batch.
        let mut records = records.into_iter();
        let mut chunk: VecDeque<Record> = VecDeque::with_capacity(TAKE_CHUNK);
        loop {
            chunk.extend(records.by_ref().take(TAKE_CHUNK));
            if chunk.is_empty() {
                return Ok(());
            }
            if self.inner.closed.load(Ordering::Acquire) {
                // As `enqueue` reports it.
                if let Some(record) = chunk.pop_front() {
                    sink.delivery(self.enqueue(record).await?);
                }
                continue;
            }
            // Every record of the chunk that takes the common path, under one lock.
            let (slow, wake) = {
                let mut st = self.inner.lock();
                let mut wake = false;
                let mut slow = None;
                while let Some(record) = chunk.pop_front() {
                    let (take, woke) = {
                        let headers = wire_headers(&record);
                        let message = wire_message(&record, &headers);
                        let size = message.encoded_len();
                        self.take_locked(
                            &mut st, &message, &record, size, None, &mut 0, false, sink,
                        )
                    };
                    wake |= woke;
                    match take {
                        Take::Done(Ok(())) => {}
                        Take::Done(Err(e)) => {
                            slow = Some(Err(e));
                            break;
                        }
                        // An unknown topic or a full buffer: `enqueue` waits for it.
                        Take::UnknownTopic | Take::BufferFull(..) => {
                            slow = Some(Ok(record));
                            break;
                        }
                    }
                }
                (slow, wake)
            };
            if wake {
                self.inner.wake_linger.notify_one();
            }
            match slow {
                None => {}
                Some(Err(e)) => return Err(e),
                Some(Ok(record)) => sink.delivery(self.enqueue(record).await?),
            }
        }
    }

    async fn take(&self, record: Record, urgent: bool) -> Result<Delivery> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed {
                context: Context::new("produce").topic(record.topic.clone()),
                what: "producer",
            });
        }
        let headers = wire_headers(&record);
        let message = wire_message(&record, &headers);
        let size = message.encoded_len();
        // One lock per record in the common case (a known topic, room in the buffer): the
        // partition is picked and the record encoded into its batch under it.
        let mut picked = None;
        // Buffer permits held for the record (after waiting for room).
        let mut credit = 0;
        loop {
            match self.try_take(&message, &record, size, picked.take(), &mut credit, urgent) {
                Take::Done(result) => {
                    inner.buffer.add_permits(credit);
                    return result;
                }
                Take::UnknownTopic => {
                    // The first record of a topic: its own (boxed) future keeps `enqueue`'s
                    // small.
                    picked = Some(Box::pin(self.partition_of(&record)).await?);
                }
                Take::BufferFull(partition, d) => {
                    let ctx = || {
                        Context::new("produce")
                            .topic(record.topic.clone())
                            .partition(partition)
                    };
                    let permits = u32::try_from(size).unwrap_or(u32::MAX);
                    // Counted as waiting since `try_take` was refused (under the lock): no
                    // reserve is taken meanwhile. Uncounted however the wait ends.
                    let _waiting = Counted(inner, |st| &mut st.waiting);
                    // Boxed: a rare path, kept out of `enqueue`'s future.
                    Box::pin(tokio::time::timeout(d, inner.buffer.acquire_many(permits)))
                        .await
                        .map_err(|_| Error::TimedOut {
                            context: ctx(),
                            waiting: "waiting for room in the producer's buffer",
                            after: d,
                        })?
                        .map_err(|_| Error::Closed {
                            context: ctx(),
                            what: "producer",
                        })?
                        .forget();
                    credit = size;
                    picked = Some(partition);
                }
            }
        }
    }

    /// Takes the record under one lock if it can: its topic known (or `picked` already) and
    /// room in the buffer (or `credit` permits held already).
    fn try_take(
        &self,
        message: &Message<'_>,
        record: &Record,
        size: usize,
        picked: Option<u32>,
        credit: &mut usize,
        urgent: bool,
    ) -> Take<Delivery> {
        let mut one = None;
        let mut st = self.inner.lock();
        let (take, wake) = self.take_locked(
            &mut st, message, record, size, picked, credit, urgent, &mut one,
        );
        if matches!(take, Take::BufferFull(..)) {
            // The caller waits for room (`take`): counted before the lock is released, so
            // no reserve is taken before its wait begins (see `State::waiting`).
            st.waiting += 1;
        }
        drop(st);
        if wake {
            self.inner.wake_linger.notify_one();
        }
        match take {
            Take::Done(Ok(())) => Take::Done(one.ok_or_else(|| {
                Error::invalid(
                    Context::new("produce"),
                    "a record taken without its delivery",
                )
            })),
            Take::Done(Err(e)) => Take::Done(Err(e)),
            Take::UnknownTopic => Take::UnknownTopic,
            Take::BufferFull(p, d) => Take::BufferFull(p, d),
        }
    }

    /// [`try_take`](Self::try_take) under a lock already held; `true` besides when the
    /// linger task is to be woken (a batch opened) once the lock is released. A record taken
    /// uses `size` of the `credit` (buffer permits its caller holds) when there is that much,
    /// else takes room from the reserve ([`State::reserve`]); a record refused before its
    /// bytes were counted leaves the credit as it was (one refused after gives its bytes back
    /// to the buffer).
    #[allow(clippy::too_many_arguments)]
    fn take_locked(
        &self,
        st: &mut State,
        message: &Message<'_>,
        record: &Record,
        size: usize,
        picked: Option<u32>,
        credit: &mut usize,
        urgent: bool,
        sink: &mut dyn Sink,
    ) -> (Take, bool) {
        let inner = &self.inner;
        let limit = self.batch_limit(&record.topic);
        // The record's own name (equal to the validated one its topic entry was found by)
        // serves as the key: cloned only for a new queue, a new batch or a batch sent.
        let topic = &record.topic;
        let partition = match picked {
            Some(p) => p,
            None => match st.topics.get_mut(&**topic).map(|t| pick(t, record)) {
                Some((_, Some(p))) => p,
                Some((count, None)) => {
                    return (Take::Done(Err(out_of_range(record, count))), false);
                }
                None => return (Take::UnknownTopic, false),
            },
        };
        let ctx = || {
            Context::new("produce")
                .topic(topic.clone())
                .partition(partition)
        };
        if size > limit {
            let e = format!("a record of {size} bytes exceeds the {limit}-byte limit of one batch");
            return (Take::Done(Err(Error::invalid(ctx(), e))), false);
        }
        if let Some(left) = credit.checked_sub(size) {
            *credit = left;
        } else if !st.reserve(&inner.buffer, size) {
            return match inner.config.buffer_full {
                BufferFull::FailFast => {
                    let e = Error::invalid(ctx(), "the producer's buffer is full");
                    (Take::Done(Err(e)), false)
                }
                BufferFull::Block(d) => (Take::BufferFull(partition, d), false),
            };
        }
        let mut ship = false;
        let mut wake = false;
        {
            // Looked up by a borrowed key: no reference count moves for a record joining an
            // open batch.
            let qref = QueueRef(topic, partition);
            let State { queues, spare, .. } = &mut *st;
            let q = match queues.get_mut(&qref) {
                Some(q) => q,
                None => queues.entry((topic.clone(), partition)).or_default(),
            };
            let fits = q.open.as_ref().is_some_and(|b| {
                b.filled + size <= limit && b.count < inner.config.batch_max_records
            });
            if !fits && let Some(full) = q.open.take() {
                q.sealed.push_back(full);
            }
            let new_batch = q.open.is_none();
            let batch = q.open.get_or_insert_with(|| {
                let records = spare.pop().unwrap_or_default();
                let now = Instant::now();
                Batch {
                    records,
                    filled: 0,
                    count: 0,
                    outcome: Arc::new(Outcome::new(topic.clone(), partition)),
                    opened: now,
                    deadline: now + inner.config.delivery_timeout,
                    urgent: false,
                }
            });
            batch.urgent |= urgent;
            let at = batch.filled;
            let end = at.saturating_add(size);
            if batch.records.len() < end {
                // Room for this record at least, doubling (up to the batch limit): the
                // zeroing is paid once per buffer, not once per record.
                let len = batch.records.len().saturating_mul(2).min(limit).max(end);
                batch.records.resize(len, 0);
            }
            let encoded = batch
                .records
                .get_mut(at..end)
                .map(|buf| message.encode(buf));
            if !matches!(encoded, Some(Ok(n)) if n == size) {
                inner.buffer.add_permits(size);
                let e = Error::invalid(ctx(), "the record can't be encoded");
                return (Take::Done(Err(e)), false);
            }
            batch.filled = end;
            sink.taken(&batch.outcome, batch.count);
            batch.count += 1;
            let full = batch.filled >= limit
                || batch.count >= inner.config.batch_max_records
                || (batch.urgent && q.room(inner.window));
            if full && let Some(full) = q.open.take() {
                q.sealed.push_back(full);
            }
            if !q.sealed.is_empty() && q.room(inner.window) {
                ship = true;
            }
            st.outstanding += 1;
            if ship {
                ship_next(inner, st, &(topic.clone(), partition));
            } else if new_batch {
                wake = true;
            }
        }
        (Take::Done(Ok(())), wake)
    }

    /// Record bytes one batch may hold for `topic`: the configured size, within what one
    /// Produce frame can carry.
    fn batch_limit(&self, topic: &str) -> usize {
        // Request header (4 + 16) + topic (4 + name) + partition and count (8) + slack.
        let frame = self.inner.client.config().max_frame_len as usize;
        let room = frame.saturating_sub(64 + topic.len());
        self.inner.config.batch_max_bytes.min(room)
    }

    /// The record's validated topic and partition: from the cache (one lock, no allocation)
    /// or, the first time, from the broker's topic list.
    async fn partition_of(&self, record: &Record) -> Result<u32> {
        let known = {
            let mut st = self.inner.lock();
            st.topics.get_mut(&*record.topic).map(|t| pick(t, record))
        };
        let picked = match known {
            Some(k) => k,
            // The first record of a topic: its own (boxed) future keeps `enqueue`'s small.
            None => Box::pin(self.read_topic(record)).await?,
        };
        match picked {
            (_, Some(p)) => Ok(p),
            (count, None) => Err(out_of_range(record, count)),
        }
    }

    /// Reads the partition count of the record's topic from the broker and caches it.
    async fn read_topic(&self, record: &Record) -> Result<(u32, Option<u32>)> {
        let ctx = || Context::new("produce").topic(record.topic.clone());
        let name = validate_topic(&record.topic, &ctx())?;
        read_partition_count(&self.inner, &name)
            .await
            .map_err(|e| e.with_context(&ctx()))?;
        let mut st = self.inner.lock();
        match st.topics.get_mut(&name) {
            Some(t) => Ok(pick(t, record)),
            // Expired between the read and here: the count just read is still the latest.
            None => Err(Error::invalid(
                ctx(),
                "the topic's partition count was dropped",
            )),
        }
    }

    /// Sends every buffered record now (no linger) and waits until none is outstanding:
    /// each is acknowledged or failed (records sent meanwhile are waited for too).
    pub async fn flush(&self) {
        let inner = &self.inner;
        {
            let mut st = inner.lock();
            st.flushing += 1;
            seal_due(inner, &mut st, Instant::now(), true);
        }
        // Uncounted however the flush ends (its future may be dropped: a timeout raced
        // against it), or linger would stay off for good.
        let _flushing = Counted(inner, |st| &mut st.flushing);
        loop {
            let idle = inner.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                let mut st = inner.lock();
                if st.outstanding == 0 {
                    break;
                }
                // Batches opened since: send them too.
                seal_due(inner, &mut st, Instant::now(), true);
            }
            idle.await;
        }
    }

    /// Refuses new records, flushes, and returns every failure since the producer started
    /// (or since the last `close`), one error per failed record, whether or not its
    /// [`Delivery`] was awaited. (They are kept until then: a producer that runs for long
    /// against a dead broker without ever closing holds one error per failed record.)
    pub async fn close(&self) -> std::result::Result<(), Vec<Error>> {
        self.inner.closed.store(true, Ordering::Release);
        self.flush().await;
        let failures = std::mem::take(&mut self.inner.lock().failures);
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures)
        }
    }

    /// Records buffered or in flight, not yet acknowledged or failed.
    pub fn outstanding(&self) -> usize {
        self.inner.lock().outstanding
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reads `topic`'s partition count from the broker's metadata (a missing topic counts as
/// one partition: what auto-create makes) and caches it, keeping the round-robin cursor.
async fn read_partition_count(inner: &Inner, topic: &Arc<str>) -> Result<u32> {
    let count = inner
        .client
        .partition_count(topic)
        .await?
        // Auto-create makes one partition.
        .unwrap_or(1);
    let mut st = inner.lock();
    let t = st
        .topics
        .entry(topic.clone())
        .or_insert_with(|| TopicState {
            partitions: count,
            next: 0,
            read_at: Instant::now(),
        });
    t.partitions = count;
    t.read_at = Instant::now();
    Ok(count)
}

/// The partition of `record` in `t` (`None`: its explicit partition is out of range), with
/// the topic's name and partition count.
/// What [`Producer::try_take`] did.
enum Take<T = ()> {
    /// Taken (its delivery, or given to the sink) or refused for good.
    Done(Result<T>),
    /// The topic's partition count is not known yet.
    UnknownTopic,
    /// The buffer is full: wait up to this long for room, keeping this partition.
    BufferFull(u32, Duration),
}

/// The error for a record whose explicit partition the topic does not have.
fn out_of_range(record: &Record, count: u32) -> Error {
    let p = record.partition.unwrap_or_default();
    Error::invalid(
        Context::new("produce")
            .topic(record.topic.clone())
            .partition(p),
        format!("partition {p} is out of range: the topic has {count}"),
    )
}

fn pick(t: &mut TopicState, record: &Record) -> (u32, Option<u32>) {
    let count = t.partitions.max(1);
    let p = match (record.partition, record.key.as_deref()) {
        (Some(p), _) => (p < count).then_some(p),
        (None, Some(k)) if !k.is_empty() => Some(partition_for_key(k, count)),
        (None, _) => {
            let p = t.next % count;
            t.next = t.next.wrapping_add(1);
            Some(p)
        }
    };
    (count, p)
}

/// Seals open batches whose linger passed (all of them with `all`) and ships where possible.
fn seal_due(inner: &Arc<Inner>, st: &mut State, now: Instant, all: bool) -> Option<Instant> {
    let linger = inner.config.linger;
    let mut next: Option<Instant> = None;
    let mut ready = Vec::new();
    for (key, q) in st.queues.iter_mut() {
        if let Some(b) = &q.open {
            let due = b.opened + linger;
            if all || b.urgent || due <= now {
                if let Some(b) = q.open.take() {
                    q.sealed.push_back(b);
                }
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        if q.room(inner.window) && !q.sealed.is_empty() {
            ready.push(key.clone());
        }
    }
    for key in ready {
        ship_next(inner, st, &key);
    }
    next
}

/// Sends the partition's sealed batches while its window has room: straight onto the
/// connection its flights use (any connection with room when none is in flight), their
/// answers coming back by callback without a task of their own. A batch that can't go at once
/// waits for the next answer when flights are out; with none out, [`recover`] sends it.
fn ship_next(inner: &Arc<Inner>, st: &mut State, key: &Key) {
    loop {
        let Some(q) = st.queues.get_mut(key) else {
            return;
        };
        if !q.room(inner.window) {
            return;
        }
        // A new epoch (the producer's, after a failure in any partition) starts a partition
        // only once its flights of the old one are settled: a retry of one of those must not
        // meet a broker that a newer batch already moved to the new epoch.
        if !q.flights.is_empty()
            && st
                .identity
                .is_some_and(|id| q.sequence_of != (id.producer_id, id.epoch))
        {
            return;
        }
        let Some(batch) = q.sealed.front_mut() else {
            return;
        };
        batch.records.truncate(batch.filled);
        let records = Arc::new(std::mem::take(&mut batch.records));
        let count = batch.count;
        let timeout = inner
            .client
            .config()
            .request_timeout
            .min(batch.deadline.saturating_duration_since(Instant::now()));
        // The batch's sequence is taken once, when it is sent: its retries carry the same.
        let numbered = st.identity.map(|id| {
            let of = (id.producer_id, id.epoch);
            let base = if q.sequence_of == of {
                q.next_sequence
            } else {
                0
            };
            let info = ProducerInfo {
                producer_id: id.producer_id,
                producer_epoch: id.epoch,
                base_sequence: Some(base),
            };
            (of, base, info)
        });
        let producer = numbered.map(|n| n.2);
        let id = st.next_flight;
        let pinned = if q.flights.is_empty() {
            None
        } else {
            q.lane.as_ref()
        };
        let sent = if timeout.is_zero() {
            None
        } else {
            let req = produce_request(key, count, &records, producer);
            let (inner2, key2) = (inner.clone(), key.clone());
            let callback: Callback = Box::new(move |r| first_answer(inner2, key2, id, r));
            inner.client.try_send(req, timeout, callback, pinned).ok()
        };
        if sent.is_none() && pinned.is_some() {
            // The flights' connection is full (or gone, and their answers say so): the
            // batch goes when one is answered.
            batch.records = Arc::try_unwrap(records).unwrap_or_else(|r| r.to_vec());
            return;
        }
        let Some(batch) = q.sealed.pop_front() else {
            return;
        };
        if let Some((of, base, _)) = numbered {
            q.sequence_of = of;
            q.next_sequence = next_sequence(base, count);
        }
        st.next_flight = id.wrapping_add(1);
        let first = if sent.is_some() {
            First::Sent
        } else {
            First::NotSent
        };
        q.flights.push_back(Flight {
            id,
            batch,
            records,
            producer,
            first,
        });
        match sent {
            Some(lane) => q.lane = Some(lane),
            None => {
                q.recovering = true;
                let (inner2, key2) = (inner.clone(), key.clone());
                inner
                    .client
                    .inner
                    .pool
                    .runtime()
                    .spawn(async move { recover(inner2, key2).await });
                return;
            }
        }
    }
}

/// A Produce of a flight's batch (the same on every attempt).
fn produce_request(
    key: &Key,
    count: u32,
    records: &Arc<Vec<u8>>,
    producer: Option<ProducerInfo>,
) -> Req {
    Req::Produce {
        topic: key.0.clone(),
        partition: key.1,
        count,
        records: records.clone(),
        producer,
    }
}

fn produce_context(key: &Key) -> Context {
    Context::new("produce")
        .topic(key.0.clone())
        .partition(key.1)
}

/// The answer to flight `id`'s first attempt, sent by [`ship_next`]. Acknowledged, the
/// partition's oldest flights that are acknowledged are finished (in order); failed, the
/// partition recovers (see [`recover`]).
fn first_answer(inner: Arc<Inner>, key: Key, id: u64, r: Result<Reply>) {
    let ctx = produce_context(&key);
    let result = match r {
        Ok(Reply::Produce { base_offset }) => Ok(base_offset),
        Ok(other) => Err(mismatch(ctx, &other)),
        Err(e) => Err(e.with_context(&ctx)),
    };
    let mut guard = inner.lock();
    let st = &mut *guard;
    if let Err(e) = &result
        && stale_topic(e)
    {
        st.topics.remove(&key.0);
    }
    let Some(q) = st.queues.get_mut(&key) else {
        return;
    };
    let Some(flight) = q.flights.iter_mut().find(|f| f.id == id) else {
        return;
    };
    let failed = result.is_err();
    flight.first = First::Answered(result);
    if q.recovering {
        drop(guard);
        inner.answered.notify_waiters();
        return;
    }
    if failed {
        q.recovering = true;
        drop(guard);
        let runtime = inner.client.inner.pool.runtime().clone();
        runtime.spawn(async move { recover(inner, key).await });
        return;
    }
    let mut done = false;
    while let Some(q) = st.queues.get_mut(&key)
        && let Some(f) = q.flights.front()
        && let First::Answered(Ok(base)) = f.first
    {
        let id = f.id;
        finish_locked(&inner, st, &key, id, Ok(base));
        done = true;
    }
    drop(guard);
    if done {
        inner.idle.notify_waiters();
    }
}

/// Finishes the partition's flights after one failed or could not be sent: once every first
/// attempt is answered, oldest first, each acknowledged one keeps its answer, and each that
/// failed with a retriable error, or was not sent, is sent again (one at a time: the broker
/// then appends them in order, and idempotence makes a retry of a batch it had appended
/// answer with the original offsets) and finished with the last attempt's result; only the
/// first failed one waits out a backoff first, the others go again as soon as it is in. A flight
/// refused with OutOfOrderSequence (or UnknownProducer: the earlier one was the producer's
/// first) after an earlier one failed was refused for the gap that one left (the broker
/// appended nothing): it is sent again too, once the earlier one is in.
/// After a flight fails for good (and the producer starts a new epoch), the flights after it
/// that failed are not retried (their sequences would follow a gap): they fail with their
/// own error; one not sent yet goes back to the front of the queue, to be numbered anew.
async fn recover(inner: Arc<Inner>, key: Key) {
    loop {
        let answered = inner.answered.notified();
        tokio::pin!(answered);
        answered.as_mut().enable();
        {
            let st = inner.lock();
            let Some(q) = st.queues.get(&key) else {
                return;
            };
            if !q.flights.iter().any(|f| matches!(f.first, First::Sent)) {
                break;
            }
        }
        answered.await;
    }
    // A flight of this recovery failed for good; an earlier flight's first attempt failed.
    let (mut broken, mut gap) = (false, false);
    // Flights put back on the queue, never sent.
    let mut requeued = 0;
    loop {
        let (id, first) = {
            let mut guard = inner.lock();
            let st = &mut *guard;
            let Some(q) = st.queues.get_mut(&key) else {
                return;
            };
            let Some(f) = q.flights.front_mut() else {
                q.recovering = false;
                ship_next(&inner, st, &key);
                return;
            };
            if broken && matches!(f.first, First::NotSent) {
                // Never sent: numbered again in the new epoch when it goes, in its order
                // (ahead of the sealed batches, behind any flight requeued before it).
                if let Some(Flight {
                    mut batch, records, ..
                }) = q.flights.pop_front()
                {
                    batch.records = Arc::try_unwrap(records).unwrap_or_else(|r| r.to_vec());
                    q.sealed.insert(requeued, batch);
                    requeued += 1;
                }
                continue;
            }
            (f.id, std::mem::replace(&mut f.first, First::Sent))
        };
        let retry = |e: &Error| {
            !broken
                && inner.config.retries > 0
                && (e.is_retriable()
                    || (gap
                        && matches!(
                            e.code(),
                            Some(ErrorCode::OUT_OF_ORDER_SEQUENCE | ErrorCode::UNKNOWN_PRODUCER)
                        )))
        };
        let result = match first {
            First::Answered(Ok(base)) => Ok(base),
            // The first failed flight waits out the backoff before its retry; once it is
            // in, what failed it is past, and the flights after it go again at once.
            First::Answered(Err(e)) if retry(&e) => {
                let waited = std::mem::replace(&mut gap, true);
                deliver(&inner, &key, id, (!waited).then_some(e)).await
            }
            First::Answered(Err(e)) => Err(e),
            First::NotSent | First::Sent => deliver(&inner, &key, id, None).await,
        };
        broken |= result.is_err();
        finish(&inner, &key, id, result);
    }
}

/// Sends flight `id` of the partition until it is acknowledged or fails for good (retrying
/// after `failed`, its first attempt's error, when given), within its delivery timeout.
async fn deliver(inner: &Arc<Inner>, key: &Key, id: u64, failed: Option<Error>) -> Result<i64> {
    let ctx = produce_context(key);
    let Some((records, count, deadline, producer)) = inner.lock().queues.get(key).and_then(|q| {
        q.flights.iter().find(|f| f.id == id).map(|f| {
            (
                f.records.clone(),
                f.batch.count,
                f.batch.deadline,
                f.producer,
            )
        })
    }) else {
        return Err(Error::Closed {
            context: ctx,
            what: "producer",
        });
    };
    let config = &inner.config;
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(config.retry_backoff)
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .with_max_times(config.retries)
        .build();
    let request_timeout = inner.client.config().request_timeout;
    let mut last = failed;
    // The leader the first attempt went to (it went out before this task started).
    let mut target = inner.client.leader_of(&key.0, key.1);
    loop {
        if let Some(e) = last.take() {
            let d = match backoff.next() {
                Some(d) if Instant::now() + d < deadline => d,
                _ => return Err(e),
            };
            tracing::debug!(error = %e, ?d, "produce failed; retrying");
            // NotLeader, or the connection to the partition's leader lost in a cluster:
            // leadership moved or the leader is gone. The retry goes to the leader the
            // Metadata names, at once when it names another than the failed one (read again
            // every `retry_backoff` within the backoff), else after the backoff. The retry
            // keeps the batch's sequence.
            if inner.client.leader_lost(&e) {
                let poll = config.retry_backoff;
                let (topic, partition) = (&key.0, key.1);
                let client = &inner.client;
                client
                    .await_new_leader(topic, partition, target.as_ref(), d, poll, deadline)
                    .await;
            } else {
                tokio::time::sleep(d).await;
            }
        }
        target = inner.client.leader_of(&key.0, key.1);
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(Error::TimedOut {
                context: ctx,
                waiting: "waiting for delivery",
                after: config.delivery_timeout,
            });
        }
        let req = produce_request(key, count, &records, producer);
        let attempt = inner
            .client
            .call(req, &ctx, request_timeout.min(remaining))
            .await;
        let e = match attempt {
            Ok(Reply::Produce { base_offset }) => return Ok(base_offset),
            Ok(other) => return Err(mismatch(ctx, &other)),
            Err(e) => e,
        };
        if stale_topic(&e) {
            inner.lock().topics.remove(&key.0);
        }
        if !e.is_retriable() {
            return Err(e);
        }
        last = Some(e);
    }
}

/// Ends the partition's flight `id` with `result`, then sends what its window has room for.
fn finish(inner: &Arc<Inner>, key: &Key, id: u64, result: Result<i64>) {
    let mut guard = inner.lock();
    finish_locked(inner, &mut guard, key, id, result);
    drop(guard);
    inner.idle.notify_waiters();
}

/// [`finish`] under the lock (the caller notifies `idle` once it is released).
fn finish_locked(inner: &Arc<Inner>, st: &mut State, key: &Key, id: u64, result: Result<i64>) {
    let flushing = st.flushing > 0;
    let now = Instant::now();
    let Some(q) = st.queues.get_mut(key) else {
        return;
    };
    let Some(at) = q.flights.iter().position(|f| f.id == id) else {
        return;
    };
    let Some(Flight { batch, records, .. }) = q.flights.remove(at) else {
        return;
    };
    if q.flights.is_empty() {
        // Not kept past its flights: a connection lives as long as a sender of it.
        q.lane = None;
    }
    if q.sealed.is_empty()
        && q.open
            .as_ref()
            .is_some_and(|b| flushing || b.urgent || b.opened + inner.config.linger <= now)
        && let Some(b) = q.open.take()
    {
        q.sealed.push_back(b);
    }
    let count = batch.count;
    if let Err(e) = &result {
        tracing::debug!(error = %e, count, "batch failed");
        st.failures
            .extend(std::iter::repeat_n(e.clone(), count as usize));
        // Whether the broker appended a failed batch is unknown (it may have, on an attempt
        // whose answer was lost), and its sequence may have left a gap or been taken: a new
        // epoch starts every partition again at sequence 0 (protocol §6.2: after
        // OutOfOrderSequence or UnknownProducer, and after any other failure too).
        if let Some(id) = &mut st.identity {
            id.bump();
        }
    }
    let bytes = records.len();
    if let Ok(buf) = Arc::try_unwrap(records)
        && st.spare.len() < 4
    {
        // Kept at its length: the next batch writes over its bytes without zeroing them.
        st.spare.push(buf);
    }
    batch.outcome.set(result);
    inner.buffer.add_permits(bytes);
    ship_next(inner, st, key);
    st.outstanding = st.outstanding.saturating_sub(count as usize);
}

/// Seals batches whose linger passed; sleeps until the next one is due or a batch opens.
async fn linger_task(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let wake = strong.wake_linger.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let next = {
            let mut st = strong.lock();
            let all = st.flushing > 0;
            let now = Instant::now();
            st.topics.retain(|_, t| now < t.read_at + TOPIC_MAX_AGE);
            seal_due(&strong, &mut st, now, all)
        };
        let idle_check = Duration::from_millis(500);
        let sleep_until = next.unwrap_or_else(|| Instant::now() + idle_check);
        tokio::select! {
            () = &mut wake => {}
            () = tokio::time::sleep_until(sleep_until) => {}
        }
    }
}

/// `record`'s headers as the wire's.
fn wire_headers(record: &Record) -> Vec<Header<'_>> {
    record
        .headers
        .iter()
        .map(|(k, v)| Header { key: k, value: v })
        .collect()
}

/// `record` as a wire message (offset 0: the broker assigns it), with `headers` from
/// [`wire_headers`].
fn wire_message<'a>(record: &'a Record, headers: &'a [Header<'a>]) -> Message<'a> {
    Message {
        offset: 0,
        timestamp: record.timestamp.unwrap_or(0),
        key: record.key.as_deref().unwrap_or_default(),
        value: &record.value,
        headers: Headers::from_slice(headers),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_takes_a_chunk_ahead_and_serves_the_next_records_from_it() {
        let buffer = Semaphore::new(1 << 20);
        let mut st = State::default();
        assert!(st.reserve(&buffer, 100));
        assert_eq!(st.reserve, PERMIT_CHUNK);
        assert_eq!(buffer.available_permits(), (1 << 20) - 100 - PERMIT_CHUNK);
        // The next record comes out of the reserve: the semaphore is not touched.
        assert!(st.reserve(&buffer, 200));
        assert_eq!(st.reserve, PERMIT_CHUNK - 200);
        assert_eq!(buffer.available_permits(), (1 << 20) - 100 - PERMIT_CHUNK);
    }

    #[test]
    fn a_short_semaphore_gets_the_reserve_back_before_a_record_is_refused() {
        let buffer = Semaphore::new(PERMIT_CHUNK + 1500);
        let mut st = State::default();
        assert!(st.reserve(&buffer, 1000));
        assert_eq!(buffer.available_permits(), 500);
        // More than the reserve holds, no chunk to be had: the reserve goes back and the
        // record takes exactly its size.
        assert!(st.reserve(&buffer, PERMIT_CHUNK + 200));
        assert_eq!(st.reserve, 0);
        assert_eq!(buffer.available_permits(), 300);
        // More than is left: refused, nothing held back.
        assert!(!st.reserve(&buffer, 301));
        assert_eq!(st.reserve, 0);
        assert_eq!(buffer.available_permits(), 300);
    }

    #[test]
    fn while_a_caller_waits_for_room_no_reserve_is_kept() {
        let buffer = Semaphore::new(1 << 20);
        let mut st = State::default();
        assert!(st.reserve(&buffer, 100));
        assert_eq!(st.reserve, PERMIT_CHUNK);
        st.waiting = 1;
        // The reserve goes back (the waiter is served from the semaphore), and no chunk is
        // taken: the record takes exactly its size.
        assert!(st.reserve(&buffer, 10));
        assert_eq!(st.reserve, 0);
        assert_eq!(buffer.available_permits(), (1 << 20) - 100 - 10);
        assert!(st.reserve(&buffer, 10));
        assert_eq!(st.reserve, 0);
        assert_eq!(buffer.available_permits(), (1 << 20) - 120);
    }
}
