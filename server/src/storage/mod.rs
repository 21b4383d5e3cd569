//! The durable partitioned log: topics → partitions → segments.
//!
//! ```text
//! <data_dir>/LOCK                               held (flock) while a Storage is open
//! <data_dir>/topics/<topic>/topic.toml          partition count and the topic's overrides
//! <data_dir>/topics/<topic>/<p>/partition.toml  the log start offset (once retention moved it)
//! <data_dir>/topics/<topic>/<p>/<base>.log      records in wire encoding, offsets stamped
//! <data_dir>/topics/<topic>/<p>/<base>.idx      one 40-byte entry per batch, with CRCs
//! <data_dir>/topics/<topic>/<p>/<base>.pidx     one 32-byte entry per idempotent batch
//! <data_dir>/tmp/, <data_dir>/trash/            staging for create, leftovers of delete
//! ```
//!
//! [`Storage`] is `Sync`: every method takes `&self` and it is meant to be shared as
//! `Arc<Storage>` by all connections. See `docs/storage.md` for the format, the durability
//! policies and recovery.

mod config;
mod durability;
mod error;
mod meta;
mod partition;
mod producers;
mod raft;
mod segment;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use streambus_core::{MessageSet, Topic};

pub use config::{DEFAULT_MAX_PRODUCERS_PER_PARTITION, FsyncPolicy, StorageConfig, TopicConfig};
pub use error::StorageError;
pub use producers::{
    BYTES_PER_PRODUCER, InvalidProducer, KEPT_BATCHES, ProducerBatch, ProducerTable,
};
pub use raft::{RaftAppend, RaftEntry, RaftEntryKind, RaftLogId, RaftLogState};

use error::IoContext;
use partition::{Partition, Settings};

/// The largest partition count of a topic.
pub const MAX_PARTITIONS: u32 = 1024;

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// The offset of the first message (the end, for zero messages).
    pub base_offset: i64,
    /// Messages appended.
    pub count: u32,
    /// The offset after the last message appended.
    pub high_water_mark: i64,
}

/// What a fetch read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchResult {
    /// The partition's end (the next offset to be assigned) when the fetch started.
    pub high_water_mark: i64,
    /// The partition's log start when the fetch started.
    pub log_start: i64,
    /// Messages in `records`.
    pub count: u32,
    /// The records in wire encoding, ready to follow a Fetch response's NumMessages.
    pub records: Vec<u8>,
    /// The offset after the last message returned (the fetch offset when none).
    pub next_offset: i64,
    /// The CRC-32 of `records`, combined from the stored per-batch CRCs (bytes of partial
    /// batches are hashed).
    pub crc: u32,
}

/// A byte range of a log file.
#[derive(Debug, Clone)]
pub struct LogRange {
    /// The segment's log file (kept open, even if retention deletes the segment meanwhile).
    pub file: Arc<std::fs::File>,
    /// Where the range starts in the file.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// What a fetch would read, as file ranges instead of bytes: for a zero-copy send
/// (`sendfile`). The ranges, concatenated, are exactly [`FetchResult::records`].
#[derive(Debug, Clone)]
pub struct FetchPlan {
    /// As in [`FetchResult`].
    pub high_water_mark: i64,
    /// As in [`FetchResult`].
    pub log_start: i64,
    /// Messages in the ranges.
    pub count: u32,
    /// The offset after the last message (the fetch offset when none).
    pub next_offset: i64,
    /// The CRC-32 of the ranges' bytes, combined from the stored batch CRCs.
    pub crc: u32,
    /// Total bytes of the ranges.
    pub len: u64,
    /// The ranges, in order.
    pub ranges: Vec<LogRange>,
}

/// An appended batch that is not yet known to be on disk: see [`Storage::append_unsynced`].
#[derive(Debug)]
pub struct PendingSync {
    partition: Arc<Partition>,
    upto: i64,
}

impl PendingSync {
    /// Returns once the batch is on disk, fsyncing if no other thread's fsync covers it.
    /// Blocks: call it where blocking is allowed.
    pub fn wait(&self) -> Result<(), StorageError> {
        self.partition.make_durable(self.upto)
    }

    /// The offset after the batch: every offset below it is on disk once `wait` returns.
    pub fn upto(&self) -> i64 {
        self.upto
    }
}

/// Counters for metrics, since open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct StorageStats {
    /// Batches appended.
    pub appends: u64,
    /// Messages appended.
    pub messages_appended: u64,
    /// Record bytes appended.
    pub bytes_appended: u64,
    /// Group-commit fsyncs (one per partition sync, however many files it flushed).
    pub fsyncs: u64,
    /// Segments whose torn or corrupt tail recovery cut.
    pub recovery_truncations: u64,
    /// Bytes recovery cut.
    pub recovery_truncated_bytes: u64,
    /// Segments deleted by retention.
    pub segments_deleted: u64,
    /// Idempotent producers whose state is kept now, over all partitions.
    pub producers: u64,
    /// Approximate memory of that state: `producers` × [`BYTES_PER_PRODUCER`].
    pub producer_state_bytes: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    appends: AtomicU64,
    messages_appended: AtomicU64,
    bytes_appended: AtomicU64,
    fsyncs: AtomicU64,
    recovery_truncations: AtomicU64,
    recovery_truncated_bytes: AtomicU64,
    segments_deleted: AtomicU64,
    /// A gauge: producers kept (see `producers::Producers`).
    pub(crate) producers: AtomicU64,
}

impl Counters {
    pub(crate) fn inc(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> StorageStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StorageStats {
            appends: g(&self.appends),
            messages_appended: g(&self.messages_appended),
            bytes_appended: g(&self.bytes_appended),
            fsyncs: g(&self.fsyncs),
            recovery_truncations: g(&self.recovery_truncations),
            recovery_truncated_bytes: g(&self.recovery_truncated_bytes),
            segments_deleted: g(&self.segments_deleted),
            producers: g(&self.producers),
            producer_state_bytes: g(&self.producers).saturating_mul(BYTES_PER_PRODUCER),
        }
    }
}

// Poisoning is ignored: every critical section leaves its state consistent before anything
// that can panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug)]
struct TopicState {
    partitions: Vec<Arc<Partition>>,
    /// Its partitions are Raft logs.
    raft: bool,
}

/// Called by the retention run with each replicated partition (topic, partition) and its
/// retention point: the last entry of the last sealed segment its topic's retention no longer
/// keeps ([`Storage::raft_retention_point`], not capped by what is applied). A Raft log is
/// never trimmed under its group: the replication layer snapshots at such an entry and purges
/// up to it ([`Storage::raft_purge`]). Called on the storage's background thread: it must not
/// block.
pub type RaftRetentionHook = Arc<dyn Fn(&str, u32, RaftLogId) + Send + Sync>;

/// The [`RaftRetentionHook`], if one is set.
#[derive(Default)]
struct RetentionHookSlot(Mutex<Option<RaftRetentionHook>>);

impl std::fmt::Debug for RetentionHookSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if lock(&self.0).is_some() {
            "RaftRetentionHook"
        } else {
            "None"
        })
    }
}

#[derive(Debug)]
struct Inner {
    config: StorageConfig,
    /// What the retention run calls for replicated partitions.
    raft_retention: RetentionHookSlot,
    topics_dir: PathBuf,
    tmp_dir: PathBuf,
    trash_dir: PathBuf,
    topics: RwLock<BTreeMap<String, Arc<TopicState>>>,
    /// Serializes create and delete (the map lock is never held across disk work).
    admin: Mutex<()>,
    seq: AtomicU64,
    counters: Arc<Counters>,
    _lock: File,
}

#[derive(Debug)]
struct Background {
    stop: mpsc::Sender<()>,
    handle: JoinHandle<()>,
}

/// The storage engine. Open it once per data directory and share it (`Arc<Storage>`).
///
/// A background thread fsyncs `Interval` partitions and applies retention; dropping the
/// `Storage` stops it and fsyncs everything.
#[derive(Debug)]
pub struct Storage {
    inner: Arc<Inner>,
    background: Option<Background>,
}

/// The current Unix time in nanoseconds.
pub fn unix_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

pub(crate) fn validate(name: &str) -> Result<(), StorageError> {
    Topic::new(name)
        .map(|_| ())
        .map_err(|_| StorageError::invalid_topic(name))
}

impl Storage {
    /// Opens (creating if needed) a data directory and recovers every topic in it.
    ///
    /// Torn or corrupt segment tails are cut to the last good batch, logged with
    /// `tracing::warn!` and counted in [`StorageStats::recovery_truncations`]; they never make
    /// `open` fail. A missing or unreadable metadata file does (nothing is dropped silently).
    pub fn open(config: StorageConfig) -> Result<Self, StorageError> {
        let root = config.data_dir.clone();
        let topics_dir = root.join("topics");
        let tmp_dir = root.join("tmp");
        let trash_dir = root.join("trash");
        for d in [&root, &topics_dir, &tmp_dir, &trash_dir] {
            fs::create_dir_all(d).ctx("create directory", d)?;
        }
        let lock_path = root.join("LOCK");
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .ctx("open", &lock_path)?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StorageError::DataDirLocked { path: root });
            }
            Err(fs::TryLockError::Error(e)) => return Err(e).ctx("lock", &lock_path),
        }
        for d in [&tmp_dir, &trash_dir] {
            for ent in fs::read_dir(d).ctx("list", d)? {
                partition::remove_tree(&ent.ctx("list", d)?.path());
            }
        }
        let counters = Arc::new(Counters::default());
        let mut topics = BTreeMap::new();
        for ent in fs::read_dir(&topics_dir).ctx("list", &topics_dir)? {
            let path = ent.ctx("list", &topics_dir)?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| validate(n).is_ok())
            else {
                tracing::warn!(path = %path.display(), "ignoring a non-topic entry in the data directory");
                continue;
            };
            let (count, cfg, raft) = meta::read_topic(&path)?;
            let topic = open_topic(&config, &path, count, &cfg, raft, &counters)?;
            topics.insert(name.to_owned(), Arc::new(topic));
        }
        let inner = Arc::new(Inner {
            config,
            raft_retention: RetentionHookSlot::default(),
            topics_dir,
            tmp_dir,
            trash_dir,
            topics: RwLock::new(topics),
            admin: Mutex::new(()),
            seq: AtomicU64::new(0),
            counters,
            _lock: lock_file,
        });
        let (stop, rx) = mpsc::channel();
        let bg = Arc::clone(&inner);
        let handle = std::thread::Builder::new()
            .name("storage-flush".into())
            .spawn(move || background(&bg, &rx))
            .ctx("spawn thread", &root)?;
        Ok(Self {
            inner,
            background: Some(Background { stop, handle }),
        })
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &StorageConfig {
        &self.inner.config
    }

    /// Creates a topic. `Ok(false)` if it exists with the same partition count;
    /// [`StorageError::TopicExists`] if with another.
    pub fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        cfg: TopicConfig,
    ) -> Result<bool, StorageError> {
        self.create(name, partitions, cfg, false)
    }

    /// Creates a replicated topic: its partitions are Raft logs (index format 2), written
    /// only through the `raft_*` methods; their high-water mark is what the replication layer
    /// sets. `Ok(false)` if it exists as such with the same partition count; a topic of the
    /// same name that is not replicated is [`StorageError::TopicExists`].
    pub fn create_raft_topic(
        &self,
        name: &str,
        partitions: u32,
        cfg: TopicConfig,
    ) -> Result<bool, StorageError> {
        self.create(name, partitions, cfg, true)
    }

    fn create(
        &self,
        name: &str,
        partitions: u32,
        cfg: TopicConfig,
        raft: bool,
    ) -> Result<bool, StorageError> {
        validate(name)?;
        if !(1..=MAX_PARTITIONS).contains(&partitions) {
            return Err(StorageError::InvalidPartitionCount {
                count: partitions,
                max: MAX_PARTITIONS,
            });
        }
        let inner = &*self.inner;
        let _admin = lock(&inner.admin);
        if let Some(t) = read(&inner.topics).get(name) {
            let existing = t.partitions.len() as u32;
            return if existing == partitions && t.raft == raft {
                Ok(false)
            } else {
                Err(StorageError::TopicExists {
                    topic: name.to_owned(),
                    partitions: existing,
                })
            };
        }
        // Build the topic in tmp/ and rename it into place: a crash leaves all or nothing.
        let staging = inner.unique_in(&inner.tmp_dir);
        fs::create_dir(&staging).ctx("create directory", &staging)?;
        for p in 0..partitions {
            let d = staging.join(p.to_string());
            fs::create_dir(&d).ctx("create directory", &d)?;
        }
        meta::write_topic(&staging, partitions, &cfg, raft)?;
        let dir = inner.topics_dir.join(name);
        fs::rename(&staging, &dir).ctx("rename", &dir)?;
        meta::sync_dir(&inner.topics_dir)?;
        let topic = match open_topic(&inner.config, &dir, partitions, &cfg, raft, &inner.counters) {
            Ok(t) => t,
            Err(e) => {
                // Out of fds, say: take the directory back out, or the topic would exist on
                // disk but be neither listed, creatable nor deletable until a restart.
                let trash = inner.unique_in(&inner.trash_dir);
                if fs::rename(&dir, &trash).is_ok() {
                    let _ = meta::sync_dir(&inner.topics_dir);
                    partition::remove_tree(&trash);
                }
                return Err(e);
            }
        };
        write(&inner.topics).insert(name.to_owned(), Arc::new(topic));
        tracing::info!(topic = name, partitions, "created topic");
        Ok(true)
    }

    /// Deletes a topic and its data.
    pub fn delete_topic(&self, name: &str) -> Result<(), StorageError> {
        validate(name)?;
        let inner = &*self.inner;
        let _admin = lock(&inner.admin);
        let Some(topic) = read(&inner.topics).get(name).cloned() else {
            return Err(StorageError::TopicNotFound {
                topic: name.to_owned(),
            });
        };
        let dir = inner.topics_dir.join(name);
        let trash = inner.unique_in(&inner.trash_dir);
        // Appends, rolls and retention runs that hold a partition now finish first; later
        // ones leave the directory alone (a re-created topic may take the same path).
        for p in &topic.partitions {
            p.mark_removed();
        }
        fs::rename(&dir, &trash).ctx("rename", &dir)?;
        meta::sync_dir(&inner.topics_dir)?;
        write(&inner.topics).remove(name);
        partition::remove_tree(&trash);
        tracing::info!(topic = name, "deleted topic");
        Ok(())
    }

    /// Every topic with its partition count, sorted by name (byte order).
    pub fn list_topics(&self) -> Vec<(String, u32)> {
        read(&self.inner.topics)
            .iter()
            .map(|(n, t)| (n.clone(), t.partitions.len() as u32))
            .collect()
    }

    /// A topic's partition count, if it exists.
    pub fn partition_count(&self, name: &str) -> Option<u32> {
        read(&self.inner.topics)
            .get(name)
            .map(|t| t.partitions.len() as u32)
    }

    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<Partition>, StorageError> {
        let topics = read(&self.inner.topics);
        let Some(t) = topics.get(topic) else {
            drop(topics);
            validate(topic)?;
            return Err(StorageError::TopicNotFound {
                topic: topic.to_owned(),
            });
        };
        t.partitions
            .get(partition as usize)
            .cloned()
            .ok_or_else(|| StorageError::PartitionNotFound {
                topic: topic.to_owned(),
                partition,
                count: t.partitions.len() as u32,
            })
    }

    /// Appends `messages` as one batch with consecutive offsets, stamping each record's
    /// Offset, and its Timestamp when 0 (with `now_unix_ns`). Under [`FsyncPolicy::Always`]
    /// it returns once the batch is on disk.
    pub fn append(
        &self,
        topic: &str,
        partition: u32,
        messages: &MessageSet<'_>,
        now_unix_ns: i64,
    ) -> Result<AppendResult, StorageError> {
        self.partition(topic, partition)?
            .append(messages, now_unix_ns)
    }

    /// [`append`](Self::append) that never waits for an fsync: under [`FsyncPolicy::Always`]
    /// it also returns the [`PendingSync`] to [`wait`](PendingSync::wait) for (on a thread
    /// that may block) before the batch may be acknowledged. Batches whose waits overlap share
    /// one fsync (group commit).
    pub fn append_unsynced(
        &self,
        topic: &str,
        partition: u32,
        messages: &MessageSet<'_>,
        now_unix_ns: i64,
    ) -> Result<(AppendResult, Option<PendingSync>), StorageError> {
        self.append_unsynced_idempotent(topic, partition, messages, now_unix_ns, None)
    }

    /// [`append_unsynced`](Self::append_unsynced) for an idempotent producer (protocol §6.2):
    /// the batch is checked against `producer`'s state on the partition and the check and the
    /// append are one atomic step. A retry of one of the producer's last batches appends
    /// nothing and returns that batch's `base_offset` and `count` with the current
    /// `high_water_mark`; under [`FsyncPolicy::Always`] with the [`PendingSync`] covering that
    /// batch, so a retry is never acknowledged before the original is on disk. Out of order:
    /// [`StorageError::OutOfOrderSequence`], [`StorageError::UnknownProducer`] or
    /// [`StorageError::InvalidProducerEpoch`]. `None` (or zero messages) is a plain append.
    pub fn append_unsynced_idempotent(
        &self,
        topic: &str,
        partition: u32,
        messages: &MessageSet<'_>,
        now_unix_ns: i64,
        producer: Option<ProducerBatch>,
    ) -> Result<(AppendResult, Option<PendingSync>), StorageError> {
        let p = self.partition(topic, partition)?;
        let appended = p.append_nowait(messages, now_unix_ns, producer.as_ref())?;
        // The batch's end: the high-water mark for an append, the original's end for a retry.
        let upto = appended
            .base_offset
            .saturating_add(i64::from(appended.count));
        let pending =
            (p.fsync_always() && appended.count > 0).then(|| PendingSync { partition: p, upto });
        Ok((appended, pending))
    }

    /// [`append`](Self::append) for an idempotent producer: see
    /// [`append_unsynced_idempotent`](Self::append_unsynced_idempotent). Under
    /// [`FsyncPolicy::Always`] it returns once the batch (or the original of a retry) is on
    /// disk.
    pub fn append_idempotent(
        &self,
        topic: &str,
        partition: u32,
        messages: &MessageSet<'_>,
        now_unix_ns: i64,
        producer: Option<ProducerBatch>,
    ) -> Result<AppendResult, StorageError> {
        let (appended, pending) =
            self.append_unsynced_idempotent(topic, partition, messages, now_unix_ns, producer)?;
        if let Some(p) = pending {
            p.wait()?;
        }
        Ok(appended)
    }

    /// Reads whole messages from `offset` on, as many as fit in `max_bytes` of record bytes,
    /// but at least one when one exists at `offset`, and never more than `max_total` bytes
    /// (a single message larger than that is [`StorageError::MessageTooLarge`]).
    ///
    /// `offset` equal to the high-water mark gives no messages; below the log start or above
    /// the high-water mark is [`StorageError::OffsetOutOfRange`].
    pub fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        max_total: u32,
    ) -> Result<FetchResult, StorageError> {
        self.partition(topic, partition)?
            .fetch(offset, max_bytes, max_total)
    }

    /// [`fetch`](Self::fetch) as file ranges, for a zero-copy send. Same rules and errors.
    pub fn fetch_plan(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        max_total: u32,
    ) -> Result<FetchPlan, StorageError> {
        self.partition(topic, partition)?
            .fetch_plan(offset, max_bytes, max_total)
    }

    /// `(log start, end)`: the first offset kept and the next offset to be assigned (the
    /// high-water mark).
    pub fn offsets(&self, topic: &str, partition: u32) -> Result<(i64, i64), StorageError> {
        Ok(self.partition(topic, partition)?.offsets())
    }

    /// A partition's directory (where the replication layer keeps its vote and snapshot).
    pub fn partition_dir(&self, topic: &str, partition: u32) -> Result<PathBuf, StorageError> {
        Ok(self.partition(topic, partition)?.dir().to_path_buf())
    }

    /// Whether a topic is replicated (its partitions are Raft logs); `None` if it does not
    /// exist.
    pub fn is_raft_topic(&self, name: &str) -> Option<bool> {
        read(&self.inner.topics).get(name).map(|t| t.raft)
    }

    /// A replicated partition's log as Raft sees it: last purged and last entries, next
    /// index, log start, end and high-water mark.
    pub fn raft_log_state(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<RaftLogState, StorageError> {
        self.partition(topic, partition)?.raft_state()
    }

    /// Appends one Raft entry to a replicated partition (see [`RaftAppend`]): its index must
    /// be the log's next and its base offset the log's end. The messages are stored byte for
    /// byte. Under [`FsyncPolicy::Always`] also returns the [`PendingSync`] to wait for before
    /// telling Raft the entry is stored. The high-water mark does not move.
    pub fn raft_append(
        &self,
        topic: &str,
        partition: u32,
        entry: &RaftAppend<'_>,
    ) -> Result<(AppendResult, Option<PendingSync>), StorageError> {
        let p = self.partition(topic, partition)?;
        let appended = p.raft_append(entry)?;
        let pending = p.fsync_always().then(|| PendingSync {
            upto: appended.high_water_mark,
            partition: p,
        });
        Ok((appended, pending))
    }

    /// The stored Raft entries with indexes `from..to` (fewer when the log ends first),
    /// records included; `from` below the first entry kept is an error.
    pub fn raft_entries(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        to: u64,
    ) -> Result<Vec<RaftEntry>, StorageError> {
        self.partition(topic, partition)?.raft_entries(from, to)
    }

    /// [`raft_entries`](Self::raft_entries) without the records (`records` is empty): the
    /// index entries only, no `.log` bytes read.
    pub fn raft_entry_headers(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        to: u64,
    ) -> Result<Vec<RaftEntry>, StorageError> {
        self.partition(topic, partition)?
            .raft_entry_headers(from, to)
    }

    /// A replicated partition's retention point at Unix time `now_unix_ns`: the last entry of
    /// the last sealed segment that its topic's retention no longer keeps (the oldest
    /// segments while the log is over `retention_bytes`, or while their newest record is
    /// older than `retention_age`: a single broker's rules), among the segments whose entries
    /// all have indexes up to `applied`. `None` if retention keeps them all (or the topic has
    /// no retention). Deletes nothing: purging up to it is [`raft_purge`](Self::raft_purge).
    pub fn raft_retention_point(
        &self,
        topic: &str,
        partition: u32,
        now_unix_ns: i64,
        applied: u64,
    ) -> Result<Option<RaftLogId>, StorageError> {
        self.partition(topic, partition)?
            .raft_retention_point(now_unix_ns, applied)
    }

    /// Sets what the retention run calls for replicated partitions (see
    /// [`RaftRetentionHook`]); without one, retention leaves them alone.
    pub fn set_raft_retention_hook(&self, hook: RaftRetentionHook) {
        *lock(&self.inner.raft_retention.0) = Some(hook);
    }

    /// Removes the entries from index `from` on, durably (a follower's divergent tail).
    /// Entries below the high-water mark are never removed: that is an error.
    pub fn raft_truncate(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
    ) -> Result<(), StorageError> {
        self.partition(topic, partition)?.raft_truncate(from)
    }

    /// Purges the entries up to `upto` (which must be stored with that log id): the log start
    /// moves to the offset after it (and the high-water mark too, if below: a purged entry is
    /// committed) and the segments holding only purged entries are deleted. The purge is
    /// persisted in `partition.toml`.
    pub fn raft_purge(
        &self,
        topic: &str,
        partition: u32,
        upto: RaftLogId,
    ) -> Result<(), StorageError> {
        self.partition(topic, partition)?.raft_purge(upto)
    }

    /// Empties a replicated partition's log for a snapshot ending at `last_purged`: the next
    /// entry has the index after it and goes at `next_offset`, which becomes the log start and
    /// the high-water mark.
    pub fn raft_reset(
        &self,
        topic: &str,
        partition: u32,
        last_purged: RaftLogId,
        next_offset: i64,
    ) -> Result<(), StorageError> {
        self.partition(topic, partition)?
            .raft_reset(last_purged, next_offset)
    }

    /// Moves a replicated partition's high-water mark up to `offset` (the end of the last
    /// committed entry): Fetch, its fetch plan and GetOffset's end never go past it.
    pub fn set_high_water_mark(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<(), StorageError> {
        self.partition(topic, partition)?
            .set_high_water_mark(offset)
    }

    /// An empty idempotent producer table for a replicated partition's state machine, bounded
    /// by `max_producers_per_partition` and counted in [`StorageStats::producers`].
    pub fn producer_table(&self) -> ProducerTable {
        ProducerTable::new(
            self.inner.config.max_producers_per_partition,
            Arc::clone(&self.inner.counters),
        )
    }

    /// An empty producer table bounded like [`producer_table`](Self::producer_table) but not
    /// counted in [`StorageStats::producers`]: a replicated partition leader's working copy
    /// of its applied table (which is counted).
    pub fn uncounted_producer_table(&self) -> ProducerTable {
        ProducerTable::new(
            self.inner.config.max_producers_per_partition,
            Arc::new(Counters::default()),
        )
    }

    /// Fsyncs every partition, whatever its policy (for a graceful shutdown).
    pub fn sync_all(&self) -> Result<(), StorageError> {
        // One partition's failure doesn't spare the others their fsync.
        first_error(self.inner.partitions().map(|p| p.sync().map(|()| 0))).map(|_| ())
    }

    /// Applies retention to every partition now; returns the segments deleted. The background
    /// thread calls this every `retention_check_interval`.
    pub fn enforce_retention(&self, now_unix_ns: i64) -> Result<u64, StorageError> {
        self.inner.enforce_retention(now_unix_ns)
    }

    /// Counters since open.
    pub fn stats(&self) -> StorageStats {
        self.inner.counters.snapshot()
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Some(bg) = self.background.take() {
            drop(bg.stop);
            if bg.handle.join().is_err() {
                tracing::error!("storage background thread panicked");
            }
        }
        if let Err(e) = self.sync_all() {
            tracing::error!(error = %e, "final fsync failed");
        }
    }
}

impl Inner {
    /// A fresh name in `tmp/` or `trash/`: a counter alone (`{topic}.{seq}` could pass the
    /// 255-byte name limit); both folders are emptied at open.
    fn unique_in(&self, parent: &std::path::Path) -> PathBuf {
        parent.join(self.seq.fetch_add(1, Ordering::Relaxed).to_string())
    }

    fn partitions(&self) -> impl Iterator<Item = Arc<Partition>> {
        let all: Vec<Arc<Partition>> = read(&self.topics)
            .values()
            .flat_map(|t| t.partitions.iter().cloned())
            .collect();
        all.into_iter()
    }

    fn enforce_retention(&self, now: i64) -> Result<u64, StorageError> {
        // A partition that fails (and stays failing) must not keep the later ones untrimmed.
        let deleted = first_error(self.partitions().map(|p| p.enforce_retention(now)));
        self.raft_retention(now);
        deleted
    }

    /// Tells the [`RaftRetentionHook`] of each replicated partition that has something to
    /// purge.
    fn raft_retention(&self, now: i64) {
        let Some(hook) = lock(&self.raft_retention.0).clone() else {
            return;
        };
        let replicated: Vec<(String, u32, Arc<Partition>)> = read(&self.topics)
            .iter()
            .filter(|(_, t)| t.raft)
            .flat_map(|(name, t)| {
                (0u32..)
                    .zip(&t.partitions)
                    .filter(|(_, p)| p.has_retention())
                    .map(|(i, p)| (name.clone(), i, Arc::clone(p)))
            })
            .collect();
        for (topic, partition, p) in replicated {
            match p.raft_retention_point(now, u64::MAX) {
                Ok(Some(point)) => hook(&topic, partition, point),
                Ok(None) => {}
                Err(e) => tracing::warn!(%topic, partition, error = %e, "retention failed"),
            }
        }
    }
}

/// Runs every step; the sum of their counts, or the first error (the others are logged).
fn first_error(
    results: impl Iterator<Item = Result<u64, StorageError>>,
) -> Result<u64, StorageError> {
    let mut total = 0;
    let mut first = None;
    for r in results {
        match r {
            Ok(n) => total += n,
            Err(e) if first.is_none() => first = Some(e),
            Err(e) => tracing::warn!(error = %e, "storage maintenance step failed"),
        }
    }
    first.map_or(Ok(total), Err)
}

fn open_topic(
    config: &StorageConfig,
    dir: &std::path::Path,
    count: u32,
    cfg: &TopicConfig,
    raft: bool,
    counters: &Arc<Counters>,
) -> Result<TopicState, StorageError> {
    let settings = Settings {
        fsync: cfg.fsync.unwrap_or(config.fsync),
        segment_bytes: config.segment_bytes.max(1),
        retention_bytes: cfg.retention_bytes.or(config.retention_bytes),
        retention_age: cfg.retention_age.or(config.retention_age),
        max_producers: config.max_producers_per_partition,
        raft,
    };
    let partitions = (0..count)
        .map(|p| {
            Partition::open(dir.join(p.to_string()), settings, Arc::clone(counters)).map(Arc::new)
        })
        .collect::<Result<_, _>>()?;
    Ok(TopicState { partitions, raft })
}

/// The background thread: fsyncs `Interval` partitions when due and applies retention.
fn background(inner: &Inner, stop: &mpsc::Receiver<()>) {
    let retention_every = inner.config.retention_check_interval;
    let mut next_retention = Instant::now() + retention_every;
    loop {
        let tick = inner
            .partitions()
            .filter_map(|p| p.fsync_interval())
            .min()
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(1), Duration::from_secs(1));
        match stop.recv_timeout(tick) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        for p in inner.partitions() {
            if let Err(e) = p.flush_if_due(now) {
                tracing::error!(error = %e, "interval fsync failed");
            }
        }
        if !retention_every.is_zero() && now >= next_retention {
            next_retention = now + retention_every;
            if let Err(e) = inner.enforce_retention(unix_now_ns()) {
                tracing::error!(error = %e, "retention failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use streambus_core::{Encode, Message, MessageSetBuilder};

    fn one_message(value: &[u8]) -> Vec<u8> {
        let m = Message::new(b"", value);
        let mut buf = vec![0u8; m.encoded_len()];
        MessageSetBuilder::new(&mut buf).push(&m).unwrap();
        buf
    }

    /// A retention run or an append that still holds a deleted topic's partitions (they were
    /// collected before the delete) must not touch the re-created topic of the same name.
    #[test]
    fn a_deleted_topics_partitions_leave_a_recreated_topic_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = StorageConfig::new(dir.path());
        cfg.fsync = FsyncPolicy::Never;
        cfg.segment_bytes = 1000;
        cfg.retention_bytes = Some(1000);
        cfg.retention_age = None;
        cfg.retention_check_interval = Duration::ZERO;
        let s = Storage::open(cfg.clone()).unwrap();
        s.create_topic("t", 2, TopicConfig::default()).unwrap();
        let big = one_message(&[7; 172]); // 200-byte records: 5 per segment
        for p in 0..2 {
            for _ in 0..10 {
                s.append("t", p, &MessageSet::new_checked(1, &big).unwrap(), 1)
                    .unwrap();
            }
        }
        let stale: Vec<Arc<Partition>> = s.inner.partitions().collect();
        s.delete_topic("t").unwrap();
        s.create_topic("t", 2, TopicConfig::default()).unwrap();
        let acked = one_message(b"acked");
        for p in 0..2 {
            let r = s
                .append("t", p, &MessageSet::new_checked(1, &acked).unwrap(), 1)
                .unwrap();
            assert_eq!(r.base_offset, 0);
        }
        for p in &stale {
            assert_eq!(
                p.enforce_retention(1).unwrap(),
                0,
                "trimmed a deleted partition"
            );
            let e = p
                .append(&MessageSet::new_checked(1, &big).unwrap(), 1)
                .unwrap_err();
            assert!(
                matches!(e, StorageError::TopicNotFound { ref topic } if topic == "t"),
                "{e:?}"
            );
            p.sync().unwrap();
        }
        drop(stale);
        drop(s);
        let s = Storage::open(cfg).unwrap();
        for p in 0..2 {
            assert_eq!(s.offsets("t", p).unwrap(), (0, 1), "partition {p}");
            let f = s.fetch("t", p, 0, 1 << 20, u32::MAX).unwrap();
            let set = MessageSet::new_checked(f.count, &f.records).unwrap();
            let values: Vec<&[u8]> = set.iter().map(|m| m.value).collect();
            assert_eq!(values, [b"acked"]);
        }
    }
}
