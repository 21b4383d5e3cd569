//! Storage errors. Their `Display` text goes on the wire as the error message, so every message
//! says what was wrong and with which value.

use std::io;
use std::path::PathBuf;

use streambus_core::ErrorCode;

/// An error from the [`Storage`](super::Storage) engine.
///
/// The first group is the caller's fault (a request naming something that doesn't exist or an
/// invalid value); [`Io`](Self::Io), [`Corrupt`](Self::Corrupt) and
/// [`DataDirLocked`](Self::DataDirLocked) are the broker's. [`error_code`](Self::error_code)
/// maps each to its v1 code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The topic does not exist.
    #[error("topic {topic} does not exist")]
    TopicNotFound {
        /// The topic asked for.
        topic: String,
    },
    /// The partition is at or beyond the topic's partition count.
    #[error("partition {partition} does not exist: topic {topic} has {count} partitions")]
    PartitionNotFound {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
        /// The topic's partition count.
        count: u32,
    },
    /// The offset is below the log start or above the high-water mark.
    #[error("offset {offset} is out of range: valid offsets are {start} to {end}")]
    OffsetOutOfRange {
        /// The offset asked for.
        offset: i64,
        /// The log start offset.
        start: i64,
        /// The high-water mark (the next offset to be assigned).
        end: i64,
    },
    /// The topic exists with another partition count.
    #[error("topic {topic} already exists with {partitions} partitions")]
    TopicExists {
        /// The topic.
        topic: String,
        /// Its existing partition count.
        partitions: u32,
    },
    /// The topic name is not 1–249 bytes of `[A-Za-z0-9._-]` (or is `.`/`..`).
    #[error(
        "invalid topic name {name:?} ({len} bytes): want 1-249 bytes of [A-Za-z0-9._-], not . or .."
    )]
    InvalidTopic {
        /// The name, cut to its first 64 characters.
        name: String,
        /// The name's length in bytes.
        len: usize,
    },
    /// The partition count is not in `1..=1024`.
    #[error("invalid partition count {count}: want 1 to {max}")]
    InvalidPartitionCount {
        /// The count asked for.
        count: u32,
        /// The largest count accepted.
        max: u32,
    },
    /// An appended batch's records exceed what one stored batch can hold (4 GiB).
    #[error("batch of {len} bytes is too large to store: at most {max} bytes")]
    BatchTooLarge {
        /// The batch's record bytes.
        len: usize,
        /// The largest batch accepted.
        max: usize,
    },
    /// The message at `offset` alone is larger than the fetch's hard limit.
    #[error("message at offset {offset} is {len} bytes, larger than the fetch limit of {limit}")]
    MessageTooLarge {
        /// The message's offset.
        offset: i64,
        /// Its record size.
        len: usize,
        /// The hard limit of the fetch.
        limit: u32,
    },
    /// Offsets would exceed `i64::MAX`.
    #[error("offset overflow: appending {count} messages at offset {end}")]
    OffsetOverflow {
        /// The current end offset.
        end: i64,
        /// The messages to append.
        count: u32,
    },
    /// A file of the data directory could not be read or written.
    #[error("storage I/O error: {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A metadata file or a sealed segment is inconsistent in a way recovery can't repair.
    #[error("storage corrupt: {}: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An fsync covering this batch failed earlier: it was written, but may not be on disk, and
    /// a later fsync succeeding proves nothing about it (the kernel reports a writeback error
    /// once).
    #[error(
        "storage I/O error: an fsync of {} covering offsets {from}..{to} failed ({reason}); this batch may not be on disk",
        dir.display()
    )]
    SyncFailed {
        /// The partition's directory.
        dir: PathBuf,
        /// The first offset the failed fsync covered.
        from: i64,
        /// The offset after the last one it covered.
        to: i64,
        /// The failure.
        reason: String,
    },
    /// Idempotent produce: the batch's sequence is not the next one expected from its producer
    /// (nor a retry of one of its last batches).
    #[error(
        "out of order sequence from producer {producer_id} epoch {epoch}: expected base sequence {expected}, received {received}"
    )]
    OutOfOrderSequence {
        /// The producer.
        producer_id: i64,
        /// The epoch the batch came with.
        epoch: i16,
        /// The sequence expected (0 for a new epoch).
        expected: i32,
        /// The batch's base sequence.
        received: i32,
    },
    /// Idempotent produce: no state for this producer (new, or forgotten) and the batch does
    /// not start at sequence 0.
    #[error(
        "unknown producer {producer_id}: no state on this partition, so its first batch must have base sequence 0, not {sequence}"
    )]
    UnknownProducer {
        /// The producer.
        producer_id: i64,
        /// The batch's base sequence.
        sequence: i32,
    },
    /// Idempotent produce: the batch's epoch is older than the producer's current one.
    #[error("producer {producer_id} epoch {epoch} is fenced: the current epoch is {current}")]
    InvalidProducerEpoch {
        /// The producer.
        producer_id: i64,
        /// The epoch the batch came with.
        epoch: i16,
        /// The producer's current epoch on this partition.
        current: i16,
    },
    /// A Raft log operation on a replicated partition that its log cannot take: an entry that
    /// does not follow the last one, a truncation of committed entries, a read of purged ones,
    /// or a Raft operation on a partition that is not a Raft log. The caller's (the
    /// replication layer's) fault, never a client's.
    #[error("raft log {}: {reason}", dir.display())]
    RaftLog {
        /// The partition's directory.
        dir: PathBuf,
        /// What was asked and why it cannot be done, with the indexes and offsets involved.
        reason: String,
    },
    /// Another process holds the data directory's lock.
    #[error("data directory {} is in use by another process", path.display())]
    DataDirLocked {
        /// The data directory.
        path: PathBuf,
    },
}

impl StorageError {
    /// The v1 error code for this error.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::TopicNotFound { .. } => ErrorCode::TOPIC_NOT_FOUND,
            Self::PartitionNotFound { .. } => ErrorCode::PARTITION_NOT_FOUND,
            Self::OffsetOutOfRange { .. } => ErrorCode::OFFSET_OUT_OF_RANGE,
            Self::TopicExists { .. } => ErrorCode::TOPIC_EXISTS,
            Self::InvalidTopic { .. } | Self::InvalidPartitionCount { .. } => {
                ErrorCode::INVALID_REQUEST
            }
            Self::OutOfOrderSequence { .. } => ErrorCode::OUT_OF_ORDER_SEQUENCE,
            Self::UnknownProducer { .. } => ErrorCode::UNKNOWN_PRODUCER,
            Self::InvalidProducerEpoch { .. } => ErrorCode::INVALID_PRODUCER_EPOCH,
            Self::BatchTooLarge { .. } | Self::MessageTooLarge { .. } => {
                ErrorCode::MESSAGE_TOO_LARGE
            }
            Self::OffsetOverflow { .. }
            | Self::Io { .. }
            | Self::Corrupt { .. }
            | Self::SyncFailed { .. }
            | Self::RaftLog { .. }
            | Self::DataDirLocked { .. } => ErrorCode::STORAGE_ERROR,
        }
    }

    pub(crate) fn invalid_topic(name: &str) -> Self {
        Self::InvalidTopic {
            name: name.chars().take(64).collect(),
            len: name.len(),
        }
    }
}

/// Attaches an operation and a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T, StorageError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T, StorageError> {
        self.map_err(|source| StorageError::Io {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}
