//! Storage settings: broker-wide [`StorageConfig`] and per-topic [`TopicConfig`] overrides.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

/// When appended data is forced to disk with `fsync` (`fdatasync`).
///
/// Every append is written to the OS page cache before it is acknowledged, so a crash of the
/// broker process alone loses nothing under any policy; the policies differ in what an OS crash
/// or power loss can lose (see `docs/storage.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FsyncPolicy {
    /// `append` returns only once the batch is on disk. Concurrent appenders to a partition
    /// share one fsync (group commit).
    Always,
    /// A background thread fsyncs each partition with unsynced data at this interval.
    Interval(Duration),
    /// Never fsync; the OS writes the page cache back when it likes. `sync_all` and a clean
    /// shutdown still fsync everything.
    Never,
}

impl Default for FsyncPolicy {
    /// `Interval(1 s)`.
    fn default() -> Self {
        Self::Interval(Duration::from_secs(1))
    }
}

/// Per-topic overrides; `None` takes the broker's [`StorageConfig`] value. Persisted with the
/// topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicConfig {
    /// The durability policy.
    pub fsync: Option<FsyncPolicy>,
    /// Retention by size: per partition, the record bytes kept (whole sealed segments are
    /// deleted, oldest first, while the partition holds more).
    pub retention_bytes: Option<u64>,
    /// Retention by age: a sealed segment is deleted once its newest batch was appended longer
    /// ago than this.
    pub retention_age: Option<Duration>,
}

/// The default of [`StorageConfig::max_producers_per_partition`]: 10 000.
pub const DEFAULT_MAX_PRODUCERS_PER_PARTITION: NonZeroUsize = NonZeroUsize::new(10_000).unwrap();

/// Broker-wide storage settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// The data directory (created if missing).
    pub data_dir: PathBuf,
    /// A segment is rolled (a new one started) when a batch would take it past this size.
    pub segment_bytes: u64,
    /// The default durability policy.
    pub fsync: FsyncPolicy,
    /// The default retention by size per partition; `None` keeps everything.
    pub retention_bytes: Option<u64>,
    /// The default retention by age; `None` keeps everything.
    pub retention_age: Option<Duration>,
    /// How often the background thread applies retention; `Duration::ZERO` turns background
    /// retention off (call [`Storage::enforce_retention`](super::Storage::enforce_retention)).
    pub retention_check_interval: Duration,
    /// Idempotent producers whose state a partition keeps; past it the least recently used
    /// is forgotten (protocol §6.2).
    pub max_producers_per_partition: NonZeroUsize,
}

impl StorageConfig {
    /// The defaults for a data directory: 256 MiB segments, `Interval(1 s)`, retention
    /// 7 days and unlimited size, checked every minute, 10 000 producers per partition.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            segment_bytes: 256 * 1024 * 1024,
            fsync: FsyncPolicy::default(),
            retention_bytes: None,
            retention_age: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_check_interval: Duration::from_secs(60),
            max_producers_per_partition: DEFAULT_MAX_PRODUCERS_PER_PARTITION,
        }
    }
}
