//! [`Consumer`]: assigned partitions, long-poll fetches, position tracking.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use streambus_core::LongPoll;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{Client, mismatch, validate_topic};
use crate::conn::{Fetched, Reply, Req};
use crate::error::{Context, Error, ErrorCode, Result};
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
    /// default 500 ms, capped by the client's `max_poll_wait`).
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
    /// The next offset to fetch.
    position: i64,
    /// Bumped by every seek; answers to older fetches are dropped.
    generation: u64,
    in_flight: bool,
    /// Empty answers in a row that came back at once (a broker without long poll).
    empty_streak: u32,
    /// Wait before the next fetch.
    delay: Duration,
}

enum Outcome {
    Records(Fetched),
    /// The position was reset (policy) to this offset.
    Reset(i64),
}

struct Done {
    key: Key,
    generation: u64,
    offset: i64,
    result: Result<Outcome>,
    elapsed: Duration,
}

/// Reads assigned topic-partitions in order, with long-poll fetches kept in flight (one per
/// partition), so a new record arrives within milliseconds of its append on a broker with
/// long poll. A broker that answers an empty fetch at once (no long poll) is polled again
/// after a short, growing pause (5 ms doubling to 50 ms), never in a hot loop.
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
#[derive(Debug)]
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    parts: HashMap<Key, Assigned>,
    fetches: JoinSet<Done>,
    buffered: VecDeque<ConsumerRecord>,
}

impl Consumer {
    /// A consumer with the default settings.
    pub fn new(client: &Client) -> Self {
        Self {
            client: client.clone(),
            config: ConsumerConfig::default(),
            parts: HashMap::new(),
            fetches: JoinSet::new(),
            buffered: VecDeque::new(),
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
        let generation = self.parts.get(&key).map_or(0, |p| p.generation + 1);
        self.buffered
            .retain(|r| !(*r.topic == *key.0 && r.partition == partition));
        self.parts.insert(
            key.clone(),
            Assigned {
                position,
                generation,
                in_flight: false,
                empty_streak: 0,
                delay: Duration::ZERO,
            },
        );
        self.start(&key);
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
        self.parts
            .retain(|(t, p), _| !(**t == *topic && *p == partition));
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

    fn start(&mut self, key: &Key) {
        let Some(a) = self.parts.get_mut(key) else {
            return;
        };
        if a.in_flight {
            return;
        }
        a.in_flight = true;
        let client = self.client.clone();
        let runtime = client.inner.pool.runtime().clone();
        let config = self.config.clone();
        let (key, generation, offset, delay) = (key.clone(), a.generation, a.position, a.delay);
        self.fetches.spawn_on(
            async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let started = Instant::now();
                let result = fetch(&client, &config, &key, offset).await;
                Done {
                    key,
                    generation,
                    offset,
                    result,
                    elapsed: started.elapsed(),
                }
            },
            &runtime,
        );
    }

    /// Waits up to `timeout` for records of the assigned partitions; returns those of the
    /// first fetch that brings any (an empty `Vec` when none came). Records of one partition
    /// come in offset order, without gaps or repeats. A fetch error is returned once; the
    /// partition keeps its position and is fetched again by the next call.
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
        let keys: Vec<Key> = self.parts.keys().cloned().collect();
        for k in &keys {
            self.start(k);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let done = match tokio::time::timeout_at(deadline, self.fetches.join_next()).await {
                Err(_) | Ok(None) => return Ok(Vec::new()),
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "fetch task failed");
                    continue;
                }
                Ok(Some(Ok(done))) => done,
            };
            if let Some(records) = self.complete(done)? {
                return Ok(records);
            }
        }
    }

    /// The next record, waiting as long as it takes (records of a fetch are buffered).
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

    /// Takes one finished fetch; `Some` when it brought records.
    fn complete(&mut self, done: Done) -> Result<Option<Vec<ConsumerRecord>>> {
        let Some(a) = self.parts.get_mut(&done.key) else {
            return Ok(None);
        };
        if a.generation != done.generation {
            return Ok(None);
        }
        a.in_flight = false;
        let outcome = match done.result {
            Ok(o) => o,
            Err(e) => {
                a.delay = if e.is_retriable() {
                    Duration::from_millis(100)
                } else {
                    Duration::from_millis(500)
                };
                return Err(e);
            }
        };
        let fetched = match outcome {
            Outcome::Reset(to) => {
                tracing::info!(topic = %done.key.0, partition = done.key.1, from = done.offset, to, "offset out of range: position reset");
                a.position = to;
                a.delay = Duration::ZERO;
                self.start(&done.key);
                return Ok(None);
            }
            Outcome::Records(f) => f,
        };
        let mut records = fetched.records;
        records.retain(|r| r.offset >= done.offset);
        let next = records
            .last()
            .map(|r| r.offset + 1)
            .or(fetched.next_offset)
            .unwrap_or(done.offset)
            .max(done.offset);
        a.position = next;
        if records.is_empty() {
            // A broker without long poll answers at once: pause a little, growing.
            let instant = done.elapsed < self.config.max_wait / 2;
            if instant {
                a.empty_streak = a.empty_streak.saturating_add(1);
                let ms = 5u64 << a.empty_streak.min(4);
                a.delay = Duration::from_millis(ms.min(50)).min(self.config.max_wait);
            } else {
                a.empty_streak = 0;
                a.delay = Duration::ZERO;
            }
        } else {
            a.empty_streak = 0;
            a.delay = Duration::ZERO;
        }
        let _ = fetched.high_water_mark;
        self.start(&done.key);
        Ok((!records.is_empty()).then_some(records))
    }
}

async fn fetch(
    client: &Client,
    config: &ConsumerConfig,
    key: &Key,
    offset: i64,
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
    };
    let timeout = client.config().request_timeout + config.max_wait;
    match client.call(req, &ctx, timeout).await {
        Ok(Reply::Fetch(f)) => Ok(Outcome::Records(f)),
        Ok(other) => Err(mismatch(ctx, &other)),
        Err(e) if e.code() == Some(ErrorCode::OFFSET_OUT_OF_RANGE) => {
            let o = client.offsets(topic, *partition).await?;
            match config.reset {
                ResetPolicy::Error => Err(e),
                ResetPolicy::Earliest => Ok(Outcome::Reset(o.start)),
                ResetPolicy::Latest => Ok(Outcome::Reset(o.end)),
            }
        }
        Err(e) => Err(e),
    }
}
