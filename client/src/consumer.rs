//! [`Consumer`]: assigned partitions, long-poll fetches, position tracking.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_core::Stream;

use streambus_core::LongPoll;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::client::{Client, mismatch, validate_topic};
use crate::conn::{AHEAD_DEPTH, Ahead, Fetched, Reply, Req};
use crate::error::{Context, Error, ErrorCode, ProtocolError, Result};
use crate::types::ConsumerRecord;

/// Where to start reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Offset {
    /// The first offset still stored.
    Earliest,
    /// The next offset to be written (only new records).
    Latest,
    /// This offset.
    At(i64),
}

/// What a consumer does when its position is out of the partition's range (the broker's
/// `OffsetOutOfRange`, e.g. after retention deleted the records there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResetPolicy {
    /// Jump to the first offset still stored (default).
    Earliest,
    /// Jump to the end.
    Latest,
    /// Return the broker's error from [`Consumer::poll`] and stay where it is.
    Error,
}

/// Settings of a [`Consumer`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// How long the broker may hold a fetch that has nothing yet (long poll, protocol §6.1;
    /// default 500 ms). At most the client's `max_poll_wait`: [`Consumer::with_config`]
    /// refuses a longer one, and [`Consumer::new`] lowers the default to it.
    pub max_wait: Duration,
    /// Bytes of records that end the broker's wait early (default 1: any record).
    pub min_bytes: u32,
    /// Record bytes per fetch (default 1 MiB; one record is always returned even if larger).
    pub max_bytes: u32,
    /// What to do on `OffsetOutOfRange` (default [`ResetPolicy::Earliest`]).
    pub reset: ResetPolicy,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_millis(500),
            min_bytes: 1,
            max_bytes: 1 << 20,
            reset: ResetPolicy::Earliest,
        }
    }
}

impl ConsumerConfig {
    /// Sets [`max_wait`](Self::max_wait).
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = d;
        self
    }
    /// Sets [`min_bytes`](Self::min_bytes).
    pub fn min_bytes(mut self, n: u32) -> Self {
        self.min_bytes = n;
        self
    }
    /// Sets [`max_bytes`](Self::max_bytes).
    pub fn max_bytes(mut self, n: u32) -> Self {
        self.max_bytes = n;
        self
    }
    /// Sets [`reset`](Self::reset).
    pub fn reset(mut self, r: ResetPolicy) -> Self {
        self.reset = r;
        self
    }
}

type Key = (Arc<str>, u32);

#[derive(Debug)]
struct Assigned {
    /// The offset after the last record handed out.
    position: i64,
    /// The high-water mark of the partition's latest fetch answer (`None` before the first).
    high_water_mark: Option<i64>,
    /// This assignment's fetcher; answers of older ones are dropped.
    generation: u64,
    fetcher: AbortHandle,
}

enum Outcome {
    /// An answer, and its records (built by the fetcher, off the connection's task).
    Records(Fetched, Vec<ConsumerRecord>),
    /// The position was reset (policy) to this offset.
    Reset(i64),
}

/// What a fetcher hands to the consumer: records or a new position (with the high-water
/// mark the broker reported, when it answered a fetch), or an error.
struct Done {
    key: Key,
    generation: u64,
    result: Result<Handed>,
}

/// A fetcher's records and where the partition stands after them.
struct Handed {
    records: Vec<ConsumerRecord>,
    next: i64,
    high_water_mark: Option<i64>,
}

impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Done")
            .field("key", &self.key)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Fetches handed to the consumer ahead of its `poll`s (each up to `max_bytes`).
const PREFETCH: usize = 2;

/// Reads assigned topic-partitions in order. Each partition has a fetcher task that keeps a
/// long-poll fetch in flight and hands records over ahead of [`poll`](Self::poll) (the
/// consumer holds up to two fetches handed over), so a new record arrives within milliseconds
/// of its append on a broker with long poll. While a partition has records to read, its
/// connection sends the next fetch (from where an answer ends) as soon as the answer arrives,
/// before copying its records out, so the broker reads on while the client builds and hands
/// over the records; it sends one such fetch at a time, and only while no answer sent ahead
/// waits unread and a fetch slot is free without waiting, so an application that stops
/// polling stops the fetching and partitions share the slots in turn.
///
/// A consumer keeps at most half its client's capacity (`pool_size × max_in_flight`) in
/// fetches, so producers and admin calls sharing the client are not starved; give a consumer
/// of very many partitions its own [`Client`] with a larger pool. A broker that answers an
/// empty fetch at once (no long poll) is polled again after a
/// short, growing pause (10 ms doubling to 50 ms), never in a hot loop.
///
/// ```no_run
/// # async fn demo(client: streambus_client::Client) -> Result<(), streambus_client::Error> {
/// use std::time::Duration;
/// use streambus_client::{Consumer, Offset};
/// let mut consumer = Consumer::new(&client);
/// consumer.assign("orders", 0, Offset::Earliest).await?;
/// loop {
///     for r in consumer.poll(Duration::from_secs(1)).await? {
///         println!("{}/{}@{}: {:?}", r.topic, r.partition, r.offset, r.value());
///     }
/// }
/// # }
/// ```
///
/// A consumer is also a [`Stream`] of records (as `async-nats` subscribers and `rdkafka`
/// stream consumers are): each item is the next record, in order per partition, or a fetch
/// error (returned once; the stream goes on after it). The stream never ends by itself;
/// with no partition assigned every item is an error. Combinators such as `take`,
/// `take_while` or `timeout` come from `futures::StreamExt` or `tokio_stream::StreamExt`.
///
/// ```no_run
/// # async fn demo(client: streambus_client::Client) -> Result<(), streambus_client::Error> {
/// use futures_util::StreamExt; // or futures::StreamExt
/// use streambus_client::{Consumer, Offset};
/// let mut consumer = Consumer::new(&client);
/// consumer.assign("orders", 0, Offset::Earliest).await?;
/// let mut records = consumer.take(100);
/// while let Some(record) = records.next().await {
///     let record = record?;
///     println!("{}@{}: {:?}", record.partition, record.offset, record.value());
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    parts: HashMap<Key, Assigned>,
    fetchers: JoinSet<()>,
    tx: mpsc::Sender<Done>,
    rx: mpsc::Receiver<Done>,
    next_generation: u64,
    buffered: VecDeque<ConsumerRecord>,
    /// Fetches in flight at once: half the client's capacity, so a consumer of many
    /// partitions leaves room for producers and admin calls on the same client.
    fetch_slots: Arc<Semaphore>,
}

impl Consumer {
    /// A consumer with the default settings.
    pub fn new(client: &Client) -> Self {
        let (tx, rx) = mpsc::channel(PREFETCH);
        Self {
            client: client.clone(),
            config: ConsumerConfig::default().max_wait(
                ConsumerConfig::default()
                    .max_wait
                    .min(client.config().max_poll_wait),
            ),
            parts: HashMap::new(),
            fetchers: JoinSet::new(),
            tx,
            rx,
            next_generation: 0,
            buffered: VecDeque::new(),
            fetch_slots: Arc::new(Semaphore::new(
                (client.config().pool_size * client.config().max_in_flight / 2).max(1),
            )),
        }
    }

    /// A consumer with `config`.
    pub fn with_config(client: &Client, config: ConsumerConfig) -> Result<Self> {
        if config.max_wait > client.config().max_poll_wait {
            return Err(Error::config(
                "max_wait",
                format!(
                    "{:?} exceeds the client's max_poll_wait {:?}",
                    config.max_wait,
                    client.config().max_poll_wait
                ),
            ));
        }
        let mut c = Self::new(client);
        c.config = config;
        Ok(c)
    }

    /// Reads `partition` of `topic` from `from`. Assigning an assigned partition seeks it.
    pub async fn assign(&mut self, topic: &str, partition: u32, from: Offset) -> Result<()> {
        let ctx = Context::new("assign").topic(topic).partition(partition);
        let t = validate_topic(topic, &ctx)?;
        let position = self.resolve(topic, partition, from).await?;
        let key = (t, partition);
        self.unassign(topic, partition);
        // Forget fetchers that ended (aborted by earlier seeks).
        while self.fetchers.try_join_next().is_some() {}
        self.next_generation += 1;
        let generation = self.next_generation;
        let fetcher = self.fetchers.spawn_on(
            fetcher(
                self.client.clone(),
                self.config.clone(),
                key.clone(),
                generation,
                position,
                self.tx.clone(),
                self.fetch_slots.clone(),
            ),
            self.client.inner.pool.runtime(),
        );
        self.parts.insert(
            key,
            Assigned {
                position,
                high_water_mark: None,
                generation,
                fetcher,
            },
        );
        Ok(())
    }

    /// Moves an assigned partition to `to`; records buffered from before are dropped.
    pub async fn seek(&mut self, topic: &str, partition: u32, to: Offset) -> Result<()> {
        let ctx = Context::new("seek").topic(topic).partition(partition);
        if !self
            .parts
            .keys()
            .any(|(t, p)| **t == *topic && *p == partition)
        {
            return Err(Error::invalid(ctx, "the partition is not assigned"));
        }
        self.assign(topic, partition, to).await
    }

    /// Stops reading a partition.
    pub fn unassign(&mut self, topic: &str, partition: u32) {
        self.parts.retain(|(t, p), a| {
            let this = **t == *topic && *p == partition;
            if this {
                a.fetcher.abort();
            }
            !this
        });
        self.buffered
            .retain(|r| !(*r.topic == *topic && r.partition == partition));
    }

    /// The next offset [`poll`](Self::poll) will return for an assigned partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<i64> {
        if let Some(r) = self
            .buffered
            .iter()
            .find(|r| *r.topic == *topic && r.partition == partition)
        {
            return Some(r.offset);
        }
        self.parts
            .iter()
            .find(|((t, p), _)| **t == *topic && *p == partition)
            .map(|(_, a)| a.position)
    }

    /// How many records an assigned partition holds past [`position`](Self::position), as of
    /// the broker's latest fetch answer for it: `Some(0)` when this consumer has caught up
    /// (until more are produced), `None` before the partition's first answer has been handed
    /// over (or for a partition not assigned). Answers are handed over by [`poll`](Self::poll),
    /// [`recv`](Self::recv) and the [`Stream`]: this is as current as the last of those calls.
    pub fn lag(&self, topic: &str, partition: u32) -> Option<i64> {
        let (_, a) = self
            .parts
            .iter()
            .find(|((t, p), _)| **t == *topic && *p == partition)?;
        let position = self.position(topic, partition)?;
        Some(a.high_water_mark?.saturating_sub(position).max(0))
    }

    /// Whether every assigned partition has caught up: each has been answered and
    /// [`lag`](Self::lag) is 0 for each. For "read what is there, then stop".
    ///
    /// ```no_run
    /// # async fn demo(client: streambus_client::Client) -> Result<(), streambus_client::Error> {
    /// use std::time::Duration;
    /// use streambus_client::{Consumer, Offset};
    /// let mut consumer = Consumer::new(&client);
    /// consumer.assign("orders", 0, Offset::Earliest).await?;
    /// let mut all = Vec::new();
    /// while !consumer.caught_up() {
    ///     all.extend(consumer.poll(Duration::from_secs(1)).await?);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn caught_up(&self) -> bool {
        !self.parts.is_empty() && self.parts.keys().all(|(t, p)| self.lag(t, *p) == Some(0))
    }

    async fn resolve(&self, topic: &str, partition: u32, from: Offset) -> Result<i64> {
        match from {
            Offset::At(o) if o >= 0 => Ok(o),
            Offset::At(o) => Err(Error::invalid(
                Context::new("assign").topic(topic).partition(partition),
                format!("offset {o} is negative"),
            )),
            Offset::Earliest => Ok(self.client.offsets(topic, partition).await?.start),
            Offset::Latest => Ok(self.client.offsets(topic, partition).await?.end),
        }
    }

    /// Waits up to `timeout` for records of the assigned partitions; returns those of the
    /// first fetch that brings any (an empty `Vec` when none came, or at once when the
    /// consumer has just [caught up](Self::caught_up)). Records of one partition
    /// come in offset order, without gaps or repeats. A fetch error is returned once; its
    /// partition keeps its position and its fetcher tries again after a pause (100 ms for a
    /// retriable error, 500 ms otherwise).
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        if !self.buffered.is_empty() {
            return Ok(self.buffered.drain(..).collect());
        }
        if self.parts.is_empty() {
            return Err(Error::invalid(
                Context::new("poll"),
                "no partition is assigned",
            ));
        }
        // A timeout past the clock's range (`Duration::MAX`) waits without a deadline.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let next = match deadline {
                Some(d) => tokio::time::timeout_at(d, self.rx.recv())
                    .await
                    .ok()
                    .flatten(),
                None => self.rx.recv().await,
            };
            let Some(done) = next else {
                return Ok(Vec::new());
            };
            if let Some(records) = self.accept(done) {
                return records;
            }
            if self.caught_up() {
                // Nothing more is stored: say so now rather than at the timeout.
                return Ok(Vec::new());
            }
        }
    }

    /// Takes a fetcher's hand-over: `None` when it brings nothing to return (an old
    /// assignment's, or only a new position), else its records (non-empty) or its error.
    fn accept(&mut self, done: Done) -> Option<Result<Vec<ConsumerRecord>>> {
        let a = self.parts.get_mut(&done.key)?;
        if a.generation != done.generation {
            return None;
        }
        match done.result {
            Err(e) => Some(Err(e)),
            Ok(h) => {
                a.position = h.next;
                if h.high_water_mark.is_some() {
                    a.high_water_mark = h.high_water_mark;
                }
                (!h.records.is_empty()).then_some(Ok(h.records))
            }
        }
    }

    /// The next record, waiting as long as it takes (records of a fetch are buffered). The
    /// consumer is also a [`Stream`] of the same items.
    pub async fn recv(&mut self) -> Result<ConsumerRecord> {
        loop {
            if let Some(r) = self.buffered.pop_front() {
                return Ok(r);
            }
            let wait = self.config.max_wait.max(Duration::from_millis(100));
            let records = self.poll(wait).await?;
            self.buffered.extend(records);
        }
    }
}

impl Stream for Consumer {
    type Item = Result<ConsumerRecord>;

    /// The next record, or a fetch error; `Pending` until a fetcher hands something over
    /// (no timer: the fetchers' long polls do the waiting).
    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(r) = this.buffered.pop_front() {
                return Poll::Ready(Some(Ok(r)));
            }
            if this.parts.is_empty() {
                return Poll::Ready(Some(Err(Error::invalid(
                    Context::new("stream"),
                    "no partition is assigned",
                ))));
            }
            let Some(done) = std::task::ready!(this.rx.poll_recv(cx)) else {
                // The consumer holds a sender: not reached.
                return Poll::Ready(None);
            };
            match this.accept(done) {
                None => {}
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(records)) => this.buffered.extend(records),
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.buffered.len(), None)
    }
}

/// The pause before fetching again after an empty answer that came back at once (a broker
/// without long poll, or `max_wait` zero): 10, 20, 40, 50, 50… ms.
fn empty_pause(streak: u32) -> Duration {
    let ms = 5u64 << streak.clamp(1, 4);
    Duration::from_millis(ms.min(50))
}

/// Whether an empty answer came back "at once": well before the broker's wait was over.
fn answered_at_once(elapsed: Duration, max_wait: Duration) -> bool {
    elapsed < (max_wait / 2).max(Duration::from_millis(5))
}

/// One partition's fetch loop: fetches from `offset` on, hands over what comes, follows the
/// reset policy, pauses after errors and after instant empty answers.
async fn fetcher(
    client: Client,
    config: ConsumerConfig,
    key: Key,
    generation: u64,
    mut offset: i64,
    tx: mpsc::Sender<Done>,
    slots: Arc<Semaphore>,
) {
    let mut streak = 0u32;
    let mut seen_hwm = None;
    // The connection sends the next fetch ahead of handing over an answer with records
    // (while this channel is empty and a fetch slot is free); `ahead` is the offset of the one
    // in flight. An answer that is not the one expected (an error, another offset) drops the
    // channel, so whatever was sent ahead before goes nowhere, and the fetch is made again
    // by the call that follows leaders and resends.
    let channel = || mpsc::channel(AHEAD_DEPTH);
    let (mut ahead_tx, mut ahead_rx) = channel();
    let mut ahead: Option<i64> = None;
    loop {
        let started = Instant::now();
        let expected = ahead.take();
        let sent_ahead = match expected {
            Some(at) if at == offset => match ahead_rx.recv().await {
                Some(Ok(Reply::Fetch(f))) if f.offset == offset => Some(f),
                _ => None,
            },
            _ => None,
        };
        if expected.is_some() && sent_ahead.is_none() {
            (ahead_tx, ahead_rx) = channel();
        }
        // An answer sent ahead may have waited in the channel: never "at once".
        let answered_ahead = sent_ahead.is_some();
        let fetched = match sent_ahead {
            Some(f) => f.records().map(|r| Outcome::Records(f, r)),
            None => {
                let Ok(slot) = slots.acquire().await else {
                    return;
                };
                let a = Ahead {
                    tx: ahead_tx.clone(),
                    slots: slots.clone(),
                };
                let fetched = fetch(&client, &config, &key, offset, a).await;
                drop(slot);
                fetched
            }
        };
        ahead = match &fetched {
            Ok(Outcome::Records(f, _)) => f.ahead,
            Ok(Outcome::Reset(_)) => None,
            Err(_) => {
                // Records that break the protocol, after a fetch was sent ahead of them.
                (ahead_tx, ahead_rx) = channel();
                None
            }
        };
        let (result, pause) = match fetched {
            Ok(Outcome::Reset(to)) => {
                tracing::info!(topic = %key.0, partition = key.1, from = offset, to, "offset out of range: position reset");
                offset = to;
                let handed = Handed {
                    records: Vec::new(),
                    next: to,
                    high_water_mark: None,
                };
                (Ok(handed), Duration::ZERO)
            }
            Ok(Outcome::Records(f, mut records)) => {
                records.retain(|r| r.offset >= offset);
                let next = records
                    .last()
                    // Below i64::MAX: `fetch` refuses a record there.
                    .map(|r| r.offset.saturating_add(1))
                    .or(f.next_offset)
                    .unwrap_or(offset)
                    .max(offset);
                let moved = next != offset;
                offset = next;
                let pause = if !records.is_empty()
                    || answered_ahead
                    || !answered_at_once(started.elapsed(), config.max_wait)
                {
                    streak = 0;
                    Duration::ZERO
                } else {
                    streak = streak.saturating_add(1);
                    empty_pause(streak)
                };
                // An empty answer that moves nothing is handed over only when it tells the
                // consumer something new: the first high-water mark, or one that changed.
                let news = seen_hwm != Some(f.high_water_mark);
                seen_hwm = Some(f.high_water_mark);
                if records.is_empty() && !moved && !news {
                    tokio::time::sleep(pause).await;
                    continue;
                }
                let handed = Handed {
                    records,
                    next,
                    high_water_mark: Some(f.high_water_mark),
                };
                (Ok(handed), pause)
            }
            Err(e) => {
                let pause = if e.is_retriable() {
                    Duration::from_millis(100)
                } else {
                    Duration::from_millis(500)
                };
                (Err(e), pause)
            }
        };
        let done = Done {
            key: key.clone(),
            generation,
            result,
        };
        if tx.send(done).await.is_err() {
            return;
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

async fn fetch(
    client: &Client,
    config: &ConsumerConfig,
    key: &Key,
    offset: i64,
    ahead: Ahead,
) -> Result<Outcome> {
    let (topic, partition) = key;
    let ctx = Context::new("fetch")
        .topic(topic.clone())
        .partition(*partition);
    let max_wait_ms = u32::try_from(config.max_wait.as_millis()).unwrap_or(u32::MAX);
    let req = Req::Fetch {
        topic: topic.clone(),
        partition: *partition,
        offset,
        max_bytes: config.max_bytes,
        long_poll: Some(LongPoll {
            max_wait_ms,
            min_bytes: config.min_bytes,
        }),
        ahead: Some(ahead),
    };
    let timeout = client.config().request_timeout + config.max_wait;
    match client.call(req, &ctx, timeout).await {
        Ok(Reply::Fetch(f)) => {
            let records = f.records()?;
            if records.iter().any(|r| r.offset == i64::MAX) {
                // No offset follows it: fetching on would bring it again, forever.
                return Err(Error::Protocol {
                    context: ctx,
                    source: ProtocolError::Unexpected(format!(
                        "a record at offset {}, the largest there is (no next offset to fetch)",
                        i64::MAX
                    )),
                });
            }
            Ok(Outcome::Records(f, records))
        }
        Ok(other) => Err(mismatch(ctx, &other)),
        Err(e) if e.code() == Some(ErrorCode::OFFSET_OUT_OF_RANGE) => match config.reset {
            // The broker's error as it came, with no GetOffset sent (whose own failure would
            // stand in for it).
            ResetPolicy::Error => Err(e),
            ResetPolicy::Earliest => Ok(Outcome::Reset(
                client.offsets(topic, *partition).await?.start,
            )),
            ResetPolicy::Latest => Ok(Outcome::Reset(client.offsets(topic, *partition).await?.end)),
        },
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_answers_back_off_and_never_spin() {
        let pauses: Vec<u64> = (1..7).map(|s| empty_pause(s).as_millis() as u64).collect();
        assert_eq!(pauses, vec![10, 20, 40, 50, 50, 50]);
        // max_wait 0 (no long poll asked): every empty answer counts as instant.
        assert!(answered_at_once(Duration::from_micros(100), Duration::ZERO));
        assert!(answered_at_once(
            Duration::from_millis(1),
            Duration::from_millis(500)
        ));
        assert!(!answered_at_once(
            Duration::from_millis(400),
            Duration::from_millis(500)
        ));
    }

    /// A fetch of partition 0 of `topic` from offset 0 that reads ahead, with its channel's
    /// receiving side and its 4 fetch slots.
    fn fetch_with_ahead(
        topic: &str,
        max_bytes: u32,
    ) -> (Req, mpsc::Receiver<Result<Reply>>, Arc<Semaphore>) {
        let (tx, rx) = mpsc::channel(AHEAD_DEPTH);
        let slots = Arc::new(Semaphore::new(4));
        let fetch = Req::Fetch {
            topic: Arc::from(topic),
            partition: 0,
            offset: 0,
            max_bytes,
            long_poll: None,
            ahead: Some(Ahead {
                tx,
                slots: slots.clone(),
            }),
        };
        (fetch, rx, slots)
    }

    /// The connection sends a consumer's next fetch itself, from the answer's NextOffset,
    /// before it hands that answer over, and stops sending ahead once an answer waits unread
    /// in the channel: one fetch from the caller brings the answers at offsets 0, 1 and 2
    /// and no more, and gives its fetch slots back. With no fetch slot free, it sends nothing
    /// ahead.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_connection_fetches_ahead_until_an_answer_waits_unread_or_no_slot_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = streambus_server::Config::default();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.data_dir = dir.path().to_owned();
        config.metrics_listen = None;
        config.fsync = streambus_server::FsyncMode::Never;
        let broker = streambus_server::start(config).unwrap();
        let client = Client::connect(broker.addr().to_string()).await.unwrap();
        client.create_topic("ahead", 1).await.unwrap();
        let producer = crate::Producer::new(&client);
        for _ in 0..10 {
            producer
                .send(crate::Record::new("ahead", vec![b'v'; 100]))
                .await
                .unwrap();
        }
        // Room for one 100-byte record per fetch.
        let (fetch, mut rx, slots) = fetch_with_ahead("ahead", 150);
        let offsets = |f: &Fetched| {
            let offsets: Vec<i64> = f.records().unwrap().iter().map(|r| r.offset).collect();
            assert_eq!(offsets.first(), Some(&f.offset));
            offsets
        };
        let timeout = Duration::from_secs(10);
        let first = match client.call(fetch, &Context::new("test"), timeout).await {
            Ok(Reply::Fetch(f)) => f,
            other => panic!("{other:?}"),
        };
        assert_eq!((offsets(&first), first.ahead), (vec![0], Some(1)));
        // The answers sent ahead arrive without another call.
        let deadline = Instant::now() + timeout;
        while rx.len() < AHEAD_DEPTH {
            assert!(Instant::now() < deadline, "{} answers ahead", rx.len());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut ahead = Vec::new();
        while let Ok(r) = rx.try_recv() {
            match r {
                Ok(Reply::Fetch(f)) => ahead.push((offsets(&f), f.ahead)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(ahead, vec![(vec![1], Some(2)), (vec![2], None)]);
        assert_eq!(slots.available_permits(), 4);

        let (tx, mut rx) = mpsc::channel(AHEAD_DEPTH);
        let fetch = Req::Fetch {
            topic: Arc::from("ahead"),
            partition: 0,
            offset: 3,
            max_bytes: 150,
            long_poll: None,
            ahead: Some(Ahead {
                tx,
                slots: Arc::new(Semaphore::new(0)),
            }),
        };
        let next = match client.call(fetch, &Context::new("test"), timeout).await {
            Ok(Reply::Fetch(f)) => f,
            other => panic!("{other:?}"),
        };
        assert_eq!((offsets(&next), next.ahead), (vec![3], None));
        assert!(rx.try_recv().is_err(), "an answer came ahead");
        drop(client);
        broker.shutdown().unwrap();
    }

    /// A fetch whose call timed out sends nothing ahead when its late answer arrives (its
    /// caller is gone: a fetch sent ahead would feed a channel nobody expects it in). A fake
    /// broker answers the fetch only after the call's timeout, then answers a HealthCheck:
    /// the requests it received are exactly that Fetch and that HealthCheck.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_answered_after_its_timeout_sends_nothing_ahead() {
        use streambus_core::broker::peek_request_id;
        use streambus_core::{
            FetchResponse, FetchTrailer, FrameDecoder, HealthCheckResponse, Message,
            MessageSetBuilder, RequestFrame, RequestType, Response as CoreResponse, Status, Text,
            encode_response, response_encoded_len,
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (late_tx, late_rx) = tokio::sync::oneshot::channel::<()>();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
            let mut seen = Vec::new();
            let mut late_rx = Some(late_rx);
            loop {
                let len = loop {
                    if let Ok(Status::Complete(len)) = FrameDecoder::default().next_frame(&buf) {
                        break len;
                    }
                    let n = s.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return seen;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                };
                let frame: Vec<u8> = buf.drain(..len).collect();
                let id = peek_request_id(&frame).unwrap();
                let ty = RequestFrame::new_checked(&frame[..])
                    .unwrap()
                    .request_type();
                seen.push(ty);
                let mut records = vec![0u8; 256];
                let response = match ty {
                    Some(RequestType::Fetch) => {
                        // The first is answered only once the call has timed out.
                        if let Some(late) = late_rx.take() {
                            let _ = late.await;
                        }
                        let mut set = MessageSetBuilder::new(&mut records);
                        set.push(&Message::new(b"", b"late")).unwrap();
                        CoreResponse::Fetch(FetchResponse {
                            high_water_mark: 5,
                            messages: set.finish(),
                            trailer: Some(FetchTrailer {
                                last_stable_offset: 5,
                                next_offset: 1,
                            }),
                        })
                    }
                    _ => CoreResponse::HealthCheck(HealthCheckResponse {
                        status: Text(b"healthy"),
                        uptime_secs: 1,
                    }),
                };
                let mut out = vec![0; response_encoded_len(&response)];
                let n = encode_response(id, &response, &mut out).unwrap();
                s.write_all(&out[..n]).await.unwrap();
            }
        });
        let client = Client::builder()
            .pool_size(1)
            .connect(addr.to_string())
            .await
            .unwrap();
        let (fetch, mut rx, slots) = fetch_with_ahead("late", 1 << 20);
        let e = client
            .call(fetch, &Context::new("test"), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::TimedOut { .. }), "{e}");
        late_tx.send(()).unwrap();
        // Answered after the late Fetch answer on the same connection (TCP keeps the order),
        // so that answer was handled when this returns.
        assert_eq!(client.health().await.unwrap().status, "healthy");
        drop(client);
        let seen = tokio::time::timeout(Duration::from_secs(10), peer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            seen,
            vec![Some(RequestType::Fetch), Some(RequestType::HealthCheck)]
        );
        assert!(rx.try_recv().is_err(), "an answer came ahead");
        assert_eq!(slots.available_permits(), 4);
    }
}
